"""CPU per player lifecycle, by process group, for one server tree under a steady load.

A lifecycle is what a player costs from connect (with a token) to close: enqueue 1v1,
start_loading, loading_complete, match_found. The server tree (this checkout or another
commit's worktree) runs as `fastmatch serve --workers N` with its embedded reference game
server against a private Redis; `fastmatch sim` from THIS checkout is the load generator, so
two trees are always measured with the same client. CPU comes from /proc (user + system, so
kernel time is included) at the start and the end of a steady window, and the lifecycles in
that window from the server's own `fastmatch_matches_assigned_total` (two players a match).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from server.store import keys
from server.store.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")
GROUPS = ("workers", "redis", "gameserver", "supervisor", "loadgen")
# Arrivals go on this long past the window's planned end: the window starts at the first
# match plus the warm-up, a few seconds after the arrivals began, and must not reach past them
# into the idle tail (whose CPU would count against fewer lifecycles).
_TAIL_S = 6.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_s(pid: int, kernel_only: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (system only with ``kernel_only``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[12]) + (0 if kernel_only else int(fields[11]))) / _TICK


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), None once it is gone: a pid that names
    the same process at both ends of a window has the same start time."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def io_ops(pid: int) -> tuple[int, int]:
    """Read-like and write-like system calls so far (/proc/<pid>/io syscr, syscw): every
    socket read and write, the counts that cost wakeups between processes."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return 0, 0
    return int(fields.get("syscr", 0)), int(fields.get("syscw", 0))


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the sim's client processes, the server's workers)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in task.read_text().split()]
                found += kids
                frontier += kids
    return found


@dataclass
class Window:
    seconds: float = 0.0
    lifecycles: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    io: dict[str, tuple[int, int]] = field(default_factory=dict)  # (reads, writes) per group
    redis_commands: int = 0

    def per_lifecycle_ms(self) -> dict[str, float]:
        n = max(self.lifecycles, 1)
        out = {g: round(self.cpu_s.get(g, 0.0) / n * 1000, 3) for g in GROUPS}
        out.update({f"{g}_kernel": round(self.cpu_s.get(f"{g}_kernel", 0.0) / n * 1000, 3)
                    for g in GROUPS})
        out["gameserver_per_match"] = round(out["gameserver"] * 2, 3)
        return out

    def io_per_lifecycle(self) -> dict[str, tuple[float, float]]:
        n = max(self.lifecycles, 1)
        return {g: (round(r / n, 2), round(w / n, 2)) for g, (r, w) in self.io.items()}


@dataclass
class Result:
    tree: str
    rate: float
    window: Window
    sim: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        w = self.window
        outcomes = self.sim.get("outcomes", {})
        players = self.sim.get("players", 0) or 1
        return {
            "tree": self.tree, "rate": self.rate,
            "lifecycles_per_s": round(w.lifecycles / w.seconds, 1) if w.seconds else 0.0,
            "cpu_ms_per_lifecycle": w.per_lifecycle_ms(),
            "redis_commands_per_lifecycle": round(w.redis_commands / max(w.lifecycles, 1), 1),
            "reads_writes_per_lifecycle": w.io_per_lifecycle(),
            "matched_share": round(outcomes.get("matched", 0) / players, 4),
            "start_loading_ms": self.sim.get("start_loading_ms"),
            "violations": self.sim.get("violation_count"),
            "unfinished": outcomes.get("unfinished", 0),
            "connection_failed": sum(v for k, v in outcomes.items() if k.startswith("connection_failed")),
        }


@contextlib.contextmanager
def server(
    tree: Path, workers: int, redis_url: str, log: Path
) -> Iterator[tuple[int, int, subprocess.Popen[bytes]]]:
    """`fastmatch serve` of ``tree`` (its own code and Lua scripts, this interpreter)."""
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(tree), "FASTMATCH_REDIS__URL": redis_url,
           "FASTMATCH_SERVER__PORT": str(port), "FASTMATCH_SERVER__HOST": "127.0.0.1",
           "FASTMATCH_METRICS__PORT": str(metrics_port), "FASTMATCH_GAMESERVER__EMBEDDED": "true",
           # Every simulated player comes from 127.0.0.1.
           "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000000",
           "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000000"}
    if "flush_interval_s" in (tree / "server" / "config.py").read_text():
        env["FASTMATCH_METRICS__FLUSH_INTERVAL_S"] = "0.1"  # exact window edges
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.app.cli", "serve", "--workers", str(workers)],
                                cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _ready(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server from {tree} did not start; see {log}")
            time.sleep(0.1)
        yield port, metrics_port, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def assigned(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(
        r'^fastmatch_matches_assigned_total\{[^}]*\} ([0-9.e+]+)$', text, re.MULTILINE))


def wait_playing(sim: subprocess.Popen[bytes], metrics_port: int, logdir: Path, warmup: float) -> None:
    """Until the generator's processes are up and a first match is assigned, then ``warmup``."""
    deadline = time.monotonic() + 60
    while assigned(metrics_port) == 0:
        if sim.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no match in 60 s; see {logdir}")
        time.sleep(0.2)
    time.sleep(warmup)


def groups(server_pid: int, sim_pid: int, redis_pid: int, r: redis.Redis) -> dict[str, list[int]]:
    workers = {int(str(w).rsplit("-", 2)[1]) for w in r.zrange(keys.workers(), 0, -1)}
    served = [p for p in children(server_pid) if not _helper(p)]
    return {"workers": [p for p in served if p in workers],
            "gameserver": [p for p in served if p not in workers],
            "supervisor": [server_pid], "redis": [redis_pid],
            "loadgen": [sim_pid, *children(sim_pid)]}


def _helper(pid: int) -> bool:
    """multiprocessing's resource tracker: neither a worker nor the game server."""
    with contextlib.suppress(OSError):
        return b"resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    return False


def sample(pids: dict[str, list[int]]) -> dict[str, float]:
    out = {g: sum(cpu_s(p) for p in ps) for g, ps in pids.items()}
    out.update({f"{g}_kernel": sum(cpu_s(p, kernel_only=True) for p in ps) for g, ps in pids.items()})
    return out


def sample_io(pids: dict[str, list[int]]) -> dict[str, tuple[int, int]]:
    out = {}
    for g, ps in pids.items():
        ops = [io_ops(p) for p in ps]
        out[g] = (sum(r for r, _ in ops), sum(w for _, w in ops))
    return out


def commands(r: redis.Redis) -> int:
    return sum(int(v["calls"]) for k, v in r.info("commandstats").items() if k.startswith("cmdstat_"))


@contextlib.contextmanager
def pinned(cpus: set[int] | None) -> Iterator[None]:
    """Run what this process starts meanwhile on ``cpus`` only (children inherit it)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """``pin``: the server (workers, Redis, the game server) on the first CPU, the load
    generator on the others, so that neither takes the other's CPU (clients on their own
    machines); else (None, None), everything shares every CPU."""
    if not pin:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("pinning needs at least two CPUs")
    return {cpus[0]}, set(cpus[1:])


def start_serving(stack: contextlib.ExitStack, tree: Path, workers: int, log: Path,
                  cpus: set[int] | None) -> tuple[EmbeddedRedis, int, int, subprocess.Popen[bytes]]:
    """An embedded Redis and `fastmatch serve` of ``tree`` on it, on ``cpus`` (None: any), both
    stopped when ``stack`` closes: (Redis, port, metrics port, the supervisor process)."""
    with pinned(cpus):
        store = stack.enter_context(EmbeddedRedis())
        port, metrics_port, proc = stack.enter_context(server(tree, workers, store.url, log))
    return store, port, metrics_port, proc


def measure(tree: Path, rate: float, seconds: float, warmup: float = 8.0, workers: int = 2,
            procs: int = 2, label: str = "", pin: bool = False) -> Result:
    """One steady run of ``tree`` at ``rate`` lifecycles/s; the window is ``seconds`` long.
    ``pin``: see ``split_cpus``."""
    logdir = Path(tempfile.mkdtemp(prefix="fastmatch-bench-"))
    server_cpus, sim_cpus = split_cpus(pin)
    with contextlib.ExitStack() as stack:
        store, port, metrics_port, proc = start_serving(stack, tree, workers, logdir / "serve.log",
                                                        server_cpus)
        r = redis.Redis(unix_socket_path=str(store.socket_path), decode_responses=True)
        stack.callback(r.close)
        report = logdir / "sim.json"
        with pinned(sim_cpus):
            sim = subprocess.Popen(
                [sys.executable, "-m", "server.app.cli", "sim", "--url", f"ws://127.0.0.1:{port}/ws",
                 "--redis-url", store.url, "--rate", str(rate), "--duration", str(warmup + seconds + _TAIL_S),
                 "--procs", str(procs), "--mix", "normal=1", "--rating-sd", "0", "--no-progress",
                 "--lifetime", "20", "--report", str(report), "--plot", str(logdir / "sim.png")],
                cwd=ROOT, stdout=(logdir / "sim.log").open("wb"), stderr=subprocess.STDOUT)
        wait_playing(sim, metrics_port, logdir, warmup)
        pids = groups(proc.pid, sim.pid, store.process.pid if store.process else 0, r)
        if len(pids["workers"]) != workers or len(pids["gameserver"]) != 1:
            raise RuntimeError(f"process groups not as started: {pids}; see {logdir}")
        born = {p: start_time(p) for ps in pids.values() for p in ps}
        io0, cpu0, done0 = sample_io(pids), sample(pids), assigned(metrics_port)
        cmd0, t0 = commands(r), time.monotonic()
        time.sleep(seconds)
        io1, cpu1, done1 = sample_io(pids), sample(pids), assigned(metrics_port)
        cmd1, t1 = commands(r), time.monotonic()
        # A process that ended (or a worker restarted) in the window would read as CPU
        # not spent: the figures would be wrong, and nothing else would say so.
        ended = sorted(p for p, t in born.items() if start_time(p) != t)
        sim.wait()
        if ended:
            raise RuntimeError(f"processes {ended} ended during the window; see {logdir}")
        if done1 <= done0:
            raise RuntimeError(f"no match was completed in the window; see {logdir}")
    window = Window(seconds=t1 - t0, lifecycles=(done1 - done0) * 2,
                    cpu_s={g: cpu1[g] - cpu0[g] for g in cpu0}, redis_commands=cmd1 - cmd0,
                    io={g: (io1[g][0] - io0[g][0], io1[g][1] - io0[g][1]) for g in io0})
    summary = json.loads(report.read_text()) if report.exists() else {}
    return Result(label or str(tree), rate, window, summary)
