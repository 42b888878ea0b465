"""Game-server messages over Redis pub/sub (PROTOCOL 7)."""

from __future__ import annotations

from typing import Final

import msgspec


class PlayerInfo(msgspec.Struct, frozen=True):
    mmr: float
    attrs: dict[str, str | int | float] = msgspec.field(default_factory=dict)


class BattleRequest(msgspec.Struct, tag="battle_request", tag_field="type", frozen=True, kw_only=True):
    match_id: str
    game_mode: str
    teams: list[list[str]]
    players: dict[str, PlayerInfo]
    reply_to: str
    deadline_ms: int


class BattleAssigned(msgspec.Struct, tag="battle_assigned", tag_field="type", frozen=True, kw_only=True):
    match_id: str
    server_address: str
    server_session_id: str


class BattleRejected(msgspec.Struct, tag="battle_rejected", tag_field="type", frozen=True, kw_only=True):
    match_id: str
    reason: str = ""


BattleReply = BattleAssigned | BattleRejected

_request_decoder: Final = msgspec.json.Decoder(BattleRequest)
_reply_decoder: Final = msgspec.json.Decoder(BattleReply)
_encoder: Final = msgspec.json.Encoder()


def encode(message: BattleRequest | BattleReply) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> BattleRequest:
    """Raises msgspec.DecodeError or msgspec.ValidationError on a malformed request."""
    request: BattleRequest = _request_decoder.decode(data)
    return request


def decode_reply(data: bytes) -> BattleReply:
    """Raises msgspec.DecodeError or msgspec.ValidationError on a malformed reply."""
    reply: BattleReply = _reply_decoder.decode(data)
    return reply
