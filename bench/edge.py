"""The cost of TLS and the PROXY protocol, measured (issue 12; README "Behind a load balancer").

The same steady load on this checkout, twice: *plain* (the simulator straight to
`fastmatch serve`, ws://) and *edge* (HAProxy from the Debian package in TCP mode, README's
config with `send-proxy-v2` and `/ready` checks over TLS, in front of the same `fastmatch serve`
serving wss:// with `server.proxy_protocol`; the simulator speaks TLS to HAProxy). Each run
reports lifecycles/s through `match_found` and CPU per lifecycle by process group from /proc
(workers, HAProxy, Redis, game server, supervisor, load generator; user + system), over a
steady window after a warm-up, as `bench/lifecycle.py` does for the plain server. Runs
alternate plain / edge so a machine that drifts drifts for both.

    .venv/bin/python -m bench.edge --rate 300 --seconds 30 --runs 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.lifecycle import ROOT, assigned, commands, free_port, groups, sample, wait_playing
from server.store import keys
from server.store.embedded import EmbeddedRedis

ORDER = ("workers", "haproxy", "redis", "gameserver", "supervisor", "loadgen")


@dataclass
class Edge:
    """What the edge run adds: HAProxy's port and pid, and the CA the client trusts."""

    port: int
    pid: int
    ca_file: Path


def _haproxy_config(backend_port: int, front_port: int, ca_file: Path) -> str:
    """README's HAProxy config, for one host on loopback."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Behind a load balancer\n", 1)[1]
    config = section.split("```haproxy\n", 1)[1].split("```", 1)[0]
    config = config.replace("bind :443", f"bind 127.0.0.1:{front_port}")
    config = config.replace("10.0.0.11:8080", f"127.0.0.1:{backend_port}")
    config = config.replace("/etc/haproxy/fastmatch-ca.pem", str(ca_file))
    config = config.replace("log stdout format raw local0 info", "log stdout format raw local0 notice")
    return "\n".join(line for line in config.splitlines() if "10.0.0.12" not in line) + "\n"


@contextmanager
def _serve(redis_url: str, env: dict[str, str], log: Path,
           workers: int) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    port, metrics_port = free_port(), free_port()
    full = {**os.environ, "FASTMATCH_REDIS__URL": redis_url, "FASTMATCH_SERVER__PORT": str(port),
            "FASTMATCH_SERVER__HOST": "127.0.0.1", "FASTMATCH_METRICS__PORT": str(metrics_port),
            "FASTMATCH_GAMESERVER__EMBEDDED": "true", "FASTMATCH_METRICS__FLUSH_INTERVAL_S": "0.1",
            # Every simulated player comes from 127.0.0.1 (as the PROXY header says, too).
            "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000000",
            "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000000", **env}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.app.cli", "serve", "--workers",
                                 str(workers)], cwd=ROOT, env=full, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield port, metrics_port, proc
    finally:
        proc.send_signal(signal.SIGINT)  # drain at once
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_workers(r: redis.Redis, port: int, workers: int, proc: subprocess.Popen[bytes]) -> None:
    """Until every worker is registered and the port accepts: `/ready` itself wants TLS and a
    PROXY header on the edge run, so readiness is read where both runs can read it."""
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("fastmatch serve did not start")
        if r.zcard(keys.workers()) >= workers:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                pass
        time.sleep(0.1)  # a child process is starting: nothing to wait on but its port


@contextmanager
def _haproxy(backend_port: int, ca_file: Path, logdir: Path) -> Iterator[Edge]:
    binary = shutil.which("haproxy")
    if binary is None:
        raise SystemExit("haproxy is not installed (Debian package `haproxy`)")
    port = free_port()
    config = logdir / "haproxy.cfg"
    config.write_text(_haproxy_config(backend_port, port, ca_file))
    with (logdir / "haproxy.log").open("wb") as out:
        proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"haproxy did not start; see {logdir}") from None
                time.sleep(0.1)
        yield Edge(port, proc.pid, ca_file)
    finally:
        proc.terminate()
        proc.wait()


def measure(rate: float, seconds: float, edge: bool, warmup: float = 8.0, workers: int = 2,
            procs: int = 2) -> dict[str, Any]:
    """One steady run at ``rate``; the window is ``seconds`` long, after ``warmup``."""
    logdir = Path(tempfile.mkdtemp(prefix="fastmatch-edge-bench-"))
    env: dict[str, str] = {}
    ca_file = logdir / "server.crt"
    if edge:
        sys.path.insert(0, str(ROOT))
        from tests.edge.certs import make_cert

        cert = make_cert(logdir, "server")
        env = {"FASTMATCH_SERVER__TLS_CERT_FILE": str(cert.cert_file),
               "FASTMATCH_SERVER__TLS_KEY_FILE": str(cert.key_file),
               "FASTMATCH_SERVER__PROXY_PROTOCOL": "true",
               "FASTMATCH_SERVER__PROXY_TRUSTED": '["127.0.0.1/32"]'}
    with EmbeddedRedis() as store:
        r = redis.Redis(unix_socket_path=str(store.socket_path), decode_responses=True)
        with _serve(store.url, env, logdir / "serve.log", workers) as (port, metrics_port, proc):
            _wait_workers(r, port, workers, proc)
            with _front(edge, port, ca_file, logdir) as front:
                url = f"wss://127.0.0.1:{front.port}/ws" if edge else f"ws://127.0.0.1:{port}/ws"
                report = logdir / "sim.json"
                sim = subprocess.Popen(
                    [sys.executable, "-m", "server.app.cli", "sim", "--url", url, "--redis-url",
                     store.url, "--rate", str(rate), "--duration", str(warmup + seconds + 2),
                     "--procs", str(procs), "--mix", "normal=1", "--rating-sd", "0",
                     "--no-progress", "--lifetime", "20", "--report", str(report),
                     "--plot", str(logdir / "sim.png"), *(["--ca-file", str(ca_file)] if edge else [])],
                    cwd=ROOT, stdout=(logdir / "sim.log").open("wb"), stderr=subprocess.STDOUT)
                wait_playing(sim, metrics_port, logdir, warmup)
                pids = groups(proc.pid, sim.pid, store.process.pid if store.process else 0, r)
                pids["haproxy"] = [front.pid] if edge else []
                cpu0, done0, cmd0, t0 = sample(pids), assigned(metrics_port), commands(r), time.monotonic()
                time.sleep(seconds)
                cpu1, done1, cmd1, t1 = sample(pids), assigned(metrics_port), commands(r), time.monotonic()
                sim.wait()
        r.close()
    lifecycles = (done1 - done0) * 2  # two players a match
    sim_summary = json.loads(report.read_text()) if report.exists() else {}
    per = {g: round((cpu1[g] - cpu0[g]) / max(lifecycles, 1) * 1000, 3) for g in ORDER}
    per["total"] = round(sum(per[g] for g in ORDER), 3)
    return {"run": "edge (HAProxy, TLS, PROXY v2)" if edge else "plain (ws://, no balancer)",
            "rate": rate, "window_s": round(t1 - t0, 1),
            "lifecycles_per_s": round(lifecycles / (t1 - t0), 1),
            "cpu_ms_per_lifecycle": per,
            "redis_commands_per_lifecycle": round((cmd1 - cmd0) / max(lifecycles, 1), 1),
            "start_loading_ms": sim_summary.get("start_loading_ms"),
            "violations": sim_summary.get("violation_count"),
            "outcomes": sim_summary.get("outcomes"), "logs": str(logdir)}


@contextmanager
def _front(edge: bool, backend_port: int, ca_file: Path, logdir: Path) -> Iterator[Edge]:
    if not edge:
        yield Edge(backend_port, 0, ca_file)
        return
    with _haproxy(backend_port, ca_file, logdir) as front:
        yield front


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--seconds", type=float, default=30.0, help="steady window per run")
    p.add_argument("--runs", type=int, default=2, help="pairs of runs (plain, edge)")
    p.add_argument("--report", type=Path, default=ROOT / "reports" / "edge-cost.json")
    args = p.parse_args()
    runs = []
    for i in range(args.runs):
        for edge in (False, True):
            result = measure(args.rate, args.seconds, edge)
            runs.append(result)
            print(f"run {i + 1} {result['run']}: {result['lifecycles_per_s']}/s, CPU ms per "
                  f"lifecycle {result['cpu_ms_per_lifecycle']}", flush=True)
    out = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
                      f"Python {platform.python_version()}", "runs": runs,
           "mean": {kind: _mean([r for r in runs if r["run"].startswith(kind)])
                    for kind in ("plain", "edge")}}
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(out, indent=2))
    plain, edge_ = out["mean"]["plain"], out["mean"]["edge"]
    print(f"\n{'':30}{'plain':>10}{'edge':>10}{'edge - plain':>14}")
    print(f"{'lifecycles/s':30}{plain['lifecycles_per_s']:>10}{edge_['lifecycles_per_s']:>10}")
    for group in (*ORDER, "total"):
        a, b = plain["cpu_ms_per_lifecycle"][group], edge_["cpu_ms_per_lifecycle"][group]
        print(f"{'CPU ms/lifecycle, ' + group:30}{a:>10.3f}{b:>10.3f}{b - a:>+14.3f}")
    print(f"report: {args.report}")


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    n = max(len(runs), 1)
    return {"lifecycles_per_s": round(sum(r["lifecycles_per_s"] for r in runs) / n, 1),
            "cpu_ms_per_lifecycle": {g: round(sum(r["cpu_ms_per_lifecycle"][g] for r in runs) / n, 3)
                                     for g in (*ORDER, "total")}}


if __name__ == "__main__":
    main()
