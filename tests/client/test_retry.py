"""The reconnect policy (docs/protocol.md section 7), as plain functions: no sockets needed."""

from __future__ import annotations

import random

import pytest

from server.client import retry
from server.client.errors import (
    ConnectionClosed,
    HandshakeRefused,
    NotFound,
    PlayerBlocked,
    RateLimited,
    ServiceUnavailable,
    SessionReplaced,
    TokenUnavailable,
    Unauthorized,
    Unavailable,
    error_for,
)
from server.protocol.messages import Error


def test_full_jitter_grows_to_the_cap_and_honours_the_server() -> None:
    rng = random.Random(1)
    first = [retry.delay(0, rng=rng) for _ in range(200)]
    assert min(first) >= 0 and max(first) <= retry.BASE_S
    late = [retry.delay(30, rng=rng) for _ in range(200)]
    assert max(late) <= retry.MAX_S and max(late) > retry.MAX_S / 2
    assert retry.delay(0, at_least=3.0, rng=rng) == 3.0


@pytest.mark.parametrize(("exc", "fresh", "wait"), [
    (OSError("refused"), False, 0.0),
    (TimeoutError(), False, 0.0),
    (ServiceUnavailable(503, "busy", 2.0), False, 2.0),
    (error_for(Error(code="unavailable", message="m", retry_after_ms=1500)), False, 1.5),
    (Unauthorized(401, "token expired"), False, None),  # the same token fails again
    (Unauthorized(401, "token expired"), True, 0.0),  # a token function may mint a fresh one
    (NotFound(404), False, None),
    (HandshakeRefused(502, "bad gateway"), False, 0.0),  # a proxy while the backends restart
    (HandshakeRefused(504, "", 3.0), False, 3.0),
    (HandshakeRefused(429, "slow down", 1.0), False, 1.0),
    (HandshakeRefused(400, "bad request"), False, None),
    (ConnectionClosed(1006), False, 0.0),
    (ConnectionClosed(1001), False, 0.0),
    (ConnectionClosed(1008), False, None),
    (SessionReplaced(4009), False, None),
    (error_for(Error(code="internal_error", message="m")), False, 0.0),
    (error_for(Error(code="player_blocked", message="m", retry_after_ms=9)), False, None),
    (error_for(Error(code="brand_new_code", message="m")), False, 0.0),  # like internal_error
    (TokenUnavailable("the token function failed"), True, 0.0),  # the token service may be back
])
def test_verdict(exc: BaseException, fresh: bool, wait: float | None) -> None:
    assert retry.verdict(exc, fresh) == wait


def test_error_classes_follow_the_code() -> None:
    assert isinstance(error_for(Error(code="rate_limited", message="m")), RateLimited)
    assert isinstance(error_for(Error(code="unavailable", message="m")), Unavailable)
    assert isinstance(error_for(Error(code="player_blocked", message="m")), PlayerBlocked)
    unknown = error_for(Error(code="brand_new_code", message="m"))
    assert type(unknown).__name__ == "ServerError" and unknown.message.code == "brand_new_code"
