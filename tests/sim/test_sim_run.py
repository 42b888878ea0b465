"""`fastmatch sim --serve`, briefly, with the whole behaviour mix: zero violations, a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server.config import DEV_SECRET, default_config_path
from server.store.embedded import EmbeddedRedis
from tests.helpers import TIMEOUT

FASTMATCH = str(Path(sys.executable).with_name("fastmatch"))
# Read by both `serve` and the sim: short deadlines, so every failure path ends quickly.
SHORT = {"FASTMATCH_MATCHING__READY_TIMEOUT_MS": "1500",
         "FASTMATCH_MATCHING__FINISHED_MATCH_TTL_MS": "300",
         "FASTMATCH_SERVER__RESUME_GRACE_MS": "1500"}


def test_short_sim_run_with_full_mix(tmp_path: Path) -> None:
    report, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    out = subprocess.run(
        [FASTMATCH, "sim", "--serve", "--workers", "2", "--rate", "40", "--duration", "4",
         "--lifetime", "8", "--no-progress", "--slo-p95-start-loading-ms", "5000",
         "--report", str(report), "--plot", str(plot)],
        capture_output=True, text=True, timeout=TIMEOUT * 24, check=False,
        env={**os.environ, **SHORT},
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


def test_serve_runs_the_config_the_sim_was_given(tmp_path: Path) -> None:
    """`fastmatch --config FILE sim --serve`: the server it starts runs FILE too. Here FILE
    signs tokens with a secret of its own; a server on the shipped config would refuse every
    player with 401."""
    default = default_config_path().read_text(encoding="utf-8")
    assert DEV_SECRET in default
    config = tmp_path / "own.toml"
    config.write_text(default.replace(DEV_SECRET, "a-secret-of-this-test-only"), encoding="utf-8")
    report = tmp_path / "sim.json"
    out = subprocess.run(
        [FASTMATCH, "--config", str(config), "sim", "--serve", "--workers", "1", "--rate", "10",
         "--duration", "1", "--lifetime", "6", "--mix", "normal=1", "--rating-sd", "0",
         "--no-progress", "--report", str(report), "--plot", str(tmp_path / "sim.png")],
        capture_output=True, text=True, timeout=TIMEOUT * 24, check=False,
        env={**os.environ, **SHORT},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(report.read_text())
    assert summary["violation_count"] == 0
    assert set(summary["handshakes"]["answers"]) == {"101"}, summary["handshakes"]
    assert summary["outcomes"].get("matched", 0) >= 2, summary["outcomes"]


def test_a_mode_the_config_does_not_define_is_refused_up_front(
        shared_redis: EmbeddedRedis, tmp_path: Path) -> None:
    """Every player would be refused `unsupported_game_mode`: the sim says so and exits 2
    before any player (or server) starts, and writes no report."""
    report = tmp_path / "sim.json"
    out = subprocess.run(
        [FASTMATCH, "sim", "--mode", "no_such_mode", "--redis-url", shared_redis.url,
         "--url", "ws://127.0.0.1:1/ws", "--rate", "5", "--duration", "0.5", "--lifetime", "1",
         "--no-progress", "--report", str(report), "--plot", str(tmp_path / "sim.png")],
        capture_output=True, text=True, timeout=TIMEOUT * 12, check=False,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--mode 'no_such_mode' is not a configured mode (1v1, 5v5" in out.stderr
    assert not report.exists()
