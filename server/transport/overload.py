"""Shedding new handshakes past capacity (README "Overload").

``LoopLag``: a timer asks to run every ``PERIOD``; how late it actually runs is the loop's lag.
While the last measurement is past the bound (or too many upgrades wait for Redis), new
handshakes are refused at once (HTTP 503): the work already admitted gets the CPU, and the
refused clients learn it in milliseconds instead of timing out in a queue. ``Shed``: the
connections accepted meanwhile are refused for a few microseconds each, not through the whole
WebSocket machinery. ``RetryHint``: the Retry-After those refusals carry grows with the
share of handshakes refused.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import time
from collections.abc import Callable
from typing import Final, Protocol, cast

from server import metrics
from server.transport.tcpinfo import since_last_data_s

PERIOD: Final = 0.05


class LoopLag:
    def __init__(self, bound_s: float, every_second: Callable[[], None] | None = None) -> None:
        self.bound_s = bound_s
        self._every_second = every_second  # also run once a second, on the same timer
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
        # Armed again first: were a gauge write below to raise, lag_s would freeze (above the
        # bound: every handshake refused for good).
        self._expected = now + PERIOD
        self._handle = loop.call_at(self._expected, self._tick)
        if self._ticks % 20 == 0:  # the gauge shows the worst lag of the last second
            metrics.LOOP_LAG.set(self._worst)
            self._worst = 0.0
            if self._every_second is not None:
                self._every_second()


class RetryHint:
    """The ``Retry-After`` of a worker's 503s: ``base_s`` while it refuses few handshakes,
    ``base_s / (1 - share)`` when it refuses ``share`` of them, at most ``max_s``.

    Every refused client comes back after Retry-After. With a fixed second, a worker offered k
    times what it admits refuses each waiting player about once a second for as long as it
    waits, and the refusals take CPU from the players it serves (the retry storm in README
    "Performance"). A wait that grows as 1 / (1 - share) brings the retries down towards
    the rate it admits, and back to ``base_s`` once it catches up. The share is counted per
    ``WINDOW_S`` and smoothed (each window weighs half): one busy second does not send clients
    away for long, a sustained overload is answered within a few windows.
    """

    WINDOW_S: Final = 1.0
    MIN_SEEN: Final = 10

    __slots__ = ("_admitted", "_clock", "_refused", "_share", "_until", "base_s", "max_s", "value")

    def __init__(self, base_s: int, max_s: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self.value = base_s  # the header's current seconds
        self._clock = clock
        self._share = 0.0
        self._admitted = 0
        self._refused = 0
        self._until = clock() + self.WINDOW_S
        metrics.RETRY_AFTER.set(base_s)

    @property
    def share(self) -> float:
        """The smoothed share of handshakes refused (0..1), as of the last window."""
        return self._share

    def admitted(self) -> None:
        self.tick()  # the handshake that closes a window belongs to the next one
        self._admitted += 1

    def refused(self) -> None:
        self.tick()
        self._refused += 1

    def tick(self) -> None:
        """Close the window if it is over (also from the worker's periodic timer, handshakes
        or not: an idle worker's hint and gauge come back to the base by themselves)."""
        if self._clock() >= self._until:
            self._roll()

    def _roll(self) -> None:
        now = self._clock()
        # A few handshakes are no storm: a window with fewer than MIN_SEEN counts as if it had
        # MIN_SEEN (one refusal in an idle second is a tenth, not all).
        seen = max(self._admitted + self._refused, self.MIN_SEEN)
        share = 0.5 * self._share + 0.5 * self._refused / seen
        # The windows since, with no handshake at all (an idle worker), count as none refused.
        idle = int((now - self._until) / self.WINDOW_S)
        self._share = share * 0.5 ** idle
        self._admitted = self._refused = 0
        self._until = now + self.WINDOW_S
        if self.base_s and self.max_s > self.base_s:
            # Rounded to the nearest second: at base 1, under a third refused is still 1 s.
            wait = self.base_s / max(1.0 - self._share, self.base_s / self.max_s)
            self.value = min(max(int(wait + 0.5), self.base_s), self.max_s)
        metrics.RETRY_AFTER.set(self.value)


class Shedder(Protocol):
    """What a ``Shed`` connection asks of the front end that accepted it."""

    def retry_after(self, reason: str) -> int: ...
    @property
    def open_timeout_s(self) -> float: ...
    def shed_reason(self, waited_s: float) -> str: ...
    def shed_refused(self, reason: str) -> None: ...
    def shed_ended(self, shed: Shed) -> None: ...
    def adopt(self, transport: asyncio.Transport, data: bytes, open_timeout_s: float) -> None: ...


class Shed(asyncio.Protocol):
    """A plain (ws://) connection accepted while its worker sheds load.

    Refusing through the whole WebSocket machinery costs a protocol object, websockets' HTTP
    parser and response builder per refused client: at twice the capacity that is work the
    loop takes from the players it serves, and every refusal waits behind it. This reads the
    request's bytes until the blank line that ends it (a WebSocket upgrade has no body, so
    nothing is left unread to turn the close into a reset), and if it asks for the WebSocket
    path and the worker still sheds, answers the prebuilt 503, the same bytes websockets
    would write. Anything else (``/health``, ``/ready``, a request past ``MAX_HEAD``, one that
    is no longer shed) is handed to a full connection with the bytes read so far, so it gets
    exactly the answer it would have had.
    """

    __slots__ = ("_accepted_at", "_buffer", "_front", "_timer", "_transport")

    def __init__(self, front: Shedder) -> None:
        self._front = front
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._accepted_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        self._accepted_at = loop.time()
        self._timer = loop.call_later(self._front.open_timeout_s, self._transport.abort)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        # Only the new bytes (and the three before them) can complete the blank line.
        end = buffer.find(b"\r\n\r\n", max(len(buffer) - len(data) - 3, 0))
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._hand_over()
            return
        transport = self._transport
        assert transport is not None
        waited = since_last_data_s(transport)
        reason = self._front.shed_reason(waited or 0.0) if end + 4 == len(buffer) else ""
        if not reason or not _plain_upgrade(buffer):
            self._hand_over()
            return
        self.refuse(reason)
        if waited is not None:
            metrics.observe(metrics.HANDSHAKE_WAIT, waited, "503")

    def refuse(self, reason: str) -> None:
        """Answer the 503 now and close (also on the worker's shutdown, request read or not)."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._front.shed_refused(reason)
        transport.write(busy_response(reason, self._front.retry_after(reason)))
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()

    def _hand_over(self) -> None:
        transport = self._transport
        self._ended()
        if transport is not None and not transport.is_closing():
            # The open timeout runs from the accept, not from the hand-over.
            remaining = self._accepted_at + self._front.open_timeout_s - asyncio.get_running_loop().time()
            self._front.adopt(transport, bytes(self._buffer), remaining)

    def _ended(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._front.shed_ended(self)


MAX_HEAD: Final = 8192  # a longer request head goes to websockets, which bounds and answers it
WS_PATHS: Final = frozenset({b"/ws", b"/ws/"})  # frontend.WS_PATHS, as the bytes on the wire
MAX_HEADERS: Final = 128  # websockets' (http11.MAX_NUM_HEADERS)


def _plain_upgrade(head: bytearray) -> bool:
    """Whether the head is plainly an upgrade request for a WebSocket path: ``GET`` over
    HTTP/1.1, at most ``MAX_HEADERS`` header lines, no body announced. Anything else goes to
    websockets, which answers it its own way (a malformed request line is closed without an
    answer, too many headers get an error status)."""
    lines = bytes(head).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1":
        return False
    if len(lines) - 3 > MAX_HEADERS:  # the request line and the blank line's two empty parts
        return False
    for line in lines[1:]:
        if line.partition(b":")[0].strip().lower() in (b"content-length", b"transfer-encoding"):
            return False
    return parts[1].partition(b"?")[0] in WS_PATHS


@functools.lru_cache(maxsize=2)
def _http_date(second: int) -> bytes:
    return email.utils.formatdate(second, usegmt=True).encode()


def busy_response(reason: str, retry_after_s: int) -> bytes:
    """The 503 that websockets' ``reject`` plus a Retry-After header would write."""
    body = b"server busy (%s); retry later\n" % reason.encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nDate: %s\r\nConnection: close\r\n"
            b"Content-Length: %d\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Retry-After: %d\r\n\r\n%s" % (_http_date(int(time.time())), len(body),
                                                retry_after_s, body))
