"""Repeated log lines aggregated per interval (server/logthrottle.py), on a clock we move."""

from __future__ import annotations

import logging

import pytest

from server.logthrottle import Throttled


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    caplog.set_level(logging.INFO, logger="throttle-test")
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}" + (" +tb" if record.exc_info else ""))

    handler = Collect()
    logging.getLogger("throttle-test").addHandler(handler)
    yield lines
    logging.getLogger("throttle-test").removeHandler(handler)


def test_first_of_each_interval_logged_the_rest_counted_with_one_example(logged: list[str]) -> None:
    clock = Clock()
    warn = Throttled(logging.getLogger("throttle-test"), "bad things", interval_s=10, clock=clock)
    for i in range(10_000):
        warn("from %s", f"client-{i}")
        clock.now += 0.0001  # 10,000 in one second
    assert logged == ["WARNING bad things: from client-0"]
    warn.flush_if_due()  # the interval has not ended: nothing yet
    assert len(logged) == 1
    clock.now += 10
    warn.flush_if_due()
    assert logged[1] == "WARNING bad things: 9999 more in 11.0s (e.g. from client-1)"
    warn.flush_if_due()  # summarised once
    warn("from %s", "late")  # a new interval: logged as it happens
    assert logged[2:] == ["WARNING bad things: from late"]


def test_next_occurrence_after_the_interval_writes_the_summary_first(logged: list[str]) -> None:
    clock = Clock()
    crashed = Throttled(logging.getLogger("throttle-test"), "handler failed", level=logging.ERROR,
                        interval_s=5, clock=clock)
    try:
        raise ValueError("boom")
    except ValueError:
        crashed("connection %d", 1, exc_info=True)
        crashed("connection %d", 2, exc_info=True)
    clock.now += 6
    crashed("connection %d", 3)
    assert logged == ["ERROR handler failed: connection 1 +tb",
                      "ERROR handler failed: 1 more in 6.0s (e.g. connection 2)",
                      "ERROR handler failed: connection 3"]


def test_lines_per_interval_are_bounded_whatever_the_rate(logged: list[str]) -> None:
    """At most two lines per interval (the first occurrence and the summary of the previous
    interval's repeats), however many occurrences: the bound README "Limits" states."""
    clock = Clock()
    warn = Throttled(logging.getLogger("throttle-test"), "flood", interval_s=10, clock=clock)
    for _ in range(60):  # one minute, 1,000 occurrences a second
        for _ in range(1000):
            warn("x")
        clock.now += 1
        warn.flush_if_due()
    clock.now += 10
    warn.flush_if_due()
    assert 6 <= len(logged) <= 2 * 7
