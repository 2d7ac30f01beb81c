"""BoundedEventQueue: FIFO, drop-oldest with an audit log line, close semantics, threads."""

import logging
import threading
import time
from dataclasses import dataclass

import pytest

from planpipe.routing.router import BoundedEventQueue, QueueClosed, Router, RoutingDecision
from planpipe_tests.unit.routing.helpers import envelope, sample

pytestmark = pytest.mark.unit

OVERFLOW = {"reason": "queue_overflow"}
DROPPED = "explain_router_dropped_total"
DEPTH = "explain_router_queue_depth"


@dataclass(frozen=True)
class Event:
    query_hash: str
    producer: int = 0
    seq: int = 0


def events(n: int, prefix: str = "h") -> list[Event]:
    return [Event(f"{prefix}{i}", seq=i) for i in range(n)]


def test_default_capacity_is_10000() -> None:
    assert BoundedEventQueue[Event]().capacity == 10_000


def test_fifo_and_batching() -> None:
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=10)
    items = events(5)
    for item in items:
        assert queue.put(item) is None
    assert queue.depth() == 5
    assert sample(DEPTH) == 5
    assert queue.get_batch(2, timeout=0) == items[:2]
    assert queue.get_batch(10, timeout=0) == items[2:]
    assert queue.depth() == 0
    assert sample(DEPTH) == 0


def test_overflow_drops_oldest_logs_hash_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=3)
    items = events(5)
    dropped_before = sample(DROPPED, **OVERFLOW)

    with caplog.at_level(logging.WARNING, logger="planpipe.router"):
        evicted = [queue.put(item) for item in items]

    assert evicted == [None, None, None, items[0], items[1]]
    assert queue.depth() == 3
    assert sample(DEPTH) == 3
    assert sample(DROPPED, **OVERFLOW) == dropped_before + 2
    warnings = [r for r in caplog.records if r.name == "planpipe.router" and r.levelno == logging.WARNING]
    assert [r.query_hash for r in warnings] == ["h0", "h1"]  # type: ignore[attr-defined]
    assert "query_hash=h0" in warnings[0].getMessage()
    assert queue.get_batch(10, timeout=0) == items[2:]


def test_works_with_routing_decisions(caplog: pytest.LogCaptureFixture) -> None:
    router = Router()
    queue: BoundedEventQueue[RoutingDecision] = BoundedEventQueue(capacity=1)
    first = router.route_envelope(envelope(query_hash="old"))
    with caplog.at_level(logging.WARNING, logger="planpipe.router"):
        queue.put(first)
        assert queue.put(router.route_envelope(envelope(query_hash="new"))) is first
    assert "query_hash=old" in caplog.text


def test_get_batch_timeout_returns_empty() -> None:
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=2)
    assert queue.get_batch(5, timeout=0) == []
    started = time.monotonic()
    assert queue.get_batch(5, timeout=0.05) == []
    assert time.monotonic() - started >= 0.04


def test_blocked_consumer_gets_item_from_another_thread() -> None:
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=2)
    got: list[list[Event]] = []
    consumer = threading.Thread(target=lambda: got.append(queue.get_batch(5, timeout=None)))
    consumer.start()
    time.sleep(0.02)
    queue.put(Event("x"))
    consumer.join(timeout=5)
    assert not consumer.is_alive()
    assert got == [[Event("x")]]


def test_close_wakes_consumer_refuses_puts_and_drains() -> None:
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=5)
    waiting: list[list[Event]] = []
    consumer = threading.Thread(target=lambda: waiting.append(queue.get_batch(5, timeout=None)))
    consumer.start()
    time.sleep(0.02)
    queue.close()
    consumer.join(timeout=5)
    assert not consumer.is_alive()
    assert waiting == [[]]
    assert queue.closed and queue.drained
    with pytest.raises(QueueClosed):
        queue.put(Event("late"))


def test_close_lets_remaining_items_drain() -> None:
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=5)
    items = events(3)
    for item in items:
        queue.put(item)
    queue.close()
    assert not queue.drained
    assert queue.get_batch(2, timeout=None) == items[:2]
    assert queue.get_batch(2, timeout=None) == items[2:]
    assert queue.drained
    assert queue.get_batch(2, timeout=None) == []  # returns at once, does not block


@pytest.mark.parametrize("capacity", [0, -1])
def test_invalid_capacity(capacity: int) -> None:
    with pytest.raises(ValueError):
        BoundedEventQueue[Event](capacity=capacity)


def test_invalid_batch_size() -> None:
    with pytest.raises(ValueError):
        BoundedEventQueue[Event]().get_batch(0)


def test_concurrent_producers_lose_nothing_unaccounted(caplog: pytest.LogCaptureFixture) -> None:
    producers, per_producer, capacity = 8, 2_000, 300
    queue: BoundedEventQueue[Event] = BoundedEventQueue(capacity=capacity)
    evicted: list[list[Event]] = [[] for _ in range(producers)]
    consumed: list[Event] = []
    dropped_before = sample(DROPPED, **OVERFLOW)
    start = threading.Barrier(producers + 1)

    def produce(p: int) -> None:
        start.wait()
        for i in range(per_producer):
            old = queue.put(Event(f"p{p}-{i}", producer=p, seq=i))
            if old is not None:
                evicted[p].append(old)

    def consume() -> None:
        start.wait()
        while not queue.drained:
            consumed.extend(queue.get_batch(16, timeout=0.01))
            time.sleep(0.001)  # slower than the producers, so the queue overflows

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    consumer = threading.Thread(target=consume)
    with caplog.at_level(logging.ERROR, logger="planpipe.router"):  # keep 1000s of warnings out of the report
        consumer.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        queue.close()
        consumer.join(timeout=60)
    assert not consumer.is_alive()

    all_evicted = [e for per in evicted for e in per]
    assert all_evicted and consumed  # both paths were exercised
    sent = {(p, i) for p in range(producers) for i in range(per_producer)}
    seen = [(e.producer, e.seq) for e in consumed + all_evicted]
    # Every event either reached the consumer or was reported evicted, exactly once.
    assert len(seen) == len(sent) and set(seen) == sent
    assert sample(DROPPED, **OVERFLOW) == dropped_before + len(all_evicted)
    assert queue.depth() == 0 and sample(DEPTH) == 0
    # FIFO holds per producer: each producer's events come out in the order it put them.
    for p in range(producers):
        seqs = [e.seq for e in consumed if e.producer == p]
        assert seqs == sorted(seqs)
