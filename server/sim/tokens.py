"""Development tokens for simulated players, minted at a few microseconds each.

The same HS256 JWTs as ``fastmatch token`` (``server.protocol.auth.mint_token``), and verified by
the server with PyJWT like any other, but signed with a prepared HMAC instead of a fresh PyJWT
encode per player (~27 us): a load run mints one per arriving player, and the load generator's
own CPU per lifecycle is one of the figures it reports.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Final

import msgspec

_encoder: Final = msgspec.json.Encoder()


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class TokenMinter:
    def __init__(self, secret: str, ttl_s: int = 3600) -> None:
        self._mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
        self._header = _b64(b'{"alg":"HS256","typ":"JWT"}') + b"."
        self.ttl_s = ttl_s

    def mint(self, player: str, mmr: float | None = None, now: float | None = None) -> str:
        issued = int(now if now is not None else time.time())
        claims: dict[str, object] = {"sub": player, "iat": issued, "exp": issued + self.ttl_s}
        if mmr is not None:
            claims["mmr"] = mmr
        signing = self._header + _b64(_encoder.encode(claims))
        mac = self._mac.copy()
        mac.update(signing)
        return (signing + b"." + _b64(mac.digest())).decode()
