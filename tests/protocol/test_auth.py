"""Token verification (PROTOCOL 1): claims, ratings, and every way a token can be wrong."""

from __future__ import annotations

import jwt
import pytest

from server.config import DEV_SECRET, AuthConfig
from server.protocol.auth import AuthError, TokenVerifier, mint_token

verifier = TokenVerifier(AuthConfig())


def test_round_trip_with_rating_and_attrs() -> None:
    ident = verifier.verify(mint_token(DEV_SECRET, "p.1:x-y", 1800, attrs={"region": "eu"}))
    assert ident.player_id == "p.1:x-y" and ident.rating("1v1", 1500) == 1800
    assert ident.attrs == {"region": "eu"}


def test_per_mode_rating_and_default() -> None:
    tok = jwt.encode({"sub": "p", "exp": 2**40, "mmr": {"5v5": 2100}}, DEV_SECRET)
    ident = verifier.verify(tok)
    assert ident.rating("5v5", 1500) == 2100 and ident.rating("1v1", 1500) == 1500
    assert verifier.verify(mint_token(DEV_SECRET, "q")).rating("1v1", 1234) == 1234


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": "p"},  # no exp
        {"exp": 2**40},  # no sub
        {"sub": "bad id!", "exp": 2**40},
        {"sub": "x" * 65, "exp": 2**40},
        {"sub": "p", "exp": 2**40, "mmr": "high"},
        {"sub": "p", "exp": 2**40, "mmr": True},
        {"sub": "p", "exp": 2**40, "mmr": 10**400},  # past a float: OverflowError, not 401
        {"sub": "p", "exp": 2**40, "mmr": 5e307},  # finite, but team sums would overflow
        {"sub": "p", "exp": 2**40, "mmr": {"2v2": -2e9}},
        {"sub": "p", "exp": 2**40, "mmr": {"1v1": -(10**400)}},
        {"sub": "p", "exp": 2**40, "attrs": {"level": 10**400}},
        {"sub": "alice\n", "exp": 2**40},  # `$` would have let the newline through
        {"sub": "p", "exp": 2**40, "attrs": {"k": {"nested": 1}}},
        {"sub": "p", "exp": 100},  # expired
    ],
)
def test_bad_claims_are_rejected(claims: dict[str, object]) -> None:
    with pytest.raises(AuthError):
        verifier.verify(jwt.encode(claims, DEV_SECRET))


def test_wrong_secret_and_algorithm_none_are_rejected() -> None:
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(mint_token("another-secret-of-sufficient-length!", "p"))
    unsigned = jwt.encode({"sub": "p", "exp": 2**40}, key=None, algorithm="none")
    with pytest.raises(AuthError):
        verifier.verify(unsigned)
    with pytest.raises(AuthError, match="missing"):
        verifier.verify(None)
