"""Messages between workers over each worker's delivery channel (DESIGN "Routing and delivery")."""

from __future__ import annotations

from typing import Final

import msgspec

from server.protocol.messages import ServerMessage


class _Envelope(msgspec.Struct, tag_field="kind", frozen=True, kw_only=True):
    pass


class Replace(_Envelope, tag="replace", frozen=True):
    """Close ``conn`` with 4009: the player connected again elsewhere (PROTOCOL 1)."""

    player: str
    conn: str


class Item(msgspec.Struct, frozen=True, kw_only=True):
    player: str
    conn: str
    message: ServerMessage


class Deliver(_Envelope, tag="deliver", frozen=True):
    """Server messages for connections this worker holds; each changes that session's state."""

    items: list[Item]


Envelope = Replace | Deliver

_decoder: Final = msgspec.json.Decoder(Envelope)
_encoder: Final = msgspec.json.Encoder()


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def decode(data: bytes) -> Envelope:
    """Raises msgspec.DecodeError/ValidationError on garbage; the subscriber logs and drops it."""
    envelope: Envelope = _decoder.decode(data)
    return envelope
