from planpipe.ingest.breaker import LatencyBreaker, LockWaitThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_only_after_60s_of_sustained_breach_and_closes_on_recovery() -> None:
    clock = Clock()
    breaker = LatencyBreaker(clock=clock)
    breaker.record(1500)
    clock.now = 59
    breaker.record(1300)
    assert not breaker.is_open
    clock.now = 60
    breaker.record(1201)
    assert breaker.is_open and breaker.opened_count == 1
    clock.now = 61
    breaker.record(1200)  # at the threshold is not a breach
    assert not breaker.is_open


def test_breach_interrupted_by_a_good_batch_restarts_the_window() -> None:
    clock = Clock()
    breaker = LatencyBreaker(clock=clock)
    breaker.record(5000)
    clock.now = 40
    breaker.record(100)
    clock.now = 70
    breaker.record(5000)
    assert not breaker.is_open
    clock.now = 130
    breaker.record(5000)
    assert breaker.is_open


def test_lock_wait_throttle_has_hysteresis() -> None:
    throttle = LockWaitThrottle(base_delay_s=0.25, max_delay_s=1.0)
    throttle.record(700)
    assert throttle.delay_s() == 0
    throttle.record(900)
    assert throttle.delay_s() == 0.25
    throttle.record(850)
    assert throttle.delay_s() == 0.5
    throttle.record(600)  # below 800 but not below 400: still throttled
    assert throttle.throttling and throttle.delay_s() == 0.5
    throttle.record(2000)
    throttle.record(2000)
    assert throttle.delay_s() == 1.0  # capped
    throttle.record(399)
    assert not throttle.throttling and throttle.delay_s() == 0
