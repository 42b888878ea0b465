"""CPU and memory of the supervisor's process tree, from /proc, for the one /metrics.

prometheus-client's own process collector describes the process that serves /metrics, and in
multiprocess mode the workers' collectors are not aggregated at all; this reads each local
process the supervisor owns, labelled by its role (``worker-0``, ``gameserver``, ...).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Final, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")

Processes = Callable[[], Mapping[str, int]]  # role -> pid, read at every scrape


class Usage(NamedTuple):
    cpu_seconds: float
    resident_bytes: int


def usage(pid: int) -> Usage | None:
    """User + system CPU and resident memory of ``pid``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return Usage((utime + stime) / _TICKS, int(statm.split()[1]) * _PAGE)


class ProcessCollector(Collector):
    def __init__(self, processes: Processes) -> None:
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "fastmatch_process_cpu_seconds", "CPU time (user + system) of each local fastmatch "
            "process", labels=["process"])
        rss = GaugeMetricFamily(
            "fastmatch_process_resident_memory_bytes", "Resident memory of each local fastmatch "
            "process", labels=["process"])
        for role, pid in sorted(self.processes().items()):
            got = usage(pid)
            if got is not None:
                cpu.add_metric([role], got.cpu_seconds)
                rss.add_metric([role], got.resident_bytes)
        yield cpu
        yield rss
