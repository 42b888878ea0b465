"""Summaries of a run: the terminal table, the JSON report, the PNG plot, the SLO gate."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from server.osutil import machine
from server.quantile import nearest_rank
from server.sim.player import PlayerResult
from server.sim.runner import RunResult
from server.sim.stats import window_mean

# How the SLO gate counts a player that never got there; the report says it with the figures.
SLO_RULE: Final = ("a normal player that enqueued and ended unfinished counts as an infinite "
                   "wait for each point it never reached")

Wait = Callable[[PlayerResult], float | None]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) of ``values``; None when there are none."""
    return nearest_rank(sorted(values), q / 100) if values else None


def _to_load(p: PlayerResult) -> float | None:
    """ms from enqueue to start_loading; None if the player never got there."""
    if p.t_start_loading is None or p.t_enqueue is None:
        return None
    return (p.t_start_loading - p.t_enqueue) * 1000


def _to_match(p: PlayerResult) -> float | None:
    """ms from enqueue to match_found; None if the player never got there."""
    if p.t_match_found is None or p.t_enqueue is None:
        return None
    return (p.t_match_found - p.t_enqueue) * 1000


def _waits(players: list[PlayerResult], wait: Wait) -> list[float]:
    return [w for p in players if (w := wait(p)) is not None]


def _stalled(p: PlayerResult) -> bool:
    """A plain player that asked for a match and was still waiting when its lifetime ended."""
    return p.behaviour == "normal" and p.outcome == "unfinished" and p.t_enqueue is not None


def _slo_p95(players: list[PlayerResult], wait: Wait) -> float | None:
    """The p95 the SLO gate judges (:data:`SLO_RULE`): over the players who got there, and
    every stalled `normal` player who did not, as an infinite wait. Over the first alone, a
    matcher that leaves some players waiting for good would pass: they would not count."""
    return percentile(_waits(players, wait) + [math.inf for p in players
                                               if _stalled(p) and wait(p) is None], 95)


def _slo(players: list[PlayerResult]) -> dict[str, Any]:
    """The SLO figures; an infinite p95 is written null, with the unfinished count beside it
    (JSON has no infinity)."""
    out: dict[str, Any] = {"rule": SLO_RULE,
                           "normal_players": sum(1 for p in players if p.behaviour == "normal"),
                           "normal_unfinished": sum(1 for p in players if _stalled(p))}
    for key, wait in (("start_loading", _to_load), ("match_found", _to_match)):
        p95 = _slo_p95(players, wait)
        out[f"{key}_p95_ms"] = _r(p95) if p95 is not None and math.isfinite(p95) else None
    return out


def summarize(r: RunResult, ceiling: float | None = None) -> dict[str, Any]:
    loads, matches = _waits(r.players, _to_load), _waits(r.players, _to_match)
    matched = [p.t_match_found for p in r.players if p.t_match_found is not None]
    # Steady state: matches completed while arrivals were running, after the first 10%.
    window = (r.arrivals_s * 0.1, r.arrivals_s)
    steady = sum(1 for t in matched if window[0] <= t <= window[1])
    rate = steady / (window[1] - window[0]) if window[1] > window[0] else 0.0
    errors: Counter[str] = Counter()
    for p in r.players:
        errors.update(p.errors)
    # Server figures over the steady window only: the idle tail after it would dilute them.
    workers = {name: {"cpu_percent_mean": _r(window_mean(r.sampler.cpu_series.get(name, []), r.steady_s)),
                      "rss_mb_peak": round(peak, 1), **_rss_drift(r.sampler.rss_series.get(name, []))}
               for name, peak in sorted(r.sampler.peak_rss_mb.items())}
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {"rate": r.config.rate, "duration_s": r.config.duration_s, "ramp_s": r.config.ramp_s,
                   "mix": r.config.mix, "mode": r.config.settings.mode,
                   "arrival_tick_ms": r.config.arrival_tick_s * 1000},
        "players": len(r.players),
        "lifecycle_per_s": round(rate, 1),
        "ceiling_lifecycle_per_s": round(ceiling, 1) if ceiling else None,
        "share_of_ceiling": round(rate / ceiling, 3) if ceiling else None,
        # Over the players who got there; the SLO gate's own figures count those who did not.
        "start_loading_ms": {q: _r(percentile(loads, q)) for q in (50, 95, 99)},
        "match_found_ms": {q: _r(percentile(matches, q)) for q in (50, 95, 99)},
        "slo": _slo(r.players),
        "outcomes": dict(Counter(p.outcome for p in r.players).most_common()),
        "behaviours": dict(Counter(p.behaviour for p in r.players).most_common()),
        "errors": dict(errors.most_common()),
        "steady_window_s": [round(t, 1) for t in r.steady_s],
        "messages_per_s": round(r.steady_messages_per_s, 1),
        # user + system CPU of the client processes per matched player, steady window
        "client_cpu_ms_per_lifecycle": round(1000 * r.client_cpu_s / r.client_lifecycles, 3)
        if r.client_lifecycles else None,
        "workers": workers,
        "redis_commands_per_s_mean": _r(window_mean(r.redis_ops, r.steady_s)),
        "violations": r.violations[:200],
        # What led to the first violations: each player's last messages, both ways.
        "traces": {p.player: p.trail for p in [q for q in r.players if q.trail][:30]},
        "violation_count": len(r.violations),
        "elapsed_s": round(r.elapsed_s, 1),
        "connections": _connections(r.players),
        "handshakes": _handshakes(r.players),
        # The generator's own loop lag: a client-side wait includes it (on shared cores it
        # can be most of it).
        "client_loop_lag_ms": {"p50": _r(percentile(r.client_lag_ms, 50)),
                               "p99": _r(percentile(r.client_lag_ms, 99)),
                               "max": _r(max(r.client_lag_ms, default=None))},
        # Players let in (a 101 on some attempt): under overload, these must still be served.
        "admitted": {"players": len(admitted := [p for p in r.players
                                                 if any(a == "101" for _, a in p.handshakes)]),
                     "outcomes": dict(Counter(p.outcome for p in admitted).most_common())},
        "missed_matches": r.missed_matches,
        "leftover_keys": r.leftover_keys[:200],
        "faults": fault_effects(r),
        "final_batch": dataclasses.asdict(r.final_batch) if r.final_batch else None,
    }


def _what(event: str) -> tuple[str, str]:
    kind, _, detail = event.partition(":")
    return kind, detail


def _connections(players: list[PlayerResult]) -> dict[str, Any]:
    """What the players' connections went through, over the whole run."""
    counts: Counter[str] = Counter()
    for p in players:
        for _, event in p.events:
            kind = _what(event)[0]
            if kind not in ("asked", "formed"):  # closes and drops asked for; matches formed
                counts[event if kind not in ("removed", "unavailable", "internal_error") else kind] += 1
    return dict(sorted(counts.items()))


def _handshakes(players: list[PlayerResult]) -> dict[str, Any]:
    """Every connection attempt: how it was answered, and how long it waited for that."""
    answers: Counter[str] = Counter()
    accepted: list[float] = []
    refused: list[float] = []
    for p in players:
        for ms, answer in p.handshakes:
            answers[answer] += 1
            (accepted if answer == "101" else refused).append(ms)
    waits = accepted + refused
    return {
        "attempts": len(waits),
        "answers": dict(answers.most_common()),
        "ms": {"p50": _r(percentile(waits, 50)), "p99": _r(percentile(waits, 99)),
               "max": _r(max(waits, default=None))},
        "accepted_ms": {"p99": _r(percentile(accepted, 99)), "max": _r(max(accepted, default=None))},
        "refused_ms": {"p99": _r(percentile(refused, 99)), "max": _r(max(refused, default=None))},
    }


def fault_effects(r: RunResult) -> list[dict[str, Any]]:
    """Per applied fault, what players went through from its start until the next fault starts
    (or the resume grace and a few seconds after it ended): unexpected drops, refused connection
    attempts by reason, resumes by the state the welcome gave, removals, `unavailable` answers,
    players who gave up, and the final outcomes of the players touched."""
    grace = r.config.settings.resume_grace_s
    starts = [a.started_s for a in r.faults] + [float("inf")]
    windows = [(a.started_s, min(starts[i + 1], a.ended_s + grace + 5))
               for i, a in enumerate(r.faults)]
    formed = sorted((t, _what(e)[1]) for p in r.players for t, e in p.events
                    if e.startswith("formed:"))
    out = []
    for applied, (begin, end) in zip(r.faults, windows, strict=True):
        counts: Counter[str] = Counter()
        refused: Counter[str] = Counter()
        resumed: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        for p in r.players:
            touched = False
            for t, event in p.events:
                if not begin <= t < end:
                    continue
                kind, detail = _what(event)
                if kind == "refused":
                    refused[detail] += 1
                elif kind == "resumed":
                    resumed[detail] += 1
                elif kind in ("drop", "gave_up", "removed", "unavailable", "internal_error",
                              "explained", "dropped"):
                    counts[event if kind in ("explained", "dropped") else kind] += 1
                else:
                    continue
                touched = True
            if touched:
                outcomes[p.outcome] += 1
        out.append({"fault": str(applied.fault), "started_s": applied.started_s,
                    "ended_s": applied.ended_s, "did": applied.did,
                    "window_s": [round(begin, 1), round(end, 1) if end != float("inf") else None],
                    "drops": counts.pop("drop", 0), "refused": dict(refused.most_common()),
                    "resumed": dict(resumed.most_common()), **dict(sorted(counts.items())),
                    "new_term_match_after_s": _new_term(formed, begin),
                    "match_after_end_s": next((round(t - applied.ended_s, 2) for t, _ in formed
                                               if t >= applied.ended_s), None),
                    "players_touched": sum(outcomes.values()),
                    "their_outcomes": dict(outcomes.most_common())})
    return out


def _new_term(formed: list[tuple[float, str]], since: float) -> float | None:
    """Seconds from ``since`` to the first match formed by a leader term (epoch and tag) not
    seen before it: how long a fault that cost the lease left the mode without matches."""
    before = {term for t, term in formed if t < since}
    return next((round(t - since, 2) for t, term in formed if t >= since and term not in before),
                None)


def _rss_drift(series: list[tuple[float, float]]) -> dict[str, float]:
    """Memory after warm-up (the second minute, or the first fifth) versus the last fifth."""
    if len(series) < 10:
        return {}
    fifth = len(series) // 5
    early = [mb for _, mb in series[fifth:2 * fifth]]
    late = [mb for _, mb in series[-fifth:]]
    return {"rss_mb_early": round(sum(early) / len(early), 1),
            "rss_mb_late": round(sum(late) / len(late), 1)}


def _r(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fastmatch sim — {summary['date']} — {summary['machine']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("players simulated", str(summary["players"]))
    table.add_row("lifecycles/s (steady, match_found)", str(summary["lifecycle_per_s"]))
    if summary["ceiling_lifecycle_per_s"]:
        table.add_row("client ceiling (echo server)", str(summary["ceiling_lifecycle_per_s"]))
        table.add_row("share of ceiling", f"{summary['share_of_ceiling']:.1%}")
    for key, label in (("start_loading_ms", "enqueue -> start_loading"),
                       ("match_found_ms", "enqueue -> match_found")):
        q = summary[key]
        table.add_row(f"{label} p50/p95/p99 ms", f"{q[50]} / {q[95]} / {q[99]}")
    slo = summary["slo"]
    table.add_row(f"SLO p95 start_loading / match_found ms ({slo['normal_unfinished']} of "
                  f"{slo['normal_players']} normal players unfinished: infinite waits)",
                  f"{_p95(slo['start_loading_p95_ms'], slo)} / {_p95(slo['match_found_p95_ms'], slo)}")
    since, until = summary["steady_window_s"]
    table.add_row("steady window (server figures, messages/s)", f"{since}s - {until}s")
    table.add_row("messages/s (both ways)", str(summary["messages_per_s"]))
    table.add_row("client CPU per lifecycle (ms)", str(summary["client_cpu_ms_per_lifecycle"]))
    table.add_row("redis commands/s (mean)", str(summary["redis_commands_per_s_mean"]))
    for name, w in summary["workers"].items():
        table.add_row(f"{name} cpu mean / rss peak", f"{w['cpu_percent_mean']}% / {w['rss_mb_peak']} MB")
        if "rss_mb_early" in w:
            table.add_row(f"{name} rss after warm-up -> at the end",
                          f"{w['rss_mb_early']} -> {w['rss_mb_late']} MB")
    table.add_row("outcomes", ", ".join(f"{k} {v}" for k, v in summary["outcomes"].items()))
    table.add_row("errors by code", ", ".join(f"{k} {v}" for k, v in summary["errors"].items()) or "-")
    table.add_row("connections", ", ".join(f"{k} {v}" for k, v in summary["connections"].items()) or "-")
    hs = summary["handshakes"]
    table.add_row("handshakes: answers", ", ".join(f"{k} {v}" for k, v in hs["answers"].items()) or "-")
    waits = hs["ms"]
    table.add_row("handshake wait p50 / p99 / max ms", f"{waits['p50']} / {waits['p99']} / {waits['max']}")
    lag = summary["client_loop_lag_ms"]
    table.add_row("load generator's loop lag p50 / p99 / max ms",
                  f"{lag['p50']} / {lag['p99']} / {lag['max']}")
    if summary["missed_matches"]:
        table.add_row("matches found while a player was away", str(summary["missed_matches"]))
    for fault in summary["faults"]:
        effects = {k: v for k, v in fault.items()
                   if k not in ("fault", "started_s", "ended_s", "did", "window_s") and v}
        table.add_row(f"fault {fault['fault']} at {fault['started_s']}s",
                      f"{fault['did']}\n" + "; ".join(f"{k} {_flat(v)}" for k, v in effects.items()))
    if summary["final_batch"]:
        fb = summary["final_batch"]
        table.add_row("final clean batch", f"{fb['matched']} of {fb['players']} matched")
    if summary["faults"] or summary["leftover_keys"]:
        table.add_row("keys left in redis", str(len(summary["leftover_keys"])))
    table.add_row("invariant violations", str(summary["violation_count"]))
    console = Console()
    console.print(table)
    for v in summary["violations"][:20]:
        console.print(f"[red]violation[/red] {v}")


def _p95(value: float | None, slo: dict[str, Any]) -> str:
    """An SLO p95 as the table shows it: null is infinite when a stalled player counted."""
    if value is not None:
        return str(value)
    return "infinite" if slo["normal_unfinished"] else "-"


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {v}" for k, v in value.items()) + "}"
    return str(value)


def write_json(summary: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))


def write_plot(r: RunResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (lat, thr) = plt.subplots(2, 1, figsize=(10, 8))
    for label, wait in (("enqueue -> start_loading", _to_load), ("enqueue -> match_found", _to_match)):
        if values := _waits(r.players, wait):
            lat.hist(values, bins=60, alpha=0.6, label=label)
    lat.set_xlabel("milliseconds")
    lat.set_ylabel("players")
    lat.set_title("latency distribution")
    lat.legend()
    seconds = int(r.elapsed_s) + 1
    arrivals, matched = [0] * seconds, [0] * seconds
    for p in r.players:
        arrivals[min(int(p.arrived), seconds - 1)] += 1
        if p.t_match_found is not None:
            matched[min(int(p.t_match_found), seconds - 1)] += 1
    thr.plot(range(seconds), arrivals, label="arrivals/s")
    thr.plot(range(seconds), matched, label="match_found/s")
    for name, series in r.sampler.cpu_series.items():
        thr.plot([t for t, _ in series], [c * 10 for _, c in series], linestyle=":",
                 label=f"{name} CPU% x10")
    thr.set_xlabel("seconds")
    thr.set_title("throughput over time")
    thr.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def slo_failures(summary: dict[str, Any], p95_start_loading_ms: float | None,
                 p95_match_ms: float | None) -> list[str]:
    """The earlier swarm's SLO_P95_* gates, plus zero invariant violations. The p95s count a
    stalled `normal` player as an infinite wait (:data:`SLO_RULE`)."""
    failures = []
    if summary["violation_count"]:
        failures.append(f"{summary['violation_count']} invariant violations")
    slo = summary["slo"]
    for key, limit in (("start_loading", p95_start_loading_ms), ("match_found", p95_match_ms)):
        p95 = slo[f"{key}_p95_ms"]
        if limit is None or (p95 is not None and p95 <= limit):
            continue
        if p95 is None and slo["normal_unfinished"]:
            failures.append(f"p95 {key}_ms infinite > {limit} ({slo['normal_unfinished']} of "
                            f"{slo['normal_players']} normal players unfinished; {SLO_RULE})")
        else:
            failures.append(f"p95 {key}_ms {p95} > {limit}")
    return failures
