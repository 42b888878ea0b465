"""Every wire message of PROTOCOL.md sections 2 and 3, as msgspec Structs tagged on ``type``."""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, get_args

import msgspec

PROTOCOL_VERSION: Final = 1

ShortStr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
RequestId = Annotated[str, msgspec.Meta(max_length=128)]
StateName = Literal["idle", "queued", "loading"]


def known(values: Any, meaning: str) -> msgspec.Meta:
    """For a string field whose values a newer server may add to (a reason, an error code):
    this server sends only ``values`` (the JSON Schema lists them as ``x-known-values``), and
    a client accepts any other as ``meaning`` says, instead of failing to read the message."""
    listed = list(get_args(values))
    return msgspec.Meta(description=f"{', '.join(listed)}; {meaning}",
                        extra_json_schema={"x-known-values": listed})


class _Client(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    """Client -> server (PROTOCOL 2). Unknown extra fields are ignored for forward compatibility."""


class Enqueue(_Client, tag="enqueue", frozen=True):
    """Join the queue of a configured game mode; answered with `enqueued` or `error`."""

    game_mode: ShortStr
    request_id: RequestId | None = None


class Dequeue(_Client, tag="dequeue", frozen=True):
    """Leave the queue; answered with `dequeued` or `error`."""

    request_id: RequestId | None = None


class LoadingComplete(_Client, tag="loading_complete", frozen=True):
    """The ready-check answer. No direct answer on success: `match_found` or `requeued` follows."""

    loading_session_id: ShortStr
    request_id: RequestId | None = None


class Status(_Client, tag="status", frozen=True):
    """Ask for `queue_status`."""

    request_id: RequestId | None = None


ClientMessage = Enqueue | Dequeue | LoadingComplete | Status


class _Server(msgspec.Struct, tag_field="type", frozen=True, kw_only=True, omit_defaults=True):
    """Server -> client (PROTOCOL 3). Optional fields are omitted when unset."""


class Welcome(_Server, tag="welcome", frozen=True):
    """First message on every connection; shows the state resumed after a reconnect."""

    player_id: str
    state: StateName
    protocol: int  # always sent (PROTOCOL 3), hence no default for omit_defaults to drop
    game_mode: str | None = None
    loading_session_id: str | None = None
    # Extension (docs/protocol.md section 11): lets a resumed client show its wait.
    queued_at_ms: int | None = None


class Enqueued(_Server, tag="enqueued", frozen=True):
    """The player entered the queue (also sent late, without request_id, after a timed-out enqueue
    that took effect)."""

    game_mode: str
    queued_at_ms: int
    request_id: str | None = None


DequeueReason = Literal["requested", "removed"]


class Dequeued(_Server, tag="dequeued", frozen=True):
    """The player left the queue: on request, or removed by the server (`reason: removed`)."""

    game_mode: str
    reason: Annotated[str, known(DequeueReason, "clients treat an unknown reason like removed")]
    request_id: str | None = None


class StartLoading(_Server, tag="start_loading", frozen=True):
    """A match was formed: load, then send `loading_complete` before `deadline_ms`."""

    loading_session_id: str
    game_mode: str
    teams: list[list[str]]
    deadline_ms: int


class MatchFound(_Server, tag="match_found", frozen=True):
    """Every player is ready and a game server accepted the match: connect there."""

    loading_session_id: str
    game_mode: str
    server_address: str
    server_session_id: str
    teams: list[list[str]]


RequeueReason = Literal[
    "player_left", "loading_timeout", "no_game_server", "allocation_failed", "server_shutdown"
]


class Requeued(_Server, tag="requeued", frozen=True):
    """The match fell through, not by this player's fault: back in the queue, same place."""

    game_mode: str
    reason: Annotated[str, known(RequeueReason, "clients treat an unknown reason like any other: "
                                                "back in the queue, same place")]
    queued_at_ms: int


class QueueStatus(_Server, tag="queue_status", frozen=True):
    """The answer to `status`."""

    state: StateName
    waited_ms: int
    queue_size: int
    search_window: float
    game_mode: str | None = None
    estimated_wait_ms: int | None = None
    request_id: str | None = None
    # Extension (docs/protocol.md section 11): why the mode forms no matches right now, e.g.
    # "game_server" while no game server can take one; the player keeps its place and wait.
    waiting_for: str | None = None


ErrorCodeName = Literal[
    "invalid_message", "unsupported_game_mode", "already_in_queue", "not_in_queue",
    "wrong_session_id", "invalid_state", "loading_timeout", "player_blocked", "rate_limited",
    "unavailable", "internal_error",
]
ErrorCode = Annotated[str, known(ErrorCodeName, "clients treat an unknown code like internal_error")]
_KNOWN_CODES: Final = frozenset(get_args(ErrorCodeName))


def acted_on(code: str) -> str:
    """An error code as a client acts on it: one it does not know (a newer server's) reads as
    ``internal_error``, i.e. the request may or may not have run (docs/protocol.md section 2)."""
    return code if code in _KNOWN_CODES else "internal_error"


class Error(_Server, tag="error", frozen=True):
    """A request failed, or the player was removed (`loading_timeout`)."""

    code: ErrorCode
    message: str
    request_id: str | None = None
    retry_after_ms: int | None = None


ServerMessage = (
    Welcome | Enqueued | Dequeued | StartLoading | MatchFound | Requeued | QueueStatus | Error
)
