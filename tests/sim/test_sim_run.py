"""`fastmatch sim --serve`, briefly, with the whole behaviour mix: zero violations, a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import TIMEOUT

FASTMATCH = str(Path(sys.executable).with_name("fastmatch"))


def test_short_sim_run_with_full_mix(tmp_path: Path) -> None:
    report, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    out = subprocess.run(
        [FASTMATCH, "sim", "--serve", "--workers", "2", "--rate", "40", "--duration", "4",
         "--lifetime", "8", "--no-progress", "--slo-p95-start-loading-ms", "5000",
         "--report", str(report), "--plot", str(plot)],
        capture_output=True, text=True, timeout=TIMEOUT * 24, check=False,
        # Read by both `serve` and the sim: short deadlines, so every failure path ends quickly.
        env={**os.environ, "FASTMATCH_MATCHING__READY_TIMEOUT_MS": "1500",
             "FASTMATCH_MATCHING__FINISHED_MATCH_TTL_MS": "300",
             "FASTMATCH_SERVER__RESUME_GRACE_MS": "1500"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(report.read_text())
    assert summary["violation_count"] == 0
    assert summary["players"] >= 150
    assert summary["outcomes"].get("matched", 0) > summary["players"] // 2
    assert set(summary["behaviours"]) >= {"normal", "afk", "drop_resume", "double_enqueue"}
    assert summary["errors"].get("invalid_message", 0) > 0  # the invalid behaviour was answered
    # Every player's first connection is counted; those that reconnect (drops, resumes) add
    # theirs. No overload here: every attempt is let in, and each let-in player is accounted.
    hs = summary["handshakes"]
    assert hs["attempts"] >= summary["players"]
    assert hs["answers"].get("101", 0) >= summary["players"]
    assert 0 < hs["ms"]["max"] < TIMEOUT * 1000
    assert summary["admitted"]["players"] == summary["players"]
    assert summary["admitted"]["outcomes"] == summary["outcomes"]
    # The generator measured its own loop lag every 50 ms of the run.
    lag = summary["client_loop_lag_ms"]
    assert lag["max"] is not None and 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert plot.stat().st_size > 10_000
    assert "invariant violations" in out.stdout
