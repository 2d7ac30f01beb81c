"""The agent process: recover, then capture → route → hand off → commit, until stopped.

Threads: the capture loop (this one), `maintenance` (watermark snapshots,
`scan_from`, count reports), `mode` and `redis-drain` (`handoff`: where a batch
goes, and the Redis drainer) and `sampler` (when live sampling is on); the HTTP
endpoint serves from its own.
"""

import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import IO, Final

from planpipe.agent import server
from planpipe.agent.config import AgentConfig
from planpipe.agent.counts import Checkpoint, checkpoints_of, report_checkpoints, report_counts
from planpipe.agent.handoff import Handoff, Stopped, fault_point
from planpipe.agent.ledger import OpenSends, Watermarks
from planpipe.agent.publisher import AgentPublisher, Item
from planpipe.agent.recovery import HEARTBEAT_S, RecoveryReport, recover
from planpipe.agent.sampler import Sampler, SamplerConfig
from planpipe.agent.source import LogSource
from planpipe.agent.state import AgentState
from planpipe.capture.logparse import LogFormat
from planpipe.contract import encode_envelope
from planpipe.health.fallback import FallbackModeReader
from planpipe.process_lock import hold_exclusive_lock
from planpipe.routing.metrics import start_metrics_server
from planpipe.routing.producer import BreakerState
from planpipe.routing.publish import Source
from planpipe.routing.redis_queue import RedisQueue
from planpipe.settings import Settings
from planpipe.stack.errors import StackError

logger = logging.getLogger("planpipe.agent")

_WAIT_LOG_S: Final = 30.0


class AgentBusy(StackError):
    """Another agent process owns this state directory."""


def _lock(path: Path) -> IO[bytes]:
    busy = f"another planpipe agent runs with state directory {path.parent}"
    return hold_exclusive_lock(path, lambda: AgentBusy(busy))


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
        self._mode_reader = FallbackModeReader(settings.pg_dsn, settings.kafka_bootstrap, ttl_s=config.mode_refresh_s)
        self.handoff: Handoff | None = None
        self.publisher: AgentPublisher | None = None
        self.watermarks: Watermarks | None = None
        self.source: LogSource | None = None
        self.sampler: Sampler | None = None
        self._sends = OpenSends()
        # Held from routing a batch until its counts are committed: a checkpoint is taken between batches.
        self._publishing = threading.Lock()
        self._checkpointed: dict[str, Checkpoint] = {}
        self._skips: set[str] = set()
        self._last_commit: float | None = None
        self._message_timeout_s = int(settings.producer_overrides.get("message.timeout.ms", 300_000)) / 1000
        request_timeout_s = int(settings.producer_overrides.get("request.timeout.ms", 30_000)) / 1000
        self._settle_s = config.inflight_settle_s if config.inflight_settle_s is not None else request_timeout_s + 5
        self._threads: list[threading.Thread] = []
        self._http: ThreadingHTTPServer | None = None
        self._last_wait_log = 0.0
        self._detail_at = 0.0

    # -- lifecycle --------------------------------------------------------------

    def run(self) -> None:
        if self.config.http_port >= 0:
            self._http, _ = start_metrics_server(self.config.http_port, health=self.health)
            port = self._http.server_port
            print(
                f"planpipe agent {self.name}: /metrics and /health on http://127.0.0.1:{port}",
                file=sys.stderr,
                flush=True,
            )
        try:
            self.status = "recovering"
            self.recovery = recover(
                self.settings, self.name, self.state, redis_queue=self.redis, stop=self.stop,
                settle_s=self._settle_s, on_wait=self._waiting,
            )  # fmt: skip
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
            self.state.mark_alive()  # before the producer may send (its spool drains at once); then every second
            self.publisher = AgentPublisher(self.settings, cooldown_s=self.config.cooldown_s)
            self._checkpoint("start")
            self.handoff = Handoff(
                self.config,
                self.publisher,
                self.redis,
                self._mode_reader,
                state=self.state,
                sends=self._sends,
                stop=self.stop,
                waiting=self._waiting,
            )
            if self.config.log is not None:
                self.source = self._open_source(self.config.log)
            self._start_threads()
            self.status, self.detail = "ok", ""
            self._capture_loop()
        except Stopped:
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
        assert self.handoff is not None
        targets = [
            ("heartbeat", self._heartbeat_loop),
            ("maintenance", self._maintenance_loop),
            ("mode", self.handoff.mode_loop),
        ]
        if self.redis is not None:
            targets.append(("redis-drain", self.handoff.drain_loop))
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
            report = self.publisher.close(timeout=10.0)
            self._checkpoint("stop", spooled=report.still_spooled)
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
        assert self.handoff is not None
        with self._publishing:
            routed = publisher.route(items)
            with self._sends.open():
                intent_id = (
                    self.state.open_intent([item.capture_id for item in items], self._scan_from())
                    if advance_cursor
                    else None
                )
                fault_point("agent_before_handoff")
                destination = self.handoff.store(routed.records)
                fault_point("agent_before_commit")
            cursor = self.source.cursor() if advance_cursor and self.source is not None else None
            self.state.commit_batch(
                intent_id=intent_id, cursor=cursor, captured=dict(routed.per_topic), used_skips=used_skips
            )
        self._last_commit = time.time()
        server.LAST_COMMIT.set(self._last_commit)
        server.ENVELOPES.labels(destination=destination).inc(len(routed.records))

    # -- what may be in doubt -------------------------------------------------------

    def _scan_from(self) -> dict[str, dict[int, int]] | None:
        """See `ledger`: the newest snapshot older than anything that could still be in doubt."""
        if self.watermarks is None:
            return None
        now = time.time()
        bound = min(now, self._sends.oldest() or now)
        if self.publisher is not None and self.publisher.producer.spool.depth() > 0:
            bound = min(bound, now - self._message_timeout_s - 5.0)
        return self.watermarks.scan_from(bound)

    def _persist_scan_from(self) -> None:
        scan_from = self._scan_from()
        if scan_from is not None:
            self.state.set_scan_from(scan_from)

    # -- background work ----------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        """Bounds, after a crash, when this process last may have sent a request (see `recovery`)."""
        while True:
            self.state.mark_alive()
            if self.stop.wait(HEARTBEAT_S):
                return

    def _maintenance_loop(self) -> None:
        next_report = 0.0
        while not self.stop.wait(self.config.snapshot_interval_s):
            assert self.watermarks is not None
            if not self._checkpoint("idle"):  # a checkpoint takes a watermark snapshot too
                self.watermarks.take()
            self._persist_scan_from()
            if time.monotonic() >= next_report:
                self._report_counts()
                next_report = time.monotonic() + self.config.report_interval_s

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

    def _checkpoint(self, kind: str, *, spooled: int | None = None) -> bool:
        """Counts and end offsets read together between batches (`counts.Checkpoint`); False when not
        taken: a batch is being handed off, or records are counted but still in the spool or Redis
        (`spooled`: the spool's depth when the producer is closed already)."""
        if self.watermarks is None or self.publisher is None or not self._publishing.acquire(blocking=False):
            return False
        try:
            if spooled is None:
                spooled = self.publisher.producer.stats().spool_depth
            if spooled or (self.handoff is not None and self.handoff.redis_pending):
                return False
            offsets = self.watermarks.take()
            if offsets is None:
                return False
            totals = self.state.totals()
        finally:
            self._publishing.release()
        last = self._checkpointed  # an idle agent on a quiet topic writes nothing new
        fresh = [
            c for c in checkpoints_of(kind, offsets, totals)
            if kind != "idle" or c.topic not in last or replace(last[c.topic], kind=kind) != c
        ]  # fmt: skip
        try:
            report_checkpoints(self.settings.pg_dsn, self.name, fresh)
        except Exception as error:  # the next idle moment writes a newer one
            logger.warning("capture checkpoint not written: %s", error)
            return True
        self._checkpointed.update({c.topic: c for c in fresh})
        return True

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

    def _waiting(self, why: str) -> None:
        self.detail, self._detail_at = why, time.monotonic()
        if time.monotonic() - self._last_wait_log >= _WAIT_LOG_S:
            self._last_wait_log = time.monotonic()
            logger.warning("agent %s: %s", self.name, why)

    def health(self) -> dict[str, object]:
        publisher = self.publisher
        stats = publisher.producer.stats() if publisher is not None else None
        status = self.status
        if status == "ok" and stats is not None and (stats.breaker is not BreakerState.CLOSED or stats.spool_depth):
            status = "degraded"
        handoff = self.handoff
        if status == "ok" and handoff is not None and handoff.writes_to == "redis":
            status = "degraded"
        position = self.source.reader.position if self.source is not None else None
        return {
            "agent": self.name,
            "cluster_id": self.cluster_id,
            "status": status,
            "detail": self.detail if time.monotonic() - self._detail_at < 5.0 else "",  # a wait still going on
            "writes_to": None if handoff is None else handoff.writes_to,
            "fallback_mode": None if handoff is None else handoff.mode.value,
            "breaker": None if stats is None else stats.breaker.value,
            "spool_depth": None if stats is None else stats.spool_depth,
            "redis_pending": handoff is not None and handoff.redis_pending,
            "last_commit_age_s": None if self._last_commit is None else round(time.time() - self._last_commit, 3),
            "log_position": None if position is None else f"{position[0]}@{position[1]}",
            "counts": {topic: {"captured": c, "dropped": d} for topic, (c, d) in self.state.totals().items()},
            "recovery": None if self.recovery is None else self.recovery.as_dict(),
        }
