"""The agent beside a real database: its auto_explain log and live samples reach Kafka and the baseline store.

No file in between: the agent tails the server's log directory, samples
pg_stat_statements as a non-superuser role, publishes; the ingest engine then
commits the plans to PostgreSQL, each observation exactly once.
"""

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from planpipe.contract import Envelope
from planpipe.ingest.engine import IngestEngine
from planpipe.settings import Settings, _with_database
from planpipe_tests.integration.routing.kafka_read import read_all

AUTO_EXPLAIN = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_format = json",
)
QUERIES = (
    "SELECT count(*) FROM orders WHERE id <= 100",
    "SELECT max(note) FROM orders WHERE id > 1500",
    "SELECT o.id FROM orders o JOIN orders p ON p.id = o.id + 1 WHERE o.id < 20",
)
SAMPLED = "SELECT count(*) FROM orders"  # no constants: pg_stat_statements keeps it runnable


@pytest.fixture
def database(stack_settings: Settings) -> Iterator[tuple[str, str]]:
    """A small database with pg_stat_statements, and a capture role that is not a superuser."""
    name = f"agentdb_{uuid.uuid4().hex[:8]}"
    role = f"agent_reader_{uuid.uuid4().hex[:8]}"
    admin = _with_database(stack_settings.pg_dsn, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pg_read_all_data, pg_read_all_stats")
    dsn = _with_database(stack_settings.pg_dsn, name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
            conn.execute("INSERT INTO orders SELECT i, 'n' || i FROM generate_series(1, 2000) i")
            conn.execute("ANALYZE orders")
        yield dsn, make_conninfo(dsn, user=role)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f"DROP ROLE IF EXISTS {role}")


def test_agent_tails_the_server_log_and_samples_live_into_the_baseline_store(
    settings: Settings, database: tuple[str, str], agent_factory: Any, pg: psycopg.Connection[Any]
) -> None:
    dsn, reader_dsn = database
    run = uuid.uuid4().hex[:8]
    with psycopg.connect(dsn, autocommit=True) as conn:
        log_dir = conn.execute(
            "SELECT current_setting('data_directory') || '/' || current_setting('log_directory')"
        ).fetchone()
        for _ in range(6):
            conn.execute(SAMPLED)
    assert log_dir is not None
    agent = agent_factory(
        f"beside-{run}",
        log=Path(log_dir[0]),
        args=[
            *("--dsn", reader_dsn, "--sample", "--sample-interval", "1", "--sample-budget-pct", "50"),
            *("--cluster-id", f"beside-{run}"),  # query ids repeat across runs; the cluster does not
        ],
    )
    agent.start().wait_until(lambda h: h["status"] == "ok", what="agent up")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in AUTO_EXPLAIN:
            conn.execute(statement)
        for query in QUERIES:
            conn.execute(f"{query} /* agent:{run} */")

    def ours(envelope: Envelope) -> bool:
        return f"agent:{run}" in (envelope.query_text or "")

    def on_topic() -> list[tuple[Envelope, dict[str, str]]]:
        return [(msgspec.json.decode(r.value, type=Envelope), r.headers) for r in read_all(settings, settings.topic)]

    deadline = time.monotonic() + 60
    while True:  # the log directory may hold older entries too: wait for this run's plans and a sample
        records = on_topic()
        logged = [e for e, _ in records if ours(e)]
        sampled = [e for e, h in records if "/sample/" in h["planpipe-capture-id"]]
        if len(logged) >= len(QUERIES) and sampled:
            break
        assert time.monotonic() < deadline, f"{len(logged)} logged, {len(sampled)} sampled: {agent.health()}"
        time.sleep(0.5)
    assert sorted(e.query_text.split(" /*")[0] for e in logged if e.query_text) == sorted(QUERIES)
    assert sampled and sampled[0].query_text == SAMPLED and sampled[0].actual_rows == 1
    assert agent.stop() == 0

    engine = IngestEngine(settings, max_messages=500)
    try:
        summary = engine.run(until_caught_up=True, max_seconds=60)
    finally:
        engine.close()
    assert summary.caught_up
    hashes = [e.query_hash for e in logged]
    # The log directory also holds earlier runs' entries of the same statements (same query ids):
    # the store must hold exactly what reached the topic, each observation once.
    published = sum(1 for e, _ in on_topic() if e.query_hash in hashes)
    row = pg.execute(
        "SELECT count(DISTINCT query_hash), sum(executions) FROM planpipe.plan_baselines"
        " WHERE cluster_id = %s AND query_hash = ANY(%s)",
        (logged[0].cluster_id, hashes),
    ).fetchone()
    assert row == (len(QUERIES), published)
