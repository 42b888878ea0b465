"""Opening a client: ``await connect(...)`` or ``async with connect(...) as client``."""

from __future__ import annotations

import ssl as ssl_module
from collections.abc import Generator
from typing import Any

from server.client.client import Client, Token


class Connecting:
    """``await connect(...)`` gives a connected :class:`Client`; ``async with connect(...) as
    client`` also closes it at the end of the block."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def _open(self) -> Client:
        await self.client._connect()
        return self.client

    async def __aenter__(self) -> Client:
        return await self._open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.close()


def connect(
    url: str, token: Token, *, auto_ready: bool = False, reconnect: bool = True,
    resume_grace_s: float = 10.0, token_in_query: bool = False, open_timeout_s: float = 10.0,
    close_timeout_s: float = 5.0, ssl: ssl_module.SSLContext | None = None,
    ping_interval_s: float | None = 20.0, ping_timeout_s: float = 20.0,
) -> Connecting:
    """Open a connection for the player the ``token`` names (a string, or a function returning
    one, called again for every reconnect) and wait for its ``welcome``.

    ``token_in_query`` sends it as ``?token=`` instead of ``Authorization: Bearer``.
    ``ping_interval_s``: a connection the server has been silent on this long is pinged, and
    dropped (then resumed) when nothing arrives within ``ping_timeout_s``; None disables it.
    Raises :class:`HandshakeRefused` (HTTP status), :class:`ServerError` (e.g. ``Unavailable``
    or ``RateLimited`` at connect), :class:`ConnectionClosed`, ``OSError`` or ``TimeoutError``.
    """
    return Connecting(Client(
        url, token, auto_ready=auto_ready, reconnect=reconnect, resume_grace_s=resume_grace_s,
        token_in_query=token_in_query, open_timeout_s=open_timeout_s,
        close_timeout_s=close_timeout_s, ssl=ssl, ping_interval_s=ping_interval_s,
        ping_timeout_s=ping_timeout_s,
    ))


