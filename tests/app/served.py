"""Run `fastmatch serve` as a real process tree against a test's own Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from server.store import keys
from tests.helpers import TIMEOUT

FASTMATCH = str(Path(sys.executable).with_name("fastmatch"))

# Fast timings so failure paths play out in about a second (same spirit as conftest.FAST).
FAST_ENV = {
    "FASTMATCH_SERVER__HOST": "127.0.0.1",
    "FASTMATCH_SERVER__RESUME_GRACE_MS": "1500",
    "FASTMATCH_SERVER__HEARTBEAT_INTERVAL_S": "0.1",
    # The TTL must exceed 2 x the interval + redis.operation_timeout_s (a heartbeat lost in
    # flight fails only after that timeout).
    "FASTMATCH_SERVER__HEARTBEAT_TTL_S": "1.3",
    "FASTMATCH_REDIS__OPERATION_TIMEOUT_S": "1.0",
    "FASTMATCH_SERVER__HOUSEKEEPING_INTERVAL_S": "0.05",
    "FASTMATCH_SERVER__DRAIN_TIMEOUT_S": "3",
    "FASTMATCH_SERVER__DRAIN_DELAY_S": "0",  # no balancer in front: drain at once
    "FASTMATCH_SERVER__MAX_CONNECTIONS": "500",  # fits any descriptor limit (conftest.FAST)
    "FASTMATCH_MATCHING__TICK_MS": "20",
    "FASTMATCH_MATCHING__LEASE_TTL_MS": "600",
    "FASTMATCH_MATCHING__TICK_BUDGET_MS": "300",
    "FASTMATCH_GAMESERVER__EMBEDDED": "true",  # a fleet: no game server holds matching (issue 16)
    "FASTMATCH_METRICS__FLUSH_INTERVAL_S": "0.1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    def __init__(self, redis_url: str, workers: int = 2, wrapper: tuple[str, ...] = (), **env: str) -> None:
        """``wrapper``: a command the server runs under (e.g. ``unshare --pid --fork``)."""
        self.wrapper = wrapper
        self.port = free_port()
        self.metrics_port = free_port()
        self.workers = workers
        self.env = {**os.environ, **FAST_ENV, "FASTMATCH_REDIS__URL": redis_url,
                    "FASTMATCH_SERVER__PORT": str(self.port),
                    "FASTMATCH_METRICS__PORT": str(self.metrics_port), **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(os.environ.get("TMPDIR", "/tmp")) / f"fastmatch-serve-{self.port}.log"

    def start(self) -> Served:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([*self.wrapper, FASTMATCH, "serve", "--workers", str(self.workers)],
                                         env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(TIMEOUT * 3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not os.environ.get("KEEP_SERVE_LOGS"):
            self.log.unlink(missing_ok=True)


async def worker_pids(admin: aioredis.Redis, port_owner: Served | None = None) -> dict[str, int]:
    """Live workers by id -> pid, from the Redis registry (ids are <host>-<pid>-<random>)."""
    members = await admin.zrange(keys.workers(), 0, -1)
    out = {}
    for wid in members:
        pid = int(wid.rsplit("-", 2)[1])
        if alive(pid):
            out[wid] = pid
    return out


def alive(pid: int) -> bool:
    """Running, not merely a zombie that still answers signal 0."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


async def wait_workers(admin: aioredis.Redis, count: int, exclude: set[int] = frozenset(),  # type: ignore[assignment]
                       timeout: float = TIMEOUT * 4) -> dict[str, int]:
    """Until `count` live workers, none of them in `exclude`, are registered and listening."""
    async with asyncio.timeout(timeout):
        while True:
            pids = await worker_pids(admin)
            if len(pids) == count and not set(pids.values()) & exclude:
                return pids
            await asyncio.sleep(0.05)


async def http_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(TIMEOUT):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


def sample(text: str, name: str, **labels: Any) -> float | None:
    """The value of one sample in Prometheus text format."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        mname, _, mlabels = metric.partition("{")
        got = ",".join(sorted(mlabels.rstrip("}").split(","))) if mlabels else ""
        if mname == name and got == want:
            return float(value)
    return None


def time_left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)
