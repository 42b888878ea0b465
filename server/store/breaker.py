"""Circuit breaker for Redis (DESIGN safety device P2), sans I/O: the caller passes the clock.

closed --threshold consecutive failures--> open --probe answered--> closed
                                            ^  |
                                            +--+ probe failed: next probe after twice the wait

While open, calls are refused at once, so a hung or dead Redis costs clients an immediate
`unavailable` instead of a timeout each. Recovery does not wait for user traffic or for the
whole cooldown: the client runs one probe (a no-op write on its own connection) when ``probe_due``,
first ``probe_initial_s`` after opening, then doubling up to ``cooldown_s``, and the first
answer closes the breaker. The seed plan's 60 s is thus the longest wait between probes, not
the time a healthy Redis is ignored (issue 17: a 2 s restart cost a minute of refusals).
"""

from __future__ import annotations

from enum import IntEnum


class BreakerState(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1  # open, with a probe in flight
    OPEN = 2


class CircuitBreaker:
    def __init__(self, threshold: int, cooldown_s: float, probe_initial_s: float) -> None:
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.probe_initial_s = min(probe_initial_s, cooldown_s) if cooldown_s > 0 else 0.0
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._wait_s = self.probe_initial_s
        self._probe_at = 0.0

    def allow(self, now: float) -> bool:
        """May a call go ahead now? Only while closed: the probe decides when it reopens."""
        return self.state is BreakerState.CLOSED

    def retry_after_s(self, now: float) -> float:
        """How long a refused client should wait: until the next probe could close it."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        return max(self._probe_at - now, 0.0)

    def probe_due(self, now: float) -> bool:
        """Open, and the next probe may go now (the caller then reports its outcome)."""
        if self.state is BreakerState.OPEN and now >= self._probe_at:
            self.state = BreakerState.HALF_OPEN
            return True
        return False

    @property
    def closed(self) -> bool:
        return self.state is BreakerState.CLOSED

    @property
    def next_probe_at(self) -> float:
        return self._probe_at

    def success(self) -> None:
        """Redis answered (a call or the probe): close."""
        self.state = BreakerState.CLOSED
        self.failures = 0
        self._wait_s = self.probe_initial_s

    def probe_failed(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self._wait_s = min(self._wait_s * 2, self.cooldown_s) if self._wait_s else self.cooldown_s
        self._probe_at = now + self._wait_s

    def failure(self, now: float) -> None:
        """A call failed for Redis' reasons (timeout, connection lost, LOADING...)."""
        self.failures += 1
        if self.state is BreakerState.CLOSED and self.failures >= self.threshold:
            self.state = BreakerState.OPEN
            self._wait_s = self.probe_initial_s
            self._probe_at = now + self._wait_s
