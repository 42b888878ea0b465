"""Invariant checks on what simulated players heard (PROTOCOL 4, DESIGN invariants 1, 4, 5).

Per player: the received sequence (typed messages, as the client decoded them) must follow the
client-visible lifecycle. Across players: everyone of a loading session heard the same teams and
a consistent outcome, and no player was matched twice.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from server.protocol.messages import (
    Dequeued,
    Enqueued,
    Error,
    MatchFound,
    QueueStatus,
    Requeued,
    ServerMessage,
    StartLoading,
    Welcome,
)


@dataclass
class SessionSeen:
    session: str
    teams: str  # canonical form, to compare across players
    outcome: str = ""  # match_found | requeued | loading_timeout | left (this player quit)


@dataclass
class SequenceChecker:
    """Feed every message a player receives, in order; collects violations."""

    player: str
    state: str = "connecting"
    sessions: list[SessionSeen] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    matched: int = 0

    def connected(self) -> None:
        self.state = "welcome"

    def received(self, msg: ServerMessage) -> None:
        if self.state == "welcome":
            if type(msg) is not Welcome:
                self._bad(f"first message {_tag(msg)}, not welcome")
                self.state = "idle"
                return
            self.state = msg.state
            if self.state == "loading":  # resumed into a ready check; teams not repeated
                self.sessions.append(SessionSeen(msg.loading_session_id or "", teams=""))
            return
        _HANDLERS[type(msg)](self, msg)

    def left(self) -> None:
        """This player closed its connection (by its behaviour)."""
        if self.state == "loading" and self.sessions and not self.sessions[-1].outcome:
            self.sessions[-1].outcome = "left"
        self.state = "connecting"

    def _expect(self, *states: str, what: str) -> bool:
        if self.state not in states:
            self._bad(f"{what} while {self.state}")
            return False
        return True

    def _on_enqueued(self, msg: ServerMessage) -> None:
        if self._expect("idle", what="enqueued"):
            self.state = "queued"

    def _on_dequeued(self, msg: ServerMessage) -> None:
        if self._expect("queued", what="dequeued"):
            self.state = "idle"

    def _on_start_loading(self, msg: ServerMessage) -> None:
        assert isinstance(msg, StartLoading)
        if self._expect("queued", what="start_loading"):
            self.state = "loading"
            teams = "|".join(",".join(sorted(t)) for t in msg.teams)
            if not any(self.player in team for team in msg.teams):
                self._bad("start_loading for a match this player is not in")
            self.sessions.append(SessionSeen(msg.loading_session_id, teams))

    def _end_session(self, msg: ServerMessage, outcome: str, next_state: str) -> None:
        if not self._expect("loading", what=outcome) or not self.sessions:
            return
        current = self.sessions[-1]
        sid = msg.loading_session_id if type(msg) is MatchFound else None
        if sid is not None and sid != current.session:
            self._bad(f"{outcome} for {sid}, loading {current.session}")
        current.outcome = outcome
        self.state = next_state

    def _on_match_found(self, msg: ServerMessage) -> None:
        self._end_session(msg, "match_found", "idle")
        self.matched += 1
        if self.matched > 1:
            self._bad("matched twice")

    def _on_requeued(self, msg: ServerMessage) -> None:
        self._end_session(msg, "requeued", "queued")

    def _on_error(self, msg: ServerMessage) -> None:
        assert isinstance(msg, Error)
        if msg.code == "loading_timeout":
            self._end_session(msg, "loading_timeout", "idle")

    def _on_queue_status(self, msg: ServerMessage) -> None:
        pass

    def _on_welcome(self, msg: ServerMessage) -> None:
        self._bad("welcome in the middle of a connection")

    def _bad(self, why: str) -> None:
        self.violations.append(f"{self.player}: {why}")


def _tag(msg: ServerMessage) -> str:
    return str(msg.__struct_config__.tag)


_HANDLERS: Final[dict[type, Callable[[SequenceChecker, ServerMessage], None]]] = {
    Welcome: SequenceChecker._on_welcome, Enqueued: SequenceChecker._on_enqueued,
    Dequeued: SequenceChecker._on_dequeued, StartLoading: SequenceChecker._on_start_loading,
    MatchFound: SequenceChecker._on_match_found, Requeued: SequenceChecker._on_requeued,
    QueueStatus: SequenceChecker._on_queue_status, Error: SequenceChecker._on_error,
}


def cross_check(players: Iterable[tuple[str, list[SessionSeen]]]) -> list[str]:
    """All players of a session saw the same teams and no contradictory outcome."""
    by_session: dict[str, list[tuple[str, SessionSeen]]] = defaultdict(list)
    for player, sessions in players:
        for seen in sessions:
            by_session[seen.session].append((player, seen))
    problems = []
    for session, entries in by_session.items():
        if len({s.teams for _, s in entries if s.teams}) > 1:
            problems.append(f"session {session}: players saw different teams")
        outcomes = {s.outcome for _, s in entries if s.outcome and s.outcome != "left"}
        if "match_found" in outcomes and len(outcomes) > 1:
            problems.append(f"session {session}: some players matched, others {sorted(outcomes)}")
    return problems
