"""`fastmatch bench-tick` measures the real leader against a private redis-server: these runs are
small (no timing is asserted, only that the bench did what its JSON line says)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import TIMEOUT


def bench_tick(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "server.app.cli", "bench-tick", *args],
                          capture_output=True, text=True, timeout=30 * TIMEOUT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_matchable_pool_is_committed_in_full_while_another_client_is_timed() -> None:
    out = bench_tick("--players", "3000", "--matchable", "--mode", "5v5", "--probe")
    assert out["players_committed"] == 3000 and out["matches"] == 300
    other = out["other_client"]
    assert isinstance(other, dict) and other["samples"] > 0
    assert 0 <= other["p50_ms"] <= other["p99_ms"] <= other["max_ms"]
    assert isinstance(out["longest_redis_call_ms"], float)


def test_a_steady_pool_reports_its_ticks() -> None:
    out = bench_tick("--players", "2000", "--churn", "0.05", "--ticks", "5", "--id-length", "64")
    assert out["ticks"] == 5 and out["changes_per_tick"] == 100 and out["pool_loads"] == 1
    assert out["id_length"] == 64
    assert out["tick_p50_ms"] <= out["tick_p99_ms"] and "other_client" not in out
