"""Repeated log lines of one kind, aggregated per interval (README "Logging").

A client, an outage or an attacker can make the same warning happen thousands of times a
second; the log must stay readable and bounded while the metrics keep the exact counts. The
first occurrence in an interval is logged as it happens; the others are counted, and one line
per interval says how many there were, with the first one's text as the example.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

DEFAULT_INTERVAL_S: Final = 10.0
_all: list[Throttled] = []


class Throttled:
    def __init__(
        self, logger: logging.Logger, kind: str, *, level: int = logging.WARNING,
        interval_s: float = DEFAULT_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.kind = kind
        self.level = level
        self.interval_s = interval_s
        self.clock = clock
        self._opened = -interval_s  # start of the current interval
        self._more = 0  # occurrences after the first in this interval
        self._example = ""
        _all.append(self)

    def __call__(self, message: str, *args: object, exc_info: bool | BaseException = False) -> None:
        """Log ``message % args`` now if it is the first of its interval, else count it.
        ``exc_info``: the first of each interval carries the traceback."""
        now = self.clock()
        if now - self._opened < self.interval_s:
            if not self._more:
                self._example = message % args if args else message
            self._more += 1
            return
        self._summarise(now)
        self._opened = now
        if self.logger.isEnabledFor(self.level):
            self.logger.log(self.level, "%s: " + message, self.kind, *args, exc_info=exc_info)

    def _summarise(self, now: float) -> None:
        if self._more:
            self.logger.log(self.level, "%s: %d more in %.1fs (e.g. %s)", self.kind,
                            self._more, now - self._opened, self._example)
            self._more = 0
            self._example = ""

    def flush_if_due(self) -> None:
        """Write the summary of an interval that has ended (its repeats would otherwise wait
        for the next occurrence, which may never come)."""
        now = self.clock()
        if self._more and now - self._opened >= self.interval_s:
            self._summarise(now)
            self._opened = -self.interval_s  # the next occurrence is logged as it happens


def flush_due() -> None:
    """Summarise every interval that has ended (each process calls it periodically)."""
    for throttled in _all:
        throttled.flush_if_due()
