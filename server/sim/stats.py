"""Server-side figures while a run goes: CPU and memory per worker, Redis commands per second."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class ProcessSample:
    pid: int
    name: str
    cpu_percent: float
    rss_mb: float


@dataclass
class Sampler:
    """Call ``sample(pids, now)`` periodically; keeps CPU% over each interval and peak RSS."""

    last: dict[int, tuple[float, float]] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    cpu_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    rss_series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def sample(self, pids: dict[str, int], now: float) -> list[ProcessSample]:
        out = []
        for name, pid in pids.items():
            cpu, rss = cpu_seconds(pid), rss_bytes(pid)
            if cpu is None or rss is None:
                continue
            prev = self.last.get(pid)
            self.last[pid] = (now, cpu)
            if prev is None or now <= prev[0]:
                continue
            percent = 100 * (cpu - prev[1]) / (now - prev[0])
            s = ProcessSample(pid, name, percent, rss / 2**20)
            out.append(s)
            self.cpu_series.setdefault(name, []).append((now, percent))
            self.rss_series.setdefault(name, []).append((now, s.rss_mb))
            self.peak_rss_mb[name] = max(self.peak_rss_mb.get(name, 0.0), s.rss_mb)
        return out


def window_mean(series: list[tuple[float, float]], window: tuple[float, float]) -> float | None:
    """The mean of the samples ``(t, value)`` taken within ``window`` (run times, both ends
    included; a sample covers the second before it); None when none was."""
    since, until = window
    values = [v for t, v in series if since <= t <= until]
    return sum(values) / len(values) if values else None
