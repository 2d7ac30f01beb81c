"""The ingestion core against the real broker and PostgreSQL: counts, exactly-once, crashes, rebalances."""

import subprocess
import sys
import time
from collections import defaultdict

import polars as pl
import psycopg
import pytest

from planpipe.contract import Envelope
from planpipe.dlq import H_REASON, H_SOURCE_OFFSET, header_map
from planpipe.ingest import parquet_sink
from planpipe.ingest.engine import IngestEngine
from planpipe.plans.fingerprint import fingerprint
from planpipe.settings import Settings
from planpipe_tests.integration.workload import (
    MALFORMED,
    capture_plans,
    consume_all,
    create_workload,
    make_envelopes,
    partition_lag,
    publish,
    settings_env,
)


@pytest.fixture(scope="session")
def real_plans(stack_settings: Settings) -> dict[str, str]:
    create_workload(stack_settings.pg_dsn)
    return capture_plans(stack_settings.pg_dsn)


def _prefix(settings: Settings) -> str:
    return settings.consumer_group.rsplit("-", 1)[-1]


def expected_baselines(envelopes: list[Envelope]) -> dict[tuple[str, str, str], tuple[int, float, float, float]]:
    acc: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for e in envelopes:
        acc[(e.cluster_id, e.query_hash, fingerprint(e.plan_text))].append(e.total_time_ms)
    return {k: (len(v), round(sum(v), 6), min(v), max(v)) for k, v in acc.items()}


def stored_baselines(dsn: str, prefix: str) -> dict[tuple[str, str, str], tuple[int, float, float, float]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT cluster_id, query_hash, fingerprint, executions, total_time_sum, total_time_min, total_time_max
               FROM planpipe.plan_baselines WHERE cluster_id LIKE %s""",
            (prefix + "-%",),
        ).fetchall()
    return {(c, q, f): (int(n), round(float(s), 6), float(lo), float(hi)) for c, q, f, n, s, lo, hi in rows}


def parquet_rows(settings: Settings) -> pl.DataFrame:
    return parquet_sink.scan(settings.parquet_dir).collect()


def test_end_to_end_counts_and_baselines(settings: Settings, real_plans: dict[str, str]) -> None:
    prefix = _prefix(settings)
    envelopes = make_envelopes(real_plans, 1200, prefix)
    publish(settings, envelopes, MALFORMED)

    engine = IngestEngine(settings, max_messages=200)
    try:
        summary = engine.run(until_caught_up=True, max_seconds=120)
        # Lag from the end offsets of every partition at once: zero when caught up, then exactly
        # what was published since (the consumer is still assigned, its fetch long-polling).
        assert summary.final_lag == {p: 0 for p in range(settings.partitions)}
        publish(settings, make_envelopes(real_plans, 30, prefix, seed=11))
        assert sum(engine.lag().values()) == 30
    finally:
        engine.close()
    assert summary.caught_up
    assert summary.consumed == len(envelopes) + len(MALFORMED)
    assert (summary.valid, summary.dlq) == (len(envelopes), len(MALFORMED))

    frame = parquet_rows(settings)
    assert frame.height == len(envelopes)
    assert frame.select(["kafka_partition", "kafka_offset"]).n_unique() == len(envelopes)
    assert set(frame["trace_id"]) == {e.trace_id for e in envelopes}

    dead = consume_all(settings, settings.dlq_topic, len(MALFORMED))
    assert len(dead) == len(MALFORMED)
    assert sorted(m.value() or b"" for m in dead) == sorted(MALFORMED)  # original bytes, untouched
    reasons = {header_map(m.headers())[H_REASON] for m in dead}
    assert {"empty_payload", "malformed_json", "missing_field", "out_of_range", "plan_unparseable",
            "wrong_type"} == reasons  # fmt: skip
    assert all(H_SOURCE_OFFSET in header_map(m.headers()) for m in dead)

    # Baselines equal a recomputation from the Parquet dataset, and from the envelopes.
    from_parquet = (
        frame.group_by(["cluster_id", "query_hash", "fingerprint"])
        .agg(
            pl.len(),
            pl.col("total_time_ms").sum().alias("s"),
            pl.col("total_time_ms").min().alias("lo"),
            pl.col("total_time_ms").max().alias("hi"),
        )
        .rows()
    )
    recomputed = {(c, q, f): (int(n), round(s, 6), lo, hi) for c, q, f, n, s, lo, hi in from_parquet}
    stored = stored_baselines(settings.pg_dsn, prefix)
    assert stored == recomputed == expected_baselines(envelopes)

    assert sum(partition_lag(settings).values()) == 30  # the group's committed lag: only what came after
    with psycopg.connect(settings.pg_dsn) as conn:
        # Histograms merged across batches account for every execution, per plan and per hour.
        for executions, hist in conn.execute(
            "SELECT executions, latency_hist FROM planpipe.plan_baselines WHERE cluster_id LIKE %s", (prefix + "-%",)
        ):
            assert sum(hist.values()) == executions
        hourly = conn.execute(
            """SELECT sum(executions), sum((SELECT sum(value::bigint) FROM jsonb_each_text(latency_hist)))
               FROM planpipe.plan_rollups_hourly WHERE cluster_id LIKE %s""",
            (prefix + "-%",),
        ).fetchone()
        assert hourly == (len(envelopes), len(envelopes))
        total = conn.execute(
            "SELECT sum(valid), sum(dlq), sum(consumed) FROM planpipe.ingest_batches WHERE consumer_group = %s",
            (settings.consumer_group,),
        ).fetchone()
        assert total == (len(envelopes), len(MALFORMED), len(envelopes) + len(MALFORMED))
        statuses = conn.execute(
            "SELECT status, count(*) FROM planpipe.plan_baselines WHERE cluster_id LIKE %s GROUP BY 1",
            (prefix + "-%",),
        ).fetchall()
        by_status = {status: n for status, n in statuses}
        assert by_status.get("accepted") == len({(e.cluster_id, e.query_hash) for e in envelopes})


def _run_ingest(
    settings: Settings, *extra: str, fault: str | None = None, timeout: float = 180
) -> "subprocess.CompletedProcess[str]":
    env = settings_env(settings)
    # A killed member holds its partitions until its session expires: keep that short here.
    env.update(PLANPIPE_CONSUMER__SESSION_TIMEOUT_MS="8000", PLANPIPE_CONSUMER__HEARTBEAT_INTERVAL_MS="2000")
    if fault:
        env["PLANPIPE_FAULT_KILL_AT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "planpipe.cli", "ingest", "--until-caught-up", "--quiet", *extra],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.parametrize("step", ["after_decode", "after_parquet", "after_pg_commit", "after_kafka_commit"])
def test_kill_9_at_each_step_loses_nothing_and_counts_nothing_twice(
    settings: Settings, real_plans: dict[str, str], step: str
) -> None:
    prefix = _prefix(settings)
    envelopes = make_envelopes(real_plans, 600, prefix, seed=11)
    publish(settings, envelopes, MALFORMED[:3])

    crashed = _run_ingest(settings, "--max-messages", "100", fault=f"{step}:3")
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    resumed = _run_ingest(settings, "--max-messages", "100")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    assert stored_baselines(settings.pg_dsn, prefix) == expected_baselines(envelopes)
    frame = parquet_rows(settings)
    assert frame.height == len(envelopes)
    assert frame.select(["kafka_partition", "kafka_offset"]).n_unique() == len(envelopes)
    assert set(partition_lag(settings).values()) == {0}
    with psycopg.connect(settings.pg_dsn) as conn:
        valid = conn.execute(
            "SELECT sum(valid) FROM planpipe.ingest_batches WHERE consumer_group = %s", (settings.consumer_group,)
        ).fetchone()
    assert valid == (len(envelopes),)
    # DLQ is at-least-once: a crash between its publish and the commit may repeat a reject.
    dead = consume_all(settings, settings.dlq_topic, 3)
    assert {header_map(m.headers())[H_SOURCE_OFFSET] for m in dead}.__len__() == 3


def _committed_batches(settings: Settings) -> int:
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM planpipe.ingest_batches WHERE consumer_group = %s", (settings.consumer_group,)
        ).fetchone()
    return 0 if row is None else int(row[0])


def test_rebalance_two_consumers_one_leaves(settings: Settings, real_plans: dict[str, str]) -> None:
    prefix = _prefix(settings)
    envelopes = make_envelopes(real_plans, 6000, prefix, seed=5)
    publish(settings, envelopes)
    env = settings_env(settings)
    command = [sys.executable, "-m", "planpipe.cli", "ingest", "--quiet", "--max-messages", "50"]
    leaver = subprocess.Popen([*command, "--max-seconds", "8"], env=env, stdout=subprocess.PIPE, text=True)
    # The stayer joins once the leaver is consuming (its first batch committed), so the group rebalances
    # twice: when the stayer joins and when the leaver leaves.
    deadline = time.monotonic() + 60
    while _committed_batches(settings) == 0 and leaver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _committed_batches(settings) > 0, "the leaving consumer never committed a batch"
    stayer = subprocess.Popen([*command, "--until-caught-up", "--max-seconds", "150"], env=env,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    leaver_out, _ = leaver.communicate(timeout=120)
    stayer_out, _ = stayer.communicate(timeout=200)
    assert leaver.returncode == 0 and stayer.returncode == 0
    import json

    left, stayed = json.loads(leaver_out.strip().splitlines()[-1]), json.loads(stayer_out.strip().splitlines()[-1])
    assert left["valid"] > 0, "the leaving consumer should have ingested part of the stream"
    assert stayed["caught_up"]
    assert left["valid"] + stayed["valid"] == len(envelopes)
    assert stored_baselines(settings.pg_dsn, prefix) == expected_baselines(envelopes)
    assert parquet_rows(settings).height == len(envelopes)
    assert set(partition_lag(settings).values()) == {0}
