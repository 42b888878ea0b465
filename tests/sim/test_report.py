"""The report's figures: server CPU, Redis and message rates over the steady window (not the
idle tail after it), and the SLO gate, which counts stalled players instead of leaving them out."""

from __future__ import annotations

import json

from server.config import DEV_SECRET
from server.sim.playing import PlayerResult, SimSettings
from server.sim.report import slo_failures, summarize
from server.sim.runner import RunConfig, RunResult


def result(players: list[PlayerResult] | None = None) -> RunResult:
    settings = SimSettings(url="ws://127.0.0.1:1/ws", secret=DEV_SECRET)
    r = RunResult(RunConfig(settings=settings, redis_url="", rate=10, duration_s=10, mix={}))
    r.players = players or []
    r.arrivals_s, r.elapsed_s, r.steady_s = 10.0, 25.0, (1.0, 10.0)
    return r


def test_server_figures_are_read_over_the_steady_window() -> None:
    """Arrivals ran for 10 s; the last players then waited out their lifetimes, the server idle,
    until 25 s. Means over the whole run read less than half what the server did."""
    r = result([PlayerResult(f"sim1-{n}", "normal", sent=20, received=30) for n in range(100)])
    busy = [(float(t), 60.0) for t in range(1, 11)]
    idle = [(0.5, 5.0)] + [(float(t), 1.0) for t in range(11, 26)]  # warming up, then the tail
    r.sampler.cpu_series["worker 7"] = sorted(busy + idle)
    r.sampler.peak_rss_mb["worker 7"] = 50.0
    r.redis_ops = sorted([(t, 3000.0) for t, _ in busy] + [(t, 10.0) for t, _ in idle])
    r.steady_messages_per_s = 500.0  # counted by the run as the messages went
    summary = summarize(r)
    assert summary["workers"]["worker 7"]["cpu_percent_mean"] == 60.0
    assert summary["redis_commands_per_s_mean"] == 3000.0
    assert summary["messages_per_s"] == 500.0  # not 5,000 messages / 25 s
    assert summary["steady_window_s"] == [1.0, 10.0]


def normal(n: int, match_ms: float | None) -> PlayerResult:
    """A normal player enqueued at 1 s: matched ``match_ms`` later, or never (unfinished)."""
    if match_ms is None:
        return PlayerResult(f"sim1-{n}", "normal", t_enqueue=1.0)
    t = 1.0 + match_ms / 1000
    return PlayerResult(f"sim1-{n}", "normal", t_enqueue=1.0, t_start_loading=t, t_match_found=t,
                        outcome="matched")


def test_a_stalled_matcher_fails_the_slo_gate() -> None:
    """18 normal players matched in 100 ms, 2 never (10%): the match p95 is infinite, not
    100 ms. An afk player left unfinished is not the matcher's doing and does not count."""
    players = [normal(n, 100.0) for n in range(18)] + [normal(18, None), normal(19, None)]
    players.append(PlayerResult("sim1-20", "afk", t_enqueue=1.0))
    summary = summarize(result(players))
    assert summary["match_found_ms"][95] == 100.0  # the matched players' own figure, as before
    slo = summary["slo"]
    assert (slo["normal_players"], slo["normal_unfinished"]) == (20, 2)
    assert slo["match_found_p95_ms"] is None and "infinite" in slo["rule"]
    json.dumps(summary, allow_nan=False)  # the report stays plain JSON
    failures = slo_failures(summary, p95_start_loading_ms=1000, p95_match_ms=1000)
    assert [f.split(" (")[0] for f in failures] == ["p95 start_loading_ms infinite > 1000",
                                                    "p95 match_found_ms infinite > 1000"]
    assert "2 of 20 normal players unfinished" in failures[1]


def test_a_few_stalled_players_still_count_in_the_slo_percentiles() -> None:
    """1 of 31 unfinished (3%): the p95 stays finite, but is taken with that player counted."""
    players = [normal(n, 100.0 + n) for n in range(30)] + [normal(30, None)]
    summary = summarize(result(players))
    assert summary["match_found_ms"][95] == 128.0  # rank 29 of the 30 matched
    assert summary["slo"]["match_found_p95_ms"] == 129.0  # rank 30 of 31
    assert slo_failures(summary, None, 129) == []
    assert slo_failures(summary, None, 128.5) == ["p95 match_found_ms 129.0 > 128.5"]
