"""deploy/prometheus/alerts.yml: promtool's checks and unit tests, and what promtool cannot see:
every alert is documented in README, has a case that fires and one that stays quiet, and reads
only metrics fastmatch exports (issue 14)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.conftest import require_tool
from tests.deploy.promql import metric_names

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
README = ROOT / "README.md"


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def github_anchor(heading: str) -> str:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces become hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def operating_section() -> str:
    text = README.read_text()
    start = text.index("\n## Operating fastmatch\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else len(text)]


@pytest.mark.parametrize("command", ["check", "test"])
def test_promtool(command: str) -> None:
    promtool = require_tool("promtool")
    target = RULES if command == "check" else RULE_TESTS
    result = subprocess.run([promtool, command, "rules", target.name], cwd=target.parent,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_documented_in_the_readme() -> None:
    section = operating_section()
    anchors = {github_anchor(h) for h in re.findall(r"^#{2,6} (.+)$", section, re.M)}
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names)) >= 8
    for alert in alerts():
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning"}
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "README.md" and anchor in anchors, (alert["alert"], anchor, sorted(anchors))


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
             for case in test.get("alert_rule_test", [])]
    for alert in alerts():
        name = alert["alert"]
        firing = [c for c in cases if c["alertname"] == name and c.get("exp_alerts")]
        quiet = [c for c in cases if c["alertname"] == name and not c.get("exp_alerts")]
        assert firing and quiet, f"{name}: {len(firing)} firing and {len(quiet)} quiet cases"
        # Expected annotations make promtool render and compare every template.
        assert all("exp_annotations" in e for c in firing for e in c["exp_alerts"]), name


def test_rules_read_only_metrics_fastmatch_exports(exported_names: set[str]) -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        unknown = metric_names(rule["expr"]) - exported_names - recorded
        assert not unknown, (rule.get("alert") or rule.get("record"), unknown)
