"""`fastmatch sim --serve`: a private Redis and `fastmatch serve` to run against, then stop both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from server.store.embedded import EmbeddedRedis


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def served(workers: int, extra_env: Mapping[str, str], log_path: Path) -> Iterator[tuple[str, str]]:
    """Yield (ws url, redis url) of a freshly started server; stop everything afterwards."""
    port = _free_port()
    with EmbeddedRedis() as redis, log_path.open("wb") as log:
        env = {**os.environ, "FASTMATCH_REDIS__URL": redis.url,
               "FASTMATCH_SERVER__PORT": str(port), "FASTMATCH_SERVER__HOST": "127.0.0.1",
               "FASTMATCH_METRICS__PORT": "0", "FASTMATCH_GAMESERVER__EMBEDDED": "true",
               # Every simulated player comes from 127.0.0.1: the per-address limit would
               # measure itself, not the server.
               "FASTMATCH_SERVER__CONNECT_RATE_PER_IP": "1000000",
               "FASTMATCH_SERVER__CONNECT_BURST_PER_IP": "1000000", **extra_env}
        fastmatch = str(Path(sys.executable).with_name("fastmatch"))
        proc = subprocess.Popen([fastmatch, "serve", "--workers", str(workers)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_listening(proc, port)
            yield f"ws://127.0.0.1:{port}/ws", redis.url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fastmatch serve exited with {proc.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)  # a child process is starting: nothing to wait on but its port
    raise RuntimeError("fastmatch serve did not start listening")
