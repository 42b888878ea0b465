"""When to reconnect, and how long to wait first (docs/protocol.md section 7, "Client reconnect
policy"). Plain functions of the failure, no I/O: the client's resume loop asks them."""

from __future__ import annotations

import random
from typing import Final

from server.client.errors import (
    ERROR_CLASSES,
    ConnectionClosed,
    FastmatchClientError,
    HandshakeRefused,
    RateLimited,
    ServerError,
    TokenUnavailable,
    Unauthorized,
    Unavailable,
)

# Closes after which the same player may simply come back: a drain, a network failure,
# storage trouble at connect, a restart. Never 1000, 1008, 1009, 4008 or 4009.
RESUMABLE: Final = frozenset({1001, 1006, 1011, 1012, 1013, 1014})
BASE_S: Final = 0.1
MAX_S: Final = 2.0


def delay(attempt: int, at_least: float = 0.0, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(MAX_S, BASE_S * 2**attempt)], but at least what the server
    asked for (``Retry-After``, ``retry_after_ms``)."""
    cap = min(MAX_S, BASE_S * 2 ** min(attempt, 16))
    return max((rng or random).uniform(0, cap), at_least)


def verdict(exc: BaseException, fresh_token: bool) -> float | None:
    """After a failed reconnect attempt: the least wait before the next one, or None to give up.

    ``fresh_token``: the token comes from a function, so a 401 may be fixed by the next call.
    """
    wait: float | None
    if isinstance(exc, OSError | TimeoutError | TokenUnavailable):
        wait = 0.0
    elif isinstance(exc, Unavailable | RateLimited):
        wait = (exc.retry_after_ms or 0) / 1000  # what the server asked for
    elif isinstance(exc, HandshakeRefused) and (exc.status == 429 or 500 <= exc.status < 600):
        # The server's own 503 (shedding load, draining), or an HTTP-aware proxy in front (a
        # 502 while the backends restart, a 504, a 429): passing, after its Retry-After.
        wait = exc.retry_after_s or 0.0
    elif isinstance(exc, Unauthorized):
        wait = 0.0 if fresh_token else None
    elif isinstance(exc, ConnectionClosed):
        wait = 0.0 if exc.code in RESUMABLE else None
    elif isinstance(exc, ServerError):
        # An unknown code counts as internal_error (docs/protocol.md section 5).
        wait = 0.0 if exc.code == "internal_error" or exc.code not in ERROR_CLASSES else None
    elif isinstance(exc, FastmatchClientError):
        wait = None
    else:
        raise exc
    return wait
