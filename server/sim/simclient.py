"""fastmatch's client, observed: what a simulated player's connection went through.

:class:`ObservedClient` is :class:`server.client.Client` with its wire callbacks (the
``wire.Handler`` protocol) noted on the way through, so a run can say when each connection ended
unexpectedly, how many attempts were refused and why, and which ``welcome`` opened a new
connection. Reconnecting itself is the client's: full-jitter backoff within the resume grace
(``server/client/retry.py``), exactly as any other user of the client gets it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from ssl import SSLContext

import msgspec

from server.client import Client, FastmatchClientError, HandshakeRefused, Welcome
from server.client.wire import Data

Clock = Callable[[], float]


class _Refusal(msgspec.Struct):
    code: str = "?"


_refusal = msgspec.json.Decoder(_Refusal)


class ObservedClient(Client):
    """A client that keeps ``events``: ``(t, what)`` with ``what`` one of ``drop:<code>`` (a
    connection ended that the player did not end), ``refused:<why>`` (an attempt failed) and
    ``asked:<what>`` (the player closed or cut it on purpose); the player adds its own."""

    def __init__(self, url: str, mint: Callable[[], str], clock: Clock, *, auto_ready: bool,
                 resume_grace_s: float, ssl: SSLContext | None = None) -> None:
        super().__init__(url, self._token, auto_ready=auto_ready, reconnect=True,
                         resume_grace_s=resume_grace_s, ssl=ssl)
        self._mint = mint
        self._clock = clock
        self.events: list[tuple[float, str]] = []
        self.attempts = 0
        self.asked = ""  # set by the player before it closes or drops the connection itself
        self.fresh: deque[Welcome] = deque()  # welcomes that opened a connection, in order
        self._refused = False  # the current attempt's failure is noted already

    def _token(self) -> str:
        """Called once per connection attempt, the first one and every reconnect."""
        self.attempts += 1
        self._refused = False
        return self._mint()

    def note(self, what: str) -> None:
        self.events.append((round(self._clock(), 3), what))

    def note_refused(self, why: str) -> None:
        if not self._refused:
            self._refused = True
            self.note(f"refused:{why}")

    # -- wire.Handler ---------------------------------------------------------------------------

    def failed(self, exc: FastmatchClientError | OSError) -> None:
        self.note_refused(f"http {exc.status}" if isinstance(exc, HandshakeRefused)
                          else type(exc).__name__)
        super().failed(exc)

    def frame(self, data: Data) -> None:
        fresh = not self.connected
        super().frame(data)
        if not fresh:
            return
        if self.connected and self.welcome is not None:
            self.fresh.append(self.welcome)
        else:  # refused at connect: error{unavailable} (or internal_error), then 1011
            try:
                self.note_refused(_refusal.decode(data).code)
            except msgspec.DecodeError:
                self.note_refused("undecodable")

    def closed(self, code: int, reason: str) -> None:
        live = self.connected
        super().closed(code, reason)
        if live:
            self.note(f"asked:{self.asked}" if self.asked else f"drop:{code}")
            self.asked = ""
        else:
            self.note_refused(f"close {code}")
