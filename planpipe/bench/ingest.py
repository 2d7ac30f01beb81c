"""`planpipe bench ingest`: how close planpipe's consumer gets to the broker, and to the runbook.

One run, one machine, the same envelopes (real plans captured from the local
PostgreSQL) on a fresh topic:

(a) raw: a bare confluent-kafka loop that only reads the messages — the ceiling;
(b) planpipe: `IngestEngine` end to end (decode, fingerprint, Parquet,
    PostgreSQL, commit);
(c) reference: the runbook's "Deterministic Consumer with DLQ Routing".

Each consumer runs in a subprocess of its own with a fresh consumer group, so
throughput and peak RSS (`ru_maxrss`) are that consumer's alone. Then the
latency phase: a fresh topic, `IngestEngine` consuming live while this process
produces at half of (b)'s measured rate for `latency_seconds`; every record's
publish → commit latency is its batch's commit time (wall clock, taken in
the consumer right after the PostgreSQL COMMIT returned) minus its
`published_at` (wall clock, stamped just before `produce()`), read back from
the Parquet files the batch wrote. The p95 is over records, not batches.
"""

import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import psycopg
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from planpipe.bench import workload
from planpipe.bench.consumers import REFERENCE_TABLE_DDL
from planpipe.bench.processes import CpuMeter, Worker, run_worker, worker_spec
from planpipe.bench.results import BenchOptions, BenchResult, format_table

__all__ = ["BenchOptions", "BenchResult", "format_table", "run_benchmark"]
from planpipe.kafka_config import admin_config, producer_config
from planpipe.settings import Settings

WARMUP_MESSAGES: Final = 500
CLUSTERS: Final = 3


Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _isolated(
    settings: Settings, run_id: str, suffix: str, partitions: int, data_dir: Path, options: BenchOptions | None = None
) -> Settings:
    topic = f"query-plans-bench-{run_id}{suffix}"
    options = options or BenchOptions()
    return replace(
        settings,
        topic=topic,
        dlq_topic=f"{topic}.dlq",
        partitions=partitions,
        consumer_group=f"planpipe-bench-{run_id}{suffix}",
        data_dir=data_dir,
        batch_max_messages=options.batch_max_messages or settings.batch_max_messages,
        batch_max_wait_s=settings.batch_max_wait_s if options.batch_max_wait_s is None else options.batch_max_wait_s,
    )


def _producer(settings: Settings) -> Producer:
    return Producer(producer_config(settings, **{"client.id": "planpipe-bench"}))


def _produce(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value)
            return
        except BufferError:
            producer.poll(0.05)


def publish_backlog(settings: Settings, factory: workload.EnvelopeFactory, count: int) -> tuple[float, int]:
    """Publish `count` envelopes as fast as the producer takes them; returns (seconds, value bytes)."""
    producer = _producer(settings)
    base = time.time() - 7200  # executions spread over the last two hours: a few hourly rollups
    spacing = 7200 / max(1, count)
    total = 0
    started = time.perf_counter()
    for i in range(count):
        key, value = factory.make(i, base + i * spacing, time.time(), "backlog")
        total += len(value)
        _produce(producer, settings.topic, key, value)
        if i % 1000 == 0:
            producer.poll(0)
    remaining = producer.flush(120)
    if remaining:
        raise RuntimeError(f"{remaining} envelopes were not delivered")
    return time.perf_counter() - started, total


_STAMP: Final = b'"published_at":1.0'
PACED_POOL: Final = 4000


def publish_paced(
    settings: Settings, factory: workload.EnvelopeFactory, rate: float, seconds: float, first_index: int
) -> tuple[int, float]:
    """Produce at `rate` envelopes/s for `seconds`; `published_at` is stamped just before each produce().

    Envelopes come from a pool built beforehand (the stamp is spliced into the
    encoded bytes), so the producer spends its CPU on producing, not on building.
    """
    producer = _producer(settings)
    now = time.time()
    pool = [factory.make(first_index + i, now, 1.0, "live") for i in range(PACED_POOL)]
    total = max(1, int(rate * seconds))
    started = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            key, value = pool[sent % PACED_POOL]
            stamped = value.replace(_STAMP, b'"published_at":' + repr(time.time()).encode(), 1)
            _produce(producer, settings.topic, key, stamped)
            sent += 1
        producer.poll(0)
        pause = sent / rate - (time.perf_counter() - started)
        if pause > 0:
            time.sleep(min(pause, 0.01))
    elapsed = time.perf_counter() - started
    if producer.flush(60):
        raise RuntimeError("paced envelopes were not delivered")
    return sent, elapsed


def _percentile(sorted_values: list[float], q: float) -> float:
    # nearest rank, as baseline_sink computes the per-batch figures
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Seconds during which at least one batch was in the engine (decoded, written or both):
    batches overlap (one is decoded while the one before it is written), so their durations
    are not summed but their spans united."""
    busy, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def record_latencies(
    parquet_root: Path, batch_log: list[dict[str, Any]], skip_prefix: str
) -> tuple[list[float], list[float]]:
    """publish → commit latency (ms) of every record of the logged batches, warm-up records left out;
    and publish → handed to the engine (its batch started, right after the consume that returned it)."""
    import polars as pl

    latencies: list[float] = []
    waits: list[float] = []
    for batch in batch_log:
        files = [str(parquet_root / name) for name in batch["files"]]
        if not files:
            continue
        frame = pl.read_parquet(files, columns=["published_at", "trace_id"])
        frame = frame.filter(~pl.col("trace_id").str.starts_with(skip_prefix))
        latencies += ((float(batch["committed_at"]) - frame["published_at"]) * 1000).to_list()
        waits += ((float(batch["started_at"]) - frame["published_at"]) * 1000).to_list()
    return sorted(latencies), sorted(waits)


def run_latency(
    settings: Settings, factory: workload.EnvelopeFactory, rate: float, options: BenchOptions, log: Log
) -> dict[str, Any]:
    paced_total = max(1, int(rate * options.latency_seconds))
    expected = WARMUP_MESSAGES + paced_total
    max_seconds = options.latency_seconds + 180
    worker = Worker(
        worker_spec("latency", settings, settings.consumer_group, expected, max_seconds, warmup=WARMUP_MESSAGES)
    )
    try:
        producer = _producer(settings)
        now = time.time()
        for i in range(WARMUP_MESSAGES):
            key, value = factory.make(i, now, now, "warmup")
            _produce(producer, settings.topic, key, value)
        producer.flush(60)
        worker.wait_for("warm", 120)
        log(f"latency: consumer warm; producing {rate:,.0f} envelopes/s for {options.latency_seconds:.0f}s")
        sent, produce_s = publish_paced(settings, factory, rate, options.latency_seconds, WARMUP_MESSAGES)
        result = worker.finish(max_seconds)
    finally:
        worker.kill()
    batch_log = result.pop("batch_log")
    lat, waits = record_latencies(settings.parquet_dir, batch_log, "warmup")
    durations = sorted(float(b["duration_ms"]) for b in batch_log)
    busy_s = busy_seconds([(float(b["started_at"]), float(b["committed_at"])) for b in batch_log])
    window_s = float(result.get("seconds") or 0.0)
    out: dict[str, Any] = {
        "stages": result.get("stages"),
        "cpu_s": result.get("cpu_s"),
        "window_s": result.get("seconds"),
        "measured": result.get("measured"),
        "rate_target_eps": round(rate, 1),
        "rate_achieved_eps": round(sent / produce_s, 1) if produce_s else None,
        "records": len(lat),
        "sent": sent,
        "seconds": round(produce_s, 2),
        "peak_rss_mb": result["peak_rss_mb"],
        "batches": result["batches"],
        "max_batch_p95_ms": round(result["max_batch_p95_ms"], 1),
        "mean_batch_records": round(sum(b["consumed"] for b in batch_log) / max(1, len(batch_log)), 1),
        "batch_duration_p50_ms": round(_percentile(durations, 0.5), 1) if durations else None,
        "batch_duration_max_ms": round(durations[-1], 1) if durations else None,
        # Share of the window the engine spent processing batches (the rest: waiting for records).
        "busy_pct": round(100 * busy_s / window_s, 1) if window_s else None,
        "live_capacity_eps": round(sum(b["consumed"] for b in batch_log) / busy_s, 1) if busy_s else None,
    }
    if waits:
        out.update(handed_p50_ms=round(_percentile(waits, 0.50), 1), handed_p95_ms=round(_percentile(waits, 0.95), 1))
    if lat:
        out.update(
            p50_ms=round(_percentile(lat, 0.50), 1),
            p95_ms=round(_percentile(lat, 0.95), 1),
            p99_ms=round(_percentile(lat, 0.99), 1),
            max_ms=round(lat[-1], 1),
        )
    return out


def run_scaleout(settings: Settings, group: str, options: BenchOptions, log: Log) -> dict[str, Any]:
    """`options.scaleout` IngestEngine consumers in one group, side by side, over the same backlog.

    Each runs until caught up (none knows its share); the combined window opens when
    the first one has committed its first batch and closes when the last one
    committed its last; every envelope must be ingested exactly once across them.
    """
    budget = options.worker_timeout_s
    start_at = time.time() + 8.0  # every consumer imported and connected by then
    spec = worker_spec("planpipe", settings, group, options.messages, budget, until_caught_up=True, start_at=start_at)
    workers = [Worker(spec) for _ in range(options.scaleout)]
    try:
        outcomes = [w.finish(budget + 60) for w in workers]
    finally:
        for w in workers:
            w.kill()
    consumed = sum(int(o["consumed"]) for o in outcomes)
    valid = sum(int(o["valid"]) for o in outcomes)
    if consumed != options.messages or valid != consumed:
        raise RuntimeError(f"scale-out: {consumed} consumed, {valid} valid of {options.messages}: not exactly once")
    started = [o["first_end"] for o in outcomes if o["first_end"] is not None]
    ended = [o["last_end"] for o in outcomes if o["last_end"] is not None]
    measured = consumed - sum(int(o["first_batch"]) for o in outcomes if o["first_end"] == min(started))
    window = max(ended) - min(started)
    out = {
        "consumers": options.scaleout,
        "shares": [int(o["consumed"]) for o in outcomes],
        "seconds": round(window, 3),
        "eps": round(measured / window, 1) if window > 0 else None,
        "peak_rss_mb": max(float(o["peak_rss_mb"]) for o in outcomes),
    }
    log(f"    {out['eps'] or 0:,.0f} envelopes/s together, shares {out['shares']}")
    return out


def _cleanup(settings: Settings, topics: list[str], groups: list[str], clusters: list[str]) -> None:
    # Best effort: a leftover topic or group is harmless.
    client = AdminClient(admin_config(settings))
    for future in client.delete_topics(topics, operation_timeout=30).values():
        with contextlib.suppress(Exception):
            future.result(30)
    with contextlib.suppress(Exception):
        for future in client.delete_consumer_groups(groups, request_timeout=30).values():
            with contextlib.suppress(Exception):
                future.result(30)
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn, conn.transaction():
        conn.execute("DELETE FROM planpipe.ingest_batches WHERE consumer_group = ANY(%s)", (groups,))
        conn.execute("DELETE FROM planpipe.consumer_offsets WHERE consumer_group = ANY(%s)", (groups,))
        for table in ("plan_rollups_hourly", "plan_baselines", "query_catalog"):
            conn.execute(f"DELETE FROM planpipe.{table} WHERE cluster_id = ANY(%s)", (clusters,))
        conn.execute("DELETE FROM planpipe_bench.reference_baselines WHERE cluster_id = ANY(%s)", (clusters,))


def run_benchmark(settings: Settings, options: BenchOptions, log: Log = _stderr) -> BenchResult:
    from planpipe import stack
    from planpipe.stack import kafka

    load_before = os.getloadavg()
    report = stack.up(settings)
    meter = CpuMeter(settings)
    log(f"stack up ({report.seconds}s): Kafka {report.bootstrap_servers}, PostgreSQL {report.pg_dsn}")
    run_id = uuid.uuid4().hex[:8]
    partitions = options.partitions or settings.partitions
    scratch = Path(tempfile.mkdtemp(prefix=f"planpipe-bench-{run_id}-"))
    throughput = _isolated(settings, run_id, "", partitions, scratch / "throughput", options)
    live = _isolated(settings, run_id, "-live", partitions, scratch / "live", options)
    all_groups = [live.consumer_group, f"planpipe-bench-{run_id}-profile"]
    clusters = [f"bench-{run_id}-pg{i}" for i in range(1, CLUSTERS + 1)]
    topics = [throughput.topic, throughput.dlq_topic, live.topic, live.dlq_topic]
    try:
        built = workload.ensure_schema(settings.pg_dsn)
        with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
            conn.execute(REFERENCE_TABLE_DDL)
        started = time.perf_counter()
        plans = workload.capture(
            settings.pg_dsn, options.query_hashes, options.variants, compact=options.plan_format == "compact"
        )
        factory = workload.EnvelopeFactory(plans, options.plan_kb * 1024, clusters)
        fingerprints = _count_fingerprints(plans)
        log(
            f"captured {len(plans)} plans ({len({p.query_hash for p in plans})} query hashes, {fingerprints} "
            f"distinct plans{', schema built' if built else ''}) in {time.perf_counter() - started:.1f}s; "
            f"mean envelope {factory.expected_mean_bytes / 1024:.2f} KB"
        )
        if abs(factory.expected_mean_bytes - options.plan_kb * 1024) > 0.1 * options.plan_kb * 1024:
            log(
                f"note: --plan-kb {options.plan_kb:g} is outside what the captured plans allow "
                f"({min(factory.sizes) / 1024:.1f}–{max(factory.sizes) / 1024:.1f} KB); try --plan-format verbatim "
                "for bigger envelopes"
            )
        kafka.ensure_topics(live)
        if options.latency_rate is not None:
            seconds, value_bytes = 0.0, factory.expected_mean_bytes * options.messages
        else:
            kafka.ensure_topics(throughput)
            seconds, value_bytes = publish_backlog(throughput, factory, options.messages)
            log(f"published {options.messages:,} envelopes ({value_bytes / 2**20:.0f} MiB) in {seconds:.1f}s "
                f"to {throughput.topic} ({partitions} partitions)")  # fmt: skip
        result = BenchResult(
            options=options,
            run_id=run_id,
            partitions=partitions,
            plans=len(plans),
            query_hashes=len({p.query_hash for p in plans}),
            fingerprints=fingerprints,
            mean_envelope_bytes=value_bytes / options.messages,
            produce_eps=round(options.messages / seconds, 1) if seconds else 0.0,
            load_before=load_before,
            batch_max_messages=throughput.batch_max_messages,
            batch_max_wait_s=throughput.batch_max_wait_s,
        )
        budget = options.worker_timeout_s
        # --only latency: (b) alone for the rate (none when the paced rate is given), then the latency phase.
        variants: tuple[str, ...] = ("raw", "planpipe", "reference")
        if options.only == "latency":
            variants = () if options.latency_rate is not None else ("planpipe",)
        runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in variants}
        for round_ in range(options.repeat):  # interleaved, so a burst of outside load hits all three alike
            for variant in runs:
                letter = {"raw": "a", "planpipe": "b", "reference": "c"}[variant]
                group = f"planpipe-bench-{run_id}-{variant}-{round_}"
                all_groups.append(group)
                extra: dict[str, Any] = {"parser": options.reference_parser} if variant == "reference" else {}
                log(f"({letter}) {variant}: {options.messages:,} envelopes, round {round_ + 1}/{options.repeat}")
                before = meter.snapshot()
                outcome = run_worker(
                    worker_spec(variant, throughput, group, options.messages, budget, **extra), budget + 60
                )
                result.cpu[variant] = CpuMeter.delta(before, meter.snapshot())
                if outcome["consumed"] < options.messages:
                    raise RuntimeError(f"{variant} consumed {outcome['consumed']} of {options.messages} in {budget}s")
                if variant == "planpipe" and (outcome["valid"] != outcome["consumed"] or outcome["dlq"]):
                    raise RuntimeError(f"planpipe did not ingest every envelope: {outcome}")
                runs[variant].append(outcome)
                log(f"    {outcome['eps']:,.0f} envelopes/s, peak RSS {outcome['peak_rss_mb']:.0f} MB")
        for variant, outcomes in runs.items():
            # The median run by throughput (the middle one of an odd count; the slower middle one of an even count).
            ranked = sorted(outcomes, key=lambda o: float(o["eps"]))
            chosen = dict(ranked[(len(ranked) - 1) // 2])
            chosen["all_eps"] = [o["eps"] for o in outcomes]
            chosen["peak_rss_mb"] = max(o["peak_rss_mb"] for o in outcomes)
            result.workers[variant] = chosen
        if options.scaleout > 1 and options.only is None:
            group = f"planpipe-bench-{run_id}-scaleout"
            all_groups.append(group)
            log(f"scale-out: {options.scaleout} planpipe consumers in one group, {options.messages:,} envelopes")
            before = meter.snapshot()
            scaled = replace(throughput, data_dir=scratch / "scaleout")
            result.scaleout = run_scaleout(scaled, group, options, log)
            result.cpu["scale-out"] = CpuMeter.delta(before, meter.snapshot())
        rate = options.latency_rate or options.latency_fraction * result.workers["planpipe"]["eps"]
        before = meter.snapshot()
        result.latency = run_latency(live, factory, rate, options, log)
        result.cpu["latency"] = CpuMeter.delta(before, meter.snapshot())
        log(f"    p95 publish→commit {result.latency.get('p95_ms')} ms over {result.latency['records']:,} records")
        if options.profile_dir is not None and options.only is None:
            profile = options.profile_dir / f"planpipe-consumer-{run_id}"
            log(f"profiling planpipe's consumer (pyinstrument) → {profile}.txt/.html")
            spec = worker_spec(
                "planpipe", throughput, f"planpipe-bench-{run_id}-profile", options.messages, budget,
                profile=str(profile),
            )  # fmt: skip
            outcome = run_worker(spec, budget + 60)
            result.workers["planpipe_profiled"] = outcome
            result.profile = outcome.get("profile")
        result.load_after = os.getloadavg()
        return result
    finally:
        if options.keep:
            log(f"kept topics {topics}, data under {scratch}")
        else:
            try:
                _cleanup(settings, topics, all_groups, clusters)
            except Exception as error:  # never hide the benchmark's own error
                log(f"cleanup incomplete: {error}")
            shutil.rmtree(scratch, ignore_errors=True)


def _count_fingerprints(plans: list[workload.CapturedPlan]) -> int:
    from planpipe.plans.fingerprint import fingerprint

    return len({fingerprint(p.plan_text) for p in plans})
