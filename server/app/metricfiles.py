"""The supervisor's prometheus-client multiprocess directory, kept to a bounded set of files.

prometheus-client keeps each process's counters and histograms in files of their own
(``counter_<pid>.db``) and reads every file at every scrape; a dead process's files must stay,
or its counts would go back down. ``mark_process_dead`` removes only the live gauges. So each
worker that ever ran leaves files behind (a crash loop at the restart backoff's 30 s leaves
thousands a day, every rolling restart one set per worker), and every scrape and console
refresh reads more of them, without bound. A dead worker's files are folded into one archive
file per type instead: its values added to the archive's, as a scrape would add them. Every
read of the directory and every fold hold one lock, so no scrape sees a process counted twice
(folded, not yet removed) or not at all.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from typing import Any, Final

from prometheus_client import multiprocess
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

# The types a worker writes per process (its gauges are all live*: removed, never folded). The
# archive's name parses like a process's file: the type, then anything (prometheus-client reads
# a pid from the name of gauge files only).
_FOLDED: Final = ("counter", "histogram", "summary")
_ARCHIVE: Final = "archive"


class MetricFiles:
    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = threading.Lock()

    def collector(self) -> LockedCollector:
        """What a registry reads the directory through (every process's metrics, summed)."""
        return LockedCollector(MultiProcessCollector(None, path=self.path), self.lock)  # type: ignore[no-untyped-call]

    def retire(self, pid: int) -> None:
        """A dead process: its live gauges dropped, its counters and histograms folded."""
        multiprocess.mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
        with self.lock:
            for kind in _FOLDED:
                self._fold(os.path.join(self.path, f"{kind}_{pid}.db"),
                           os.path.join(self.path, f"{kind}_{_ARCHIVE}.db"))

    @staticmethod
    def _fold(source: str, archive_path: str) -> None:
        """The archive written anew beside the old one, then put in its place: a failure (a full
        disk) before that leaves both files as they were, counted once each."""
        try:
            values = list(MmapedDict.read_all_values_from_file(source))  # type: ignore[no-untyped-call]
        except FileNotFoundError:
            return  # that process wrote no metric of this type
        totals: dict[str, tuple[float, float]] = {}
        if os.path.exists(archive_path):
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(archive_path):  # type: ignore[no-untyped-call]
                totals[key] = (value, timestamp)
        for key, value, timestamp, _ in values:
            total, latest = totals.get(key, (0.0, 0.0))
            totals[key] = (total + value, max(latest, timestamp))
        fresh = f"{archive_path}.new"  # not *.db: never read by a scrape
        with contextlib.suppress(FileNotFoundError):
            os.remove(fresh)  # left by a fold that failed
        archive = MmapedDict(fresh)  # type: ignore[no-untyped-call]
        try:
            for key, (total, latest) in totals.items():
                archive.write_value(key, total, latest)  # type: ignore[no-untyped-call]
        finally:
            archive.close()  # type: ignore[no-untyped-call]
        os.replace(fresh, archive_path)
        os.remove(source)


class LockedCollector:
    """A collector whose reads exclude the folds (``MetricFiles.retire``)."""

    def __init__(self, inner: MultiProcessCollector, lock: threading.Lock) -> None:
        self._inner = inner
        self._lock = lock

    def collect(self) -> Iterable[Any]:
        with self._lock:
            return list(self._inner.collect())  # type: ignore[no-untyped-call]
