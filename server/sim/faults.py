"""`fastmatch sim --serve --faults SCHEDULE`: faults applied on time to the server the run started.

    SCHEDULE := FAULT ("," FAULT)*
    FAULT    := KIND "@" SECONDS [":" SECONDS]    (from the start of the run; the second number
                                                   is freeze-redis's duration, and only that)

e.g. ``kill-worker@10,freeze-redis@22:3,restart-redis@40``. Each applied fault is recorded with
when it started and ended and what it did; the report then counts, per fault, what players went
through in its window (``report.fault_effects``).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Final, Protocol

from server.sim.facts import Facts

KINDS: Final = {
    "kill-worker": "SIGKILL one worker; its players reconnect, the supervisor restarts it",
    "kill-leader": "SIGKILL the worker leading the run's mode: another worker takes the lease when "
                   "it expires, loads the queue into its pool and goes on matching",
    "sigterm-worker": "SIGTERM one worker: it drains (1001) and the supervisor restarts it",
    "freeze-redis": "SIGSTOP Redis for the given seconds, then SIGCONT",
    "restart-redis": "kill Redis and start it empty on the same socket: every record is lost",
    "kill-supervisor": "SIGKILL the supervisor (its workers drain by themselves) and start a new "
                       "`fastmatch serve` on the same port at once, as a service manager would",
}


@dataclass(frozen=True)
class Fault:
    kind: str
    at_s: float
    duration_s: float = 0.0

    def __str__(self) -> str:
        return f"{self.kind}@{self.at_s:g}" + (f":{self.duration_s:g}" if self.duration_s else "")


def parse_faults(text: str) -> list[Fault]:
    """The schedule, in time order; a bad entry is a ValueError that names it."""
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        kind, _, when = entry.partition("@")
        at, _, duration = when.partition(":")
        if kind not in KINDS:
            raise ValueError(f"unknown fault {kind!r} in {entry!r}; one of {', '.join(KINDS)}")
        try:
            at_s, duration_s = float(at), float(duration or 0)
        except ValueError:
            raise ValueError(f"bad time in {entry!r}: KIND@SECONDS[:SECONDS]") from None
        if at_s < 0 or duration_s < 0:
            raise ValueError(f"negative time in {entry!r}")
        if (kind == "freeze-redis") != bool(duration):
            raise ValueError(f"{entry!r}: freeze-redis takes a duration (freeze-redis@T:SECONDS), "
                             "the other faults none")
        faults.append(Fault(kind, at_s, duration_s))
    if not faults:
        raise ValueError("the fault schedule is empty")
    return sorted(faults, key=lambda f: f.at_s)


class Target(Protocol):
    """What faults act on (``launch.Server``)."""

    def worker_pids(self) -> list[int]: ...
    def leader(self, mode: str) -> tuple[int, int]: ...
    def signal_redis(self, sig: int) -> int: ...
    def restart_redis(self) -> tuple[int, int]: ...
    def restart_supervisor(self) -> tuple[int, int]: ...


@dataclass
class Applied:
    fault: Fault
    started_s: float  # run time, as the players' clocks read it
    ended_s: float
    did: str


class Injector:
    """Applies a schedule against a target; ``applied`` fills in as faults happen."""

    def __init__(self, schedule: list[Fault], target: Target, facts: Facts, t0: float,
                 seed: int = 1) -> None:
        self.schedule = schedule
        self.target = target
        self.facts = facts
        self.t0 = t0
        self.rng = random.Random(seed)
        self.applied: list[Applied] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def run(self) -> None:
        await asyncio.gather(*(self._one(fault) for fault in self.schedule))

    async def _one(self, fault: Fault) -> None:
        await asyncio.sleep(max(fault.at_s - self.now(), 0.0))  # a schedule: the time is the event
        started = self.now()
        try:
            did = await self._apply(fault)
        except (OSError, RuntimeError) as exc:
            did = f"could not be applied: {exc}"
        self.applied.append(Applied(fault, round(started, 2), round(self.now(), 2), did))

    async def _apply(self, fault: Fault) -> str:
        target = self.target
        match fault.kind:
            case "kill-worker" | "sigterm-worker":
                pids = target.worker_pids()
                if not pids:
                    raise RuntimeError("no live worker found")
                pid = self.rng.choice(pids)
                sig = signal.SIGKILL if fault.kind == "kill-worker" else signal.SIGTERM
                os.kill(pid, sig)
                return f"{signal.Signals(sig).name} worker pid {pid} (of {len(pids)})"
            case "kill-leader":
                pid, epoch = target.leader(self.facts.mode)
                os.kill(pid, signal.SIGKILL)
                return f"SIGKILL worker pid {pid}, leader of {self.facts.mode} with epoch {epoch}"
            case "freeze-redis":
                pid = target.signal_redis(signal.SIGSTOP)
                try:
                    await asyncio.sleep(fault.duration_s)
                finally:
                    target.signal_redis(signal.SIGCONT)
                return f"SIGSTOP redis pid {pid}, SIGCONT {fault.duration_s:g}s later"
            case "restart-redis":
                self.facts.data_lost_at.append(self.now())
                # Blocks the loop for the restart (tens of ms): a child started from a helper
                # thread would get its parent-death signal when that thread ends.
                old, new = target.restart_redis()
                return f"redis pid {old} killed, started empty as pid {new} on the same socket"
            case "kill-supervisor":
                old, new = target.restart_supervisor()
                return f"SIGKILL supervisor pid {old}; new supervisor pid {new} started"
        raise RuntimeError(f"unknown fault {fault.kind}")  # pragma: no cover - parse refuses it
