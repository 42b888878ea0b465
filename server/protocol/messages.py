"""Every wire message of PROTOCOL.md sections 2 and 3, as msgspec Structs tagged on ``type``."""

from __future__ import annotations

from typing import Annotated, Final, Literal

import msgspec

PROTOCOL_VERSION: Final = 1

ShortStr = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
RequestId = Annotated[str, msgspec.Meta(max_length=128)]
StateName = Literal["idle", "queued", "loading"]


class _Client(msgspec.Struct, tag_field="type", frozen=True, kw_only=True):
    """Client -> server (PROTOCOL 2). Unknown extra fields are ignored for forward compatibility."""


class Enqueue(_Client, tag="enqueue", frozen=True):
    game_mode: ShortStr
    request_id: RequestId | None = None


class Dequeue(_Client, tag="dequeue", frozen=True):
    request_id: RequestId | None = None


class LoadingComplete(_Client, tag="loading_complete", frozen=True):
    loading_session_id: ShortStr
    request_id: RequestId | None = None


class Status(_Client, tag="status", frozen=True):
    request_id: RequestId | None = None


ClientMessage = Enqueue | Dequeue | LoadingComplete | Status


class _Server(msgspec.Struct, tag_field="type", frozen=True, kw_only=True, omit_defaults=True):
    """Server -> client (PROTOCOL 3). Optional fields are omitted when unset."""


class Welcome(_Server, tag="welcome", frozen=True):
    player_id: str
    state: StateName
    protocol: int  # always sent (PROTOCOL 3), hence no default for omit_defaults to drop
    game_mode: str | None = None
    loading_session_id: str | None = None
    # Extension (documented in README "Protocol extensions"): lets a resumed client show its wait.
    queued_at_ms: int | None = None


class Enqueued(_Server, tag="enqueued", frozen=True):
    game_mode: str
    queued_at_ms: int
    request_id: str | None = None


class Dequeued(_Server, tag="dequeued", frozen=True):
    game_mode: str
    reason: Literal["requested", "removed"]
    request_id: str | None = None


class StartLoading(_Server, tag="start_loading", frozen=True):
    loading_session_id: str
    game_mode: str
    teams: list[list[str]]
    deadline_ms: int


class MatchFound(_Server, tag="match_found", frozen=True):
    loading_session_id: str
    game_mode: str
    server_address: str
    server_session_id: str
    teams: list[list[str]]


RequeueReason = Literal[
    "player_left", "loading_timeout", "no_game_server", "allocation_failed", "server_shutdown"
]


class Requeued(_Server, tag="requeued", frozen=True):
    game_mode: str
    reason: RequeueReason
    queued_at_ms: int


class QueueStatus(_Server, tag="queue_status", frozen=True):
    state: StateName
    waited_ms: int
    queue_size: int
    search_window: float
    game_mode: str | None = None
    estimated_wait_ms: int | None = None
    request_id: str | None = None


class Error(_Server, tag="error", frozen=True):
    code: str
    message: str
    request_id: str | None = None
    retry_after_ms: int | None = None


ServerMessage = (
    Welcome | Enqueued | Dequeued | StartLoading | MatchFound | Requeued | QueueStatus | Error
)
