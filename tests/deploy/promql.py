"""The metric names a PromQL expression reads (enough PromQL for dashboards and alert rules)."""

from __future__ import annotations

import re
from typing import Final

_STRINGS: Final = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS: Final = re.compile(r"\{[^}]*\}")
_RANGES: Final = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS: Final = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_VARIABLES: Final = re.compile(r"\$\{[^}]*\}|\$\w+")  # Grafana's $mode, ${datasource}
_NUMBERS: Final = re.compile(r"(?<![\w:])(?:\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|s|m|h|d|w|y)?)+(?![\w:])")
# Possessive: a name followed by "(" is a function, not a shorter metric name.
_IDENTIFIERS: Final = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*+(?!\s*\()")
_KEYWORDS: Final = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "inf", "nan", "Inf", "NaN"})


def metric_names(expr: str) -> set[str]:
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = _VARIABLES.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    return {name for name in _IDENTIFIERS.findall(text) if name not in _KEYWORDS}
