"""The per-connection state machine, driven synchronously with plain values (no I/O)."""

from __future__ import annotations

import json

import pytest

from server.config import load_config
from server.protocol.messages import (
    Dequeued,
    Enqueued,
    Error,
    MatchFound,
    QueueStatus,
    Requeued,
    StartLoading,
    Welcome,
)
from server.protocol.results import (
    DequeueResult,
    EnqueueResult,
    Failed,
    PlayerState,
    ReadyResult,
    StatusResult,
)
from server.protocol.session import (
    Close,
    Limits,
    Phase,
    RunDequeue,
    RunEnqueue,
    RunReady,
    RunStatus,
    Send,
    Session,
)

CONFIG = load_config(environ={})
MODES = CONFIG.modes
LIMITS = Limits(CONFIG.server.bad_message_budget, CONFIG.server.message_rate,
                CONFIG.server.message_burst, CONFIG.server.rate_limit_strikes)
DOWN = Failed("unavailable", "down", 500)


def session(budget: int = 2) -> Session:
    limits = Limits(bad_messages=budget, message_rate=1000, message_burst=1000, rate_strikes=3)
    s = Session("p1", MODES, limits)
    s.welcome("idle", "", 0)
    return s


def frame(**fields: object) -> str:
    return json.dumps(fields)


def only_error(effects: list) -> str:  # type: ignore[type-arg]
    assert len(effects) == 1 and isinstance(effects[0], Send) and isinstance(effects[0].message, Error)
    return effects[0].message.code


def test_welcome_shows_resumed_state() -> None:
    s = Session("p1", MODES, LIMITS)
    [effect] = s.welcome("queued", "5v5", 1234)
    assert effect == Send(Welcome(player_id="p1", state="queued", protocol=1, game_mode="5v5",
                                  queued_at_ms=1234))
    assert s.phase is Phase.QUEUED


def test_phase_changes_before_the_request_runs() -> None:
    s = session()
    assert s.receive(frame(type="enqueue", game_mode="1v1")) == [RunEnqueue("1v1", None)]
    assert s.phase is Phase.ENQUEUING
    # A second enqueue while the first is in flight never reaches storage.
    assert only_error(s.receive(frame(type="enqueue", game_mode="1v1"))) == "already_in_queue"
    [sent] = s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=99))
    assert sent == Send(Enqueued(game_mode="1v1", queued_at_ms=99))
    assert s.phase is Phase.QUEUED


def test_dequeue_round_trip_and_errors() -> None:
    s = session()
    assert only_error(s.receive(frame(type="dequeue"))) == "not_in_queue"
    s.receive(frame(type="enqueue", game_mode="5v5"))
    s.complete(RunEnqueue("5v5", None), EnqueueResult("ok", queued_at_ms=5))
    assert s.receive(frame(type="dequeue", request_id="d")) == [RunDequeue("d")]
    assert s.phase is Phase.DEQUEUING
    assert s.complete(RunDequeue("d"), DequeueResult("ok", "5v5")) == [
        Send(Dequeued(game_mode="5v5", reason="requested", request_id="d"))]
    assert s.phase is Phase.IDLE


def test_failed_request_undoes_the_optimistic_phase() -> None:
    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    effects = s.complete(RunEnqueue("1v1", None), DOWN)
    assert s.phase is Phase.IDLE and s.game_mode is None
    assert effects == [Send(Error(code="unavailable", message="down", retry_after_ms=500))]
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=1))
    s.receive(frame(type="dequeue"))
    s.complete(RunDequeue(None), DOWN)
    assert s.phase is Phase.QUEUED


def test_redis_view_wins_over_the_local_view() -> None:
    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    already = EnqueueResult("already", current=PlayerState("queued", "5v5", 3))
    assert only_error(s.complete(RunEnqueue("1v1", None), already)) == "already_in_queue"
    assert s.phase is Phase.QUEUED and s.game_mode == "5v5"
    s.receive(frame(type="dequeue"))
    assert only_error(s.complete(RunDequeue(None), DequeueResult("not_in_queue"))) == "not_in_queue"
    assert s.phase is Phase.IDLE


def test_unknown_mode_and_status() -> None:
    s = session()
    assert only_error(s.receive(frame(type="enqueue", game_mode="chess"))) == "unsupported_game_mode"
    assert s.receive(frame(type="status", request_id="s")) == [RunStatus("s")]
    [sent] = s.complete(RunStatus("s"), StatusResult(PlayerState("queued", "1v1", 1_000), 7, 11_000))
    assert isinstance(sent, Send) and isinstance(sent.message, QueueStatus)
    assert sent.message.waited_ms == 10_000 and sent.message.queue_size == 7
    assert sent.message.search_window == MODES["1v1"].window(10_000)


def test_bad_input_budget_then_close_1008() -> None:
    s = session(budget=2)
    for bad in ("nope", b"\x00", frame(type="warp")):
        effects = s.receive(bad)
        assert isinstance(effects[0], Send) and effects[0].message.code == "invalid_message"  # type: ignore[union-attr]
    assert effects[-1] == Close(1008, "too many invalid messages")
    assert s.closed and s.receive(frame(type="status")) == []


def test_replaced_closes_once_with_4009() -> None:
    s = session()
    assert s.replaced() == [Close(4009, "session_replaced")]
    assert s.replaced() == []


def test_window_grows_with_wait_up_to_the_cap() -> None:
    mode = MODES["1v1"]
    assert mode.window(0) == mode.window_base
    assert mode.window(1000) == mode.window_base + mode.window_growth_per_s
    assert mode.window(10**9) == mode.window_max


def test_flood_is_refused_then_closed_4008() -> None:
    limits = Limits(bad_messages=10, message_rate=1, message_burst=2, rate_strikes=1)
    s = Session("p1", MODES, limits, now=0.0)
    s.welcome("idle", "", 0)
    status = frame(type="status")
    assert s.receive(status, now=0.0) == [RunStatus(None)]
    assert s.receive(status, now=0.0) == [RunStatus(None)]
    refused = s.receive(status, now=0.0)
    assert isinstance(refused[0], Send) and refused[0].message.code == "rate_limited"  # type: ignore[union-attr]
    assert refused[0].message.retry_after_ms == 1000  # type: ignore[union-attr]
    assert s.receive(status, now=1.5) == [RunStatus(None)]  # refilled: allowed again
    assert s.receive(status, now=1.5)[-1] == Close(4008, "rate limited")  # second strike
    assert s.closed


def test_resync_reports_what_redis_really_did() -> None:
    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), DOWN)  # but the script had run
    [late] = s.resync("queued", "1v1", 777)
    assert late == Send(Enqueued(game_mode="1v1", queued_at_ms=777)) and s.phase is Phase.QUEUED
    s.receive(frame(type="dequeue"))
    s.complete(RunDequeue(None), DOWN)
    [gone] = s.resync("idle", "", 0)
    assert gone == Send(Dequeued(game_mode="1v1", reason="requested")) and s.phase is Phase.IDLE
    assert s.resync("idle", "", 0) == []  # agreeing views: nothing to say


def test_what_a_deaf_worker_or_a_failover_lost_is_told_after_the_resync() -> None:
    """README "Deployment: Sentinel": Redis' view wins, and the client hears what it missed."""
    from server.protocol.messages import Requeued, StartLoading
    from server.protocol.results import MatchView

    def check(n: int) -> StartLoading:
        return StartLoading(loading_session_id=f"1.a.{n}", game_mode="1v1", teams=[["p1"], ["p2"]],
                            deadline_ms=9)

    def view(n: int) -> dict[str, MatchView]:
        return {f"1.a.{n}": MatchView(f"1.a.{n}", "1v1", "loading", "", [["p1"], ["p2"]], 9)}

    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    [gone] = s.caught_up(PlayerState("idle"), {})  # the enqueue was lost
    assert gone == Send(Dequeued(game_mode="1v1", reason="removed")) and s.phase is Phase.IDLE
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=7))
    loading = PlayerState("loading", "1v1", 7, "1.a.1")
    [missed] = s.caught_up(loading, view(1))  # its start_loading was published unheard
    assert missed == Send(check(1)) and s.phase is Phase.LOADING
    assert s.deliver(check(1)) == []  # the notice itself, overtaken by the catch-up: said once
    assert s.caught_up(loading, view(1)) == []  # agreeing views: nothing to say
    # Its ready check ended unheard (its record lost too) and it is in the next one.
    assert s.caught_up(PlayerState("loading", "1v1", 7, "1.a.2"), view(2)) == [
        Send(Requeued(game_mode="1v1", reason="server_shutdown", queued_at_ms=7)), Send(check(2))]
    [back] = s.caught_up(PlayerState("queued", "1v1", 7), {})  # the match was lost, the ticket not
    assert back == Send(Requeued(game_mode="1v1", reason="server_shutdown", queued_at_ms=7))
    assert s.phase is Phase.QUEUED and s.loading_session_id is None
    assert s.caught_up(PlayerState("queued", "1v1", 7), {}) == []
    s.receive(frame(type="dequeue"))
    assert s.caught_up(PlayerState("idle"), {}) == []  # a request in flight settles it
    s.complete(RunDequeue(None), DequeueResult("ok", "1v1"))
    # The dequeue's write was lost in a failover: Redis still has the player queued.
    [late] = s.caught_up(PlayerState("queued", "1v1", 7), {})
    assert late == Send(Enqueued(game_mode="1v1", queued_at_ms=7)) and s.phase is Phase.QUEUED


def test_notices_out_of_step_after_a_deaf_spell_are_said_once_and_in_order() -> None:
    """Notices published while the worker could not hear (README "Deployment: Sentinel"):
    what follows an ending the session never heard makes sense to the client."""
    from server.protocol.messages import Requeued, StartLoading

    def check(n: int) -> StartLoading:
        return StartLoading(loading_session_id=f"1.a.{n}", game_mode="1v1", teams=[["p1"], ["p2"]],
                            deadline_ms=9)

    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    # The ending of a ready check it never heard of: nothing to requeue it from ...
    assert s.deliver(Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)) == []
    # ... or out of matchmaking for it: told it is out, without the puzzle.
    [out] = s.deliver(Error(code="loading_timeout", message="late"))
    assert out == Send(Dequeued(game_mode="1v1", reason="removed")) and s.phase is Phase.IDLE
    assert s.deliver(Dequeued(game_mode="1v1", reason="removed")) == []  # told already
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=7))
    assert s.deliver(check(1)) == [Send(check(1))]
    # The next ready check while the last one's ending went unheard: requeued first.
    assert s.deliver(check(2)) == [
        Send(Requeued(game_mode="1v1", reason="server_shutdown", queued_at_ms=7)), Send(check(2))]
    assert s.phase is Phase.LOADING and s.loading_session_id == "1.a.2"


def test_a_requeue_made_up_for_a_connection_welcomed_in_a_ready_check_keeps_the_place() -> None:
    """A player resumed into a ready check (welcome says loading) whose ending goes unheard:
    the requeue the session makes up before the next ready check carries the original
    queued_at_ms from the player's record, which the welcome itself does not show."""
    from server.protocol.messages import Requeued, StartLoading

    def check(n: int) -> StartLoading:
        return StartLoading(loading_session_id=f"1.a.{n}", game_mode="1v1", teams=[["p1"], ["p2"]],
                            deadline_ms=9)

    s = Session("p1", MODES, LIMITS)
    [welcome] = s.welcome("loading", "1v1", 1234, "1.a.1")
    assert welcome == Send(Welcome(player_id="p1", state="loading", protocol=1, game_mode="1v1",
                                   loading_session_id="1.a.1"))  # no queued_at_ms: not queued
    assert s.deliver(check(2)) == [
        Send(Requeued(game_mode="1v1", reason="server_shutdown", queued_at_ms=1234)), Send(check(2))]
    [idle] = Session("p2", MODES, LIMITS).welcome("idle", "", 1234)
    assert isinstance(idle, Send) and isinstance(idle.message, Welcome)
    assert idle.message.queued_at_ms is None


def test_a_match_notice_never_overtakes_the_reply_it_follows() -> None:
    from server.protocol.messages import StartLoading

    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    notice = StartLoading(loading_session_id="1.2.3", game_mode="1v1", teams=[["p1"], ["p2"]],
                          deadline_ms=9)
    assert s.deliver(notice) == []  # held while the enqueue is in flight
    done = s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    sent = [e.message for e in done if isinstance(e, Send)]
    assert [type(m).__name__ for m in sent] == ["Enqueued", "StartLoading"]
    assert s.phase is Phase.LOADING
    # A dequeue that loses the race to the match: the refusal first, then the notice.
    s2 = session()
    s2.receive(frame(type="enqueue", game_mode="1v1"))
    s2.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    s2.receive(frame(type="dequeue"))
    s2.deliver(notice)
    effects = s2.complete(RunDequeue(None), DequeueResult("invalid_state"))
    assert [type(e.message).__name__ for e in effects if isinstance(e, Send)] == ["Error", "StartLoading"]
    assert s2.phase is Phase.LOADING


def test_nothing_overtakes_the_welcome() -> None:
    from server.protocol.messages import StartLoading

    s = Session("p1", MODES, LIMITS)
    notice = StartLoading(loading_session_id="1.2.3", game_mode="1v1", teams=[["p1"], ["p2"]],
                          deadline_ms=9)
    assert s.deliver(notice) == []  # attached, matched, but not welcomed yet
    sent = [e.message for e in s.welcome("queued", "1v1", 5) if isinstance(e, Send)]
    assert [type(m).__name__ for m in sent] == ["Welcome", "StartLoading"]
    assert s.phase is Phase.LOADING


def test_ready_results_answer_only_errors_and_a_mismatch_is_a_bug() -> None:
    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    from server.protocol.messages import StartLoading

    s.deliver(StartLoading(loading_session_id="9.1.0", game_mode="1v1", teams=[["p1"], ["p2"]],
                           deadline_ms=9))
    [ready] = s.receive(frame(type="loading_complete", loading_session_id="9.1.0"))
    assert ready == RunReady("9.1.0", "1v1", None)
    assert s.complete(ready, ReadyResult("ready")) == []  # the match's outcome is the answer
    assert only_error(s.complete(ready, ReadyResult("wrong_session"))) == "wrong_session_id"
    assert s.complete(ready, ReadyResult("replaced")) == [Close(4009, "session_replaced")]
    with pytest.raises(TypeError):
        session().complete(RunStatus(None), ReadyResult("ready"))


def test_catching_up_tells_what_was_missed_while_deaf() -> None:
    """After the worker's subscriber was down, Redis' view of the player is compared with the
    session's and the missed notices are rebuilt: in the order they happened, and nothing when
    both agree."""
    from server.protocol.messages import MatchFound, Requeued, StartLoading
    from server.protocol.results import MatchView

    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    queued = PlayerState("queued", "1v1", 5)
    assert not s.behind(queued) and s.caught_up(queued, {}) == []
    # A ready check began and ended in a requeue, and a second one began, all unheard.
    first = MatchView("m1", "1v1", "cancelled", "player_left", [["p1"], ["p2"]], 100)
    second = MatchView("m2", "1v1", "loading", "", [["p1"], ["p3"]], 200)
    s.deliver(StartLoading(loading_session_id="m1", game_mode="1v1", teams=first.teams,
                           deadline_ms=100))
    now = PlayerState("loading", "1v1", 5, "m2")
    assert s.behind(now)
    assert s.caught_up(now, {"m1": first, "m2": second}) == [
        Send(Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)),
        Send(StartLoading(loading_session_id="m2", game_mode="1v1", teams=second.teams,
                          deadline_ms=200))]
    assert s.phase is Phase.LOADING and not s.behind(now)
    # That one was assigned to a game server while unheard: the match_found it missed.
    assigned = MatchView("m2", "1v1", "assigned", "", second.teams, 200, "gs:1", "s-1")
    [found] = s.caught_up(PlayerState("idle"), {"m2": assigned})
    assert found == Send(MatchFound(loading_session_id="m2", game_mode="1v1",
                                    server_address="gs:1", server_session_id="s-1",
                                    teams=second.teams))
    assert s.phase is Phase.IDLE
    # Queued, and the ticket gone (removed) while unheard; a record gone too says removed.
    s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=9))
    assert s.caught_up(PlayerState("idle"), {}) == [
        Send(Dequeued(game_mode="1v1", reason="removed"))]
    assert s.phase is Phase.IDLE and s.caught_up(PlayerState("idle"), {}) == []


def test_what_the_player_already_knows_is_not_sent_again() -> None:
    """A notice that races the catch-up after a resync (or a removal after the player left
    the queue itself) is dropped, not sent twice; a lost record tells only a player who holds
    a ticket, never one whose enqueue is still in flight."""
    from server.protocol.messages import MatchFound, Requeued, StartLoading

    s = session()
    s.receive(frame(type="enqueue", game_mode="1v1"))
    assert s.ticket_lost() == []  # in flight: the enqueue's own answer tells
    s.complete(RunEnqueue("1v1", None), EnqueueResult("ok", queued_at_ms=5))
    start = StartLoading(loading_session_id="m1", game_mode="1v1", teams=[["p1"], ["p2"]],
                         deadline_ms=9)
    assert s.deliver(start) == [Send(start)]
    assert s.deliver(start) == []  # the same ready check again
    requeued = Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)
    assert s.deliver(requeued) == [Send(requeued)]
    assert s.deliver(requeued) == [] and s.phase is Phase.QUEUED
    [told] = s.ticket_lost()
    assert told == Send(Dequeued(game_mode="1v1", reason="removed")) and s.phase is Phase.IDLE
    for late in (Dequeued(game_mode="1v1", reason="removed"),
                 MatchFound(loading_session_id="m1", game_mode="1v1", server_address="a",
                            server_session_id="b", teams=[["p1"], ["p2"]]),
                 Error(code="loading_timeout", message="x")):
        assert s.deliver(late) == [], late
    assert s.delivered == 2


def start_loading(sid: str = "1.1.0", mode: str = "1v1") -> StartLoading:
    return StartLoading(loading_session_id=sid, game_mode=mode, teams=[["p1"], ["p2"]], deadline_ms=9)


def test_nothing_overtakes_the_answer_to_a_status_or_ready_in_flight() -> None:
    """PROTOCOL 2: a match notice that arrives while `status` is in flight follows its answer,
    so the client never reads `queue_status{queued}` after the `start_loading` that ended it."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    [status] = s.receive(frame(type="status", request_id="s1"))
    assert s.deliver(start_loading()) == []  # held
    effects = s.complete(status, StatusResult(PlayerState("queued", "1v1", 5), queue_size=3, now_ms=10))
    sent = [type(e.message).__name__ for e in effects if isinstance(e, Send)]
    assert sent == ["QueueStatus", "StartLoading"]
    assert s.phase is Phase.LOADING
    [ready] = s.receive(frame(type="loading_complete", loading_session_id="1.1.0"))
    found = MatchFound(loading_session_id="1.1.0", game_mode="1v1", server_address="gs:1",
                       server_session_id="x", teams=[["p1"], ["p2"]])
    assert s.deliver(found) == []  # held behind the ready's answer
    effects = s.complete(ready, ReadyResult("ready"))
    assert [type(e.message).__name__ for e in effects if isinstance(e, Send)] == ["MatchFound"]


def test_already_loading_keeps_the_place_and_invents_no_requeue() -> None:
    """An enqueue that Redis answers "already loading" (its first try timed out after it ran,
    and a match formed) learns the ticket's place; the held start_loading then follows the
    error as it is, without a made-up `requeued` (the session never knew another ready check)."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1", request_id="r2"))
    assert s.deliver(start_loading("7.1.0")) == []  # held while the enqueue is in flight
    effects = s.complete(run, EnqueueResult("already", current=PlayerState("loading", "1v1", 42, "7.1.0")))
    sent = [e.message for e in effects if isinstance(e, Send)]
    assert [type(m).__name__ for m in sent] == ["Error", "StartLoading"], sent
    assert s.phase is Phase.LOADING and s.loading_session_id == "7.1.0" and s.queued_at_ms == 42


def test_a_ready_for_our_own_expired_match_is_not_wrong_session() -> None:
    s = session()
    s.welcome("loading", "1v1", 5, "3.1.0")
    [ready] = s.receive(frame(type="loading_complete", loading_session_id="3.1.0", request_id="x"))
    assert s.complete(ready, ReadyResult("unknown")) == []  # its outcome message is on its way


def test_a_completed_request_makes_an_earlier_read_of_redis_stale() -> None:
    """The front end reads Redis back after a request timed out; if the session moved while
    it read (the client's retried dequeue answered), that read must not undo the move."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    before = s.version
    [retry] = s.receive(frame(type="dequeue", request_id="r2"))
    s.complete(retry, DequeueResult("ok", "1v1"))
    assert s.version != before  # the front end re-reads instead of applying its old read


def test_an_enqueue_that_timed_out_but_ran_is_told_before_its_ready_check() -> None:
    """An enqueue whose reply was lost after it ran (the front end reads the player back) and
    whose match formed meanwhile: the client hears `enqueued` first, then `start_loading`,
    never a ready check for a queue it was told it is not in (docs/protocol.md section 2)."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1", request_id="r1"))
    [error] = s.complete(run, Failed("unavailable", "timeout", 500, unsettled=True))
    assert isinstance(error, Send) and isinstance(error.message, Error)
    assert s.phase is Phase.IDLE
    assert s.deliver(start_loading("4.1.0")) == []  # held until Redis is read back
    told = [e.message for e in s.resync("loading", "1v1", 77) if isinstance(e, Send)]
    assert told == [Enqueued(game_mode="1v1", queued_at_ms=77), start_loading("4.1.0")]
    assert s.phase is Phase.LOADING and s.loading_session_id == "4.1.0"
    # Not held any more: the next notice goes out at once.
    found = MatchFound(loading_session_id="4.1.0", game_mode="1v1", server_address="gs:1",
                       server_session_id="x", teams=[["p1"], ["p2"]])
    assert s.deliver(found) == [Send(found)]


def test_a_failure_that_did_not_run_holds_nothing() -> None:
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, Failed("unavailable", "down", 500))  # refused before sending: settled
    assert s.deliver(start_loading()) == [Send(start_loading())]


def test_a_ready_check_that_came_and_went_during_a_dequeue_is_not_replayed() -> None:
    """Redis ran start_loading, then its requeue (another player left), then our dequeue: the
    notices held while the dequeue was in flight are older than it. Replayed after `dequeued`,
    they would leave the session queued while Redis says idle, and no match would ever come."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    [dequeue] = s.receive(frame(type="dequeue", request_id="d1"))
    assert s.deliver(start_loading("5.1.0")) == []
    assert s.deliver(Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)) == []
    effects = s.complete(dequeue, DequeueResult("ok", "1v1"))
    assert [e.message for e in effects if isinstance(e, Send)] == [
        Dequeued(game_mode="1v1", reason="requested", request_id="d1")]
    assert s.phase is Phase.IDLE
    late = Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)
    assert s.deliver(late) == []  # one still on its way is out of step, and dropped
    [again] = s.receive(frame(type="enqueue", game_mode="1v1"))  # and the player can queue again
    assert isinstance(again, RunEnqueue)


def test_a_retry_that_did_not_run_does_not_settle_an_unknown_enqueue() -> None:
    """The first enqueue may have run (its reply timed out); a retry refused before it was
    sent says nothing about that: notices stay held until the read-back."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1", request_id="r1"))
    s.complete(run, Failed("unavailable", "timeout", 500, unsettled=True))
    assert s.deliver(start_loading("6.1.0")) == []
    [retry] = s.receive(frame(type="enqueue", game_mode="1v1", request_id="r2"))
    s.complete(retry, Failed("unavailable", "breaker open", 500))  # not sent: did not run
    assert s.phase is Phase.IDLE
    told = [e.message for e in s.resync("loading", "1v1", 8) if isinstance(e, Send)]
    assert told == [Enqueued(game_mode="1v1", queued_at_ms=8), start_loading("6.1.0")]


def test_the_read_back_of_a_dequeue_that_ran_drops_the_ready_check_before_it() -> None:
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    [dequeue] = s.receive(frame(type="dequeue", request_id="d1"))
    s.complete(dequeue, Failed("unavailable", "timeout", 500, unsettled=True))
    assert s.phase is Phase.QUEUED
    assert s.deliver(start_loading("8.1.0")) == []
    assert s.deliver(Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)) == []
    told = [e.message for e in s.resync("idle", "", 0) if isinstance(e, Send)]
    assert told == [Dequeued(game_mode="1v1", reason="requested")]
    assert s.phase is Phase.IDLE


def test_a_ready_check_notice_overtaken_by_the_dequeues_answer_is_dropped() -> None:
    """The dequeue's answer came before the pub/sub notice of a ready check that formed and
    ended before the dequeue ran: neither its start_loading nor its requeue moves the session.
    A new enqueue ends that: its ready checks are followed again."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    [dequeue] = s.receive(frame(type="dequeue"))
    s.complete(dequeue, DequeueResult("ok", "1v1"))
    assert s.deliver(start_loading("9.1.0")) == []
    assert s.deliver(Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)) == []
    assert s.phase is Phase.IDLE
    [again] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(again, EnqueueResult("ok", queued_at_ms=12))
    assert s.deliver(start_loading("9.2.0")) == [Send(start_loading("9.2.0"))]


def test_a_catch_up_to_a_ready_check_of_an_unannounced_ticket_says_enqueued_first() -> None:
    from server.protocol.results import MatchView

    s = session()
    view = MatchView("2.1.0", "1v1", "loading", teams=[["p1"], ["p2"]], deadline_ms=9)
    effects = s.caught_up(PlayerState("loading", "1v1", 77, "2.1.0"), {"2.1.0": view})
    told = [e.message for e in effects if isinstance(e, Send)]
    assert told == [Enqueued(game_mode="1v1", queued_at_ms=77), start_loading("2.1.0")]
    assert s.phase is Phase.LOADING


def test_a_dequeue_read_back_that_finds_a_held_ending_tells_that_ending() -> None:
    """The dequeue timed out; a ready check had formed before it and then timed out (the
    player never heard it), so Redis has the player idle for that reason, not the dequeue's.
    The read-back tells what really happened (the held start_loading and loading_timeout),
    not a made-up dequeued{requested}."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    [dequeue] = s.receive(frame(type="dequeue", request_id="d1"))
    s.complete(dequeue, Failed("unavailable", "timeout", 500, unsettled=True))
    timeout = Error(code="loading_timeout", message="missed")
    assert s.deliver(start_loading("8.1.0")) == [] and s.deliver(timeout) == []
    told = [e.message for e in s.resync("idle", "", 0) if isinstance(e, Send)]
    assert told == [start_loading("8.1.0"), timeout]
    assert s.phase is Phase.IDLE


def test_not_in_queue_after_a_lost_dequeue_drops_the_ready_check_before_it() -> None:
    """The first dequeue ran but its answer was lost; a ready check came and went before it
    (held); the retry finds the player idle: that ready check is not replayed."""
    s = session()
    [run] = s.receive(frame(type="enqueue", game_mode="1v1"))
    s.complete(run, EnqueueResult("ok", queued_at_ms=5))
    [d1] = s.receive(frame(type="dequeue", request_id="d1"))
    s.complete(d1, Failed("unavailable", "timeout", 500, unsettled=True))
    assert s.deliver(start_loading("8.2.0")) == []
    assert s.deliver(Requeued(game_mode="1v1", reason="player_left", queued_at_ms=5)) == []
    [d2] = s.receive(frame(type="dequeue", request_id="d2"))
    effects = s.complete(d2, DequeueResult("not_in_queue"))
    assert [type(e.message).__name__ for e in effects if isinstance(e, Send)] == ["Error"]
    assert s.phase is Phase.IDLE
