"""`fastmatch sim --serve`: a private Redis and `fastmatch serve` to run against, then stop both.

The :class:`Server` handle is also what ``--faults`` acts on: its workers, its Redis (frozen,
restarted empty), its supervisor (killed, then started again as a service manager would).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import redis

from server.store import keys
from server.store.embedded import EmbeddedRedis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A running `fastmatch serve` (one supervisor, its workers) and the Redis it uses."""

    def __init__(self, workers: int, extra_env: Mapping[str, str], redis_server: EmbeddedRedis,
                 log: IO[bytes], config_path: str | None = None) -> None:
        self.port = _free_port()
        self.redis = redis_server
        self.log = log
        self.workers = workers
        # The simulator's own config (token secret, deadlines, modes): the server must run it
        # too, or players would be refused or judged against deadlines it does not keep.
        self.config_path = str(Path(config_path).resolve()) if config_path else None
        self.env = {**os.environ, "FASTMATCH_REDIS__URL": redis_server.url,
                    "FASTMATCH_SERVER__PORT": str(self.port), "FASTMATCH_SERVER__HOST": "127.0.0.1",
                    "FASTMATCH_METRICS__PORT": "0", "FASTMATCH_GAMESERVER__EMBEDDED": "true",
                    # Every simulated player comes from 127.0.0.1: the per-address limit would
                    # measure itself, not the server.
                    "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000000",
                    "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000000", **extra_env}
        self.supervisor = self._spawn()
        self._known_workers: list[int] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def _spawn(self) -> subprocess.Popen[bytes]:
        fastmatch = str(Path(sys.executable).with_name("fastmatch"))
        config = ["--config", self.config_path] if self.config_path else []  # a global option
        return subprocess.Popen([fastmatch, *config, "serve", "--workers", str(self.workers)],
                                env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_listening(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.supervisor.poll() is not None:
                raise RuntimeError(f"fastmatch serve exited with {self.supervisor.returncode} at start")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.1)  # a child process is starting: nothing to wait on but its port
        raise RuntimeError("fastmatch serve did not start listening")

    # -- what faults act on -------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """The supervisor's live workers: its children that are in the Redis registry (ids are
        ``<host>-<pid>-<hex>``); the last list read if Redis does not answer (frozen)."""
        children = _children(self.supervisor.pid)
        try:
            client = redis.Redis.from_url(self.redis.url, socket_timeout=0.5, decode_responses=True)
            with contextlib.closing(client):
                registered = {int(str(w).rsplit("-", 2)[1]) for w in client.zrange(keys.workers(), 0, -1)}
            self._known_workers = sorted(registered & set(children))
        except (redis.RedisError, OSError, ValueError, IndexError):
            pass
        return [pid for pid in self._known_workers if pid in children]

    def leader(self, mode: str) -> tuple[int, int]:
        """(pid, epoch) of the worker holding ``mode``'s lease (``<host>-<pid>-<hex>|<epoch>``)."""
        client = redis.Redis.from_url(self.redis.url, socket_timeout=0.5, decode_responses=True)
        try:
            with contextlib.closing(client):
                lease = client.get(keys.leader(mode))
        except redis.RedisError as exc:
            raise RuntimeError(f"cannot read {mode}'s lease: {exc}") from exc
        if not lease:
            raise RuntimeError(f"nobody leads {mode}")
        holder, _, epoch = str(lease).rpartition("|")
        return int(holder.rsplit("-", 2)[1]), int(epoch)

    def signal_redis(self, sig: int) -> int:
        process = self.redis.process
        if process is None:
            raise RuntimeError("redis is not running")
        os.kill(process.pid, sig)
        return process.pid

    def restart_redis(self) -> tuple[int, int]:
        """Kill Redis and start it again, empty, on the same socket: (old pid, new pid)."""
        old = self.redis.process.pid if self.redis.process else 0
        self.redis.restart()
        return old, self.redis.process.pid if self.redis.process else 0

    def restart_supervisor(self) -> tuple[int, int]:
        """SIGKILL the supervisor (its workers are told by the kernel and drain by themselves),
        then start a new one on the same port at once, as a service manager would."""
        old = self.supervisor
        old.kill()
        old.wait()
        self.supervisor = self._spawn()
        return old.pid, self.supervisor.pid

    def stop(self) -> None:
        self.supervisor.send_signal(signal.SIGTERM)
        try:
            self.supervisor.wait(30)
        except subprocess.TimeoutExpired:
            self.supervisor.kill()
            self.supervisor.wait()


def _children(pid: int) -> list[int]:
    """Live children of ``pid`` (a killed worker stays a zombie until the supervisor reaps it)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(k) for k in task.read_text().split()]
    return [pid for pid in found if _running(pid)]


def _running(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@contextmanager
def started(workers: int, extra_env: Mapping[str, str], log_path: Path,
            config_path: str | None = None) -> Iterator[Server]:
    """A freshly started server (on ``config_path``, else the shipped default); everything is
    stopped afterwards."""
    with EmbeddedRedis() as store, log_path.open("wb") as log:
        server = Server(workers, extra_env, store, log, config_path)
        try:
            server.wait_listening()
            yield server
        finally:
            server.stop()


@contextmanager
def served(workers: int, extra_env: Mapping[str, str], log_path: Path,
           config_path: str | None = None) -> Iterator[tuple[str, str]]:
    """Yield (ws url, redis url) of a freshly started server; stop everything afterwards."""
    with started(workers, extra_env, log_path, config_path) as server:
        yield server.url, server.redis.url
