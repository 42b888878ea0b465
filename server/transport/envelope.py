"""Messages on each worker's delivery channel (DESIGN "Routing and delivery").

Two senders: another worker (``Replace``: close a connection a newer one replaced) and the Lua
scripts (``Notices``: facts about this worker's players, turned into client messages by
``server/protocol/notices.py``).
"""

from __future__ import annotations

from typing import Final

import msgspec

from server.protocol.notices import Notice


class _Envelope(msgspec.Struct, tag_field="kind", frozen=True, kw_only=True):
    pass


class Replace(_Envelope, tag="replace", frozen=True):
    """Close ``conn`` with 4009: the player connected again elsewhere (PROTOCOL 1)."""

    player: str
    conn: str


class Notices(_Envelope, tag="notices", frozen=True):
    """What the scripts changed for connections this worker holds, in Redis' order."""

    events: list[Notice]


Envelope = Replace | Notices

_decoder: Final = msgspec.json.Decoder(Envelope)
_encoder: Final = msgspec.json.Encoder()


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(data: bytes) -> Envelope:
    """Raises msgspec.DecodeError/ValidationError on garbage; the subscriber logs and drops it."""
    envelope: Envelope = _decoder.decode(data)
    return envelope
