"""Past capacity (issue 9): the excess refused at once, the admitted served to the end.

`fastmatch serve --workers 2` (embedded Redis, reference game server) gets full player
lifecycles from `fastmatch sim` at ``--rate``, e.g. twice the sustainable rate `make bench
BASE=...` finds. Refused players retry after Retry-After, as the bundled clients do, so the
offered handshakes grow past ``--rate``. Printed: how every connection attempt was answered and
how long it waited (the client's view: on the shared cores it includes the generator's own
lag), the server's `fastmatch_handshakes_refused_total` by reason, and what became of the
players admitted (a welcome): each should reach `match_found`, with no invariant violation.

    python -m bench.overload --rate 1800 --seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from bench.lifecycle import ROOT, pinned, split_cpus, start_serving
from server.osutil import machine


def refused(metrics_port: int) -> dict[str, float]:
    """`fastmatch_handshakes_refused_total` by reason, every worker's."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r'^fastmatch_handshakes_refused_total\{[^}]*reason="([^"]*)"[^}]*\} ([0-9.e+]+)$',
                         text, re.MULTILINE):
        out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def histogram(metrics_port: int, name: str, label: str) -> dict[str, dict[str, float]]:
    """A histogram by one label, every worker's: cumulative counts by upper bound (a tree
    without the histogram gives {})."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[str, float]] = {}
    pattern = rf'^{name}_bucket\{{([^}}]*)\}} ([0-9.e+]+)$'
    for m in re.finditer(pattern, text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        by_le = out.setdefault(labels[label], {})
        by_le[labels["le"]] = by_le.get(labels["le"], 0.0) + float(m.group(2))
    return out


def waits(metrics_port: int) -> dict[str, dict[str, float]]:
    """Handshake waits by status, and (as "matched") the queue wait of every matched player:
    what the server itself saw of the admitted players' service."""
    out = histogram(metrics_port, "fastmatch_handshake_wait_seconds", "status")
    for by_le in histogram(metrics_port, "fastmatch_match_wait_seconds", "mode").values():
        out["matched"] = by_le  # the run plays one mode
    return out


def wait_summary(after: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
    """Count, p50/p99 as bucket bounds ("<= 0.05"), and how many waited over 1 s."""
    counts = sorted(((float(le), n - before.get(le, 0.0)) for le, n in after.items()))
    total = counts[-1][1] if counts else 0.0

    def bound(q: float) -> str:
        for le, n in counts:
            if n >= q * total:
                return f"<= {le:g} s"
        return "?"

    within_1s = next((n for le, n in counts if le == 1.0), 0.0)
    return {"count": int(total), "p50": bound(0.5), "p99": bound(0.99),
            "over_1s": int(total - within_1s)}


def run(rate: float, seconds: float, workers: int, lifetime: float, tree: Path = ROOT,
        pin: bool = False) -> dict[str, Any]:
    """``pin``: the server (its workers, Redis, the game server) on the first CPU and the load
    generator on the others, so that the generator's retries cannot take the server's CPU:
    what clients on their own machines would see."""
    logdir = Path(tempfile.mkdtemp(prefix="fastmatch-overload-"))
    report = logdir / "sim.json"
    server_cpus, sim_cpus = split_cpus(pin)
    with contextlib.ExitStack() as stack:
        store, port, metrics_port, _ = start_serving(stack, tree, workers, logdir / "serve.log",
                                                     server_cpus)
        before = refused(metrics_port)
        waits_before = waits(metrics_port)
        with pinned(sim_cpus):  # the bench itself only waits meanwhile
            sim = subprocess.run(
                [sys.executable, "-m", "server.app.cli", "sim", "--url", f"ws://127.0.0.1:{port}/ws",
                 "--redis-url", store.url, "--rate", str(rate), "--duration", str(seconds),
                 "--procs", "2", "--mix", "normal=1", "--rating-sd", "0", "--no-progress",
                 "--lifetime", str(lifetime), "--report", str(report), "--plot", str(logdir / "sim.png")],
                cwd=ROOT, stdout=(logdir / "sim.log").open("wb"), stderr=subprocess.STDOUT,
                timeout=seconds + lifetime + 120, check=False)  # its exit status is about SLOs
        after = refused(metrics_port)
        waits_after = waits(metrics_port)
    if not report.exists():
        raise RuntimeError(f"the simulator wrote no report (exit {sim.returncode}); see {logdir}")
    summary = json.loads(report.read_text())
    return {"logs": str(logdir), "summary": summary,
            "refused_by_server": {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after},
            "server_waits": {status: wait_summary(by_le, waits_before.get(status, {}))
                             for status, by_le in waits_after.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, required=True, help="lifecycles/s offered")
    parser.add_argument("--seconds", type=float, default=20, help="seconds of arrivals")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lifetime", type=float, default=20, help="a player gives up after this")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="serve this checkout (built) instead, e.g. the commit before a change; "
                             "the load is this tree's `fastmatch sim` either way")
    parser.add_argument("--pin", action="store_true",
                        help="the server on the first CPU, the load generator on the others")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-overload.json")
    args = parser.parse_args()
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    print(f"fastmatch bench overload {date} on {machine()}: {args.rate:.0f} lifecycles/s offered "
          f"for {args.seconds:.0f} s, {args.workers} workers, serving {args.tree.resolve()}"
          + (f"; pinned: server on CPU {min(os.sched_getaffinity(0))}, load on the others"
             if args.pin else ""), flush=True)
    result = run(args.rate, args.seconds, args.workers, args.lifetime, args.tree.resolve(), args.pin)
    s = result["summary"]
    hs = s["handshakes"]
    admitted = s["admitted"]
    print(f"  players {s['players']}, matched/s (steady) {s['lifecycle_per_s']}")
    print(f"  connection attempts {hs['attempts']}: {hs['answers']}")
    print(f"  wait for an answer, ms: p50 {hs['ms']['p50']}, p99 {hs['ms']['p99']}, max {hs['ms']['max']}; "
          f"accepted p99/max {hs['accepted_ms']['p99']}/{hs['accepted_ms']['max']}, "
          f"refused p99/max {hs['refused_ms']['p99']}/{hs['refused_ms']['max']}")
    lag = s["client_loop_lag_ms"]
    print(f"  the load generator's own loop lag (part of the client's view), ms: p50 {lag['p50']}, "
          f"p99 {lag['p99']}, max {lag['max']}")
    print(f"  refused by the server (fastmatch_handshakes_refused_total): {result['refused_by_server']}")
    server_waits = dict(result["server_waits"])
    matched = server_waits.pop("matched", None)
    print("  server-side wait, request arrival -> answer (fastmatch_handshake_wait_seconds): "
          + ("; ".join(f"{status}: {w['count']}, p50 {w['p50']}, p99 {w['p99']}, over 1 s {w['over_1s']}"
                       for status, w in sorted(server_waits.items()))
             or "not measured by this tree"))
    if matched is not None:
        print(f"  server-side queue wait of the matched (fastmatch_match_wait_seconds): {matched['count']}, "
              f"p50 {matched['p50']}, p99 {matched['p99']}, over 1 s {matched['over_1s']}")
    print(f"  admitted players {admitted['players']}: {admitted['outcomes']}")
    print(f"  invariant violations {s['violation_count']}, enqueue -> start_loading p99 "
          f"{s['start_loading_ms']['99']} ms")
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"date": date, "machine": machine(), "rate": args.rate, "pin": args.pin,
                                    "seconds": args.seconds, **result}, indent=2))
    print(f"report: {args.out} (logs {result['logs']})")


if __name__ == "__main__":
    main()
