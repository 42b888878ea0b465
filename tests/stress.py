"""``make test-stress``: the whole suite on a contended machine, several rounds in a row.

CI runs on shared machines; a test that only passes on an idle one is a bug in the test or the
product. Each round runs the suite twice: once with a CPU hog on one core, once with one hog
per core (both contended). Every failure is printed with its test id and the condition it ran
under; the exit status is non-zero if any run had one. Nothing is retried.

    python -m tests.stress [--rounds 3] [pytest args...]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from server.osutil import die_with_parent

_HOG = "while :; do :; done"


@contextlib.contextmanager
def hogs(cores: list[int]) -> Iterator[None]:
    """A busy loop pinned to each of ``cores`` (``sh``, as a noisy neighbour would be)."""
    procs = []
    for core in cores:
        # Dies with this process even if it is SIGKILLed (no finally runs then).
        proc = subprocess.Popen(["sh", "-c", _HOG], stdout=subprocess.DEVNULL,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 (prctl only)
        with contextlib.suppress(OSError):  # pinning is best effort (e.g. a restricted cpuset)
            os.sched_setaffinity(proc.pid, {core})
        procs.append(proc)
    try:
        yield
    finally:
        before = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut this short
        for proc in procs:
            proc.kill()
            proc.wait()
        signal.signal(signal.SIGTERM, before)


def failures(junit: Path) -> list[str]:
    """``test id: first line of the message`` for every failed or erroring test."""
    out = []
    for case in ET.parse(junit).iter("testcase"):
        for bad in (*case.findall("failure"), *case.findall("error")):
            test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
            message = (bad.get("message") or "").strip().splitlines()
            out.append(f"{test_id}: {message[0][:200] if message else bad.tag}")
    return out


def run_suite(label: str, cores: list[int], pytest_args: list[str]) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        started = time.monotonic()
        with hogs(cores):
            code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                    f"--junitxml={junit}", *pytest_args])
        found = failures(junit) if junit.exists() else []
        if code != 0 and not found:
            found = [f"pytest exited with {code} and reported no test (collection or set-up)"]
        print(f"== {label}: {'passed' if not found else f'{len(found)} failed'} "
              f"in {time.monotonic() - started:.0f} s", flush=True)
        return [f"[{label}] {line}" for line in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args, pytest_args = parser.parse_known_args(argv)
    # Stopped from outside (make interrupted, a CI job cancelled): unwind, so the hogs and the
    # running suite are killed instead of left spinning on a shared machine.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cpus = sorted(os.sched_getaffinity(0))
    conditions = [("one core busy", cpus[:1]), ("every core busy", cpus)]
    found: list[str] = []
    for n in range(1, args.rounds + 1):
        for label, cores in conditions:
            found += run_suite(f"round {n}/{args.rounds}, {label}", cores, pytest_args)
    print(f"== test-stress: {args.rounds} rounds x {len(conditions)} conditions, "
          f"{len(found)} failure(s)")
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
