"""The sim's invariant checker flags what PROTOCOL 4 forbids (it must be able to fail)."""

from __future__ import annotations

from server.sim.checker import SequenceChecker, SessionSeen, cross_check
from server.sim.player import parse_mix

WELCOME = {"type": "welcome", "state": "idle"}
START = {"type": "start_loading", "loading_session_id": "s1", "teams": [["a"], ["b"]]}


def run(*messages: dict) -> SequenceChecker:  # type: ignore[type-arg]
    check = SequenceChecker("a")
    check.connected()
    for msg in messages:
        check.received(msg)
    return check


def test_a_valid_lifecycle_has_no_violation() -> None:
    again = {**START, "loading_session_id": "s2"}
    check = run(WELCOME, {"type": "enqueued"}, START, {"type": "requeued"}, again,
                {"type": "match_found", "loading_session_id": "s2"})
    assert check.violations == []
    assert [(s.session, s.outcome) for s in check.sessions] == [("s1", "requeued"), ("s2", "match_found")]


def test_out_of_order_messages_are_violations() -> None:
    assert run({"type": "enqueued"}).violations  # no welcome first
    assert run(WELCOME, START).violations  # start_loading while idle
    assert run(WELCOME, {"type": "enqueued"}, {"type": "match_found"}).violations  # not loading
    assert run(WELCOME, {"type": "enqueued"}, START,
               {"type": "match_found", "loading_session_id": "other"}).violations
    assert run(WELCOME, {"type": "enqueued"}, {**START, "teams": [["x"], ["y"]]}).violations


def test_matched_twice_is_a_violation() -> None:
    found = {"type": "match_found", "loading_session_id": "s1"}
    check = run(WELCOME, {"type": "enqueued"}, START, found, {"type": "enqueued"}, START, found)
    assert any("matched twice" in v for v in check.violations)


def test_cross_check_outcomes_and_teams() -> None:
    assert cross_check([("a", [SessionSeen("s", "a|b", "match_found")]),
                        ("b", [SessionSeen("s", "a|b", "match_found")])]) == []
    assert cross_check([("a", [SessionSeen("s", "a|b", "match_found")]),
                        ("b", [SessionSeen("s", "a|b", "requeued")])])
    assert cross_check([("a", [SessionSeen("s", "a|b", "")]), ("b", [SessionSeen("s", "b|a", "")])])
    # A player who quit is not a contradiction.
    assert cross_check([("a", [SessionSeen("s", "a|b", "requeued")]),
                        ("b", [SessionSeen("s", "a|b", "left")])]) == []


def test_mix_parsing() -> None:
    assert parse_mix("normal=3,afk=1") == {"normal": 3.0, "afk": 1.0}
    for bad in ("teleport=1", "", "normal=0"):
        try:
            parse_mix(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
