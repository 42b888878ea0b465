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
    """Parse one WebSocket frame. Binary frames are bad input: the protocol is JSON text."""
    if not isinstance(frame, str):
        raise BadMessage("binary frames are not accepted; send JSON text frames")
    try:
        message: ClientMessage = _decoder.decode(frame)
        return message
    except msgspec.ValidationError as exc:
        raise BadMessage(f"invalid message: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadMessage(f"malformed JSON: {exc}") from exc


def encode(message: ServerMessage) -> str:
    # Text frames must carry str; the encoder's output is ASCII-safe UTF-8.
    return _encoder.encode(message).decode()
