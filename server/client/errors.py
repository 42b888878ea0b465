"""Everything the client raises, under one root (docs/protocol.md "Errors" and "Close codes").

Three families:

- :class:`HandshakeRefused`: the server answered the WebSocket handshake with an HTTP status
  instead of ``101`` (401 bad token, 404 wrong path, 426 not a WebSocket request, 503 shedding
  load or shutting down, with ``Retry-After``).
- :class:`ServerError` and one subclass per ``error.code`` (``AlreadyInQueue``,
  ``PlayerBlocked``, ...): the server answered a request, or told the client, with ``error``.
- :class:`ConnectionClosed`: the WebSocket ended; ``code`` is the close code (4009 raises the
  subclass :class:`SessionReplaced`).
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

from server.protocol.messages import Error


class CloseCode(IntEnum):
    """Close codes fastmatch sends (docs/protocol.md "Close codes")."""

    NORMAL = 1000
    GOING_AWAY = 1001  # server shutdown or drain: reconnect, to this or another host
    ABNORMAL = 1006  # no close frame: the TCP connection just ended (never sent on the wire)
    POLICY = 1008  # too many invalid messages
    TOO_BIG = 1009  # a frame over max_message_bytes
    INTERNAL = 1011  # storage unavailable at the handshake, or an internal error
    RATE_LIMITED = 4008  # flooding after error{rate_limited}
    SESSION_REPLACED = 4009  # another connection of the same player won


class FastmatchClientError(Exception):
    """Root of every exception this client raises."""


class NotConnected(FastmatchClientError):
    """A request was made while no connection is open (closed, or reconnecting)."""


class TokenUnavailable(FastmatchClientError):
    """The token function raised, or returned something other than a string (its exception
    is the ``__cause__``). While resuming it is retried like a network failure, until the
    grace ends: the service that mints tokens may be down for a moment too."""


class HandshakeRefused(FastmatchClientError):
    """The HTTP upgrade was answered with ``status`` instead of 101 Switching Protocols."""

    def __init__(self, status: int, body: str = "", retry_after_s: float | None = None) -> None:
        super().__init__(f"handshake refused with HTTP {status}: {body.strip() or 'no reason'}")
        self.status = status
        self.body = body
        self.retry_after_s = retry_after_s


class Unauthorized(HandshakeRefused):
    """HTTP 401: the token is missing, expired, badly signed or malformed."""


class NotFound(HandshakeRefused):
    """HTTP 404: the URL's path is not ``/ws``."""


class UpgradeRequired(HandshakeRefused):
    """HTTP 426: the request reached ``/ws`` without a WebSocket upgrade."""


class ServiceUnavailable(HandshakeRefused):
    """HTTP 503: the server sheds load or is shutting down; retry after ``retry_after_s``."""


_BY_STATUS: Final[dict[int, type[HandshakeRefused]]] = {
    401: Unauthorized, 404: NotFound, 426: UpgradeRequired, 503: ServiceUnavailable,
}


def handshake_refused(status: int, body: str, retry_after_s: float | None) -> HandshakeRefused:
    return _BY_STATUS.get(status, HandshakeRefused)(status, body, retry_after_s)


class ConnectionClosed(FastmatchClientError):
    """The connection ended with close ``code`` (1006: no close frame) and ``reason``."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"connection closed with {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class SessionReplaced(ConnectionClosed):
    """Close 4009: the same player connected again elsewhere; that connection has the state."""


def connection_closed(code: int, reason: str = "") -> ConnectionClosed:
    cls = SessionReplaced if code == CloseCode.SESSION_REPLACED else ConnectionClosed
    return cls(code, reason)


class ServerError(FastmatchClientError):
    """An ``error`` message; the subclass names its ``code``, unknown codes get this class."""

    code = ""

    def __init__(self, message: Error) -> None:
        super().__init__(f"{message.code}: {message.message}")
        self.message = message
        self.code = message.code  # this class's own for known codes; the server's for others

    @property
    def request_id(self) -> str | None:
        return self.message.request_id

    @property
    def retry_after_ms(self) -> int | None:
        return self.message.retry_after_ms


class InvalidMessage(ServerError):
    """A frame the server could not use: malformed JSON, unknown type, wrong field types."""

    code = "invalid_message"


class UnsupportedGameMode(ServerError):
    """``enqueue`` named a game mode the server does not run."""

    code = "unsupported_game_mode"


class AlreadyInQueue(ServerError):
    """``enqueue`` while queued, loading, or while another enqueue is in flight."""

    code = "already_in_queue"


class NotInQueue(ServerError):
    """``dequeue`` while not queued."""

    code = "not_in_queue"


class WrongSessionId(ServerError):
    """``loading_complete`` for a loading session other than this player's current one."""

    code = "wrong_session_id"


class InvalidState(ServerError):
    """The request does not fit the player's state (``dequeue`` while loading, ``loading_complete``
    with no ready check running)."""

    code = "invalid_state"


class LoadingTimeout(ServerError):
    """This player did not send ``loading_complete`` before the deadline and was removed."""

    code = "loading_timeout"


class PlayerBlocked(ServerError):
    """Too many dodged ready checks recently; ``enqueue`` again after ``retry_after_ms``."""

    code = "player_blocked"


class RateLimited(ServerError):
    """Too many messages (or new connections from this address); slow down."""

    code = "rate_limited"


class Unavailable(ServerError):
    """Matchmaking storage is unreachable; retry after ``retry_after_ms``."""

    code = "unavailable"


class InternalError(ServerError):
    """The server failed to handle the request."""

    code = "internal_error"


ERROR_CLASSES: Final[dict[str, type[ServerError]]] = {
    cls.code: cls for cls in (
        InvalidMessage, UnsupportedGameMode, AlreadyInQueue, NotInQueue, WrongSessionId,
        InvalidState, LoadingTimeout, PlayerBlocked, RateLimited, Unavailable, InternalError,
    )
}


def error_for(message: Error) -> ServerError:
    """The exception for an ``error`` message (for errors read from the message stream)."""
    return ERROR_CLASSES.get(message.code, ServerError)(message)
