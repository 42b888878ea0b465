"""Circuit breaker for Redis (DESIGN safety device P2), sans I/O: the caller passes the clock.

closed --threshold consecutive failures--> open --cooldown--> half-open --probe ok--> closed
                                             ^                     |
                                             +----probe failed-----+
While open (and while a half-open probe is in flight) calls are refused at once, so a hung or
dead Redis costs clients an immediate `unavailable` instead of a timeout each.
"""

from __future__ import annotations

from enum import IntEnum


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, threshold: int = 5, cooldown_s: float = 60.0) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._opened_at = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        """May a call go ahead now? In half-open, exactly one probe is let through."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.cooldown_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probing = False
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_after_s(self, now: float) -> float:
        if self.state is BreakerState.OPEN:
            return max(self.cooldown_s - (now - self._opened_at), 0.0)
        return 0.0

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._probing = False

    def abandon(self) -> None:
        """A call that ``allow`` let through ended without an answer from Redis (cancelled, or
        it never got a connection): if it was the half-open probe, the next call probes."""
        self._probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._opened_at = now
            self._probing = False
