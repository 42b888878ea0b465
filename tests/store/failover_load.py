"""`fastmatch serve` on a replicated deployment under simulated load while its primary fails:
the scenario the Sentinel and the Cluster tests share (issue 11's "killing a primary under 150
players/s"), with the deployment's own way to fail and to wait for the new primary."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.config import DEV_SECRET
from server.sim.cli import DEFAULT_MIX
from server.sim.player import SimSettings, parse_mix
from server.sim.runner import RunConfig, run
from server.store import keys, sentinel
from tests.app.served import Served, http_get, sample, wait_workers
from tests.helpers import TIMEOUT

# Read by `serve`: the deadlines of the sim fault test (tests/sim/test_sim_faults.py), and the
# README's advice for Sentinel (a breaker whose probes come at least every 2 s, so service
# resumes within a probe of the failover; a subscriber back well within a ready check).
SERVE_ENV = {
    "FASTMATCH_SERVER__RESUME_GRACE_MS": "3000",
    "FASTMATCH_SERVER__HEARTBEAT_INTERVAL_S": "0.2",
    "FASTMATCH_SERVER__HEARTBEAT_TTL_S": "1",
    "FASTMATCH_SERVER__MAX_CONNECTIONS": "5000",
    "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000000",  # every simulated player is 127.0.0.1
    "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000000",
    "FASTMATCH_MATCHING__READY_TIMEOUT_MS": "2000",
    "FASTMATCH_MATCHING__FINISHED_MATCH_TTL_MS": "300",
    "FASTMATCH_GAMESERVER__ALLOCATION_TIMEOUT_MS": "1500",
    "FASTMATCH_REDIS__OPERATION_TIMEOUT_S": "0.5",
    "FASTMATCH_REDIS__BREAKER_COOLDOWN_S": "2",
    # A ready check committed while a worker's subscriber is away reaches its players when it
    # is back: its reconnect backoff stays well below the ready timeout.
    "FASTMATCH_REDIS__RECONNECT_MAX_S": "0.5",
}
RATE = 150.0  # players arriving per second
FAIL_AT_S = 5.0
DURATION_S = 12


@dataclass(frozen=True)
class Failed:
    """What the scenario measured: seconds from the fault to the new primary, and to the
    first match after it."""

    failover_s: float
    resumed_s: float


async def matches_created(served: Served) -> float:
    status, text = await http_get(served.metrics_port, "/metrics")
    assert status == 200
    return sample(text, "fastmatch_matches_created_total", mode="1v1") or 0.0


async def serve_through_a_failover(locator: str, env: dict[str, str], fail: Callable[[], object],
                                   wait: Callable[[], object]) -> Failed:
    """~150 players/s with the whole behaviour mix; ``fail`` (blocking) breaks the primary
    mid-run and ``wait`` (blocking) returns once the deployment has a new one. Matching must
    resume within 5 s of that without restarting fastmatch; the checker finds no player
    matched twice and no player stuck (the sim is not told of the fault: whatever the
    failover lost, the server must have said so); nothing is left in Redis after the graces,
    and a final batch is matched in full."""
    keys.configure(locator)  # this process reads Redis too (the checker)
    served = Served("", workers=2, **SERVE_ENV, **env).start()
    admin = sentinel.async_client(locator, decode_responses=True)
    try:
        await wait_workers(admin, 2)
        grace_s = 3.0
        settings = SimSettings(url=f"ws://127.0.0.1:{served.port}/ws", secret=DEV_SECRET,
                               lifetime_s=10, rating_sd=400, redis_url=locator,
                               resume_grace_s=grace_s, outcome_bound_s=2 + 1.5 + 5)
        cfg = RunConfig(settings=settings, redis_url=locator, rate=RATE, duration_s=DURATION_S,
                        mix=parse_mix(DEFAULT_MIX), leftover_wait_s=grace_s + 1 + 0.3 + 10,
                        final_batch=10)
        sim = asyncio.create_task(run(cfg))
        try:
            await asyncio.sleep(FAIL_AT_S)  # the schedule: the time is the event
            assert await matches_created(served) > 0, served.output()[-3000:]
            await asyncio.to_thread(fail)
            failed = time.monotonic()
            await asyncio.to_thread(wait)
            failover_s = time.monotonic() - failed
            # Every commit before the fault is counted by now (workers flush every 0.1 s), and
            # none can land between the fault and the promotion: the next one is matching resumed.
            before = await matches_created(served)
            try:
                async with asyncio.timeout(failover_s + 5 + TIMEOUT * 2):
                    while await matches_created(served) <= before:
                        await asyncio.sleep(0.05)
            except TimeoutError:
                raise AssertionError(f"no match within {time.monotonic() - failed:.1f}s of the "
                                     f"fault (new primary after {failover_s:.1f}s)\n"
                                     + served.output()[-6000:]) from None
            resumed_s = time.monotonic() - failed
            result = await sim
        finally:
            if not sim.done():
                sim.cancel()
                await asyncio.gather(sim, return_exceptions=True)
        assert resumed_s <= failover_s + 5, (resumed_s, failover_s)
        assert result.violations == [], (
            result.violations[:20], [p.trail for p in result.players if p.violations][:5],
            served.output()[-4000:])
        assert result.leftover_keys == []
        assert result.final_batch is not None
        assert result.final_batch.matched == result.final_batch.players == 10
        assert len(result.players) >= RATE * DURATION_S * 0.9
        assert served.proc is not None and served.proc.poll() is None  # never restarted
        return Failed(failover_s, resumed_s)
    finally:
        served.stop()
        await admin.aclose()
