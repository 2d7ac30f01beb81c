"""The agent process: recover, then capture → route → hand off → commit, until stopped.

Threads: the capture loop (this one), `maintenance` (watermark snapshots,
`scan_from`, count reports, gauges), `redis-drain` (when Redis is configured)
and `sampler` (when live sampling is on); the HTTP endpoint serves from its own.

Where a batch goes (`_destination`), under one lock so order per key holds:

1. Redis while it still holds records (newer records queue behind them);
2. Redis while the broker-health sensor reports the cluster degraded
   (`planpipe.kafka_fallback_mode`, runbook: URP > 5 for > 2 min);
3. Redis when the producer's breaker is not closed (Kafka unreachable) and the
   spool passed a size or age limit;
4. otherwise the producer (Kafka, or its spool on an outage).

The drainer moves Redis records to Kafka only while the cluster is not
degraded, the breaker is closed and the spool is empty (spooled records are
older); when Redis is empty it hands new batches back to the producer.
"""

import fcntl
import itertools
import logging
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import IO, Final, Literal

from planpipe.agent import server
from planpipe.agent.config import AgentConfig
from planpipe.agent.counts import report_counts
from planpipe.agent.ledger import Watermarks
from planpipe.agent.publisher import AgentPublisher, Item
from planpipe.agent.recovery import RecoveryReport, recover
from planpipe.agent.sampler import Sampler, SamplerConfig
from planpipe.agent.source import LogSource
from planpipe.agent.state import AgentState
from planpipe.capture.autoexplain import LogFormat
from planpipe.contract import encode_envelope
from planpipe.health.broker import FallbackMode
from planpipe.health.fallback import FallbackModeReader
from planpipe.routing.producer import BreakerState
from planpipe.routing.publish import Source
from planpipe.routing.redis_queue import QueueUnavailable, RedisDrainer, RedisQueue
from planpipe.routing.spool import OutRecord
from planpipe.settings import Settings
from planpipe.stack.errors import StackError

logger = logging.getLogger("planpipe.agent")

Destination = Literal["kafka", "redis"]
_SPOOL_CHECK_S: Final = 1.0
_WAIT_LOG_S: Final = 30.0


class AgentBusy(StackError):
    """Another agent process owns this state directory."""


class _Stopped(Exception):
    """Stop requested while a batch could be stored nowhere: its intent stays open, the log keeps it."""


_FAULT_COUNTS: dict[str, int] = {}


def _fault_point(name: str) -> None:
    """Crash tests: PLANPIPE_FAULT_KILL_AT=<step>[:<n>] SIGKILLs the agent at the n-th pass. Never in production."""
    step, _, nth = os.environ.get("PLANPIPE_FAULT_KILL_AT", "").partition(":")
    if step != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or "1"):
        os.kill(os.getpid(), signal.SIGKILL)


def _setter(event: threading.Event) -> Callable[[float], None]:
    return lambda _elapsed_ms: event.set()


def _lock(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "ab")  # noqa: SIM115 - held for the agent's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise AgentBusy(f"another planpipe agent runs with state directory {path.parent}") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle


class Agent:
    def __init__(self, config: AgentConfig, settings: Settings, *, name: str, cluster_id: str) -> None:
        self.config = config
        self.name = name
        self.cluster_id = cluster_id
        state_dir = config.state_dir or settings.home / "agent" / name
        self.state_dir = state_dir
        self.settings = replace(settings, spool_path=state_dir / "spool.sqlite3")
        self._lock_handle = _lock(state_dir / "agent.lock")
        self.state = AgentState(state_dir / "state.sqlite3")
        self.stop = threading.Event()
        self.status = "starting"
        self.detail = ""
        self.recovery: RecoveryReport | None = None
        self.redis = (
            RedisQueue(
                settings.redis_url,
                name,
                dlq_topic=settings.dlq_topic,
                ttl_s=config.redis_ttl_s,
                max_entries=config.redis_max_entries,
            )
            if settings.redis_url
            else None
        )
        # Read by the `mode` thread only: a slow or absent PostgreSQL never stalls the capture path.
        self.mode = FallbackModeReader(settings.pg_dsn, settings.kafka_bootstrap, ttl_s=config.mode_refresh_s)
        self._mode = FallbackMode.KAFKA
        self.publisher: AgentPublisher | None = None
        self.watermarks: Watermarks | None = None
        self.source: LogSource | None = None
        self.sampler: Sampler | None = None
        self._route_lock = threading.Lock()
        self._redis_pending = False
        self._sends_lock = threading.Lock()
        self._sends = itertools.count()
        self._open_sends: dict[int, float] = {}
        self._spool_over: tuple[float, bool] = (0.0, False)
        self._skips: set[str] = set()
        self._last_commit: float | None = None
        self._message_timeout_s = int(settings.producer_overrides.get("message.timeout.ms", 300_000)) / 1000
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self._last_wait_log = 0.0

    # -- lifecycle --------------------------------------------------------------

    def run(self) -> None:
        if self.config.http_port >= 0:
            self._http = server.serve(self.config.http_port, self.health)
        try:
            self.status = "recovering"
            self.recovery = recover(
                self.settings, self.name, self.state, redis_queue=self.redis, stop=self.stop, on_wait=self._waiting
            )
            self._count_recovery(self.recovery)
            self.state.prune_skips(older_than_s=7 * 86400)  # entries of a log deleted since: never met again
            self._skips = self.state.skip_ids()
            # The first snapshot precedes everything this run produces (taken before the producer starts).
            self.watermarks = Watermarks(self.settings, self.name)
            # If Kafka does not answer now, the first snapshot comes after records may have been
            # produced: until one qualifies, the floor is the last persisted one (or offset 0).
            self.watermarks.seed(self.state.scan_from() or {})
            self.watermarks.take()
            self._persist_scan_from()
            self.publisher = AgentPublisher(self.settings, cooldown_s=self.config.cooldown_s)
            if self.redis is not None:
                try:
                    self._redis_pending = self.redis.pending() > 0
                except QueueUnavailable:  # unknown: assume it holds older records (order first)
                    self._redis_pending = True
            if self.config.log is not None:
                self.source = self._open_source(self.config.log)
            self._mode = self.mode()
            self._start_threads()
            self.status, self.detail = "ok", ""
            self._capture_loop()
        except _Stopped:
            logger.warning("agent %s stopped with a batch not stored; it is read again at the next start", self.name)
        finally:
            self._shutdown()

    def _open_source(self, log: Path) -> LogSource:
        return LogSource(
            log,
            agent=self.name,
            cluster_id=self.cluster_id,
            scratch_state=self.state_dir / "cursor.json",
            saved_cursor=self.state.cursor(),
            fmt=None if self.config.log_format == "auto" else LogFormat(self.config.log_format),
            all_files=self.config.all_files,
            log_timezone=self.config.log_timezone,
        )

    def _start_threads(self) -> None:
        targets = [("maintenance", self._maintenance_loop), ("mode", self._mode_loop)]
        if self.redis is not None:
            targets.append(("redis-drain", self._drain_loop))
        if self.config.sample and self.config.dsn:
            self.sampler = Sampler(
                SamplerConfig(
                    dsn=self.config.dsn,
                    interval_s=self.config.sample_interval_s,
                    max_statements=self.config.sample_max_statements,
                    statement_timeout_ms=self.config.sample_statement_timeout_ms,
                    budget_pct=self.config.sample_budget_pct,
                    allow_superuser=self.config.allow_superuser,
                ),
                self.cluster_id,
            )
            targets.append(("sampler", self._sample_loop))
        for name, target in targets:
            thread = threading.Thread(target=self._guard(target), name=f"planpipe-agent-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            while not self.stop.is_set():
                try:
                    target()
                    return
                except Exception:
                    logger.exception("agent thread %s failed; restarting it", threading.current_thread().name)
                    self.stop.wait(5.0)

        return run

    def _shutdown(self) -> None:
        self.stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for thread in self._threads:
            thread.join()
        if self.sampler is not None:
            self.sampler.close()
        if self.publisher is not None:
            # Unacknowledged records stay in the spool (durable); the cursor already passed them.
            self.publisher.close(timeout=10.0)
        if self.source is not None:
            self.source.close()
        if self.watermarks is not None:
            self.watermarks.close()
        if self.publisher is not None:
            self._report_counts()
        if self.redis is not None:
            self.redis.close()
        self.state.close()
        self._lock_handle.close()

    # -- capture ----------------------------------------------------------------

    def _capture_loop(self) -> None:
        source = self.source
        while not self.stop.is_set():
            if source is None:
                self.stop.wait(1.0)
                continue
            pairs = source.poll(self.config.batch_size)
            items: list[Item] = []
            used: list[str] = []
            for envelope, cid in pairs:
                if cid in self._skips:
                    self._skips.discard(cid)
                    used.append(cid)
                    continue
                items.append(Item(encode_envelope(envelope), cid, Source(str(self.config.log))))
            if items:
                self._publish(items, used_skips=used, advance_cursor=True)
            elif used or source.reader.dirty:
                self.state.commit_batch(intent_id=None, cursor=source.cursor(), used_skips=used)
            if len(pairs) < self.config.batch_size:
                self.stop.wait(self.config.poll_interval_s)

    def _publish(self, items: Sequence[Item], *, used_skips: Sequence[str] = (), advance_cursor: bool) -> None:
        """Route, record the intent, hand off, wait until durable, commit (cursor, counts) in one transaction."""
        publisher = self.publisher
        assert publisher is not None
        routed = publisher.route(items)
        token = self._begin_send()
        try:
            intent_id = (
                self.state.open_intent([item.capture_id for item in items], self._scan_from())
                if advance_cursor
                else None
            )
            _fault_point("agent_before_handoff")
            destination = self._handoff(routed.records)
            _fault_point("agent_before_commit")
        finally:
            self._end_send(token)
        cursor = self.source.cursor() if advance_cursor and self.source is not None else None
        self.state.commit_batch(
            intent_id=intent_id, cursor=cursor, captured=dict(routed.per_topic), used_skips=used_skips
        )
        self._last_commit = time.time()
        server.LAST_COMMIT.set(self._last_commit)
        server.ENVELOPES.labels(destination=destination).inc(len(routed.records))

    def _handoff(self, records: Sequence[OutRecord]) -> Destination:
        """Store `records` durably, in order, in Redis or through the producer; blocks until done."""
        publisher = self.publisher
        assert publisher is not None
        while True:
            done = threading.Event()
            with self._route_lock:
                destination = self._destination()
                if destination == "redis":
                    assert self.redis is not None
                    try:
                        self.redis.push(records)
                        self._redis_pending = True
                        self._set_detail("degraded", "writing to the Redis queue")
                        return "redis"
                    except QueueUnavailable as error:
                        if self._redis_pending:
                            wait_reason = f"Redis holds older records but refuses new ones ({error}); waiting"
                        else:
                            logger.warning("Redis queue unavailable (%s); using the producer and its spool", error)
                            destination = "kafka"
                if destination == "kafka":
                    if records:
                        publisher.producer.send(records, on_durable=_setter(done))
                    else:
                        done.set()
            if destination == "kafka":
                done.wait()
                return "kafka"
            self._waiting(wait_reason)
            if self.stop.wait(1.0):
                raise _Stopped

    def _destination(self) -> Destination:
        if self.redis is None:
            return "kafka"
        if self._redis_pending or self._mode is FallbackMode.REDIS:
            return "redis"
        publisher = self.publisher
        assert publisher is not None
        if publisher.producer.breaker_state is not BreakerState.CLOSED and self._spool_over_limit():
            return "redis"
        return "kafka"

    def _spool_over_limit(self) -> bool:
        """Rows from the spool's own count (exact, free); bytes and age from SQLite at most once a second."""
        assert self.publisher is not None
        spool = self.publisher.producer.spool
        if spool.depth() >= self.config.spool_max_rows:
            return True
        checked_at, over = self._spool_over
        if time.monotonic() - checked_at >= _SPOOL_CHECK_S:
            stats = spool.stats()
            over = stats.value_bytes >= self.config.spool_max_bytes or (
                (stats.oldest_age_s or 0.0) >= self.config.spool_max_age_s
            )
            self._spool_over = (time.monotonic(), over)
        return over

    # -- what may be in doubt -------------------------------------------------------

    def _begin_send(self) -> int:
        token = next(self._sends)
        with self._sends_lock:
            self._open_sends[token] = time.time()
        return token

    def _end_send(self, token: int) -> None:
        with self._sends_lock:
            self._open_sends.pop(token, None)

    def _scan_from(self) -> dict[str, dict[int, int]] | None:
        """See `ledger`: the newest snapshot older than anything that could still be in doubt."""
        if self.watermarks is None:
            return None
        now = time.time()
        bound = now
        with self._sends_lock:
            if self._open_sends:
                bound = min(self._open_sends.values())
        if self.publisher is not None and self.publisher.producer.spool.depth() > 0:
            bound = min(bound, now - self._message_timeout_s - 5.0)
        return self.watermarks.scan_from(bound)

    def _persist_scan_from(self) -> None:
        scan_from = self._scan_from()
        if scan_from is not None:
            self.state.set_scan_from(scan_from)

    # -- background work ----------------------------------------------------------

    def _maintenance_loop(self) -> None:
        next_report = 0.0
        while not self.stop.wait(self.config.snapshot_interval_s):
            assert self.watermarks is not None
            self.watermarks.take()
            self._persist_scan_from()
            if time.monotonic() >= next_report:
                self._report_counts()
                next_report = time.monotonic() + self.config.report_interval_s

    def _mode_loop(self) -> None:
        while not self.stop.is_set():
            self._mode = self.mode()  # cached by the reader for mode_refresh_s
            self.stop.wait(min(1.0, self.config.mode_refresh_s))

    def _report_counts(self) -> None:
        rows = self.state.counts(dirty_only=True)
        if not rows:
            return
        try:
            report_counts(self.settings.pg_dsn, self.name, rows)
        except Exception as error:  # the next round reports the same absolute values
            logger.warning("capture counts not reported yet: %s", error)
            return
        self.state.mark_reported(rows)

    def _drain_loop(self) -> None:
        assert self.redis is not None and self.publisher is not None
        drainer = RedisDrainer(self.redis, self._send_durable, may_drain=self._may_drain)
        next_expiry = 0.0
        while not self.stop.is_set():
            moved = 0
            try:
                if time.monotonic() >= next_expiry:
                    self._expire()
                    next_expiry = time.monotonic() + min(10.0, self.redis.ttl_s / 2)
                if self._redis_pending and self._may_drain():
                    moved = drainer.drain_once(self.stop)
                    server.REDIS_MOVED.inc(moved)
                    if moved == 0:
                        with self._route_lock:
                            if self.redis.pending() == 0:
                                self._redis_pending = False
                                self._set_detail("ok", "")
                server.REDIS_PENDING.set(self.redis.pending())
            except QueueUnavailable as error:
                self._waiting(f"Redis drain waits: {error}")
            server.FALLBACK_REDIS.set(1 if self._redis_pending else 0)
            if not moved:
                self.stop.wait(0.5)

    def _may_drain(self) -> bool:
        publisher = self.publisher
        assert publisher is not None
        return (
            self._mode is not FallbackMode.REDIS
            and publisher.producer.breaker_state is BreakerState.CLOSED
            and publisher.producer.spool.depth() == 0
        )

    def _send_durable(self, records: Sequence[OutRecord]) -> None:
        assert self.publisher is not None
        token = self._begin_send()
        try:
            self.publisher.send_durable(records)
            _fault_point("drain_before_delete")
        finally:
            self._end_send(token)

    def _expire(self) -> None:
        assert self.redis is not None
        expired = self.redis.expire()
        if not expired:
            return
        per_topic = Counter(entry.record.topic for entry in expired)
        self.state.add_dropped(per_topic)
        for topic, count in per_topic.items():
            server.REDIS_EXPIRED.labels(topic=topic).inc(count)
        keys = ", ".join(sorted({(e.record.key or b"-").decode(errors="replace") for e in expired})[:20])
        logger.error(
            "Redis queue TTL (%.0f s): dropped %d record(s) never delivered (%s); keys: %s",
            self.redis.ttl_s,
            len(expired),
            dict(per_topic),
            keys,
        )

    def _sample_loop(self) -> None:
        assert self.sampler is not None
        while not self.stop.is_set():
            envelopes = self.sampler.sample_once()
            for outcome, count in self.sampler.outcomes.items():
                server.SAMPLES.labels(outcome=outcome).inc(count)
            self.sampler.outcomes.clear()
            if envelopes:
                items = [
                    Item(encode_envelope(e), f"{self.name}/sample/{uuid.uuid4().hex}", Source("pg_stat_statements"))
                    for e in envelopes
                ]
                self._publish(items, advance_cursor=False)
            self.stop.wait(self.config.sample_interval_s)

    # -- reporting -------------------------------------------------------------------

    def _count_recovery(self, report: RecoveryReport) -> None:
        server.SKIPPED_REPUBLISH.labels(where="kafka").inc(report.found_in_kafka)
        server.SKIPPED_REPUBLISH.labels(where="spool").inc(report.found_in_spool)
        server.SKIPPED_REPUBLISH.labels(where="redis").inc(report.found_in_redis)
        server.DUPLICATES_REMOVED.labels(where="spool").inc(report.spool_duplicates_removed)
        server.DUPLICATES_REMOVED.labels(where="redis").inc(report.redis_duplicates_removed)

    def _set_detail(self, status: str, detail: str) -> None:
        self.status, self.detail = status, detail

    def _waiting(self, why: str) -> None:
        self.detail = why
        if time.monotonic() - self._last_wait_log >= _WAIT_LOG_S:
            self._last_wait_log = time.monotonic()
            logger.warning("agent %s: %s", self.name, why)

    def health(self) -> dict[str, object]:
        publisher = self.publisher
        stats = publisher.producer.stats() if publisher is not None else None
        status = self.status
        if status == "ok" and stats is not None and (stats.breaker is not BreakerState.CLOSED or stats.spool_depth):
            status = "degraded"
        if status == "ok" and self._redis_pending:
            status = "degraded"
        position = self.source.reader.position if self.source is not None else None
        return {
            "agent": self.name,
            "cluster_id": self.cluster_id,
            "status": status,
            "detail": self.detail,
            "writes_to": "redis" if self._redis_pending or self._mode is FallbackMode.REDIS else "kafka",
            "fallback_mode": self._mode.value,
            "breaker": None if stats is None else stats.breaker.value,
            "spool_depth": None if stats is None else stats.spool_depth,
            "redis_pending": self._redis_pending,
            "last_commit_age_s": None if self._last_commit is None else round(time.time() - self._last_commit, 3),
            "log_position": None if position is None else f"{position[0]}@{position[1]}",
            "counts": {topic: {"captured": c, "dropped": d} for topic, (c, d) in self.state.totals().items()},
            "recovery": None if self.recovery is None else self.recovery.as_dict(),
        }
