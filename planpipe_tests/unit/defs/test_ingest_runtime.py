"""The ingest run's cancel watch and stuck-run timing, without Dagster running."""

import threading

import pytest

from planpipe.defs.ingest.runtime import CancelWatch, replace_after_s, watchdog_interval_s

pytestmark = pytest.mark.unit


def test_the_cancel_watch_stops_the_engine_once_the_run_is_canceling() -> None:
    status = {"canceling": False}
    stopped = threading.Event()
    calls: list[int] = []

    def stop() -> None:
        calls.append(1)
        stopped.set()

    with CancelWatch(lambda: status["canceling"], stop, interval_s=0.01) as watch:
        assert not stopped.wait(0.1) and not watch.requested
        status["canceling"] = True
        assert stopped.wait(5)
    assert watch.requested and calls == [1]


def test_the_cancel_watch_outlives_a_status_it_cannot_read_and_stops_with_its_block() -> None:
    reads = {"n": 0}

    def canceling() -> bool:
        reads["n"] += 1
        raise ConnectionError("instance storage away")

    stops: list[int] = []
    with CancelWatch(canceling, lambda: stops.append(1), interval_s=0.01) as watch:
        threading.Event().wait(0.1)
    assert reads["n"] >= 2 and not watch.requested and stops == []
    assert not watch._thread.is_alive()


@pytest.mark.parametrize("stall_after_s", [1.0, 4.0, 20.0, 60.0, 600.0])
def test_a_stuck_run_is_replaced_only_after_two_of_its_own_checks_past_the_limit(stall_after_s: float) -> None:
    interval = watchdog_interval_s(stall_after_s)
    assert 1.0 <= interval <= 10.0
    assert replace_after_s(stall_after_s) - stall_after_s >= 2 * interval
