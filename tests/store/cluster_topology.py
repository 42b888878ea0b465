"""A real Redis Cluster deployment for tests: 3 primaries with 1 replica each (6 nodes) on free
ports of 127.0.0.1 in a private temporary directory, from the binary fastmatch finds
(``embedded.py``), joined by the CLI's ``--cluster create``.

A short node timeout (1 s) and ``cluster-replica-validity-factor 0`` (a replica may always take
over, however long its link was down) make a failover take a few seconds. Every process dies with
the test process (PR_SET_PDEATHSIG) and ``stop()`` kills and reaps them all, so a crashed run
leaves nothing listening. Never the machine's port 6379.

The cluster publishes no event for "failed over" or "healthy again", so every wait polls the
nodes against a deadline and raises with ``describe()`` when it passes.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeAlias

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from server.osutil import die_with_parent
from server.store.embedded import find_redis_server

NODE_TIMEOUT_MS: Final = 1000
PRIMARIES: Final = 3
SLOTS: Final = 16384
BUS_OFFSET: Final = 10000  # each node's cluster bus listens on its port + 10000
# Node ports and their bus ports both stay below Linux's ephemeral range (32768 and up), so a
# client connection cannot be handed a killed node's port before restore() binds it again.
PORTS: Final = range(20000, 22700)
POLL_S: Final = 0.05

# (first slot, last slot) -> (primary port, replica ports), as one node's CLUSTER SLOTS says.
SlotMap: TypeAlias = dict[tuple[int, int], tuple[int, frozenset[int]]]


@dataclass(frozen=True)
class _Killed:
    """What restore() and wait_failover() need to know about a node after it is gone."""

    node_id: str
    slots: list[tuple[int, int]]  # the ranges it served as a primary (empty: it was a replica)
    primary: int  # the primary it replicated (0: it was a primary)


def find_cli(server_binary: str) -> str:
    """The CLI beside the server first (the same release: ``--cluster`` options have changed
    across versions), the one named like the server before the other, then one on PATH."""
    names = ["redis-cli", "valkey-cli"]
    if Path(server_binary).name.startswith("valkey"):
        names.reverse()
    for name in names:
        beside = Path(server_binary).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    for name in names:
        if found := shutil.which(name):
            return found
    raise RuntimeError(f"no {' or '.join(names)} beside {server_binary} or on PATH")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int]) -> int:
    """A port free now whose bus port (+10000) is free too; another process may still take it
    before the node binds, which start() survives by trying another."""
    while True:
        port = random.choice(PORTS)
        if port not in taken and _bindable(port) and _bindable(port + BUS_OFFSET):
            return port


class ClusterTopology:
    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self.dir = Path(tempfile.mkdtemp(prefix="fastmatch-cluster-"))
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}  # by port, in the order started
        self._killed: dict[int, _Killed] = {}

    @property
    def seeds(self) -> list[int]:
        return list(self.nodes)[:PRIMARIES]

    @property
    def locator(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.seeds)

    @property
    def cluster_env(self) -> dict[str, str]:
        """How `fastmatch serve` is pointed at this deployment."""
        return {"FASTMATCH_REDIS__URL": f"redis://127.0.0.1:{self.seeds[0]}",
                "FASTMATCH_REDIS__CLUSTER": "true"}

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, timeout_s: float = 30.0) -> ClusterTopology:
        deadline = time.monotonic() + timeout_s
        try:
            taken: set[int] = set()
            for _ in range(2 * PRIMARIES):
                self._boot(taken, deadline)
            self._create(deadline)
            self.wait_healthy(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def _boot(self, taken: set[int], deadline: float) -> None:
        """Start one node on a fresh port, trying another if the port was taken meanwhile."""
        for _ in range(3):
            port = free_cluster_port(taken)
            taken.add(port)
            self._spawn_node(port)
            if self._wait_up(port, deadline):
                return
            del self.nodes[port]
        raise RuntimeError(f"no cluster node would start; the last one logged: {self._log_tail(port)}")

    def _spawn_node(self, port: int) -> None:
        work = self.dir / f"node-{port}"
        work.mkdir(exist_ok=True)
        args = [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(work), "--daemonize", "no",
                "--loglevel", "warning", "--logfile", str(work / "log"),
                "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0",
                "--cluster-enabled", "yes", "--cluster-config-file", str(work / "nodes.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-replica-validity-factor", "0",
                # CLUSTER SLOTS leaves out a replica until its replication offset moves, which on
                # an idle primary waits for the primary's ping: every 10 s by default.
                "--repl-ping-replica-period", "1"]
        self.nodes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL,
                                            preexec_fn=die_with_parent)  # noqa: PLW1509 (prctl only)

    def _wait_up(self, port: int, deadline: float) -> bool:
        """Until the node answers PING (True) or exits, as it does when its port was taken."""
        proc = self.nodes[port]
        with contextlib.closing(self.node(port)) as client:
            while proc.poll() is None:
                with contextlib.suppress(redis.RedisError, OSError):
                    if client.ping():
                        return True
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {port} did not answer PING in time")
                time.sleep(0.01)  # start-up takes milliseconds; only the socket tells
        proc.wait()
        return False

    def _log_tail(self, port: int) -> str:
        """The end of a node's log, for errors: stop() deletes the directory it lives in."""
        log = self.dir / f"node-{port}" / "log"
        return log.read_text(errors="replace")[-1000:] if log.exists() else "(no log)"

    def _create(self, deadline: float) -> None:
        cli = find_cli(self.binary)
        args = [cli, "--cluster", "create", *(f"127.0.0.1:{port}" for port in self.nodes),
                "--cluster-replicas", "1", "--cluster-yes"]
        done = subprocess.run(args, capture_output=True, text=True,
                              timeout=max(1.0, deadline - time.monotonic()),
                              preexec_fn=die_with_parent)
        if done.returncode != 0:
            raise RuntimeError(f"{cli} --cluster create failed ({done.returncode}): "
                               f"{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def stop(self) -> None:
        for proc in self.nodes.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- what tests look at -------------------------------------------------------------------------

    def node(self, port: int) -> redis.Redis:
        """A client of one node that does not retry: redis-py's default (10 tries with backoff)
        spends about 3 s on a port nobody listens on, and the waits here poll anyway."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, decode_responses=True,
                           retry=Retry(NoBackoff(), 0))

    def _live(self) -> list[int]:
        return [port for port, proc in self.nodes.items() if proc.poll() is None]

    def _slot_map(self, port: int) -> SlotMap:
        with contextlib.closing(self.node(port)) as client:
            rows = _command(client, "CLUSTER", "SLOTS")
        return {(int(row[0]), int(row[1])): (int(row[2][1]),
                                             frozenset(int(replica[1]) for replica in row[3:]))
                for row in rows}

    def _any_slot_map(self) -> SlotMap:
        for port in self._live():
            with contextlib.suppress(redis.RedisError, OSError):
                return self._slot_map(port)
        raise RuntimeError(f"no live cluster node answers CLUSTER SLOTS: {self.describe()}")

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Primary port -> its slot ranges, as the first live node that answers sees them."""
        found: dict[int, list[tuple[int, int]]] = {}
        for ranges, (primary, _) in sorted(self._any_slot_map().items()):
            found.setdefault(primary, []).append(ranges)
        return found

    def owner(self, key: str) -> int:
        """The primary serving ``key``'s slot."""
        return self._owner_of_slot(key_slot(key.encode()))

    def _cluster_nodes(self, port: int) -> list[list[str]]:
        """CLUSTER NODES as rows: id, ip:port@bus, flags, primary id, ... (the documented order)."""
        with contextlib.closing(self.node(port)) as client:
            text: str = _command(client, "CLUSTER", "NODES")
        return [line.split() for line in text.splitlines() if line.strip()]

    def replica_of(self, primary: int) -> int:
        """A live replica of ``primary`` as the primary itself sees it."""
        rows = self._cluster_nodes(primary)
        me = next(row[0] for row in rows if "myself" in row[2].split(","))
        live = self._live()
        for row in rows:
            flags, port = set(row[2].split(",")), _port(row[1])
            if row[3] == me and "slave" in flags and not flags & {"fail", "fail?"} and port in live:
                return port
        raise RuntimeError(f"no live replica of {primary}: {self.describe()}")

    def describe(self) -> str:
        """Each node alive or dead, its role and cluster state, and who serves which slots."""
        seen = []
        for port, proc in self.nodes.items():
            if proc.poll() is not None:
                seen.append(f"{port} dead")
                continue
            try:
                with contextlib.closing(self.node(port)) as client:
                    role = _command(client, "ROLE")[0]
                    info: str = _command(client, "CLUSTER", "INFO")
                state = next((line.split(":", 1)[1] for line in info.splitlines()
                              if line.startswith("cluster_state:")), "?")
                seen.append(f"{port} {role} {state}")
            except (redis.RedisError, OSError) as exc:
                seen.append(f"{port} alive, no answer ({exc})")
        try:
            slots = str(self.primaries())
        except RuntimeError:
            slots = "unknown"
        return f"nodes [{', '.join(seen)}]; slots by primary {slots}"

    # -- health -------------------------------------------------------------------------------------

    def wait_healthy(self, timeout_s: float) -> None:
        """Every live node says cluster_state:ok and gives the same CLUSTER SLOTS, every slot is
        served by a live primary, and every primary has a replica in sync: ready to fail over."""
        self._wait(self._healthy, timeout_s, "cluster not healthy")

    def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout_s:g}s: {self.describe()}")
            time.sleep(POLL_S)

    def _agreed(self) -> SlotMap | None:
        """The slot map every live node gives while each says cluster_state:ok (None: not so)."""
        maps = []
        try:
            for port in self._live():
                with contextlib.closing(self.node(port)) as client:
                    info: str = _command(client, "CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return None
                maps.append(self._slot_map(port))
        except (redis.RedisError, OSError):
            return None
        if not maps or any(other != maps[0] for other in maps[1:]):
            return None
        covered = sum(last - first + 1 for first, last in maps[0])
        return maps[0] if covered == SLOTS else None

    def _healthy(self) -> bool:
        agreed = self._agreed()
        if agreed is None:
            return False
        live = set(self._live())
        # Before the node timeout passes, a killed primary is still listed with cluster_state:ok.
        if not all(primary in live and replicas and replicas <= live
                   for primary, replicas in agreed.values()):
            return False
        try:
            return all(self._replicated(primary) for primary, _ in agreed.values())
        except (redis.RedisError, OSError):
            return False

    def _replicated(self, primary: int) -> bool:
        with contextlib.closing(self.node(primary)) as client:
            info = client.info("replication")
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return info.get("role") == "master" and bool(links) and all(
            v.get("state") == "online" for v in links)

    # -- what tests do ------------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one node and reap it, first noting what it served (for wait_failover and
        restore, which cannot ask a dead node)."""
        with contextlib.closing(self.node(port)) as client:
            node_id: str = _command(client, "CLUSTER", "MYID")
            role = _command(client, "ROLE")
        primary = 0 if role[0] == "master" else int(role[2])
        self._killed[port] = _Killed(node_id, self.primaries().get(port, []), primary)
        proc = self.nodes[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def wait_failover(self, old: int, timeout_s: float) -> int:
        """After ``old`` (a primary) was killed: until every live node says cluster_state:ok and
        names the same live primaries for every slot ``old`` served; the new primary's port."""
        served = self._killed[old].slots
        if not served:
            raise RuntimeError(f"{old} served no slots when killed: there is nothing to fail over")
        live = self._live()
        taken: list[int] = []

        def moved() -> bool:
            agreed = self._agreed()
            if agreed is None:
                return False
            # Compare primaries only: replica lists can lag while the dead node is being failed.
            owners = [primary for ranges, (primary, _) in agreed.items()
                      if any(_overlap(ranges, mine) for mine in served)]
            taken[:] = owners
            return bool(owners) and all(primary in live for primary in owners)

        self._wait(moved, timeout_s, f"slots of {old} not failed over")
        return taken[0]

    def failover(self, replica: int, timeout_s: float = 15.0) -> None:
        """A manual CLUSTER FAILOVER on ``replica``; waits until it is a primary and the whole
        cluster is healthy again (its old primary back in sync as its replica), so a test may
        fail over again straight after."""
        self.request_failover(replica)
        self.wait_promoted(replica, timeout_s)
        self.wait_healthy(timeout_s)

    def request_failover(self, replica: int) -> None:
        """Send CLUSTER FAILOVER to ``replica`` and return at once: the switch itself (the
        primary pauses writes, the replica catches up and takes the slots) is the fault."""
        with contextlib.closing(self.node(replica)) as client:
            _command(client, "CLUSTER", "FAILOVER")

    def wait_promoted(self, replica: int, timeout_s: float) -> None:
        """Until every live node agrees that ``replica`` serves slots (the handover is done;
        its old primary may still be resyncing)."""
        def done() -> bool:
            agreed = self._agreed()
            return agreed is not None and any(primary == replica for primary, _ in agreed.values())

        self._wait(done, timeout_s, f"no manual failover to {replica}")

    def restore(self, old: int, timeout_s: float = 30.0) -> None:
        """Start a killed node again empty (a new node id) as a replica of the primary that
        took over its slots (or, for a killed replica, of the primary it followed); waits until
        the cluster is healthy, for the tests that follow."""
        deadline = time.monotonic() + timeout_s
        killed = self._killed.pop(old)
        target = (self._owner_of_slot(killed.slots[0][0]) if killed.slots else killed.primary)
        # Forget the dead identity first: otherwise every node keeps it as a "noaddr,fail" ghost
        # at this address. A node that never knew it answers "Unknown node", which is fine.
        for port in self._live():
            with contextlib.suppress(redis.ResponseError), contextlib.closing(self.node(port)) as c:
                _command(c, "CLUSTER", "FORGET", killed.node_id)
        work = self.dir / f"node-{old}"
        # nodes.conf would bring the old identity back and a replica's dump.rdb its old data;
        # CLUSTER REPLICATE refuses a node that holds keys. The log stays, for post-mortems.
        for path in work.iterdir():
            if path.name != "log":
                path.unlink()
        self._spawn_node(old)
        if not self._wait_up(old, deadline):
            raise RuntimeError(f"node {old} would not start again: {self._log_tail(old)}")
        with contextlib.closing(self.node(target)) as client:
            target_id: str = _command(client, "CLUSTER", "MYID")
        with contextlib.closing(self.node(old)) as client:
            _command(client, "CLUSTER", "MEET", "127.0.0.1", str(target))
            self._wait(lambda: self._replicate(client, target_id), deadline - time.monotonic(),
                       f"{old} could not replicate {target}")
        self.wait_healthy(max(0.0, deadline - time.monotonic()))

    def _replicate(self, client: redis.Redis, target_id: str) -> bool:
        """CLUSTER REPLICATE answers "Unknown node" until the MEET handshake is done."""
        try:
            _command(client, "CLUSTER", "REPLICATE", target_id)
        except redis.ResponseError:
            return False
        return True

    def _owner_of_slot(self, slot: int) -> int:
        for (first, last), (primary, _) in self._any_slot_map().items():
            if first <= slot <= last:
                return primary
        raise RuntimeError(f"no node serves slot {slot}: {self.describe()}")


def _command(client: redis.Redis, *args: str) -> Any:
    """Every raw command goes through here: redis-py leaves ``execute_command`` unannotated, and
    the words passed apart skip its reply parsing (whose shapes change between its versions)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _port(address: str) -> int:
    """The client port of CLUSTER NODES' ``ip:port@bus[,hostname]`` (0 for a node without one)."""
    port = address.split("@", 1)[0].rpartition(":")[2]
    return int(port) if port.isdigit() else 0


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]
