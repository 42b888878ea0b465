"""The circuit breaker's state machine, driven with a plain clock (DESIGN P2, issue 17)."""

from server.store.breaker import BreakerState, CircuitBreaker


def test_opens_after_threshold_and_refuses_until_a_probe_answers() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=10, probe_initial_s=0.25)
    for t in range(2):
        assert b.allow(t)
        b.failure(t)
    assert b.state is BreakerState.CLOSED
    b.failure(2)
    assert b.state is BreakerState.OPEN and not b.allow(2.1)
    assert not b.probe_due(2.2)  # the first probe waits probe_initial_s
    assert abs(b.retry_after_s(2.2) - 0.05) < 1e-9  # refused clients are told when to retry
    assert b.probe_due(2.25) and b.state is BreakerState.HALF_OPEN
    assert not b.probe_due(2.25) and not b.allow(2.25)  # one probe at a time
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow(3) and b.failures == 0


def test_failed_probes_back_off_to_the_cooldown_and_no_further() -> None:
    b = CircuitBreaker(threshold=1, cooldown_s=2, probe_initial_s=0.25)
    b.failure(0)
    waits = []
    now = 0.0
    for _ in range(6):
        now = b.next_probe_at
        assert b.probe_due(now)
        b.probe_failed(now)
        waits.append(round(b.next_probe_at - now, 3))
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert not b.allow(now)
    b.success()  # Redis is back: the next outage starts from the short wait again
    b.failure(now)
    assert round(b.next_probe_at - now, 3) == 0.25


def test_a_success_resets_the_count() -> None:
    b = CircuitBreaker(threshold=2, cooldown_s=1, probe_initial_s=0.25)
    b.failure(0)
    b.success()
    b.failure(0)
    assert b.state is BreakerState.CLOSED
