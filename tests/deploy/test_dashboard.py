"""deploy/grafana/fastmatch.json: importable (datasource as a variable), the rows the issue asks
for, and every query reads only metrics fastmatch exports (issue 14)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.promql import metric_names

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "fastmatch.json"
ROWS = ["Players", "Queues", "Matching", "Ready checks and handoff", "Redis", "Processes"]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [(p["title"], t["expr"]) for p in panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            expr = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert expr is not None, var["name"]
            found.append((f"${var['name']}", expr.group(1)))
    return found


def test_importable_with_the_datasource_and_mode_as_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["mode"]["type"] == "query" and variables["mode"]["multi"]
    assert dashboard["uid"] == "fastmatch" and "id" not in dashboard  # import assigns the id
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_has_the_rows_of_the_issue_in_order(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ROWS
    assert all(p["type"] == "row" or len(p["targets"]) for p in dashboard["panels"])
    per_mode = [p["title"] for p in panels(dashboard) if any('mode=~"$mode"' in t["expr"]
                                                            for t in p["targets"])]
    assert len(per_mode) >= 10, per_mode


def test_queries_read_only_exported_metrics(
    dashboard: dict[str, Any], exported_names: set[str]
) -> None:
    used: set[str] = set()
    for where, expr in queries(dashboard):
        names = metric_names(expr)
        assert names, (where, expr)
        assert not names - exported_names, (where, names - exported_names)
        used |= names
    # Spot checks that the names really come from the scrape and the declarations.
    assert {"fastmatch_process_cpu_seconds_total", "fastmatch_worker_restarts_total",
            "fastmatch_match_wait_seconds_bucket"} <= used


@pytest.mark.parametrize(("expr", "names"), [
    ('histogram_quantile(0.95, sum by (mode, le) (rate(x_bucket{mode=~"$mode"}[$__rate_interval])))',
     {"x_bucket"}),
    ("sum(rate(a_total[5m] offset 1h)) / ignoring (x) group_left b > 1e3 and on () c:rec", {
        "a_total", "b", "c:rec"}),
    ('label_replace(up, "dst", "$1", "src", "(.*)") * 2', {"up"}),
    ("rec:x\n or on (mode)\n (0 * y + on () group_left () z)", {"rec:x", "y", "z"}),
])
def test_metric_names_of_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
