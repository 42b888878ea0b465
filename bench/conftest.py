"""Benchmark session header (machine, date) and a summary of the DESIGN.md pairing targets."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from server.osutil import machine

# Filled by the benchmarks: (mode, size, impl) -> best seconds.
RESULTS: dict[tuple[str, int, str], float] = {}


def pytest_report_header() -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"fastmatch bench on {machine()}, {now}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("DESIGN.md pairing targets (decode + pair, best round)")
    tr.write_line(f"{'mode':6} {'candidates':>10} {'cython ms':>10} {'python ms':>10} {'ratio':>7}")
    for mode, size in sorted({(m, s) for m, s, _ in RESULTS}):
        cy = RESULTS.get((mode, size, "cython"))
        py = RESULTS.get((mode, size, "python"))
        ratio = f"{py / cy:6.1f}x" if cy and py else "      -"
        cy_ms = f"{cy * 1000:10.2f}" if cy else f"{'-':>10}"
        py_ms = f"{py * 1000:10.2f}" if py else f"{'-':>10}"
        tr.write_line(f"{mode:6} {size:>10} {cy_ms} {py_ms} {ratio}")
    cy100 = [RESULTS[k] for k in RESULTS if k[1] == 100_000 and k[2] == "cython"]
    if cy100:
        tr.write_line(f"target: 100k under 30 ms -> worst mode {max(cy100) * 1000:.2f} ms; "
                      "extension at least 30x the twin (see ratio)")


@pytest.fixture(scope="session")
def results() -> dict[tuple[str, int, str], float]:
    return RESULTS
