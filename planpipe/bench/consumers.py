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

Throughput is measured from the moment the first batch is in hand until the
last record is committed (processed, for `raw`): group join and start-up are
reported apart (`startup_s`) and not counted.
"""

import json
import resource
import sys
import time
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


def _result(spec: dict[str, Any], consumed: int, first: float | None, last: float | None, started: float,
            **extra: Any) -> dict[str, Any]:  # fmt: skip
    elapsed = (last - first) if first is not None and last is not None else None
    return {
        "event": "result",
        "variant": spec["variant"],
        "consumed": consumed,
        "seconds": round(elapsed, 3) if elapsed is not None else None,
        "eps": round(consumed / elapsed, 1) if elapsed else None,
        "startup_s": round(first - started, 3) if first is not None else None,
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
    started = time.perf_counter()
    consumer = Consumer(
        {
            "bootstrap.servers": spec["bootstrap"],
            "group.id": spec["group"],
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([spec["topic"]])
    expected, deadline = spec["messages"], started + spec["max_seconds"]
    consumed = value_bytes = 0
    first: float | None = None
    while consumed < expected and time.perf_counter() < deadline:
        records = consumer.consume(num_messages=RUNBOOK_BATCH, timeout=1.0)
        if records and first is None:
            first = time.perf_counter()
        for record in records:
            if _check(record):
                consumed += 1
                value_bytes += len(record.value() or b"")
    last = time.perf_counter()
    consumer.close()
    return _result(spec, consumed, first, last, started, value_bytes=value_bytes)


# --- (b) planpipe ----------------------------------------------------------------------------------


def _engine_settings(spec: dict[str, Any]) -> Any:
    from planpipe.settings import load_settings

    overrides = dict(spec["settings"])
    overrides["data_dir"] = Path(overrides["data_dir"])
    return replace(load_settings(), **overrides)


def run_planpipe(spec: dict[str, Any], *, live: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    from planpipe.ingest.engine import BatchReport, IngestEngine

    settings = _engine_settings(spec)
    expected = spec["messages"]
    state: dict[str, Any] = {"consumed": 0, "first": None, "last": None, "warm": False}
    batches: list[dict[str, Any]] = []

    def on_batch(report: BatchReport) -> None:
        now_perf, now_wall = time.perf_counter(), time.time()
        if state["first"] is None:
            # duration_ms runs from "records in hand" to the commit; the first batch's start.
            state["first"] = now_perf - report.duration_ms / 1000
        state["consumed"] += report.consumed
        state["last"] = now_perf
        if live:
            batches.append(
                {
                    "committed_at": now_wall,
                    "consumed": report.consumed,
                    "files": report.parquet_files,
                    "p95_ms": report.p95_latency_ms,
                    "duration_ms": round(report.duration_ms, 2),
                }
            )
            if not state["warm"] and state["consumed"] >= spec.get("warmup", 0):
                state["warm"] = True
                _emit({"event": "warm", "consumed": state["consumed"]})
        if state["consumed"] >= expected:
            engine.stop()

    engine = IngestEngine(settings, on_batch=on_batch, client_id=f"bench-{spec['variant']}")
    profiler = None
    if spec.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005)
        profiler.start()
    try:
        summary = engine.run(max_seconds=spec["max_seconds"])
    finally:
        if profiler is not None:
            profiler.stop()
        engine.close()
    result = _result(
        spec, state["consumed"], state["first"], state["last"], started,
        batches=summary.batches, dlq=summary.dlq, max_batch_p95_ms=summary.max_p95_latency_ms,
    )  # fmt: skip
    if live:
        result["batch_log"] = batches
    if profiler is not None:
        base = Path(spec["profile"])
        base.parent.mkdir(parents=True, exist_ok=True)
        base.with_suffix(".txt").write_text(profiler.output_text(unicode=True, color=False, show_all=False))
        base.with_suffix(".html").write_text(profiler.output_html())
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
    started = time.perf_counter()
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
    expected, deadline = spec["messages"], started + spec["max_seconds"]
    consumed = 0
    first: float | None = None
    while consumed < expected and time.perf_counter() < deadline:
        records = consumer.consume(num_messages=RUNBOOK_BATCH, timeout=1.0)
        records = [r for r in records if _check(r)]
        if records:
            if first is None:
                first = time.perf_counter()
            process_batch(records)
            consumed += len(records)
    last = time.perf_counter()
    consumer.close()
    dlq.flush(10)
    conn.close()
    return _result(spec, consumed, first, last, started, dlq=dead[0], parser=spec.get("parser", "orjson"))


RUNNERS: Final = {
    "raw": run_raw,
    "planpipe": run_planpipe,
    "reference": run_reference,
    "latency": lambda spec: run_planpipe(spec, live=True),
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(args[0])
    _emit(RUNNERS[spec["variant"]](spec))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
