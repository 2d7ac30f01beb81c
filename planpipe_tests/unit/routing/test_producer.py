"""PlanProducer's spool and fence logic against a fake librdkafka (the breaker alone: test_breaker)."""

import collections
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from planpipe.routing.breaker import BreakerState
from planpipe.routing.producer import PlanProducer
from planpipe.routing.spool import OutRecord, Spool
from planpipe.routing.spool_lock import SpoolInUse
from planpipe.settings import Settings, load_settings
from planpipe_tests.unit.routing.test_breaker import FakeClock

pytestmark = pytest.mark.unit


# -- PlanProducer against a fake librdkafka -----------------------------------------

Callback = Callable[[KafkaError | None, Any], None]


class FakeKafka:
    """A stand-in for librdkafka: one FIFO queue, delivered on poll() while the broker is up.

    While down, queued records stay queued (as librdkafka retries them) and the
    error callback reports the transport failure; metadata requests fail.
    """

    def __init__(self, conf: dict[str, Any], *, up: bool = True) -> None:
        self.conf = conf
        self.lock = threading.Lock()
        self.queue: list[tuple[str, bytes | None, bytes, Callback]] = []
        self.events: collections.deque[tuple[Callback, KafkaError | None]] = collections.deque()
        self.errors: collections.deque[KafkaError] = collections.deque()
        self.log: list[tuple[str, bytes | None, bytes]] = []
        self.up = up
        self.hold = False  # up, but not acknowledging yet
        self.buffer_error_at: set[bytes] = set()
        self.too_large: set[bytes] = set()

    def produce(
        self,
        topic: str,
        value: str | bytes | None = None,
        key: str | bytes | None = None,
        partition: int = -1,
        callback: Callback | None = None,
        on_delivery: Callback | None = None,
        timestamp: int = 0,
        headers: Any = None,
    ) -> None:
        assert isinstance(value, bytes) and (key is None or isinstance(key, bytes)) and on_delivery is not None
        if value in self.buffer_error_at:
            self.buffer_error_at.discard(value)
            raise BufferError("Local: Queue full")
        if value in self.too_large:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        with self.lock:
            self.queue.append((topic, key, value, on_delivery))

    def poll(self, timeout: float = -1) -> int:
        with self.lock:
            if self.up and not self.hold:
                for topic, key, value, callback in self.queue:
                    self.log.append((topic, key, value))
                    self.events.append((callback, None))
                self.queue.clear()
            events, self.events = list(self.events), collections.deque()
            errors, self.errors = list(self.errors), collections.deque()
        for error in errors:
            self.conf["error_cb"](error)
        for callback, err in events:
            callback(err, None)
        if not events and timeout > 0:
            time.sleep(min(timeout, 0.005))
        return len(events)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        with self.lock:
            self.events.extend((callback, KafkaError(KafkaError._PURGE_QUEUE)) for *_, callback in self.queue)
            self.queue.clear()

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if not self.up:
            time.sleep(0.01)
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))
        return SimpleNamespace(brokers={1: object()}, topics={})

    def close(self) -> bool:
        return True

    # test controls
    def go_down(self) -> None:
        with self.lock:
            self.up = False
            self.errors.append(KafkaError(KafkaError._TRANSPORT))

    def come_back(self) -> None:
        with self.lock:
            self.up = True
            self.hold = False

    def time_out_oldest(self, n: int) -> None:
        """message.timeout.ms expired for the n oldest queued records (only those: librdkafka's gaps)."""
        with self.lock:
            for *_, callback in self.queue[:n]:
                self.events.append((callback, KafkaError(KafkaError._MSG_TIMED_OUT)))
            del self.queue[:n]

    def queued(self) -> list[bytes]:
        with self.lock:
            return [value for _, _, value, _ in self.queue]

    def values(self) -> list[bytes]:
        with self.lock:
            return [value for _, _, value in self.log]


@pytest.fixture
def unit_settings(tmp_path: Path) -> Settings:
    return replace(load_settings({}), spool_path=tmp_path / "spool.sqlite3", topic="t", dlq_topic="t.dlq")


@pytest.fixture
def fakes() -> list[FakeKafka]:
    return []


def make_producer(settings: Settings, fakes: list[FakeKafka], *, up: bool = True, **kwargs: Any) -> PlanProducer:
    def factory(conf: dict[str, Any]) -> FakeKafka:
        fake = FakeKafka(conf, up=up)
        fakes.append(fake)
        return fake

    kwargs.setdefault("cooldown_s", 0.2)
    kwargs.setdefault("probe_timeout_s", 0.05)
    return PlanProducer(settings, client_factory=factory, **kwargs)


def recs(start: int, stop: int, key: bytes = b"standard:q") -> list[OutRecord]:
    return [OutRecord("t", key, b"%d" % i) for i in range(start, stop)]


def nums(start: int, stop: int) -> list[bytes]:
    return [b"%d" % i for i in range(start, stop)]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def producers() -> Iterator[list[PlanProducer]]:
    made: list[PlanProducer] = []
    yield made
    for producer in made:
        producer.close(timeout=1)


def test_healthy_broker_goes_direct_and_reports_durable_batches(
    unit_settings: Settings, fakes: list[FakeKafka]
) -> None:
    durable: list[float] = []
    delivered: list[OutRecord] = []
    with make_producer(unit_settings, fakes, on_delivered=delivered.extend) as producer:
        producer.send(recs(0, 50), on_durable=durable.append)
        assert producer.flush(5) == 0
        stats = producer.stats()
    assert fakes[0].values() == nums(0, 50)
    assert [r.value for r in delivered] == nums(0, 50)
    assert len(durable) == 1 and durable[0] >= 0
    assert stats.sent_direct == 50 and stats.spooled == 0 and stats.breaker is BreakerState.CLOSED


def test_outage_spools_in_order_and_resends_each_record_once(unit_settings: Settings, fakes: list[FakeKafka]) -> None:
    clock = FakeClock()  # the cool-down passes when the test says so
    with make_producer(unit_settings, fakes, clock=clock) as producer:
        fake = fakes[0]
        producer.send(recs(0, 10))
        assert producer.flush(5) == 0
        fake.go_down()
        for i in range(10, 40):  # direct until the breaker opens, then straight to the spool
            producer.send(recs(i, i + 1))
            time.sleep(0.005)
        wait_until(lambda: producer.breaker_state is not BreakerState.CLOSED)
        # Everything not acknowledged is in the spool, including what librdkafka still holds.
        assert [r.record.value for r in producer.spool.peek_batch(100)] == nums(10, 40)
        held = len(fake.queue)
        assert held > 0
        clock.now += 0.2  # the cool-down passes: half-open, but the broker is still down
        assert producer.breaker_state is not BreakerState.CLOSED
        assert fake.values() == nums(0, 10)
        fake.come_back()
        producer.send(recs(40, 45))
        assert producer.flush(5) == 0

        def drained() -> bool:
            clock.now += 0.2  # time passes: any cool-down a failed probe started ends too
            return producer.breaker_state is BreakerState.CLOSED and producer.spool.depth() == 0

        wait_until(drained)
        stats = producer.stats()
    # Held records were delivered by the client's own retry; the drain sent the rest.
    assert fake.values() == nums(0, 45)
    assert stats.delivered_from_spool == 45 - 10 - held
    assert stats.spool_depth == 0 and stats.breaker is BreakerState.CLOSED and stats.breaker_opened >= 1
    assert len(stats.drain_seconds) == 1


def test_timed_out_record_fences_the_records_queued_behind_it(unit_settings: Settings, fakes: list[FakeKafka]) -> None:
    with make_producer(unit_settings, fakes) as producer:
        fake = fakes[0]
        fake.hold = True
        producer.send(recs(0, 10))
        wait_until(lambda: len(fake.queue) == 10)
        # librdkafka times out only the oldest two; 2..9 would otherwise be delivered
        # first once the broker answers, overtaking 0 and 1 (its documented "1, 4, 5" gap).
        fake.time_out_oldest(2)
        wait_until(lambda: producer.spool.depth() == 10)
        assert [r.record.value for r in producer.spool.peek_batch(100)] == nums(0, 10)
        # 2..9 are purged back, not left to overtake; the drain may already have
        # re-produced the spool, but then 0 and 1 are first again.
        wait_until(lambda: fake.queued() in ([], nums(0, 10)))
        producer.send(recs(10, 12))  # behind the spooled ones
        fake.come_back()
        assert producer.flush(5) == 0
        stats = producer.stats()
    assert fake.values() == nums(0, 12)  # each once, in order
    assert stats.failed_deliveries == 2  # the purge of 2..9 is ours, not the broker's


def test_buffer_error_diverts_the_rest_of_the_batch(unit_settings: Settings, fakes: list[FakeKafka]) -> None:
    with make_producer(unit_settings, fakes) as producer:
        fakes[0].buffer_error_at.add(b"4")
        producer.send(recs(0, 10))
        producer.send(recs(10, 15))
        assert producer.flush(5) == 0
        stats = producer.stats()
    assert fakes[0].values() == nums(0, 15)
    # 0-3 direct, 4-9 spooled; 10-14 go behind them into the spool, or direct if the drain thread
    # had already emptied it (on a loaded machine it may not have): the order holds either way.
    assert stats.spooled >= 6 and stats.sent_direct in (4, 9), stats


def test_undeliverable_record_goes_to_the_hook_not_the_spool(unit_settings: Settings, fakes: list[FakeKafka]) -> None:
    refused: list[tuple[bytes, str]] = []
    with make_producer(unit_settings, fakes, on_undeliverable=lambda r, e: refused.append((r.value, e))) as producer:
        fakes[0].too_large.add(b"3")
        producer.send(recs(0, 6))
        assert producer.flush(5) == 0
        stats = producer.stats()
    assert fakes[0].values() == [b"0", b"1", b"2", b"4", b"5"]
    assert [value for value, _ in refused] == [b"3"] and stats.undeliverable == 1


def test_leftovers_from_an_earlier_run_go_out_before_new_records(
    unit_settings: Settings, fakes: list[FakeKafka]
) -> None:
    with Spool(unit_settings.spool_path) as spool:
        spool.append(recs(0, 5))
    with make_producer(unit_settings, fakes) as producer:
        producer.send(recs(5, 10))
        assert producer.flush(5) == 0
    assert fakes[0].values() == nums(0, 10)


def test_close_while_down_leaves_everything_in_the_spool(unit_settings: Settings, fakes: list[FakeKafka]) -> None:
    producer = make_producer(unit_settings, fakes, up=False)
    for i in range(20):
        producer.send(recs(i, i + 1))
    assert producer.flush(0.2) == 20
    stats = producer.close(timeout=0.1)
    assert stats.spool_depth == 20 and fakes[0].values() == []
    with Spool(unit_settings.spool_path) as spool:
        assert [r.record.value for r in spool.peek_batch(100)] == nums(0, 20)
    with pytest.raises(RuntimeError):
        producer.send(recs(0, 1))

    with make_producer(unit_settings, fakes) as again:  # next run, broker back
        assert again.flush(5) == 0
    assert fakes[1].values() == nums(0, 20)


def test_one_producer_per_spool_file(unit_settings: Settings, fakes: list[FakeKafka]) -> None:
    with make_producer(unit_settings, fakes), pytest.raises(SpoolInUse):
        make_producer(unit_settings, fakes)
    make_producer(unit_settings, fakes).close()  # released on close


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port  # nothing listens there any more


def test_real_client_against_an_unreachable_broker_opens_and_spools(unit_settings: Settings) -> None:
    settings = replace(unit_settings, kafka_bootstrap=f"127.0.0.1:{_closed_port()}")
    producer = PlanProducer(settings, cooldown_s=0.5, probe_timeout_s=0.3, config={"log_level": 0})
    started = time.monotonic()
    for i in range(40):
        producer.send(recs(i, i + 1))
        time.sleep(0.02)
    wait_until(lambda: producer.breaker_state is not BreakerState.CLOSED, timeout=10)
    opened_after = time.monotonic() - started
    stats = producer.close(timeout=0.5)
    assert stats.spool_depth == 40 and stats.delivered == 0
    with Spool(settings.spool_path) as spool:
        assert [r.record.value for r in spool.peek_batch(100)] == nums(0, 40)
    assert opened_after < 10
