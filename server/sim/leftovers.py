"""What a run may leave in Redis once every simulated player has left (DESIGN invariant 6).

The rule for keys is the store's (``keys.outlives_players``); what is judged here is what that
rule cannot see from a key's name: whose players a worker's set still holds, whether a worker
is still alive to hold them, and whether a key allowed to stay because it expires does expire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from typing import Final, cast

import redis.asyncio as aioredis

from server.store import keys

# Mode keys that may remain only because they expire by themselves (keys.py: a lease, a hold
# and its failure count); penalties are matched by prefix (:func:`_expires`).
_EXPIRING: Final = (":leader", ":hold", ":hold_failures")
_POLL_S: Final = 0.25


async def leftover_keys(admin: aioredis.Redis, wait_s: float,
                        simulated: Collection[str] = ()) -> list[str]:
    """DESIGN invariant 6: once every player left and the timeouts passed, nothing remains.

    Waits up to ``wait_s`` for the keys a player leaves to go, then also reports each key that
    may stay only because it expires but has no TTL (it would stay for good). ``simulated``:
    the run's player ids; any of them still in a worker's player set is a leaked member (on a
    server shared with real players, only the simulated ones are judged)."""
    deadline = time.monotonic() + wait_s
    while True:
        # SCAN, not KEYS: a cluster client sends KEYS to one node, and SCAN to every one. On a
        # cluster only fastmatch's slot (it may share the cluster with other data).
        names = [str(k) async for k in admin.scan_iter(keys.pattern(), count=1000)]
        found = sorted(k for k in names if not keys.outlives_players(k)) + await _dead_workers(admin, names)
        found += await _members_left(admin, names, simulated)
        if not found or time.monotonic() > deadline:
            # Waiting cannot mend a key without a TTL: asked once, at the end.
            return found + await _without_ttl(admin, names)
        await asyncio.sleep(_POLL_S)


async def _dead_workers(admin: aioredis.Redis, names: list[str]) -> list[str]:
    """What the registry and the per-worker player sets hold for workers that are gone: an
    entry past its heartbeat deadline, a set whose worker is not registered. Both may outlive
    the players only while their worker runs; a dead worker nobody reaped is a leak too."""
    seconds, micros = await admin.time()
    now_ms = seconds * 1000 + micros // 1000
    entries = cast(list[tuple[str, float]], await admin.zrange(keys.workers(), 0, -1, withscores=True))
    live = {w for w, deadline in entries if deadline > now_ms}
    out = [f"{keys.workers()} entry {w} (past its heartbeat deadline)"
           for w, deadline in entries if deadline <= now_ms]
    return out + sorted(k for k in names if (w := keys.players_worker(k)) is not None and w not in live)


async def _members_left(admin: aioredis.Redis, names: list[str], simulated: Collection[str]) -> list[str]:
    """Simulated players still in a worker's player set. A worker removes a player from its set
    when the connection ends, and Redis deletes a set once it is empty: a live worker's set may
    stay while it holds someone, but never one of the players who all left."""
    if not simulated:
        return []
    out = []
    for key in sorted(k for k in names if keys.players_worker(k) is not None):
        members = [str(m) async for m in admin.sscan_iter(key, count=1000)]
        out += [f"{key} member {m} (a simulated player, after every one left)"
                for m in sorted(members) if m in simulated]
    return out


async def _without_ttl(admin: aioredis.Redis, names: list[str]) -> list[str]:
    """Keys allowed to outlive the players because they expire, that will not (PTTL -1)."""
    out = []
    for key in sorted(k for k in names if _expires(k)):
        if await admin.pttl(key) == -1:
            out.append(f"{key} (no TTL: it would never expire)")
    return out


def _expires(key: str) -> bool:
    # keys.penalty("") ends in the empty hash tag "{}": what is before it is every penalty's prefix.
    return key.endswith(_EXPIRING) or key.startswith(keys.penalty("").removesuffix("{}"))
