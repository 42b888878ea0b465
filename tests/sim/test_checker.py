"""The sim's invariant checker flags what PROTOCOL 4 forbids (it must be able to fail)."""

from __future__ import annotations

from server.protocol.messages import (
    Enqueued,
    MatchFound,
    Requeued,
    ServerMessage,
    StartLoading,
    Welcome,
)
from server.sim.checker import SequenceChecker, SessionSeen, cross_check
from server.sim.player import parse_mix

WELCOME = Welcome(player_id="a", state="idle", protocol=1)
ENQUEUED = Enqueued(game_mode="1v1", queued_at_ms=1)
REQUEUED = Requeued(game_mode="1v1", reason="player_left", queued_at_ms=1)


def start(session: str = "s1", teams: tuple[str, str] = ("a", "b")) -> StartLoading:
    return StartLoading(loading_session_id=session, game_mode="1v1",
                        teams=[[teams[0]], [teams[1]]], deadline_ms=1)


def found(session: str = "s1") -> MatchFound:
    return MatchFound(loading_session_id=session, game_mode="1v1", server_address="gs:1",
                      server_session_id="x", teams=[["a"], ["b"]])


def run(*messages: ServerMessage) -> SequenceChecker:
    check = SequenceChecker("a")
    check.connected()
    for msg in messages:
        check.received(msg)
    return check


def test_a_valid_lifecycle_has_no_violation() -> None:
    check = run(WELCOME, ENQUEUED, start(), REQUEUED, start("s2"), found("s2"))
    assert check.violations == []
    assert [(s.session, s.outcome) for s in check.sessions] == [("s1", "requeued"), ("s2", "match_found")]


def test_out_of_order_messages_are_violations() -> None:
    assert run(ENQUEUED).violations  # no welcome first
    assert run(WELCOME, start()).violations  # start_loading while idle
    assert run(WELCOME, ENQUEUED, found()).violations  # not loading
    assert run(WELCOME, ENQUEUED, start(), found("other")).violations
    assert run(WELCOME, ENQUEUED, start(teams=("x", "y"))).violations
    assert run(WELCOME, WELCOME).violations  # a second welcome on one connection


def test_matched_twice_is_a_violation() -> None:
    check = run(WELCOME, ENQUEUED, start(), found(), ENQUEUED, start(), found())
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
