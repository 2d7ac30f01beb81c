"""The circuit breaker alone, on an injected clock: no test waits out a cool-down."""

import pytest

from planpipe.routing.breaker import BreakerState, CircuitBreaker

pytestmark = pytest.mark.unit


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """Read through a call: mypy would otherwise narrow `breaker.state` across asserts."""
    return breaker.state


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_three_consecutive_failures_open_the_breaker() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=30.0, clock=clock)
    assert state_of(breaker) is BreakerState.CLOSED
    assert not breaker.record_failure("a") and not breaker.record_failure("b")
    breaker.record_success()  # not consecutive any more
    assert breaker.consecutive_failures == 0
    assert not breaker.record_failure("c") and not breaker.record_failure("d")
    assert breaker.record_failure("e")  # True exactly when it opens
    assert state_of(breaker) is BreakerState.OPEN and breaker.times_opened == 1
    assert breaker.last_failure == "e"
    assert not breaker.record_failure("f")  # already open
    assert breaker.cooldown_remaining_s() == 30.0


def test_cooldown_half_open_then_reopen_or_close() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(threshold=3, cooldown_s=30.0, clock=clock)
    for _ in range(3):
        breaker.record_failure("down")
    clock.now += 20
    assert not breaker.record_failure("still down")  # failures during the cool-down do not extend it
    clock.now += 9.9
    assert state_of(breaker) is BreakerState.OPEN
    assert breaker.cooldown_remaining_s() == pytest.approx(0.1)
    clock.now += 0.1
    assert state_of(breaker) is BreakerState.HALF_OPEN
    breaker.record_success()  # a success alone does not close: the owner closes after the drain
    assert state_of(breaker) is BreakerState.HALF_OPEN

    assert breaker.record_failure("trial failed")  # one failure while half-open re-opens
    assert state_of(breaker) is BreakerState.OPEN and breaker.times_opened == 2
    clock.now += 29
    assert state_of(breaker) is BreakerState.OPEN  # fresh cool-down
    clock.now += 1
    assert state_of(breaker) is BreakerState.HALF_OPEN
    breaker.close()
    assert state_of(breaker) is BreakerState.CLOSED and breaker.consecutive_failures == 0
    assert not breaker.record_failure("one")  # counting starts again from zero


def test_breaker_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown_s=-1)
