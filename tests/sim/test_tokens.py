"""The simulator's fast token minter makes tokens the server accepts, with the same claims."""

from __future__ import annotations

import jwt

from server.config import DEV_SECRET, AuthConfig
from server.protocol.auth import TokenVerifier, mint_token
from server.sim.tokens import TokenMinter


def test_minted_tokens_verify_like_fastmatch_token() -> None:
    fast = TokenMinter(DEV_SECRET).mint("sim1-7", 1480, now=1_900_000_000)
    slow = mint_token(DEV_SECRET, "sim1-7", 1480, ttl_s=3600, now=1_900_000_000)
    options = {"verify_exp": False, "verify_iat": False}
    assert jwt.decode(fast, DEV_SECRET, ["HS256"], options=options) == jwt.decode(
        slow, DEV_SECRET, ["HS256"], options=options)
    identity = TokenVerifier(AuthConfig(secret=DEV_SECRET)).verify(TokenMinter(DEV_SECRET).mint("p", 1510))
    assert identity.player_id == "p" and identity.rating("1v1", 0) == 1510
