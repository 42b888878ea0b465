"""fastmatch's Python client (docs/protocol.md; README "Clients").

    from server.client import connect, MatchFound

    async with connect("ws://127.0.0.1:8080/ws", token, auto_ready=True) as client:
        await client.enqueue("1v1")
        async for message in client:
            if isinstance(message, MatchFound):
                print(message.server_address)
                break

Messages are the Structs of :mod:`server.protocol.messages`, the one definition of the wire
format; errors are the exceptions of :mod:`server.client.errors`, under
:class:`FastmatchClientError`.
"""

from server.client.client import Client, Token
from server.client.connect import Connecting, connect
from server.client.errors import (
    AlreadyInQueue,
    CloseCode,
    ConnectionClosed,
    FastmatchClientError,
    HandshakeRefused,
    InternalError,
    InvalidMessage,
    InvalidState,
    LoadingTimeout,
    NotConnected,
    NotFound,
    NotInQueue,
    PlayerBlocked,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    SessionReplaced,
    TokenUnavailable,
    Unauthorized,
    Unavailable,
    UnsupportedGameMode,
    UpgradeRequired,
    WrongSessionId,
    error_for,
)
from server.protocol.messages import (
    Dequeue,
    Dequeued,
    Enqueue,
    Enqueued,
    Error,
    LoadingComplete,
    MatchFound,
    QueueStatus,
    Requeued,
    ServerMessage,
    StartLoading,
    Status,
    Welcome,
)

__all__ = [
    "AlreadyInQueue",
    "Client",
    "CloseCode",
    "Connecting",
    "ConnectionClosed",
    "Dequeue",
    "Dequeued",
    "Enqueue",
    "Enqueued",
    "Error",
    "FastmatchClientError",
    "HandshakeRefused",
    "InternalError",
    "InvalidMessage",
    "InvalidState",
    "LoadingComplete",
    "LoadingTimeout",
    "MatchFound",
    "NotConnected",
    "NotFound",
    "NotInQueue",
    "PlayerBlocked",
    "QueueStatus",
    "RateLimited",
    "Requeued",
    "ServerError",
    "ServerMessage",
    "ServiceUnavailable",
    "SessionReplaced",
    "StartLoading",
    "Status",
    "Token",
    "TokenUnavailable",
    "Unauthorized",
    "Unavailable",
    "UnsupportedGameMode",
    "UpgradeRequired",
    "Welcome",
    "WrongSessionId",
    "connect",
    "error_for",
]
