"""The ``fastmatch`` command: ``serve``, ``token``, ``gameserver``, ``sim`` and ``bench-tick``."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence

from server.app.logs import setup_logging
from server.config import Config, load_config
from server.errors import ConfigError
from server.protocol.auth import AuthError, mint_token


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    if getattr(args, "workers", None) is not None:
        overrides["server.workers"] = args.workers
    if getattr(args, "port", None) is not None:
        overrides["server.port"] = args.port
    # The CLI is the one place that reads the process environment; it hands it to the config.
    return load_config(args.config, os.environ, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args)
    setup_logging("supervisor")
    # prometheus-client multiprocess mode: the directory must be set before prometheus_client
    # is imported, here and (inherited) in every spawned worker; wiped at every start.
    multiproc_dir = tempfile.mkdtemp(prefix="fastmatch-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    try:
        from server.app.supervisor import Supervisor

        return Supervisor(config, config.server.workers, multiproc_dir).run()
    finally:
        shutil.rmtree(multiproc_dir, ignore_errors=True)


def cmd_token(args: argparse.Namespace) -> int:
    config = _load(args)
    if not config.auth.algorithm.startswith("HS"):
        raise ConfigError("`fastmatch token` signs with auth.secret; auth.algorithm is not HMAC")
    if args.ttl < 1:
        # Already expired (the verifier's leeway would only hide it for auth.leeway_s).
        raise ConfigError(f"--ttl must be at least 1 second (got {args.ttl})")
    print(mint_token(config.auth.secret, args.player, args.mmr, args.ttl,
                     algorithm=config.auth.algorithm))
    return 0


def cmd_gameserver(args: argparse.Namespace) -> int:
    from server.app.gameserver import Behaviour, run_gameserver
    from server.store import sentinel

    config = _load(args)
    if config.production and not args.not_production:
        # It answers every battle request with a made-up address: on a production Redis it
        # would send real players to no server at all.
        raise ConfigError("`fastmatch gameserver` is the reference game server (fake addresses) "
                          "and the config says production = true; pass --not-production if this "
                          "Redis really is not production's")
    url = args.redis_url or sentinel.locator(config.redis)
    if not url:
        raise ConfigError("`fastmatch gameserver` needs --redis-url, redis.url or redis.sentinels")
    if not 0 <= args.reject_rate <= 1:
        raise ConfigError("--reject-rate must be between 0 and 1")
    run_gameserver(url, config.gameserver.request_channel,
                   Behaviour(args.delay_ms, args.reject_rate, args.silent))
    return 0


def cmd_bench_tick(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from server.app.benchtick import TickBench, run_bench

    config = _load(args)
    if args.mode not in config.modes:
        raise ConfigError(f"--mode {args.mode!r} is not a configured mode ({', '.join(config.modes)})")
    if (args.players < 2 or not 0 <= args.churn <= 1 or args.ticks < 1
            or not (args.id_length == 0 or 16 <= args.id_length <= 64)):
        raise ConfigError("bench-tick needs --players >= 2, --churn in [0, 1], --ticks >= 1 and "
                          "--id-length 0 or 16 to 64")
    bench = TickBench(args.players, args.churn, args.mode, args.ticks, args.matchable, args.probe,
                      args.id_length)
    print(json.dumps(asyncio.run(run_bench(config, bench))), flush=True)
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from server.sim.cli import main as sim_main

    return sim_main(args, _load(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmatch", description="skill-based matchmaking server")
    parser.add_argument("--config", help="TOML config file (default: the shipped dev config)")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server (embedded Redis if no URL is configured)")
    serve.add_argument("--workers", type=int, help="worker processes (0: one per CPU)")
    serve.add_argument("--port", type=int, help="public WebSocket port")
    serve.set_defaults(func=cmd_serve)
    token = sub.add_parser("token", help="mint a development token with the configured secret")
    token.add_argument("--player", required=True, help="player id (the `sub` claim)")
    token.add_argument("--mmr", type=float, help="rating (the `mmr` claim)")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)
    game = sub.add_parser("gameserver", help="run the reference game server (PROTOCOL 7)")
    game.add_argument("--redis-url", help="Redis to listen on (default: redis.url)")
    game.add_argument("--delay-ms", type=int, default=0, help="answer this late")
    game.add_argument("--reject-rate", type=float, default=0.0, help="share of requests to reject")
    game.add_argument("--silent", action="store_true", help="never answer")
    game.add_argument("--not-production", action="store_true",
                      help="run even though the config says production = true (its Redis is not "
                           "production's: a staging copy of the config)")
    game.set_defaults(func=cmd_gameserver)
    bench = sub.add_parser("bench-tick", help="one mode's TryMatch tick on a big pool (private Redis)")
    bench.add_argument("--players", type=int, default=100_000, help="waiting players")
    bench.add_argument("--churn", type=float, default=0.01,
                       help="share of the pool joining or leaving per tick")
    bench.add_argument("--mode", default="1v1", help="configured game mode")
    bench.add_argument("--ticks", type=int, default=50, help="measured ticks")
    bench.add_argument("--matchable", action="store_true",
                       help="everyone matchable: time to commit the whole pool")
    bench.add_argument("--probe", action="store_true",
                       help="also time another client's reads meanwhile (what players wait)")
    bench.add_argument("--id-length", type=int, default=0,
                       help="pad player ids to this many characters (16 to 64; PROTOCOL allows 64)")
    bench.set_defaults(func=cmd_bench_tick)
    from server.sim.cli import add_arguments as sim_arguments

    sim = sub.add_parser("sim", help="simulated players over real WebSockets (load, SLO gate)")
    sim_arguments(sim)
    sim.set_defaults(func=cmd_sim)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, AuthError) as exc:
        print(f"fastmatch: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
