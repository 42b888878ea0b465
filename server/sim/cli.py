"""`fastmatch sim`: simulated players against a fastmatch server; exits 1 when an SLO fails."""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing as mp
import os
import tempfile
from collections.abc import Coroutine
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from server.config import Config
from server.errors import ConfigError
from server.sim import report
from server.sim.echo import ceiling_in_process, measure_ceiling
from server.sim.faults import Fault, Target, parse_faults
from server.sim.player import SimSettings, parse_mix
from server.sim.runner import RunConfig, RunResult, check, merge, run

T = TypeVar("T")

DEFAULT_MIX = ("normal=70,quit_before_match=5,quit_during_loading=3,slow_loader=7,afk=3,"
               "invalid=4,double_enqueue=4,drop_resume=4")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="ws://127.0.0.1:8080/ws", help="server WebSocket URL")
    p.add_argument("--redis-url", help="the server's Redis (stats and leftover checks): a URL, or "
                   "redis+sentinel://host:port,host:port/<service> for a Sentinel deployment")
    p.add_argument("--ca-file", default="", help="wss:// URLs: trust this CA (PEM file)")
    p.add_argument("--serve", action="store_true", help="start a private Redis + fastmatch serve")
    p.add_argument("--workers", type=int, default=2, help="with --serve: worker processes")
    p.add_argument("--rate", type=float, default=200.0, help="arriving players per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--ramp", type=float, default=0.0, help="seconds to ramp up to --rate")
    p.add_argument("--mix", default=DEFAULT_MIX, help="behaviour weights, name=weight,...")
    p.add_argument("--mode", default="1v1")
    p.add_argument("--lifetime", type=float, default=30.0, help="a player gives up after this")
    p.add_argument("--rating-sd", type=float, default=200.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ceiling", action="store_true", help="also measure the client's own ceiling")
    p.add_argument("--slo-p95-start-loading-ms", type=float)
    p.add_argument("--slo-p95-match-ms", type=float)
    p.add_argument("--report", type=Path, default=Path("reports/sim.json"))
    p.add_argument("--plot", type=Path, default=Path("reports/sim.png"))
    p.add_argument("--procs", type=int, default=1,
                   help="client processes sharing the arrivals (one Python client tops out first)")
    p.add_argument("--arrival-tick-ms", type=float, default=100.0,
                   help="players due within one tick arrive together (1: evenly spaced; larger "
                        "ticks cost the generator less CPU per player)")
    p.add_argument("--faults", metavar="SCHEDULE",
                   help="with --serve: faults at seconds from the start, e.g. kill-worker@10,"
                        "freeze-redis@22:3,restart-redis@40 (also sigterm-worker@T, "
                        "kill-supervisor@T); README 'Load simulation'")
    p.add_argument("--final-batch", type=int,
                   help="after the run, this many plain players must all be matched "
                        "(default 20 with --faults, else 0)")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace, config: Config) -> int:
    if args.mode not in config.modes:
        # Every player would be refused `unsupported_game_mode`: say so before starting anything
        # (ConfigError: `fastmatch` prints it and exits 2).
        raise ConfigError(f"--mode {args.mode!r} is not a configured mode "
                          f"({', '.join(config.modes)}); see --config")
    try:
        mix = parse_mix(args.mix)
        faults = parse_faults(args.faults) if args.faults else []
    except ValueError as exc:
        raise SystemExit(f"fastmatch sim: {exc}") from None
    if faults and (not args.serve or args.procs > 1):
        raise SystemExit("fastmatch sim: --faults needs --serve (faults act on the server the sim "
                         "started) and one client process (--procs 1)")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    ceiling = _ceiling(args.procs) if args.ceiling else None
    if args.serve:
        from server.sim.launch import started

        log = Path(tempfile.gettempdir()) / f"fastmatch-sim-serve-{os.getpid()}.log"
        # args.config: the global `fastmatch --config`, which loaded ``config`` too.
        with started(args.workers, {}, log, args.config) as server:
            result = _loop(_run(args, config, mix, server.url, server.redis.url, faults, server))
    else:
        if not args.redis_url:
            raise SystemExit("fastmatch sim: --redis-url is required without --serve")
        result = _loop(_run(args, config, mix, args.url, args.redis_url, faults, None))
    summary = report.summarize(result, ceiling)
    report.write_json(summary, args.report)
    report.write_plot(result, args.plot)
    report.print_summary(summary)
    print(f"report: {args.report}  plot: {args.plot}")
    failures = report.slo_failures(summary, args.slo_p95_start_loading_ms, args.slo_p95_match_ms)
    for failure in failures:
        print(f"SLO FAILED: {failure}")
    return 1 if failures else 0


def _loop(main: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop, as the workers do: the load generator's CPU is a reported figure."""
    # What was imported so far lives as long as the process: keep it out of the collector's
    # full passes, which would otherwise walk it every few thousand players.
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _ceiling(procs: int) -> float:
    if procs <= 1:
        return _loop(measure_ceiling())
    with ProcessPoolExecutor(procs, mp_context=mp.get_context("spawn")) as pool:
        return sum(pool.map(ceiling_in_process, [5.0] * procs))


def _run_part(cfg: RunConfig) -> RunResult:
    return _loop(run(cfg))


async def _run(args: argparse.Namespace, config: Config, mix: dict[str, float], url: str,
               redis_url: str, faults: list[Fault], target: Target | None) -> RunResult:
    cfg = _config(args, config, mix, url, redis_url, faults)
    if args.procs > 1:
        parts = [replace(cfg, rate=cfg.rate / args.procs, seed=cfg.seed * 1000 + i,
                         check_leftovers=False, final_batch=0, sample=i == 0)
                 for i in range(args.procs)]
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(args.procs, mp_context=mp.get_context("spawn")) as pool:
            results = await asyncio.gather(*(loop.run_in_executor(pool, _run_part, part) for part in parts))
        merged = merge(list(results))
        merged.config = cfg
        await check(merged)
        return merged
    return await _run_one(args, cfg, target)


def _config(args: argparse.Namespace, config: Config, mix: dict[str, float], url: str,
            redis_url: str, faults: list[Fault]) -> RunConfig:
    grace = config.server.resume_grace_ms / 1000
    settings = SimSettings(url=url, secret=config.auth.secret, mode=args.mode,
                           lifetime_s=args.lifetime, rating_sd=args.rating_sd, redis_url=redis_url,
                           resume_grace_s=grace, ca_file=args.ca_file,
                           outcome_bound_s=(config.matching.ready_timeout_ms
                                            + config.gameserver.allocation_timeout_ms) / 1000 + 5)
    final_batch = args.final_batch if args.final_batch is not None else 20 if faults else 0
    # A worker that died keeps its players' records until its heartbeat expires; then the grace.
    wait = grace + config.server.heartbeat_ttl_s + config.matching.finished_match_ttl_ms / 1000 + 10
    return RunConfig(settings=settings, redis_url=redis_url, rate=args.rate,
                     duration_s=args.duration, mix=mix, ramp_s=args.ramp, seed=args.seed,
                     arrival_tick_s=args.arrival_tick_ms / 1000, leftover_wait_s=wait,
                     faults=tuple(faults), final_batch=final_batch)


async def _run_one(args: argparse.Namespace, cfg: RunConfig, target: Target | None) -> RunResult:
    if args.no_progress:
        return await run(cfg, target=target)
    from rich.live import Live

    with Live(refresh_per_second=4) as live:
        def progress(result: RunResult, active: int, elapsed: float) -> None:
            live.update(progress_line(result, active, elapsed))
        return await run(cfg, progress, target)


def progress_line(result: RunResult, active: int, elapsed: float) -> str:
    """The live line, from the counters kept as players finish: it is drawn every tick, and a
    pass over every finished player would cost the generator's CPU (a reported figure) more
    the longer the run."""
    tally = result.tally
    return (f"t={elapsed:5.1f}s  active={active}  done={tally.done}  matched={tally.matched}  "
            f"violations={tally.violations}")
