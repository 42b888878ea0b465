"""`make bench BASE=<commit>`: the same load on a reference commit and on this checkout, side by side.

The reference is checked out in a git worktree under `.bench/` and its Cython extension built
in place; both trees run with this checkout's interpreter, Redis binary and load generator.
Runs alternate (base, new, base, new, ...) so that a machine that drifts during the sitting
drifts for both, and the ratios are printed with every figure. `--find-rate` also looks for
each tree's sustainable rate (>= 99% of players matched, p99 enqueue -> start_loading under
250 ms, no violation, at least 97% of the offered rate delivered in the window) in short
steps and holds the best one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.lifecycle import GROUPS, ROOT, Result, measure
from server.osutil import machine


def worktree(ref: str) -> Path:
    sha = subprocess.check_output(["git", "rev-parse", "--short=12", ref], cwd=ROOT, text=True).strip()
    path = ROOT / ".bench" / sha
    if not (path / "server").is_dir():
        path.parent.mkdir(exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", "--force", str(path), sha],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    if not list((path / "_fastmatch").glob("kernel*.so")):
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=path, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return path


# Lifecycles completed in the window against those offered: arrivals are paced, not random,
# so a run that keeps up delivers the offered rate to within the window's edges (about 1%);
# a backlog growing through the window does not, however many players it matches in the end.
DELIVERED_SHARE = 0.97


def sustainable(s: dict[str, Any]) -> bool:
    p99 = (s["start_loading_ms"] or {}).get("99") or (s["start_loading_ms"] or {}).get(99)
    return (s["violations"] == 0 and s["matched_share"] >= 0.99 and p99 is not None and p99 < 250
            and s["lifecycles_per_s"] >= DELIVERED_SHARE * s["rate"])


def _said(label: str, what: str, s: dict[str, Any], ok: bool) -> None:
    print(f"  {label} {what} -> {s['lifecycles_per_s']}/s, p99 start_loading "
          f"{(s['start_loading_ms'] or {}).get('99')} ms, matched {s['matched_share']:.1%} "
          f"-> {'ok' if ok else 'not sustainable'}", flush=True)


def find_rate(tree: Path, label: str, steps: list[float], step_s: float, hold_s: float,
              holds: int = 4, pin: bool = False) -> dict[str, Any]:
    """Short steps up to the first that fails, then the best step held for ``hold_s``; a hold
    that fails (a backlog that a short step did not show) steps down, at most ``holds`` times.
    ``best`` is the highest rate that held, None if none did."""
    passed, tried = [], []
    for rate in steps:
        s = measure(tree, rate, step_s, label=label, pin=pin).summary()
        ok = sustainable(s)
        tried.append({**s, "sustainable": ok})
        _said(label, f"step {rate:5.0f}/s", s, ok)
        if not ok:
            break
        passed.append(rate)
    best, held, failed_holds = None, None, []
    for rate in list(reversed(passed))[:holds]:
        held = measure(tree, rate, hold_s, label=label, pin=pin).summary()
        held["sustainable"] = sustainable(held)
        _said(label, f"hold {rate:5.0f}/s for {hold_s:.0f} s", held, held["sustainable"])
        if held["sustainable"]:
            best = rate
            break
        failed_holds.append(held)
    return {"steps": tried, "best": best, "held": held, "failed_holds": failed_holds}


def _row(name: str, base: float | None, new: float | None) -> str:
    """One figure of both trees; one that was not measured prints as "-", never as 0."""
    def shown(value: float | None) -> str:
        return f"{value:10.3f}" if value is not None else f"{'-':>10}"
    ratio = f"{new / base:6.2f}x" if base and new is not None else "     -"
    return f"  {name:34} {shown(base)} {shown(new)} {ratio}"


def _p99(s: dict[str, Any]) -> float | None:
    value = (s.get("start_loading_ms") or {}).get("99")
    return float(value) if value is not None else None


def print_pair(base: dict[str, Any], new: dict[str, Any]) -> None:
    print(f"  {'':34} {'base':>10} {'new':>10}  new/base")
    print(_row("lifecycles/s in the window", base["lifecycles_per_s"], new["lifecycles_per_s"]))
    for g in (*GROUPS, "gameserver_per_match"):
        print(_row(f"{g} CPU ms per lifecycle", base["cpu_ms_per_lifecycle"][g],
                   new["cpu_ms_per_lifecycle"][g]))
    print(_row("redis commands per lifecycle", base["redis_commands_per_lifecycle"],
               new["redis_commands_per_lifecycle"]))
    for key in ("matched_share", "violations", "unfinished"):
        print(_row(key, float(base[key] or 0), float(new[key] or 0)))
    print(_row("p99 enqueue->start_loading ms", _p99(base), _p99(new)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="reference commit (e.g. ff79587)")
    parser.add_argument("--rate", type=float, default=300, help="lifecycles/s offered to both")
    parser.add_argument("--seconds", type=float, default=60, help="measured window per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating base/new pairs")
    parser.add_argument("--find-rate", action="store_true", help="also find each sustainable rate")
    parser.add_argument("--steps", default="200,400,600,800,900,1000,1100,1200,1400,1600,1800,2000,2400")
    parser.add_argument("--step-seconds", type=float, default=15)
    parser.add_argument("--pin", action="store_true",
                        help="the servers on the first CPU, the load generator on the others")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "bench-compare.json")
    args = parser.parse_args()
    base_tree = worktree(args.base)
    out: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "base": args.base, "new": subprocess.check_output(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True).strip(),
        "rate": args.rate, "seconds": args.seconds, "pin": args.pin, "rounds": [],
    }
    args.out.parent.mkdir(exist_ok=True)
    print(f"fastmatch bench compare {out['date']} on {out['machine']}: base {args.base} vs {out['new']}, "
          f"{args.rate:.0f} lifecycles/s offered, {args.seconds:.0f} s windows"
          + ("; pinned: the server on the first CPU, the load generator on the others" if args.pin else ""),
          flush=True)
    for i in range(args.rounds):
        pair = []
        for label, tree in (("base", base_tree), ("new", ROOT)):
            result: Result = measure(tree, args.rate, args.seconds, label=label, pin=args.pin)
            pair.append(result.summary())
        print(f"round {i + 1}:")
        print_pair(*pair)
        out["rounds"].append(pair)
        args.out.write_text(json.dumps(out, indent=2))
    if args.find_rate:
        steps = [float(x) for x in args.steps.split(",")]
        for label, tree in (("base", base_tree), ("new", ROOT)):
            print(f"sustainable rate, {label}:", flush=True)
            out[f"rate_{label}"] = find_rate(tree, label, steps, args.step_seconds, args.seconds,
                                             pin=args.pin)
            args.out.write_text(json.dumps(out, indent=2))
        b, n = out["rate_base"]["best"], out["rate_new"]["best"]
        print(f"sustainable: base {b}/s, new {n}/s" + (f" ({n / b:.2f}x)" if b and n else ""))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
