"""Decode client frames, encode server messages. The decoder raises only :class:`BadMessage`."""

from __future__ import annotations

from typing import Final

import msgspec

from server.errors import FastmatchError
from server.protocol.messages import ClientMessage, ServerMessage

_decoder: Final = msgspec.json.Decoder(ClientMessage)
_encoder: Final = msgspec.json.Encoder()


class BadMessage(FastmatchError):
    """A frame that is not a valid client message (PROTOCOL 5: `invalid_message`)."""


def decode(frame: str | bytes) -> ClientMessage:
    """Parse one WebSocket frame. Binary frames are bad input: the protocol is JSON text.

    Whatever goes wrong is bad input (PROTOCOL 5), never a crash: msgspec raises
    DecodeError/ValidationError for what it recognises, RecursionError for JSON nested past
    the interpreter's limit (even inside a field that would be ignored), and other errors for
    input it cannot even read (UnicodeEncodeError for a ``str`` holding lone surrogates)."""
    if not isinstance(frame, str):
        raise BadMessage("binary frames are not accepted; send JSON text frames")
    try:
        message: ClientMessage = _decoder.decode(frame)
        return message
    except msgspec.ValidationError as exc:
        raise BadMessage(f"invalid message: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadMessage(f"malformed JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadMessage("malformed JSON: nested too deeply") from exc
    except Exception as exc:
        # Broad on purpose: this parses hostile input, and a failure we did not foresee must
        # still be `invalid_message` (counted against the budget), not a 1011 and a traceback.
        raise BadMessage(f"unreadable text ({type(exc).__name__})") from exc


def encode(message: ServerMessage) -> bytes:
    """One server message as the UTF-8 payload of a text frame."""
    return _encoder.encode(message)
