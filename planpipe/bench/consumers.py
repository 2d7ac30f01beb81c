"""The consumer loops `planpipe bench ingest` measures, each run in a process of its own.

`python -m planpipe.bench.consumers '<json spec>'` runs one loop and prints one
JSON line per event on stdout (the last one is the result), so the parent reads
numbers that belong to that consumer alone: its throughput and its peak RSS
(`ru_maxrss` of this process).

* `raw`: a bare confluent-kafka loop that only reads the messages (the ceiling).
* `planpipe`: `IngestEngine` — decode, fingerprint, Parquet, PostgreSQL, commit.
* `reference`: the runbook's "Deterministic Consumer with DLQ Routing", as written
  there: `consume(num_messages=500, timeout=1.0)`, a JSON parse per record, one
  upsert per record, `consumer.commit()` per batch.
* `latency`: `IngestEngine` consuming live while the parent produces at a paced
  rate; reports, per committed batch, the wall-clock time the batch was
  committed and the Parquet files that hold its records.

Throughput is steady state, defined the same way for every loop: the window
opens when the first batch is done (committed; read, for `raw`) and closes when
the last one is; the records of the batches in between are counted. Start-up,
group join and the first batch (cold caches, first files) are reported apart
(`startup_s`) and not counted.
"""

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import psycopg
from confluent_kafka import Consumer, KafkaError, Message, Producer

RUNBOOK_BATCH: Final = 500


def _emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB.
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class Window:
    """The measured window: from the end of the first batch to the end of the last."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.consumed = 0
        self.first_end: float | None = None
        self.first_batch = 0
        self.last_end: float | None = None
        # CPU seconds of this process at those two instants (its own work in the window).
        self.first_cpu = 0.0
        self.last_cpu = 0.0

    def batch_done(self, records: int) -> None:
        now = time.perf_counter()
        self.consumed += records
        if self.first_end is None:
            self.first_end, self.first_batch = now, records
            self.first_cpu = time.process_time()
        self.last_end = now
        self.last_cpu = time.process_time()

    def result(self, spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
        measured = self.consumed - self.first_batch
        elapsed = None
        if self.first_end is not None and self.last_end is not None:
            elapsed = self.last_end - self.first_end
        return {
            "event": "result",
            "variant": spec["variant"],
            "consumed": self.consumed,
            "measured": measured,
            "seconds": round(elapsed, 3) if elapsed is not None else None,
            "eps": round(measured / elapsed, 1) if elapsed else None,
            "startup_s": round(self.first_end - self.started, 3) if self.first_end is not None else None,
            # CLOCK_MONOTONIC is machine-wide: the parent combines the windows of consumers run side by side.
            "first_end": self.first_end,
            "last_end": self.last_end,
            "first_batch": self.first_batch,
            "window_cpu_s": round(self.last_cpu - self.first_cpu, 3),
            "peak_rss_mb": peak_rss_mb(),
            **extra,
        }


def _check(message: Message) -> bool:
    error = message.error()
    if error is None:
        return True
    if error.code() == KafkaError._PARTITION_EOF:
        return False
    raise RuntimeError(f"consumer error: {error}")


# --- (a) raw -------------------------------------------------------------------------------------


def run_raw(spec: dict[str, Any]) -> dict[str, Any]:
    window = Window()
    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([spec["topic"]])
    expected, deadline = spec["messages"], window.started + spec["max_seconds"]
    value_bytes = 0
    while window.consumed < expected and time.perf_counter() < deadline:
        records = consumer.consume(num_messages=RUNBOOK_BATCH, timeout=1.0)
        read = 0
        for record in records:
            if _check(record):
                read += 1
                value_bytes += len(record.value() or b"")
        if read:
            window.batch_done(read)
    consumer.close()
    return window.result(spec, value_bytes=value_bytes)


# --- (b) planpipe ----------------------------------------------------------------------------------


def _engine_settings(spec: dict[str, Any]) -> Any:
    from planpipe.settings import load_settings

    overrides = dict(spec["settings"])
    overrides["data_dir"] = Path(overrides["data_dir"])
    return replace(load_settings(), **overrides)


class StageTimer:
    """Wall and CPU seconds spent in each step of `IngestEngine._process`, measured from outside.

    Wraps the module-level functions the engine calls (no edit to the engine):
    `prepare_batch` (decode + validate + fingerprint), `write_batch` (Parquet,
    fsynced), `commit_batch` (the PostgreSQL transaction), and the consumer's
    `consume` (waiting for records). Overhead: four clock reads per call.
    """

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def wrap(self, name: str, func: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            # thread_time: the batch writer's steps run on their own thread, beside the decode.
            w, c = time.perf_counter(), time.thread_time()
            try:
                return func(*args, **kwargs)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
                self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - c

        return timed

    def install(self, engine: Any) -> None:
        from planpipe.ingest import baseline_sink, parquet_sink, sinks
        from planpipe.ingest import engine as engine_module

        # The engine calls these through its module globals, so rebinding them there is enough.
        # A name the engine no longer uses is simply not timed (its time shows as "other").
        targets = (
            (engine_module, "prepare_batch", "decode+fingerprint"),
            (sinks, "identify_plan", "identify new plans"),
            (parquet_sink, "write_batch", "parquet"),
            (baseline_sink, "commit_batch", "postgresql"),
        )
        for module, name, label in targets:
            if callable(getattr(module, name, None)):
                setattr(module, name, self.wrap(label, getattr(module, name)))
        engine._consumer = _TimedConsumer(engine._consumer, self.wrap("kafka consume", engine._consumer.consume))

    def snapshot(self) -> dict[str, list[float]]:
        return {k: [round(self.wall[k], 3), round(self.cpu.get(k, 0.0), 3)] for k in self.wall}


class _TimedConsumer:
    def __init__(self, consumer: Consumer, consume: Any) -> None:
        self._consumer = consumer
        self.consume = consume

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def run_planpipe(spec: dict[str, Any], *, live: bool = False) -> dict[str, Any]:
    window = Window()
    from planpipe.ingest.engine import BatchReport, IngestEngine

    settings = _engine_settings(spec)
    # In a group of several consumers none knows its share: each runs until caught up.
    until_caught_up = bool(spec.get("until_caught_up"))
    expected = spec["messages"] if not until_caught_up else float("inf")
    state: dict[str, Any] = {"warm": False, "stages": None}
    timer = StageTimer()
    batches: list[dict[str, Any]] = []

    def on_batch(report: BatchReport) -> None:
        window.batch_done(report.consumed)
        if window.consumed == window.first_batch:
            state["cpu0"] = time.process_time()
            state["stages0"] = timer.snapshot()
        if live:
            batches.append(
                {
                    # The engine's own clock at its PostgreSQL commit; a batch is reported only
                    # once the next one is decoded (the writes overlap it), so not time.time() here.
                    "started_at": report.started_at,
                    "committed_at": report.committed_at,
                    "consumed": report.consumed,
                    "files": report.parquet_files,
                    "p95_ms": report.p95_latency_ms,
                    "duration_ms": round(report.duration_ms, 2),
                }
            )
            if not state["warm"] and window.consumed >= spec.get("warmup", 0):
                state["warm"] = True
                _emit({"event": "warm", "consumed": window.consumed})
        if window.consumed >= expected:
            state["stages"] = timer.snapshot()
            state["cpu1"] = time.process_time()
            engine.stop()

    engine = IngestEngine(settings, on_batch=on_batch, client_id=f"bench-{spec['variant']}")
    if not spec.get("profile"):
        timer.install(engine)
    profiler = None
    if spec.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    if spec.get("start_at"):
        # Consumers run side by side join the group together (imports and connections done),
        # so the first one does not drain the backlog before the others are assigned partitions.
        time.sleep(max(0.0, float(spec["start_at"]) - time.time()))
    try:
        summary = engine.run(max_seconds=spec["max_seconds"], until_caught_up=until_caught_up)
    finally:
        if profiler is not None:
            profiler.stop()
        engine.close()
    result = window.result(
        spec,
        batches=summary.batches,
        valid=summary.valid,
        dlq=summary.dlq,
        max_batch_p95_ms=summary.max_p95_latency_ms,
    )
    if until_caught_up:
        state["stages"], state["cpu1"] = timer.snapshot(), time.process_time()
    if state["stages"] is not None and "stages0" in state:
        # Stage totals over the measured window (after the first batch, like "seconds"), and
        # the process CPU time in it: wall minus CPU is time spent waiting (PostgreSQL, fsync, broker, CPU queue).
        before = state["stages0"]
        result["stages"] = {
            k: [round(v[0] - before.get(k, [0, 0])[0], 3), round(v[1] - before.get(k, [0, 0])[1], 3)]
            for k, v in state["stages"].items()
        }
        result["cpu_s"] = round(state["cpu1"] - state["cpu0"], 3)
    if live:
        result["batch_log"] = batches
    if profiler is not None:
        base = Path(spec["profile"])
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".txt").write_text(profiler.output_text(unicode=True, color=False, show_all=False))
        base.with_suffix(".html").write_text(profiler.output_html())
        if profiler.last_session is not None:  # re-render with `pyinstrument --load <file> --show-all`
            profiler.last_session.save(str(base.with_suffix(".pyisession")))
        result["profile"] = str(base.with_suffix(".txt"))
    return result


# --- (c) the runbook's reference loop ---------------------------------------------------------------

REFERENCE_TABLE_DDL: Final = """
CREATE TABLE IF NOT EXISTS planpipe_bench.reference_baselines (
    cluster_id     text             NOT NULL,
    query_hash     text             NOT NULL,
    plan_text      text             NOT NULL,
    executions     bigint           NOT NULL,
    total_time_sum double precision NOT NULL,
    total_time_min double precision NOT NULL,
    total_time_max double precision NOT NULL,
    rows_sum       numeric          NOT NULL,
    first_seen     timestamptz      NOT NULL,
    last_seen      timestamptz      NOT NULL,
    PRIMARY KEY (cluster_id, query_hash)
)"""

REFERENCE_UPSERT: Final = """
INSERT INTO planpipe_bench.reference_baselines AS b
    (cluster_id, query_hash, plan_text, executions, total_time_sum, total_time_min, total_time_max, rows_sum,
     first_seen, last_seen)
VALUES (%(cluster_id)s, %(query_hash)s, %(plan_text)s, 1, %(total_time_ms)s, %(total_time_ms)s, %(total_time_ms)s,
        %(actual_rows)s, to_timestamp(%(execution_timestamp)s), to_timestamp(%(execution_timestamp)s))
ON CONFLICT (cluster_id, query_hash) DO UPDATE SET
    executions = b.executions + 1,
    total_time_sum = b.total_time_sum + excluded.total_time_sum,
    total_time_min = least(b.total_time_min, excluded.total_time_min),
    total_time_max = greatest(b.total_time_max, excluded.total_time_max),
    rows_sum = b.rows_sum + excluded.rows_sum,
    first_seen = least(b.first_seen, excluded.first_seen),
    last_seen = greatest(b.last_seen, excluded.last_seen)"""


def run_reference(spec: dict[str, Any]) -> dict[str, Any]:
    """The runbook's loop. Its `baseline_store_upsert` is one INSERT … ON CONFLICT per record.

    The upserts of a batch share one PostgreSQL transaction, committed right
    before `consumer.commit()` (per-record autocommit would cost an fsync per
    record and make the reference a strawman). psycopg prepares the statement
    server-side after its fifth use.
    """
    window = Window()
    loads: Callable[[bytes], Any]
    if spec.get("parser", "orjson") == "orjson":
        import orjson

        loads = orjson.loads
    else:
        loads = json.loads

    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 45000,
        }
    )
    dlq = Producer({"bootstrap.servers": spec["bootstrap"]})
    conn = psycopg.connect(spec["pg_dsn"])
    dead: list[int] = [0]

    def baseline_store_upsert(cur: psycopg.Cursor[Any], payload: dict[str, Any]) -> None:
        cur.execute(REFERENCE_UPSERT, payload)

    def route_to_dlq(msg: Message, reason: str) -> None:
        dead[0] += 1
        dlq.produce(spec["dlq_topic"], value=msg.value(), key=msg.key(), headers={"reason": reason[:200]})
        dlq.poll(0)

    def process_batch(records: list[Message]) -> None:
        with conn.cursor() as cur:
            for msg in records:
                try:
                    payload = loads(msg.value())  # type: ignore[arg-type]
                    baseline_store_upsert(cur, payload)
                except Exception as e:
                    route_to_dlq(msg, str(e))
        conn.commit()
        consumer.commit()

    consumer.subscribe([spec["topic"]])
    expected, deadline = spec["messages"], window.started + spec["max_seconds"]
    while window.consumed < expected and time.perf_counter() < deadline:
        records = consumer.consume(num_messages=RUNBOOK_BATCH, timeout=1.0)
        records = [r for r in records if _check(r)]
        if records:
            process_batch(records)
            window.batch_done(len(records))
    consumer.close()
    dlq.flush(10)
    conn.close()
    return window.result(spec, dlq=dead[0], parser=spec.get("parser", "orjson"))


def run_latency(spec: dict[str, Any]) -> dict[str, Any]:
    return run_planpipe(spec, live=True)


RUNNERS: Final[dict[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "raw": run_raw,
    "planpipe": run_planpipe,
    "reference": run_reference,
    "latency": run_latency,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec: dict[str, Any] = json.loads(args[0])
    runner: Callable[[dict[str, Any]], dict[str, Any]] = RUNNERS[spec["variant"]]
    _emit(runner(spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
