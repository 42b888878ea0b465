"""The circuit breaker's state machine, driven with a plain clock (DESIGN P2)."""

from server.store.breaker import BreakerState, CircuitBreaker


def test_opens_after_threshold_then_half_open_probe_decides() -> None:
    b = CircuitBreaker(threshold=3, cooldown_s=10)
    for t in range(2):
        assert b.allow(t)
        b.failure(t)
    assert b.state is BreakerState.CLOSED
    b.failure(2)
    assert b.state is BreakerState.OPEN and not b.allow(5) and b.retry_after_s(5) == 7
    assert b.allow(12) and b.state is BreakerState.HALF_OPEN  # the probe
    assert not b.allow(12)  # only one probe at a time
    b.failure(12)
    assert b.state is BreakerState.OPEN and not b.allow(13)
    assert b.allow(22)
    b.success()
    assert b.state is BreakerState.CLOSED and b.allow(22) and b.allow(22)


def test_a_success_resets_the_count() -> None:
    b = CircuitBreaker(threshold=2, cooldown_s=1)
    b.failure(0)
    b.success()
    b.failure(0)
    assert b.state is BreakerState.CLOSED


def test_an_abandoned_probe_lets_the_next_call_probe() -> None:
    """A half-open probe that is cancelled (or never gets a connection) must not leave the
    breaker refusing everything forever."""
    b = CircuitBreaker(threshold=1, cooldown_s=1)
    b.failure(0)
    assert b.allow(2) and not b.allow(2)  # the probe is out
    b.abandon()
    assert b.allow(2)  # another call may probe
    b.success()
    assert b.state is BreakerState.CLOSED
