"""Connection caps that fit the process's file descriptor limit (README "Limits against hostile
clients").

A worker refuses handshakes past ``server.max_connections`` and closes new sockets past
``max_connections + max_pending_handshakes`` (connections still in their handshake, which a
client that never finishes its request could otherwise pile up). Both are only worth anything
below the descriptor limit: a worker that runs out of descriptors can accept nobody, reach
Redis or open a file. So the soft limit is raised as far as the caps need (up to the hard
limit, which only root can raise), and where even that is too low the caps shrink to fit.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from typing import Final

log = logging.getLogger(__name__)
# The worker's own descriptors: Redis and pub/sub connections, the listening socket, logs,
# pipes, the event loop's, the metrics files (about 30 when idle).
RESERVED: Final = 64


@dataclass(frozen=True, slots=True)
class Caps:
    connections: int  # open WebSocket connections; past it handshakes get 503
    sockets: int  # every TCP connection the worker holds; past it new ones are closed at once


def fit(max_connections: int, max_pending: int, descriptors: int) -> Caps:
    """The caps that fit in ``descriptors``: as configured when they do, else shrunk, keeping
    room for ``max_pending`` handshakes (at most half of what there is)."""
    room = max(descriptors - RESERVED, 2)
    if max_connections + max_pending <= room:
        return Caps(max_connections, max_connections + max_pending)
    return Caps(min(max_connections, max(room - max_pending, room // 2)), room)


def caps_for(max_connections: int, max_pending: int) -> Caps:
    """Raise this process's soft descriptor limit as far as the caps need, then fit them."""
    wanted = max_connections + max_pending + RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as exc:
            log.warning("could not raise the file descriptor limit to %d: %s", new, exc)
    caps = fit(max_connections, max_pending, wanted if soft == resource.RLIM_INFINITY else soft)
    if caps.connections < max_connections:
        log.warning("server.max_connections = %d does not fit the file descriptor limit (%d, "
                    "`ulimit -n`); this worker takes at most %d connections", max_connections,
                    soft, caps.connections)
    return caps
