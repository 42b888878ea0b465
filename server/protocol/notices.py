"""Facts the Lua scripts publish about players, and the client messages they become.

Scripts publish what happened (a match is loading, a match ended and each player's part in
it, a ticket was removed) to the delivery channel of each worker holding a recipient
(``lua/include/notify.lua``); this module is the one place that turns those facts into the
PROTOCOL 3 messages, so the wire format is written once, here and in ``messages.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final, Literal

import msgspec

from server.protocol.messages import (
    Dequeued,
    Error,
    MatchFound,
    Requeued,
    RequeueReason,
    ServerMessage,
    StartLoading,
)

TIMED_OUT_TEXT: Final = "the ready check ended before this client loaded; removed from matchmaking"


class _Notice(msgspec.Struct, tag_field="e", frozen=True, kw_only=True):
    mode: str


class Loading(_Notice, tag="loading", frozen=True):
    """A match was committed: its players start the ready check (``start_loading``)."""

    match: str
    teams: list[list[str]]
    deadline: int
    to: list[tuple[str, str]]  # (player, connection)


class Ended(_Notice, tag="ended", frozen=True):
    """A match ended; ``to`` says what became of each connected player."""

    match: str
    status: str
    reason: str
    to: list[tuple[str, str, Literal["requeued", "removed", "timed_out", "matched"], int]]
    server: str = ""  # assigned: the game server's address ...
    session: str = ""  # ... and session id
    teams: list[list[str]] = msgspec.field(default_factory=list)


class Removed(_Notice, tag="removed", frozen=True):
    """A ticket was taken out of the queue by the server (poison): ``dequeued{removed}``."""

    to: list[tuple[str, str]]


Notice = Loading | Ended | Removed


def messages(notice: Notice) -> Iterator[tuple[str, str, ServerMessage]]:
    """(player, connection, message) for every recipient of ``notice``."""
    match notice:
        case Loading():
            start = start_loading(notice)
            for player, conn in notice.to:
                yield player, conn, start
        case Removed():
            removed = Dequeued(game_mode=notice.mode, reason="removed")
            for player, conn in notice.to:
                yield player, conn, removed
        case Ended():
            for player, conn, what, queued_at in notice.to:
                yield player, conn, ending(notice, what, queued_at)


def start_loading(notice: Loading) -> StartLoading:
    return StartLoading(loading_session_id=notice.match, game_mode=notice.mode,
                        teams=notice.teams, deadline_ms=notice.deadline)


def ending(notice: Ended, what: str, queued_at: int) -> ServerMessage:
    """The message that tells one player ``what`` a match's end made of it."""
    if what == "requeued":
        reason: RequeueReason = notice.reason  # type: ignore[assignment]
        return Requeued(game_mode=notice.mode, reason=reason, queued_at_ms=queued_at)
    if what == "removed":
        return Dequeued(game_mode=notice.mode, reason="removed")
    if what == "timed_out":
        return Error(code="loading_timeout", message=TIMED_OUT_TEXT)
    return MatchFound(loading_session_id=notice.match, game_mode=notice.mode,
                      server_address=notice.server, server_session_id=notice.session,
                      teams=notice.teams)
