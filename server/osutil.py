"""Small OS helpers shared by the process entry points (Linux)."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import platform
import signal
import sys
from typing import Final

_PR_SET_PDEATHSIG: Final = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` when our parent exits, so a SIGKILLed supervisor leaves no
    orphaned workers or servers behind. Also safe in ``preexec_fn`` (only calls prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig)


def exit_if_orphaned() -> None:
    """The parent may have died before ``die_with_parent`` took effect: then our parent is
    no longer the process that started us (init, or a subreaper, has adopted us). Compared
    with the parent's pid, not with 1: in a container without an init the supervisor itself
    is pid 1, and its workers' parent is 1 all along."""
    parent = multiprocessing.parent_process()  # set for processes started by multiprocessing
    if parent is not None and os.getppid() != parent.pid:
        sys.exit(1)


def machine() -> str:
    """What a benchmark ran on, for its report: host, CPU model and count, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
