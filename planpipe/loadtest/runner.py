"""`planpipe loadtest`: the runbook's automated replay test against the real stack.

"Use a staging environment to inject synthetic plan payloads at 2x production throughput.
Validate that consumer scaling policies trigger correctly and that fallback chains activate
without data loss." One run, on topics, consumer groups, a spool and a Parquet directory of
its own (the stack's other traffic is untouched):

* a generator publishes synthetic envelopes through the real router and producer at
  `rate x factor` per second; a share is explicitly `low` priority, a share critical;
* the lag sensor's own scaling decision (`planpipe.defs.ingest.sensors.wanted_runs`) runs every
  `sensor_interval_s` against the group's real lag and starts ingest runs (IngestEngine
  consumers in the group) up to the limit; a run ends after `idle_s` caught up, so the count
  comes back down once the traffic stops;
* in the middle the local broker is stopped for `outage_s` and started again: the producer's
  breaker opens and the spool takes the traffic, then drains in order; the backlog's
  publish → commit latency breaches the 1,200 ms p95 and the ingest breaker sheds `low` only;
* at the end every injected envelope is looked up in the Parquet dataset by its id: nothing
  may be missing except `low` envelopes the breaker dropped (counted), nothing may be there twice.

With `agent_rate` > 0 an agent lane (`agent_lane.py`) also feeds an in-process `planpipe agent`
from a synthetic auto_explain log; under the outage its spool passes a small limit and the agent
falls back to the Redis queue, which drains to Kafka afterwards. Without it the summary says that
Redis was not exercised rather than claiming it.
"""

import logging
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Final

import msgspec
import polars as pl

from planpipe.contract import Envelope, Priority, encode_envelope
from planpipe.ingest.breaker import LatencyBreaker
from planpipe.ingest.engine import BatchReport, IngestEngine
from planpipe.ingest.lag import LagUnavailable, group_lag
from planpipe.loadtest.agent_lane import AgentLane, id_pattern, lane_id
from planpipe.routing.publish import PlanPublisher
from planpipe.settings import Settings
from planpipe.stack import kafka

logger = logging.getLogger("planpipe.loadtest")

# A few plan shapes (what the fingerprint keeps) so the dataset has more than one plan per query.
_PLANS: Final = tuple(
    msgspec.json.encode([{"Plan": plan, "Execution Time": 1.0}]).decode()
    for plan in (
        {"Node Type": "Seq Scan", "Relation Name": "orders", "Alias": "o", "Filter": "(status = 'open'::text)"},
        {"Node Type": "Index Scan", "Relation Name": "orders", "Alias": "o", "Index Name": "orders_pkey",
         "Index Cond": "(id = 42)"},
        {"Node Type": "Hash Join", "Join Type": "Inner", "Hash Cond": "(o.customer_id = c.id)", "Plans": [
            {"Node Type": "Seq Scan", "Relation Name": "orders", "Alias": "o", "Parent Relationship": "Outer"},
            {"Node Type": "Hash", "Parent Relationship": "Inner", "Plans": [
                {"Node Type": "Seq Scan", "Relation Name": "customers", "Alias": "c",
                 "Parent Relationship": "Outer"}]}]},
        {"Node Type": "Sort", "Sort Key": ["o.created_at"], "Plans": [
            {"Node Type": "Seq Scan", "Relation Name": "orders", "Alias": "o", "Parent Relationship": "Outer"}]},
    )
)  # fmt: skip


@dataclass(frozen=True)
class LoadtestConfig:
    rate: float  # the stated production rate, envelopes per second
    factor: float = 2.0
    duration_s: float = 120.0  # of injection
    max_runs: int = 2  # the lag sensor's limit (PLANPIPE_MAX_INGEST_RUNS)
    lag_per_run: int | None = None  # None: the sensor's own (one more run per 20,000 behind)
    sensor_interval_s: float = 15.0  # the lag sensor's tick
    idle_s: float = 10.0  # an ingest run ends after this long caught up
    breaker_window_s: float = 60.0  # runbook: p95 > 1,200 ms for 60 s
    outage_s: float | None = 10.0  # broker down this long in the middle; None: no outage
    producer_cooldown_s: float = 30.0  # the router breaker's cool-down before it retries
    batch_max_messages: int | None = None  # None: the engine's adaptive batches
    agent_rate: float = 0.0  # envelopes/s through an in-process agent (needs Redis); 0: no agent lane
    agent_spool_rows: int = 50  # the agent's spool limit before it falls back to Redis
    low_share: float = 0.2
    critical_share: float = 0.1
    settle_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.factor > 0 and self.duration_s > 0):
            raise ValueError("rate, factor and duration must be positive")
        if self.max_runs < 1:
            raise ValueError("max_runs must be >= 1")
        if not 0 <= self.low_share + self.critical_share <= 1:
            raise ValueError("low_share + critical_share must be within 0..1")


@dataclass
class _Batches:
    """What the ingest runs committed, gathered from every run's on_batch (any thread)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    batches: int = 0
    breaker_open_batches: int = 0
    dropped_low: int = 0
    drops_while_closed: int = 0  # low dropped by a batch prepared with the breaker closed: a defect
    max_p95_ms: float = 0.0

    def record(self, report: BatchReport) -> None:
        with self.lock:
            was_open = report.breaker_open  # what the batch was prepared under
            self.batches += 1
            self.breaker_open_batches += int(was_open)
            self.dropped_low += report.dropped_low
            if report.dropped_low and not was_open:
                self.drops_while_closed += report.dropped_low
            self.max_p95_ms = max(self.max_p95_ms, report.p95_latency_ms or 0.0)


def loadtest_settings(settings: Settings, run_id: str) -> Settings:
    """Topics, groups, spool and data of this run only."""
    root = settings.home / "loadtest" / run_id
    return replace(
        settings,
        topic=f"{settings.topic}.loadtest-{run_id}",
        dlq_topic=f"{settings.topic}.loadtest-{run_id}.dlq",
        consumer_group=f"{settings.consumer_group}.loadtest-{run_id}",
        replay_group=f"{settings.replay_group}.loadtest-{run_id}",
        data_dir=root / "data",
        spool_path=root / "spool.sqlite3",
    )


def kind_of(number: int, low_share: float, critical_share: float) -> str:
    """ "low", "critical" or "standard": deterministic by number, the shares spread evenly."""
    slot = (number * 7919) % 1000  # in thousandths: exact shares, no float rounding at the edges
    low = round(low_share * 1000)
    if slot < low:
        return "low"
    return "critical" if slot < low + round(critical_share * 1000) else "standard"


def envelope_id(run_id: str, number: int) -> str:
    return f"lt-{run_id}-{number:09d}"


def synthetic_envelope(run_id: str, number: int, low_share: float, critical_share: float) -> Envelope:
    """Envelope `number` of a run: its id travels as trace_id; `low` ones say so explicitly,
    critical ones are slower than the routing guide's 5,000 ms."""
    kind = kind_of(number, low_share, critical_share)
    priority: Priority | None = "low" if kind == "low" else None
    critical = kind == "critical"
    return Envelope(
        query_hash=f"loadtest-q{number % 50:02d}",
        execution_timestamp=time.time(),
        cluster_id=f"loadtest-{number % 3}",
        plan_text=_PLANS[number % len(_PLANS)],
        actual_rows=number % 1000,
        total_time_ms=6000.0 + number % 100 if critical else 1.0 + number % 400 / 10,
        query_type="SELECT",
        trace_id=envelope_id(run_id, number),
        published_at=time.time(),
        priority=priority,
    )


class Loadtest:
    def __init__(self, settings: Settings, config: LoadtestConfig, run_id: str | None = None) -> None:
        self.config = config
        self.run_id = run_id or uuid.uuid4().hex[:8]
        self.base = settings
        self.settings = loadtest_settings(settings, self.run_id)
        self._started = 0.0
        self._stop_scaler = threading.Event()
        self._lock = threading.Lock()
        self._runs: dict[int, threading.Thread] = {}
        self._engines: dict[int, IngestEngine] = {}
        self._run_errors: list[str] = []
        self._next_run = 0
        self._timeline: list[tuple[float, int | None, int]] = []  # (t, lag or None, runs)
        self._outage: tuple[float, float] | None = None
        self._batches = _Batches()
        self._injected: Counter[str] = Counter()  # priority → count

    # -- the lag sensor's policy, applied to real lag ---------------------------------------------
    def _running(self) -> int:
        with self._lock:
            return sum(1 for thread in self._runs.values() if thread.is_alive())

    def _tick(self) -> None:
        from planpipe.defs.ingest.sensors import LAG_PER_EXTRA_RUN, wanted_runs

        try:
            lag: int | None = sum(p.lag for p in group_lag(self.settings, self.settings.consumer_group,
                                                            self.settings.topic, timeout_s=3.0))  # fmt: skip
        except LagUnavailable:
            lag = None  # the broker is down: the sensor skips its tick
        running = self._running()
        if lag is not None:
            # A smaller lag per run (CI) is expressed in the sensor's unit, so its own rule decides.
            per_run = self.config.lag_per_run or LAG_PER_EXTRA_RUN
            for _ in range(wanted_runs(math.ceil(lag * LAG_PER_EXTRA_RUN / per_run), running, self.config.max_runs)):
                self._launch()
        self._timeline.append((round(time.monotonic() - self._started, 2), lag, self._running()))

    def _scaler(self) -> None:
        while not self._stop_scaler.is_set():
            self._tick()
            self._stop_scaler.wait(self.config.sensor_interval_s)

    def _launch(self) -> None:
        with self._lock:
            number = self._next_run
            self._next_run += 1
            thread = threading.Thread(target=self._ingest_run, args=(number,), name=f"loadtest-ingest-{number}")
            self._runs[number] = thread
        thread.start()

    def _ingest_run(self, number: int) -> None:
        try:
            engine = IngestEngine(
                self.settings, max_messages=self.config.batch_max_messages, client_id=f"loadtest-ingest-{number}",
                on_batch=self._batches.record,
            )  # fmt: skip
            engine.breaker = LatencyBreaker(window_s=self.config.breaker_window_s)
            with self._lock:
                self._engines[number] = engine
            try:
                engine.run(until_caught_up=True, idle_s=self.config.idle_s, max_seconds=self.config.settle_timeout_s)
            finally:
                engine.close()
        except Exception as error:  # reported in the summary (a failed run is a failed test)
            logger.exception("loadtest ingest run %d failed", number)
            with self._lock:
                self._run_errors.append(f"run {number}: {type(error).__name__}: {error}")
        finally:
            with self._lock:
                self._engines.pop(number, None)

    # -- the broker outage --------------------------------------------------------------------------
    def _broker_outage(self) -> None:
        assert self.config.outage_s is not None
        went = time.monotonic() - self._started
        # The outage is the broker going away: a controlled shutdown keeps serving requests for up
        # to 30 s (seen in CI), long enough for the traffic meant to meet the outage to pass before it.
        kafka.stop(self.base, wait_s=2.0)
        time.sleep(self.config.outage_s)
        kafka.start(self.base)
        self._outage = (round(went, 2), round(time.monotonic() - self._started, 2))

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, object]:
        config = self.config
        if config.outage_s is not None and self.base.kafka_external:
            raise ValueError("a broker outage needs the local broker; use --no-outage against an external cluster")
        kafka.ensure_topics(self.settings)
        publisher = PlanPublisher(self.settings, cooldown_s=config.producer_cooldown_s)
        lane = None
        if config.agent_rate > 0:
            lane = AgentLane(self.settings, self.run_id, self.settings.data_dir.parent,
                             spool_max_rows=config.agent_spool_rows, cooldown_s=config.producer_cooldown_s)  # fmt: skip
            lane.start()
        self._started = time.monotonic()
        scaler = threading.Thread(target=self._scaler, name="loadtest-scaler", daemon=True)
        scaler.start()
        outage = threading.Timer(max(0.0, config.duration_s / 2 - (config.outage_s or 0) / 2), self._broker_outage)
        if config.outage_s is not None:
            outage.start()
        per_second = config.rate * config.factor
        sent = 0
        try:
            while (elapsed := time.monotonic() - self._started) < config.duration_s:
                due = int(elapsed * per_second)
                while sent < due:
                    envelope = synthetic_envelope(self.run_id, sent, config.low_share, config.critical_share)
                    publisher.submit_raw(encode_envelope(envelope))
                    self._injected[kind_of(sent, config.low_share, config.critical_share)] += 1
                    sent += 1
                if lane is not None and int(elapsed * 5) != int((elapsed - 0.005) * 5):  # 5 times a second
                    lane.write_until(int(elapsed * config.agent_rate))
                time.sleep(0.005)
            if config.outage_s is not None:
                outage.join()
            report = publisher.close(config.settle_timeout_s)
            if lane is not None:
                lane.drain(config.settle_timeout_s)
            self._settle()
        finally:
            self._stop_scaler.set()
            scaler.join()
            self._stop_runs()
        return self._summary(sent, report.as_dict(), report.producer.max_spool_depth, lane)

    def _settle(self) -> None:
        """Let the scaler run on until the backlog is ingested and every run ended (scaled down)."""
        deadline = time.monotonic() + self.config.settle_timeout_s
        while time.monotonic() < deadline:
            lag = self._timeline[-1][1] if self._timeline else None
            if lag == 0 and (running := self._running()) == 0:
                self._timeline.append((round(time.monotonic() - self._started, 2), lag, running))
                return
            time.sleep(0.25)

    def _stop_runs(self) -> None:
        with self._lock:
            engines = list(self._engines.values())
            threads = list(self._runs.values())
        for engine in engines:
            engine.stop()
        for thread in threads:
            thread.join(60)

    # -- verification -------------------------------------------------------------------------------
    def stored_ids(self) -> pl.DataFrame:
        files = list(self.settings.parquet_dir.rglob("*.parquet"))
        if not files:
            schema = {"trace_id": pl.String, "priority": pl.String, "query_text": pl.String}
            return pl.DataFrame(schema=schema)
        return pl.read_parquet(files, columns=["trace_id", "priority", "query_text"])

    def _summary(
        self, sent: int, publish: dict[str, object], max_spool_depth: int, lane: AgentLane | None
    ) -> dict[str, object]:
        config = self.config
        everything = self.stored_ids()
        lane_ids = everything["query_text"].str.extract(id_pattern(self.run_id).pattern, 1).drop_nulls()
        stored = everything.filter(pl.col("trace_id").str.starts_with(f"lt-{self.run_id}-"))
        counts = stored.group_by("trace_id").len()
        duplicates = int(counts.filter(pl.col("len") > 1).height)
        stored_by_priority = Counter(dict(stored.group_by("priority").len().iter_rows()))
        stored_set = set(stored["trace_id"].to_list())
        missing = [n for n in range(sent) if envelope_id(self.run_id, n) not in stored_set]
        missing_low = sum(1 for n in missing if kind_of(n, config.low_share, config.critical_share) == "low")
        missing_other = len(missing) - missing_low
        expected = {envelope_id(self.run_id, n) for n in range(sent)}
        batches = self._batches
        runs = [r for _, _, r in self._timeline]
        peak = max(runs, default=0)
        peak_at = runs.index(peak) if runs else 0
        verdicts: dict[str, bool] = {
            "scaled_up_to_limit": peak >= config.max_runs,
            "scaled_down": peak > 0 and self._running() == 0 and min(runs[peak_at:], default=peak) < peak,
            "breaker_dropped_only_low": batches.drops_while_closed == 0 and missing_low == batches.dropped_low,
            "nothing_lost": missing_other == 0 and missing_low == batches.dropped_low
            and not publish["queue_overflow"] and not publish["undeliverable"] and not publish["still_spooled"],
            "no_duplicates": duplicates == 0 and not (stored_set - expected),
            "ingest_runs_ok": not self._run_errors,
        }  # fmt: skip
        if config.outage_s is not None:
            verdicts["spool_engaged"] = int(str(publish["spooled"])) > 0
            verdicts["breaker_opened_under_breach"] = batches.breaker_open_batches > 0
        agent: dict[str, object] | str = "not exercised: no agent lane (--agent-rate), the Redis queue is the agent's"
        if lane is not None:
            seen = Counter(lane_ids.to_list())
            agent_missing = sum(1 for n in range(lane.report.written) if lane_id(self.run_id, n) not in seen)
            agent_twice = sum(1 for count in seen.values() if count > 1)
            agent = {"written": lane.report.written, "stored": len(seen), "missing": agent_missing,
                     "duplicates": agent_twice, "redis_engaged": lane.report.redis_engaged,
                     "drained": lane.report.drained, "error": lane.report.error}  # fmt: skip
            verdicts["agent_lane_complete"] = (
                agent_missing == 0 and agent_twice == 0 and lane.report.drained and lane.report.error is None
            )
            if config.outage_s is not None:
                verdicts["redis_engaged"] = lane.report.redis_engaged
        return {
            "run_id": self.run_id,
            "topic": self.settings.topic,
            "rate_per_s": config.rate,
            "factor": config.factor,
            "injected_per_s": config.rate * config.factor,
            "duration_s": config.duration_s,
            "injected": sent,
            "injected_by_priority": dict(self._injected),
            "published": publish["published_total"],
            "spooled": publish["spooled"],
            "max_spool_depth": max_spool_depth,
            "producer_breaker_opened": publish["breaker_opened"],
            "broker_outage_s": self._outage,
            "agent_lane": agent,
            "ingest_runs_launched": self._next_run,
            "max_concurrent_runs": peak,
            "run_limit": config.max_runs,
            "runs_timeline": [{"t": t, "lag": lag, "runs": r} for t, lag, r in self._timeline],
            "batches": batches.batches,
            "batches_with_breaker_open": batches.breaker_open_batches,
            "max_batch_p95_ms": round(batches.max_p95_ms, 1),
            "dropped_low": batches.dropped_low,
            "stored": stored.height,
            "stored_by_priority": dict(stored_by_priority),
            "missing_low": missing_low,
            "missing_other": missing_other,
            "duplicates": duplicates,
            "run_errors": self._run_errors,
            "verdicts": verdicts,
            "passed": all(verdicts.values()),
            "seconds": round(time.monotonic() - self._started, 1),
        }
