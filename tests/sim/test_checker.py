"""The sim's invariant checker flags what PROTOCOL 4 forbids (it must be able to fail)."""

from __future__ import annotations

from server.protocol.messages import (
    Dequeued,
    Enqueued,
    Error,
    MatchFound,
    Requeued,
    ServerMessage,
    StartLoading,
    Welcome,
)
from server.sim.checker import SequenceChecker, SessionSeen, cross_check, missed_matches
from server.sim.faults import Fault, parse_faults
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


# -- reconnects: a resumed sequence is accepted, anything lost is still flagged ----------------------

def queued(at: int = 1) -> Welcome:
    return Welcome(player_id="a", state="queued", game_mode="1v1", queued_at_ms=at, protocol=1)


def loading(session: str = "s1") -> Welcome:
    return Welcome(player_id="a", state="loading", game_mode="1v1", loading_session_id=session,
                   protocol=1)


def test_a_queued_player_resumes_with_its_own_place() -> None:
    check = run(WELCOME, ENQUEUED)
    check.resumed(queued(1))
    check.received(start())
    check.received(found())
    assert check.violations == [] and check.vanished == ""
    moved = run(WELCOME, ENQUEUED)
    moved.resumed(queued(2))
    assert any("queued_at" in v for v in moved.violations)


def test_a_ticket_gone_at_resume_must_be_explained_unless_a_dequeue_was_in_flight() -> None:
    check = run(WELCOME, ENQUEUED)
    check.resumed(WELCOME)
    assert check.vanished  # the player looks for a reason (restart, walk-out, grace) or flags it
    asked = run(WELCOME, ENQUEUED)
    asked.sent("dequeue")
    asked.resumed(WELCOME)
    assert asked.vanished == "" and asked.violations == []


def test_a_match_found_while_away_may_follow_the_welcome_and_nothing_later() -> None:
    told = run(WELCOME, ENQUEUED, start("s1"))
    told.resumed(WELCOME)
    told.received(found("s1"))  # kept for it through the grace, told after the welcome
    assert told.violations == [] and told.matched == 1
    assert [s.outcome for s in told.sessions] == ["match_found"]
    others = [("b", [SessionSeen("s1", "a|b", "match_found")]), ("a", told.sessions)]
    assert cross_check(others) == [] and missed_matches(others) == 0
    other = run(WELCOME, ENQUEUED, start("s1"))
    other.resumed(WELCOME)
    other.received(found("s2"))  # not the ready check it was cut from
    assert other.violations
    late = run(WELCOME, ENQUEUED, start("s1"))
    late.resumed(WELCOME)
    late.received(ENQUEUED)
    late.received(found("s1"))  # only right after the welcome
    assert late.violations


def test_resuming_into_a_queue_or_match_never_asked_for_is_a_violation() -> None:
    check = run(WELCOME)
    check.resumed(queued())
    assert check.violations
    sent = run(WELCOME)
    sent.sent("enqueue")  # in flight when the connection ended: it may have run
    sent.resumed(queued())
    assert sent.violations == []


def test_a_ready_check_cut_by_a_drop_ends_as_dropped_and_may_resume() -> None:
    check = run(WELCOME, ENQUEUED, start("s1"))
    check.resumed(loading("s1"))  # same ready check: carries on
    check.received(found("s1"))
    assert check.violations == [] and [s.outcome for s in check.sessions] == ["match_found"]
    gone = run(WELCOME, ENQUEUED, start("s1"))
    gone.resumed(WELCOME)
    assert gone.violations == [] and gone.vanished == "" and gone.sessions[0].outcome == "dropped"
    # The others of s1 were matched; this player missed it while away: counted, not a violation.
    others = [("b", [SessionSeen("s1", "a|b", "match_found")]), ("a", gone.sessions)]
    assert cross_check(others) == [] and missed_matches(others) == 1
    requeued = run(WELCOME, ENQUEUED, start("s1"))
    requeued.resumed(queued(1))
    requeued.received(start("s2"))
    assert requeued.violations == [] and [s.outcome for s in requeued.sessions] == ["dropped", ""]


def test_an_enqueue_refused_with_unavailable_may_still_have_run() -> None:
    ambiguous = run(WELCOME)
    ambiguous.sent("enqueue")
    ambiguous.received(Error(code="unavailable", message="x", retry_after_ms=100))
    ambiguous.received(start())  # its `enqueued` never came: the match notice did
    assert ambiguous.violations == []
    retried = run(WELCOME)
    retried.sent("enqueue")
    retried.received(Error(code="unavailable", message="x"))
    retried.sent("enqueue")
    retried.received(Error(code="already_in_queue", message="x"))
    retried.received(start())
    assert retried.violations == []
    assert run(WELCOME, start()).violations  # no enqueue at all


def test_an_unknown_error_code_reads_as_internal_error() -> None:
    """docs/protocol.md 2: a newer server's code means the request may or may not have run,
    as internal_error does; the enqueue is no longer pending (the player may ask again)."""
    newer = run(WELCOME)
    newer.sent("enqueue")
    newer.received(Error(code="shard_moving", message="x"))
    assert newer.pending == set() and newer.ambiguous == {"enqueue"}
    newer.received(start())  # it did run: its `enqueued` never came, the match notice did
    assert newer.violations == []


def test_removals_are_told_and_unasked_dequeues_are_not() -> None:
    removed = run(WELCOME, ENQUEUED, start(), Dequeued(game_mode="1v1", reason="removed"))
    assert removed.violations == [] and removed.sessions[0].outcome == "removed"
    unasked = run(WELCOME, ENQUEUED, Dequeued(game_mode="1v1", reason="requested"))
    assert unasked.vanished
    not_queued = run(WELCOME, ENQUEUED)
    not_queued.sent("dequeue")
    not_queued.received(Error(code="not_in_queue", message="x"))
    assert not_queued.vanished and not_queued.state == "idle"
    # A dequeue refused `unavailable` that ran all the same: the one sent again finds no ticket.
    ran = run(WELCOME, ENQUEUED)
    ran.sent("dequeue")
    ran.received(Error(code="unavailable", message="x", retry_after_ms=1000))
    ran.sent("dequeue")
    ran.received(Error(code="not_in_queue", message="x"))
    assert ran.vanished == "" and ran.violations == [] and ran.state == "idle"


def test_requeued_keeps_the_original_place() -> None:
    assert run(WELCOME, ENQUEUED, start(), REQUEUED).violations == []
    moved = Requeued(game_mode="1v1", reason="player_left", queued_at_ms=7)
    assert run(WELCOME, ENQUEUED, start(), moved).violations


def test_a_player_in_two_matches_found_is_flagged_unless_it_missed_the_first() -> None:
    twice = [("a", [SessionSeen("s1", "a|b", "requeued"), SessionSeen("s2", "a|c", "match_found")]),
             ("b", [SessionSeen("s1", "a|b", "match_found")]),
             ("c", [SessionSeen("s2", "a|c", "match_found")])]
    problems = cross_check(twice)
    assert any("a: in 2 matches" in p for p in problems)
    missed = [("a", [SessionSeen("s1", "a|b", "dropped"), SessionSeen("s2", "a|c", "match_found")]),
              ("b", [SessionSeen("s1", "a|b", "match_found")]),
              ("c", [SessionSeen("s2", "a|c", "match_found")])]
    assert cross_check(missed) == []


def test_a_match_found_after_a_player_walked_out_is_flagged() -> None:
    """A leaver that never answered its ready check: the others cannot have been matched."""
    walked = [("a", [SessionSeen("1.t.1.0", "a|b", "match_found")]),
              ("b", [SessionSeen("1.t.1.0", "a|b", "walked_out")])]
    assert any("matched though b left it" in p for p in cross_check(walked))
    # Back in the same ready check before it was cancelled (its welcome said loading): fine.
    back = [("a", [SessionSeen("1.t.1.0", "a|b", "match_found")]),
            ("b", [SessionSeen("1.t.1.0", "a|b", "walked_out"), SessionSeen("1.t.1.0", "", "match_found")])]
    assert cross_check(back) == []
    # One that answered and then left may lose the race to the assignment.
    answered = [("a", [SessionSeen("1.t.1.0", "a|b", "match_found")]),
                ("b", [SessionSeen("1.t.1.0", "a|b", "left")])]
    assert cross_check(answered) == []


def test_a_ready_check_formed_after_a_match_the_player_never_heard_of_is_flagged() -> None:
    """The ticket outlived the match: the server put the player into a second ready check it
    never heard of (it had left, matched). One formed earlier may have ended while it was away."""
    after = [("a", [SessionSeen("3.t.7.0", "a|b", "match_found")]),
             ("b", [SessionSeen("3.t.7.0", "a|b", "match_found"), SessionSeen("3.t.9.0", "a|b", "requeued")])]
    assert any("a: put into 3.t.9.0 after it was matched" in p for p in cross_check(after))
    before = [("a", [SessionSeen("3.t.7.0", "a|c", "match_found")]),
              ("b", [SessionSeen("3.t.5.0", "a|b", "requeued")]),
              ("c", [SessionSeen("3.t.7.0", "a|c", "match_found")])]
    assert cross_check(before) == []
    # The same leader, a later lease (its ticks go on): flagged.
    same_leader = [("a", [SessionSeen("3.t.7.0", "a|c", "match_found")]),
                   ("b", [SessionSeen("4.t.9.0", "a|b", "requeued")]),
                   ("c", [SessionSeen("3.t.7.0", "a|c", "match_found")])]
    assert any("a: put into 4.t.9.0" in p for p in cross_check(same_leader))
    # Another leader, a later lease: the epochs order them (a failover, a killed leader) ...
    other_leader = [("a", [SessionSeen("1.u.3.0", "a|c", "match_found")]),
                    ("b", [SessionSeen("2.t.140.0", "a|b", "requeued")]),
                    ("c", [SessionSeen("1.u.3.0", "a|c", "match_found")])]
    assert any("a: put into 2.t.140.0" in p for p in cross_check(other_leader, epochs_ordered=True))
    # ... unless they started over (Redis lost its data): then no order to trust.
    assert cross_check(other_leader) == []
    earlier_leader = [("a", [SessionSeen("2.u.3.0", "a|c", "match_found")]),
                      ("b", [SessionSeen("1.t.140.0", "a|b", "requeued")]),
                      ("c", [SessionSeen("2.u.3.0", "a|c", "match_found")])]
    assert cross_check(earlier_leader, epochs_ordered=True) == []


def test_fault_schedules() -> None:
    assert [str(f) for f in parse_faults("restart-redis@40, kill-worker@10,freeze-redis@22:3")] == [
        "kill-worker@10", "freeze-redis@22:3", "restart-redis@40"]
    assert parse_faults("freeze-redis@1.5:0.5") == [Fault("freeze-redis", 1.5, 0.5)]
    for bad in ("", "explode@1", "kill-worker", "kill-worker@x", "kill-worker@1:2",
                "freeze-redis@3", "sigterm-worker@-1"):
        try:
            parse_faults(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted")
