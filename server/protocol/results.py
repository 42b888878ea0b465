"""What a request's run in storage came to: the store returns these, the session consumes them.

One typed hand-over (``Session.complete(request, result)``) instead of outcome strings mapped
onto a method each. The store layer imports this module (it points inward); the session
never sees Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.protocol.messages import StateName


@dataclass(frozen=True, slots=True)
class PlayerState:
    """A player's matchmaking state as Redis has it."""

    state: StateName
    mode: str = ""
    queued_at_ms: int = 0
    match_id: str = ""  # the loading session while state is "loading"


@dataclass(frozen=True, slots=True)
class MatchView:
    """A loading session's record as Redis keeps it (while it loads, and
    ``matching.finished_match_ttl_ms`` after it ended): what a player who missed its notices
    needs to be told."""

    match_id: str
    mode: str
    status: str  # loading | assigned | cancelled | timed_out | failed | aborted
    reason: str = ""
    teams: list[list[str]] = field(default_factory=list)
    deadline_ms: int = 0
    server_address: str = ""
    server_session_id: str = ""


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    outcome: Literal["ok", "replaced", "gone", "already", "blocked"]
    queued_at_ms: int = 0
    current: PlayerState | None = None  # with "already": where the player is
    retry_after_ms: int = 0  # with "blocked"


@dataclass(frozen=True, slots=True)
class DequeueResult:
    outcome: Literal["ok", "replaced", "gone", "not_in_queue", "invalid_state"]
    mode: str = ""


@dataclass(frozen=True, slots=True)
class ReadyResult:
    """A player's `loading_complete` recorded; the last of a match also starts the handoff."""

    outcome: Literal["unknown", "replaced", "gone", "wrong_session", "final", "ready", "allocating"]
    status: str = ""  # with "final": how the match ended
    deadline_ms: int = 0  # with "allocating": the game server must answer by then ...
    teams: list[list[str]] = field(default_factory=list)
    tickets: dict[str, bytes] = field(default_factory=dict)  # ... for the battle_request
    created_ms: int = 0


@dataclass(frozen=True, slots=True)
class StatusResult:
    """The player's state, its queue's size and the Redis clock, read at once."""

    player: PlayerState
    queue_size: int
    now_ms: int
    waiting_for: str = ""  # why the player's mode forms no matches now (issue 16), if it does not


@dataclass(frozen=True, slots=True)
class Failed:
    """The request did not (knowingly) happen: storage unavailable, or an internal error."""

    code: Literal["unavailable", "internal_error"]
    message: str
    retry_after_ms: int | None = None
    # It may have run after all (a timeout after sending): the front end reads the player back
    # and the session holds server messages until then (``Session.resync``).
    unsettled: bool = False


Result = EnqueueResult | DequeueResult | ReadyResult | StatusResult | Failed
