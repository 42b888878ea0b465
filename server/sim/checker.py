"""Invariant checks on what simulated players heard (PROTOCOL 4, DESIGN invariants 1, 4, 5).

Per player: the received sequence (typed messages, as the client decoded them) must follow the
client-visible lifecycle, across the reconnects of a connection that ended unexpectedly. Across
players: everyone of a loading session heard the same teams and a consistent outcome, and no
player was matched twice.

A reconnect is checked against what the player knew before it: a queued player resumes with its
own ``queued_at_ms``, a loading one with its session (or learns it ended while it was away). A
ticket that is gone without the player being told (no ``dequeued``, no ``error``) is recorded in
:attr:`SequenceChecker.vanished` for the player to explain (a Redis restart that lost data, a
ready check it walked out of, a resume grace that ran out) or to report as a violation: the
checker itself cannot see those facts.
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
    acted_on,
)

# Ends of a session that say nothing about the match itself: this player went away.
ABSENT: Final = frozenset({"left", "walked_out", "dropped"})
# Errors after which a request may or may not have run (docs/protocol.md "Storage trouble").
_AMBIGUOUS: Final = frozenset({"unavailable", "internal_error"})


@dataclass
class SessionSeen:
    session: str
    teams: str  # canonical form, to compare across players; "" when resumed into it
    # match_found | requeued | loading_timeout | removed (told) | left (this player quit) |
    # walked_out (it quit, and never answered the ready check on any connection) |
    # dropped (its connection ended unexpectedly; it learned the end only from a welcome)
    outcome: str = ""


@dataclass
class SequenceChecker:
    """Feed every message a player receives, in order; collects violations."""

    player: str
    state: str = "connecting"  # connecting | welcome | idle | queued | loading
    queued_at: int | None = None  # of the current ticket, when known
    sessions: list[SessionSeen] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    matched: int = 0
    # Requests sent and not answered yet, and those answered by an error after which they may
    # have run all the same: either may show up as a state change nobody announced.
    pending: set[str] = field(default_factory=set)
    ambiguous: set[str] = field(default_factory=set)
    vanished: str = ""  # the ticket is gone and nobody said so: the player explains or flags it
    # The ready check a drop cut, when the welcome after it said idle: the match_found the
    # player missed while away may follow that welcome (the server keeps it for the grace).
    missed: str = ""

    def connected(self) -> None:
        self.state = "welcome"

    def sent(self, request: str) -> None:
        """The player sent ``enqueue`` or ``dequeue``."""
        self.pending.add(request)

    def received(self, msg: ServerMessage) -> None:
        if self.state == "welcome":
            if type(msg) is not Welcome:
                self._bad(f"first message {_tag(msg)}, not welcome")
                self.state = "idle"
                return
            self._take_welcome(msg)
            return
        missed, self.missed = self.missed, ""
        if type(msg) is MatchFound and missed and msg.loading_session_id == missed \
                and self.state == "idle":
            # Matched while away, told right after the welcome: as if it had stayed.
            self.state = "loading"
        _HANDLERS[type(msg)](self, msg)

    def resumed(self, welcome: Welcome) -> None:
        """The first message of a connection made after the previous one ended unexpectedly."""
        before, current = self.state, self.sessions[-1] if self.sessions else None
        # A request in flight when the connection ended may or may not have run.
        self.ambiguous |= self.pending
        self.pending.clear()
        same = welcome.state == "loading" and current is not None \
            and current.session == welcome.loading_session_id and before == "loading"
        self.missed = ""
        if before == "loading" and current is not None and not current.outcome and not same:
            current.outcome = "dropped"
            if welcome.state == "idle":
                self.missed = current.session
        if welcome.state != "idle" and before == "idle" and "enqueue" not in self.ambiguous:
            self._bad(f"resumed {welcome.state} without having asked to queue")
        if welcome.state == "queued" and before in ("queued", "loading") and self.queued_at \
                and welcome.queued_at_ms != self.queued_at:
            self._bad(f"resumed with queued_at {welcome.queued_at_ms}, was {self.queued_at}")
        if welcome.state == "idle" and before == "queued" and "dequeue" not in self.ambiguous:
            self.vanished = "resumed idle while queued"
        if same:
            self.state = "loading"
            self.ambiguous.clear()
            return
        keep = self.queued_at if before in ("queued", "loading") else None
        self._take_welcome(welcome)
        if welcome.state == "loading":
            self.queued_at = keep

    def _take_welcome(self, msg: Welcome) -> None:
        self.state = msg.state
        self.ambiguous.clear()
        self.queued_at = msg.queued_at_ms if msg.state == "queued" else None
        if msg.state == "loading":  # resumed into a ready check; teams not repeated
            self.sessions.append(SessionSeen(msg.loading_session_id or "", teams=""))

    def left(self, answering: bool = True) -> None:
        """This player closed its connection (by its behaviour); ``answering``: it answers
        ready checks (False: it never said ``loading_complete`` for any)."""
        if self.state == "loading" and self.sessions and not self.sessions[-1].outcome:
            self.sessions[-1].outcome = "left" if answering else "walked_out"
        self.state = "connecting"

    def _expect(self, *states: str, what: str) -> bool:
        if self.state not in states:
            self._bad(f"{what} while {self.state}")
            return False
        return True

    def _on_enqueued(self, msg: ServerMessage) -> None:
        assert isinstance(msg, Enqueued)
        self.pending.discard("enqueue")
        self.ambiguous.discard("enqueue")
        if self._expect("idle", what="enqueued"):
            self.state, self.queued_at = "queued", msg.queued_at_ms

    def _on_dequeued(self, msg: ServerMessage) -> None:
        assert isinstance(msg, Dequeued)
        asked = "dequeue" in self.pending or "dequeue" in self.ambiguous
        self.pending.discard("dequeue")
        self.ambiguous.discard("dequeue")
        # Told: the server took the ticket (or the ready check); a reason this checker does
        # not know reads as removed (docs/protocol.md 2).
        if msg.reason != "requested":
            if self._expect("queued", "loading", what="dequeued{removed}"):
                self._end_current("removed")
                self.state, self.queued_at = "idle", None
            return
        if self._expect("queued", what="dequeued"):
            if not asked:
                # What a worker sends when Redis no longer has a ticket it thought was there.
                self.vanished = "dequeued{requested} that was never asked for"
            self.state, self.queued_at = "idle", None

    def _on_start_loading(self, msg: ServerMessage) -> None:
        assert isinstance(msg, StartLoading)
        # An enqueue answered `unavailable` may have run: its `enqueued` may never come.
        states = ("queued", "idle") if "enqueue" in self.ambiguous else ("queued",)
        if self._expect(*states, what="start_loading"):
            self.state = "loading"
            self.ambiguous.discard("enqueue")
            teams = "|".join(",".join(sorted(t)) for t in msg.teams)
            if not any(self.player in team for team in msg.teams):
                self._bad("start_loading for a match this player is not in")
            self.sessions.append(SessionSeen(msg.loading_session_id, teams))

    def _end_session(self, msg: ServerMessage, outcome: str, next_state: str) -> None:
        if self.state != "loading":
            never = " (no start_loading: a ready check it was never told of)" \
                if self.state == "queued" else ""
            self._bad(f"{outcome} while {self.state}{never}")
            self.state = next_state  # what the server says now: check on from there
            return
        if not self.sessions:
            return
        current = self.sessions[-1]
        sid = msg.loading_session_id if type(msg) is MatchFound else None
        if sid is not None and sid != current.session:
            self._bad(f"{outcome} for {sid}, loading {current.session}")
        current.outcome = outcome
        self.state = next_state

    def _end_current(self, outcome: str) -> None:
        if self.state == "loading" and self.sessions and not self.sessions[-1].outcome:
            self.sessions[-1].outcome = outcome

    def _on_match_found(self, msg: ServerMessage) -> None:
        self._end_session(msg, "match_found", "idle")
        self.queued_at = None
        self.matched += 1
        if self.matched > 1:
            self._bad("matched twice")

    def _on_requeued(self, msg: ServerMessage) -> None:
        assert isinstance(msg, Requeued)
        if self.queued_at and msg.queued_at_ms != self.queued_at:
            self._bad(f"requeued with queued_at {msg.queued_at_ms}, was {self.queued_at}")
        self._end_session(msg, "requeued", "queued")
        self.queued_at = msg.queued_at_ms

    def _on_error(self, msg: ServerMessage) -> None:
        assert isinstance(msg, Error)
        code = acted_on(msg.code)
        if code == "loading_timeout":
            self._end_session(msg, "loading_timeout", "idle")
            self.queued_at = None
        elif code in _AMBIGUOUS:
            self.ambiguous |= self.pending
            self.pending.clear()
        elif code == "already_in_queue":
            asked = "enqueue" in self.pending or "enqueue" in self.ambiguous
            self.pending.discard("enqueue")
            self.ambiguous.discard("enqueue")
            if self.state == "idle" and asked:  # an earlier, ambiguous enqueue did run
                self.state, self.queued_at = "queued", None
        elif code == "not_in_queue":
            ran = "dequeue" in self.ambiguous  # an earlier dequeue refused `unavailable` did run
            self.pending.discard("dequeue")
            self.ambiguous.discard("dequeue")
            if self.state == "queued":
                if not ran:
                    self.vanished = "not_in_queue while queued"
                self.state, self.queued_at = "idle", None
        elif code in ("player_blocked", "unsupported_game_mode"):
            self.pending.discard("enqueue")

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


def cross_check(players: Iterable[tuple[str, list[SessionSeen]]], epochs_ordered: bool = False) -> list[str]:
    """All players of a session saw the same teams and no contradictory outcome; no match was
    found while one of its players had walked out of the ready check (and not come back to
    it); nobody was in two matches that were found (unless it missed the first,
    disconnected); and nobody was put into a ready check it never heard of after or beside a
    match it was found in (its ticket must have gone with that match)."""
    by_session: dict[str, list[tuple[str, SessionSeen]]] = defaultdict(list)
    own: dict[tuple[str, str], str] = {}
    for player, sessions in players:
        for seen in sessions:
            by_session[seen.session].append((player, seen))
            own[player, seen.session] = seen.outcome
    problems = []
    found_in: dict[str, list[str]] = defaultdict(list)
    unheard: dict[str, list[str]] = defaultdict(list)  # member -> sessions naming it, unseen
    for session, entries in by_session.items():
        if len({s.teams for _, s in entries if s.teams}) > 1:
            problems.append(f"session {session}: players saw different teams")
        outcomes = {s.outcome for _, s in entries if s.outcome and s.outcome not in ABSENT}
        if "match_found" in outcomes and len(outcomes) > 1:
            problems.append(f"session {session}: some players matched, others {sorted(outcomes)}")
        teams = next((s.teams for _, s in entries if s.teams), "")
        members = list(filter(None, teams.replace("|", ",").split(",")))
        if "match_found" in outcomes:
            walked = [m for m in members if own.get((m, session)) == "walked_out"]
            if walked:  # it never answered: the ready check could not pass (one that answered
                # and then left may lose the race to the assignment: either outcome is fine)
                problems.append(f"session {session}: matched though {', '.join(walked)} left it")
            for member in members:
                found_in[member].append(session)
        for member in members:
            if (member, session) not in own:
                unheard[member].append(session)
    for member, found in found_in.items():
        problems += _matched_twice(member, found, own, unheard.get(member, []), epochs_ordered)
    return problems


def _matched_twice(member: str, found: list[str], own: dict[tuple[str, str], str],
                   unheard: list[str], epochs_ordered: bool) -> list[str]:
    problems = []
    counted = [s for s in found if own.get((member, s)) not in ABSENT]
    if len(counted) > 1:
        problems.append(f"{member}: in {len(counted)} matches found: {', '.join(sorted(counted))}")
    # A ready check formed after the one it was matched in: its ticket outlived the match.
    # (One formed before may have ended while the player was away and back in time.)
    later = [s for s in unheard if any(_formed_after(s, m, epochs_ordered) for m in found
                                       if own.get((member, m)) == "match_found")]
    if later:
        problems.append(f"{member}: put into {', '.join(sorted(later))} after it was matched")
    return problems


def _formed_after(session: str, other: str, epochs_ordered: bool = False) -> bool:
    """Was ``session`` formed after ``other``? Ids are ``<epoch>.<leader tag>.<tick>.<n>``: a
    leader's tag is its own and its ticks only grow, so one leader's ticks compare. Across
    leaders the lease epochs do (each acquisition increments them), but only with
    ``epochs_ordered``: they start over when Redis loses its data (a restart without it).
    Anything else: False (no order to trust)."""
    a, b = session.split("."), other.split(".")
    if len(a) != 4 or len(b) != 4 or not all(x.isdigit() for x in (a[0], a[2], b[0], b[2])):
        return False
    if a[1] == b[1]:
        return int(a[2]) > int(b[2])
    return epochs_ordered and int(a[0]) > int(b[0])


def missed_matches(players: Iterable[tuple[str, list[SessionSeen]]]) -> int:
    """Matches found for a player whose connection had ended: it learned only from its next
    welcome that it was no longer loading (no message can reach a player that is away)."""
    found = set()
    absent = []
    for _, sessions in players:
        for seen in sessions:
            if seen.outcome == "match_found":
                found.add(seen.session)
            elif seen.outcome == "dropped":
                absent.append(seen.session)
    return sum(1 for session in absent if session in found)
