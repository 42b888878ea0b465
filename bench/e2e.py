"""`make bench`, end to end: the figures DESIGN.md's performance targets name.

1. the load generator's own ceiling (the same client against a trivial echo server);
2. the highest sustainable lifecycle rate (2 workers, Redis, the reference game server and the
   generator on this machine), found in 10 s steps, then held for 60 s with every check on;
3. idle connections: 20,000 held across 2 workers, server memory per connection;
4. a 100,000-player pool: one TryMatch tick, and the longest single Redis call (SLOWLOG).
Prints a table and writes reports/bench-e2e.json. Every figure is measured by this run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from server.config import load_config
from server.osutil import machine
from server.protocol.auth import mint_token
from server.sim import report
from server.sim.echo import ceiling_in_process
from server.sim.launch import served
from server.sim.player import SimSettings
from server.sim.runner import RunConfig, RunResult, check, merge, run
from server.sim.stats import rss_bytes
from server.store import keys

CONFIG = load_config(environ=dict(os.environ))
PROCS = 2


def _part(cfg: RunConfig) -> RunResult:
    return asyncio.run(run(cfg))


def sim(url: str, redis_url: str, rate: float, seconds: float, full_checks: bool) -> dict[str, Any]:
    # Equal ratings: every player is matchable at once, so the latencies measure the system,
    # not how long the skill window takes to cover an outlier (that is policy, not speed).
    settings = SimSettings(url=url, secret=CONFIG.auth.secret, lifetime_s=15, rating_sd=0)
    cfg = RunConfig(settings=settings, redis_url=redis_url, rate=rate, duration_s=seconds,
                    mix={"normal": 1.0}, check_leftovers=False,
                    leftover_wait_s=CONFIG.server.resume_grace_ms / 1000 + 40)
    parts = [replace(cfg, rate=rate / PROCS, seed=int(rate) * 10 + i, sample=i == 0) for i in range(PROCS)]
    with ProcessPoolExecutor(PROCS, mp_context=mp.get_context("spawn")) as pool:
        merged = merge(list(pool.map(_part, parts)))
    merged.config = cfg
    if full_checks:
        asyncio.run(check(merged))
    else:
        from server.sim.checker import cross_check

        merged.violations = [v for p in merged.players for v in p.violations]
        merged.violations += cross_check((p.player, p.sessions) for p in merged.players)
    return report.summarize(merged)


def sustainable(s: dict[str, Any], rate: float) -> bool:
    p99 = s["start_loading_ms"][99]
    # The one odd player left at the very end has nobody to play with: not a failure.
    return (s["violation_count"] == 0 and p99 is not None and p99 < 250
            and s["lifecycle_per_s"] >= 0.9 * rate and s["outcomes"].get("unfinished", 0) <= 1)


def find_rate(steps: list[float], hold_s: float) -> dict[str, Any]:
    with served(2, {}, Path(tempfile.gettempdir()) / "bench-serve.log") as (url, redis_url):
        tried = []
        best = None
        for rate in steps:
            s = sim(url, redis_url, rate, 10, full_checks=False)
            ok = sustainable(s, rate)
            tried.append({"rate": rate, "lifecycle_per_s": s["lifecycle_per_s"],
                          "p99_start_loading_ms": s["start_loading_ms"][99],
                          "unfinished": s["outcomes"].get("unfinished", 0), "sustainable": ok})
            print(f"  step {rate:6.0f}/s -> {s['lifecycle_per_s']}/s, p99 start_loading "
                  f"{s['start_loading_ms'][99]} ms, unfinished {s['outcomes'].get('unfinished', 0)}"
                  f" -> {'ok' if ok else 'not sustainable'}", flush=True)
            if not ok:
                break
            best = rate
        held = sim(url, redis_url, best, hold_s, full_checks=True) if best else None
    if held:
        print(f"  held {best:.0f}/s for {hold_s:.0f} s -> {held['lifecycle_per_s']}/s, start_loading "
              f"p50/p95/p99 {held['start_loading_ms']}, violations {held['violation_count']}",
              flush=True)
    return {"steps": tried, "best_rate": best, "held": held}


async def _hold_connections(url: str, count: int, start: int) -> int:
    token = {i: mint_token(CONFIG.auth.secret, f"idle{start + i}", 1500) for i in range(count)}
    sockets = []
    sem = asyncio.Semaphore(200)

    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with sem:
            for _ in range(3):  # a handshake lost in a full accept queue is retried
                try:
                    ws = await connect(f"{url}?token={token[i]}", compression=None,
                                       ping_interval=None, open_timeout=60)
                    await ws.recv()
                    sockets.append(ws)
                    return
                except (OSError, InvalidHandshake, ConnectionClosed):
                    failures += 1

    await asyncio.gather(*(one(i) for i in range(count)))
    held = len(sockets)
    if failures:
        print(f"  {failures} handshakes failed and were retried", flush=True)
    await asyncio.sleep(3)  # the measurement is taken by the parent meanwhile
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return held


def _hold(args: tuple[str, int, int]) -> int:
    return asyncio.run(_hold_connections(*args))


def idle_connections(total: int) -> dict[str, Any]:
    with served(2, {}, Path(tempfile.gettempdir()) / "bench-idle.log") as (url, redis_url):
        pids = asyncio.run(_worker_pids(redis_url))
        before = sum(rss_bytes(p) or 0 for p in pids)
        with ProcessPoolExecutor(PROCS, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_hold, (url, total // PROCS, i * total)) for i in range(PROCS)]
            connected = asyncio.run(_wait_connected(redis_url, total))
            after = sum(rss_bytes(p) or 0 for p in pids)
            held = sum(f.result() for f in futures)
    per_conn = (after - before) / max(connected, 1)
    return {"target": total, "held": held, "connected_in_redis": connected,
            "server_rss_before_mb": round(before / 2**20, 1), "server_rss_after_mb": round(after / 2**20, 1),
            "kib_per_connection": round(per_conn / 1024, 2)}


async def _worker_pids(redis_url: str) -> list[int]:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    workers = await admin.zrange(keys.workers(), 0, -1)
    await admin.aclose()
    return [int(str(w).rsplit("-", 2)[1]) for w in workers]


async def _wait_connected(redis_url: str, total: int) -> int:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + 120
    count = 0
    while time.monotonic() < deadline:
        workers = await admin.zrange(keys.workers(), 0, -1)
        count = sum([await admin.scard(keys.worker_players(w)) for w in workers])
        if count >= total:
            break
        await asyncio.sleep(0.5)
    await admin.aclose()
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", default="100,200,300,400,500,600,800,1000,1500,2000,3000,5000")
    parser.add_argument("--hold", type=float, default=60)
    parser.add_argument("--idle", type=int, default=20_000)
    parser.add_argument("--only", default="ceiling,lifecycle,idle,pool",
                        help="comma-separated parts to run")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    Path("reports").mkdir(exist_ok=True)
    report_path = Path("reports/bench-e2e.json")
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    def save() -> None:  # after every part: a later failure loses nothing measured
        report_path.write_text(json.dumps(out, indent=2, default=str))

    if "ceiling" in parts:
        print("client ceiling (echo server)...", flush=True)
        with ProcessPoolExecutor(PROCS, mp_context=mp.get_context("spawn")) as pool:
            out["ceiling_lifecycle_per_s"] = round(sum(pool.map(ceiling_in_process, [5.0] * PROCS)), 1)
        print(f"  {out['ceiling_lifecycle_per_s']}/s", flush=True)
        save()
    if "lifecycle" in parts:
        print("sustainable lifecycle rate...", flush=True)
        out["lifecycle"] = find_rate([float(x) for x in args.steps.split(",")], args.hold)
        save()
    if "idle" in parts:
        print("idle connections...", flush=True)
        out["idle"] = idle_connections(args.idle)
        print(f"  {out['idle']}", flush=True)
        save()
    if "pool" in parts:
        from server.app.benchtick import TickBench, run_bench

        print("100k pool: steady ticks at 1% churn, then everyone matchable...", flush=True)
        out["pool_tick"] = asyncio.run(run_bench(CONFIG, TickBench(100_000, 0.01)))
        out["pool_drain"] = asyncio.run(run_bench(CONFIG, TickBench(100_000, 0.0, matchable=True)))
        print(f"  {out['pool_tick']}\n  {out['pool_drain']}", flush=True)
        save()
    if parts >= {"ceiling", "lifecycle", "idle", "pool"}:
        print_table(out)


def print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fastmatch make bench — {out['date']} — {out['machine']}")
    t.add_column("figure")
    t.add_column("measured", justify="right")
    t.add_column("target", justify="right")
    lc = out["lifecycle"]
    held = lc["held"] or {}
    rate = held.get("lifecycle_per_s")
    t.add_row("client ceiling, lifecycles/s (echo)", str(out["ceiling_lifecycle_per_s"]), "-")
    t.add_row(f"sustained lifecycles/s ({held.get('config', {}).get('duration_s', 0):.0f} s, 2 workers)",
              str(rate), "5,000")
    if rate:
        t.add_row("  as a share of the client ceiling", f"{rate / out['ceiling_lifecycle_per_s']:.1%}", "-")
        q = held["start_loading_ms"]
        t.add_row("  enqueue -> start_loading p50/p95/p99 ms", f"{q[50]} / {q[95]} / {q[99]}", "p99 < 250")
        t.add_row("  invariant violations", str(held["violation_count"]), "0")
    idle = out["idle"]
    t.add_row("idle connections held (2 workers)", f"{idle['connected_in_redis']:,}", "20,000")
    t.add_row("  server memory per connection", f"{idle['kib_per_connection']} KiB", "< 20 KiB")
    pt, pd = out["pool_tick"], out["pool_drain"]
    t.add_row("100k pool, 1% churn per tick: tick p50 / p99",
              f"{pt['tick_p50_ms']} / {pt['tick_p99_ms']} ms", "p99 < 50 ms")
    t.add_row("  first tick of a new leader (full load)", f"{pt['first_tick_ms']} ms", "< 1,500 ms")
    t.add_row("100k pool, all matchable: everyone committed in",
              f"{pd['all_committed_ms']} ms ({pd['commits_per_s']:,.0f} players/s)", "< 3,000 ms")
    longest = max((pt, pd), key=lambda r: r["longest_redis_call_ms"])
    t.add_row("  longest single Redis call",
              f"{longest['longest_redis_call_ms']} ms ({longest['longest_redis_call']})", "< 5 ms")
    Console().print(t)


if __name__ == "__main__":
    main()
