"""`fastmatch sim --serve --faults`: a short schedule of every fault under load. Players reconnect
and resume as real clients do; the run ends with zero violations, nothing left in Redis, and a
final clean batch that is matched in full (issue 13)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import TIMEOUT

FASTMATCH = str(Path(sys.executable).with_name("fastmatch"))
SCHEDULE = "kill-worker@2,freeze-redis@4.5:1.5,sigterm-worker@7,restart-redis@9.5"
# Read by both `serve` and the sim: short deadlines so every failure path plays out in seconds,
# a resume grace longer than the freeze, and a worker's death noticed within a second.
FAST = {
    "FASTMATCH_SERVER__RESUME_GRACE_MS": "3000",
    "FASTMATCH_SERVER__HEARTBEAT_INTERVAL_S": "0.2",
    "FASTMATCH_SERVER__HEARTBEAT_TTL_S": "1",
    "FASTMATCH_SERVER__DRAIN_DELAY_S": "0",
    "FASTMATCH_SERVER__DRAIN_TIMEOUT_S": "3",
    "FASTMATCH_MATCHING__READY_TIMEOUT_MS": "2000",
    "FASTMATCH_MATCHING__FINISHED_MATCH_TTL_MS": "300",
    "FASTMATCH_GAMESERVER__ALLOCATION_TIMEOUT_MS": "1500",
    "FASTMATCH_REDIS__OPERATION_TIMEOUT_S": "0.5",  # a freeze of 1.5 s is refused, not waited out
}


def _clean_run(tmp_path: Path, *args: str) -> dict[str, Any]:
    """`fastmatch sim --serve` with a fault schedule (``args``); the report, once it shows what
    every such run must: zero violations, nothing left in Redis, a final batch matched in full."""
    report = tmp_path / "sim.json"
    out = subprocess.run(
        [FASTMATCH, "sim", "--serve", "--workers", "2", "--rating-sd", "400", "--final-batch", "10",
         "--no-progress", "--report", str(report), *args],
        capture_output=True, text=True, timeout=TIMEOUT * 30, check=False,
        env={**os.environ, **FAST},
    )
    summary: dict[str, Any] = json.loads(report.read_text())
    assert out.returncode == 0 and summary["violation_count"] == 0, (
        out.stdout[-4000:] + out.stderr[-2000:] + json.dumps(summary["traces"], indent=1)[:4000])
    assert summary["leftover_keys"] == []
    assert summary["final_batch"] == {"players": 10, "matched": 10, "outcomes": {"matched": 10}}
    return summary


def test_a_fault_schedule_leaves_nothing_behind(tmp_path: Path) -> None:
    summary = _clean_run(tmp_path, "--rate", "30", "--duration", "11", "--lifetime", "9",
                         "--faults", SCHEDULE, "--plot", str(tmp_path / "sim.png"))
    faults = {f["fault"]: f for f in summary["faults"]}
    assert list(faults) == SCHEDULE.split(",")
    for fault in faults.values():
        assert fault["did"] and not fault["did"].startswith(("could not", "not applied")), fault
    # What each fault did to the players, as a real client lives it.
    killed, frozen, drained, restarted = faults.values()
    assert killed["drops"] > 0 and killed["resumed"], killed  # 1006, then back within the grace
    assert frozen["refused"].get("unavailable", 0) + frozen.get("unavailable", 0) > 0, frozen
    assert drained["resumed"], drained  # 1001, then resumed on the other worker
    assert restarted["removed"] > 0 or restarted["resumed"], restarted  # told their ticket is gone
    assert summary["connections"].get("drop:1001", 0) > 0


def test_killing_the_leader_hands_matching_to_a_new_term(tmp_path: Path) -> None:
    """Issue 10: the leader dies mid-churn; another worker takes the lease when it lapses, loads
    the queue into its pool, follows the changes and goes on matching: nobody is matched twice,
    nothing is left, and matches formed by a new term come after the kill."""
    summary = _clean_run(tmp_path, "--rate", "40", "--duration", "10", "--lifetime", "8",
                         "--faults", "kill-leader@3")
    [killed] = summary["faults"]
    assert killed["did"].startswith("SIGKILL worker pid") and "leader of 1v1" in killed["did"], killed
    # The lease (3 s) lapses, then the new leader's first tick loads the pool and matches.
    assert killed["new_term_match_after_s"] is not None, killed
    assert killed["drops"] > 0, killed  # the dead worker's players were cut and came back


def test_a_fault_the_run_never_applied_fails_it(tmp_path: Path) -> None:
    """A run that names a fault and ends before it (or cannot apply it) has not tested what
    it says: that is a violation, never a clean report."""
    report = tmp_path / "sim.json"
    out = subprocess.run(
        [FASTMATCH, "sim", "--serve", "--workers", "1", "--rate", "10", "--duration", "1",
         "--lifetime", "1", "--no-progress", "--report", str(report), "--faults", "kill-worker@60"],
        capture_output=True, text=True, timeout=TIMEOUT * 12, check=False, env={**os.environ, **FAST},
    )
    summary: dict[str, Any] = json.loads(report.read_text())
    assert out.returncode != 0
    assert summary["violations"] == ["fault kill-worker@60 not applied: the run ended first"]
