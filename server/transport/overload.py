"""How late the event loop runs: the signal for shedding new handshakes (README "Overload").

A timer asks to run every ``PERIOD``; how late it actually runs is the loop's lag. While the
last measurement is past the bound, new handshakes are refused at once (HTTP 503): the work
already admitted gets the CPU, and the refused clients learn it in milliseconds instead of
timing out in a queue.
"""

from __future__ import annotations

import asyncio
from typing import Final

from server import metrics

PERIOD: Final = 0.05


class LoopLag:
    def __init__(self, bound_s: float) -> None:
        self.bound_s = bound_s
        self.lag_s = 0.0
        self._worst = 0.0  # since the last gauge update
        self._ticks = 0
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0

    @property
    def lagging(self) -> bool:
        return self.bound_s > 0 and self.lag_s > self.bound_s

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._expected = loop.time() + PERIOD
        self._handle = loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.lag_s = max(now - self._expected, 0.0)
        self._worst = max(self._worst, self.lag_s)
        self._ticks += 1
        if self._ticks % 20 == 0:  # the gauge shows the worst lag of the last second
            metrics.LOOP_LAG.set(self._worst)
            self._worst = 0.0
        self._expected = now + PERIOD
        self._handle = loop.call_at(self._expected, self._tick)
