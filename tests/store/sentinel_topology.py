"""A real Sentinel deployment for tests: 1 primary, 1 replica, 3 Sentinels, on free ports of
127.0.0.1 in a private temporary directory, from the binary fastmatch finds (``embedded.py``).

Short Sentinel timeouts (down after 1 s, failover timeout 5 s) make a failover take a few
seconds. Every process dies with the test process (PR_SET_PDEATHSIG) and ``stop()`` kills and
reaps them all, so a crashed run leaves nothing listening. Never the machine's port 6379.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

import redis

from server.osutil import die_with_parent
from server.store.embedded import find_redis_server

SERVICE: Final = "fm-test"
DOWN_AFTER_MS: Final = 1000
FAILOVER_TIMEOUT_MS: Final = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SentinelTopology:
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.dir = Path(tempfile.mkdtemp(prefix="fastmatch-sentinel-"))
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}  # data nodes by port
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}
        self.first_primary = 0

    @property
    def locator(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    @property
    def sentinel_env(self) -> dict[str, str]:
        """How `fastmatch serve` is pointed at this deployment."""
        return {"FASTMATCH_REDIS__URL": "",
                "FASTMATCH_REDIS__SENTINELS": ",".join(f"127.0.0.1:{p}" for p in self.sentinels),
                "FASTMATCH_REDIS__SENTINEL_SERVICE": SERVICE}

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> SentinelTopology:
        try:
            primary, replica = free_port(), free_port()
            self.first_primary = primary
            self.start_node(primary)
            self.start_node(replica, replica_of=primary)
            for _ in range(3):
                self._start_sentinel(free_port(), primary)
            self.wait_healthy(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, port: int, replica_of: int = 0) -> None:
        work = self.dir / f"node-{port}"
        work.mkdir(exist_ok=True)
        args = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(work), "--daemonize", "no",
                "--loglevel", "warning", "--logfile", str(work / "log"),
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if replica_of:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[port] = self._spawn(args)

    def _start_sentinel(self, port: int, primary: int) -> None:
        work = self.dir / f"sentinel-{port}"
        work.mkdir()
        conf = work / "sentinel.conf"  # rewritten by the Sentinel as it learns the topology
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {work}\nlogfile {work / 'log'}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n")
        self.sentinels[port] = self._spawn([self.binary, str(conf), "--sentinel"])

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 (prctl only)

    def stop(self) -> None:
        for proc in [*self.sentinels.values(), *self.nodes.values()]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what tests look at and do ------------------------------------------------------------------

    def ask(self, port: int) -> tuple[str, int] | None:
        """What one Sentinel names as the primary (None: it does not answer)."""
        with contextlib.suppress(redis.RedisError, OSError):
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5)
            with contextlib.closing(client):
                host, found = client.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
                return host.decode(), int(found)
        return None

    def primary(self) -> int:
        """The primary's port as the Sentinels' majority names it (0: no majority)."""
        named = [self.ask(port) for port in self.sentinels]
        for candidate in {n for n in named if n is not None}:
            if named.count(candidate) >= 2:
                return candidate[1]
        return 0

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True)

    def wait_healthy(self, timeout_s: float) -> None:
        """The primary has a replica in sync and every Sentinel sees the primary, one replica
        and the two other Sentinels: ready to fail over."""
        deadline = time.monotonic() + timeout_s
        while not self._healthy():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sentinel topology not healthy within {timeout_s:g}s: "
                                   f"{self.describe()}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        primary = self.primary()
        try:
            return bool(primary) and self._replicated(primary) and all(
                self._sentinel_ready(port) for port in self.sentinels)
        except (redis.RedisError, OSError, KeyError):
            return False

    def _replicated(self, primary: int) -> bool:
        with contextlib.closing(self.node(primary)) as client:
            info = client.info("replication")
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return info.get("role") == "master" and bool(links) and all(
            v.get("state") == "online" for v in links)

    def _sentinel_ready(self, port: int) -> bool:
        """This Sentinel sees the primary up, its replica linked, and the other Sentinels."""
        with contextlib.closing(redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5,
                                            decode_responses=True)) as s:
            seen = s.execute_command("SENTINEL", "MASTER", SERVICE)
            replicas = s.execute_command("SENTINEL", "REPLICAS", SERVICE)
        return (int(seen["num-slaves"]) >= 1 and int(seen["num-other-sentinels"]) >= 2
                and "down" not in seen["flags"]
                and all("down" not in r["flags"] and r.get("master-link-status") == "ok"
                        for r in replicas))

    def describe(self) -> str:
        alive = {p: proc.poll() is None for p, proc in self.nodes.items()}
        return f"nodes alive {alive}; sentinels name {[self.ask(p) for p in self.sentinels]}"

    def kill_primary(self) -> int:
        """SIGKILL the current primary; its port."""
        port = self.primary()
        if not port:
            raise RuntimeError(f"no primary to kill: {self.describe()}")
        self.nodes[port].send_signal(signal.SIGKILL)
        self.nodes[port].wait()
        return port

    def wait_failover(self, old: int, timeout_s: float) -> int:
        """Until the Sentinels' majority names a primary other than ``old``; its port."""
        deadline = time.monotonic() + timeout_s
        while (port := self.primary()) in (0, old):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no failover within {timeout_s:g}s: {self.describe()}")
            time.sleep(0.1)
        return port

    def restore(self, old: int, timeout_s: float = 30.0) -> None:
        """Start the killed node again, empty, as the replica of today's primary, and wait for
        a healthy deployment (for the tests that follow)."""
        self.start_node(old, replica_of=self.primary())
        self.wait_healthy(timeout_s)
