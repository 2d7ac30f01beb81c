"""Demo traffic for the main job: a real capture loop against a workload in the local PostgreSQL.

Every cycle runs the demo workload with `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)`
(the same capture path as `planpipe capture explain`) and publishes the envelopes
through the router. Now and then it sends malformed envelopes (one that a DLQ
correction rule can repair, one that must be parked) and it induces a plan change
by dropping the index a query relies on (restoring it later), so a newcomer sees
the sensors fire, DLQ replays, and a plan regression being detected.
"""

import logging
import random
import threading
import time
from dataclasses import dataclass, field

import msgspec
import psycopg

from planpipe.capture.explain import capture_workload
from planpipe.contract import encode_envelope
from planpipe.ingest.lag import LagUnavailable, group_assignments
from planpipe.ingest.reconcile import record_capture_count
from planpipe.routing.publish import PlanPublisher, Source
from planpipe.routing.router import Rejection
from planpipe.settings import Settings, _with_database

logger = logging.getLogger("planpipe.demo")

DEMO_DATABASE = "demo_target"
DEMO_CLUSTER = "demo-cluster"
INDEX_DDL = "CREATE INDEX IF NOT EXISTS accounts_bid_idx ON demo.accounts (bid)"

SETUP = [
    "CREATE SCHEMA IF NOT EXISTS demo",
    "CREATE TABLE IF NOT EXISTS demo.branches (bid int PRIMARY KEY, bbalance int NOT NULL, filler text)",
    """CREATE TABLE IF NOT EXISTS demo.accounts (aid int PRIMARY KEY, bid int NOT NULL REFERENCES demo.branches,
       abalance int NOT NULL, filler text)""",
    "INSERT INTO demo.branches SELECT g, 0, 'branch' FROM generate_series(1, 200) g ON CONFLICT DO NOTHING",
    """INSERT INTO demo.accounts SELECT g, 1 + g % 200, (g::bigint * 7919 % 10000)::int, repeat('x', 60)
       FROM generate_series(1, 300000) g ON CONFLICT DO NOTHING""",
    INDEX_DDL,
    "ANALYZE demo.branches",
    "ANALYZE demo.accounts",
]


def workload(rng: random.Random) -> str:
    """Five statements with fresh constants each cycle: constants never change a fingerprint."""
    aid, bid = rng.randint(1, 300_000), rng.randint(1, 200)
    return f"""
        SELECT * FROM demo.accounts WHERE aid = {aid};
        SELECT count(*), sum(abalance) FROM demo.accounts WHERE bid = {bid};
        SELECT b.bid, sum(a.abalance) FROM demo.accounts a JOIN demo.branches b ON a.bid = b.bid
            WHERE b.bid <= {1 + bid % 5} GROUP BY b.bid;
        SELECT aid, abalance FROM demo.accounts ORDER BY abalance DESC LIMIT 10;
        UPDATE demo.accounts SET abalance = abalance + 1 WHERE aid = {aid};
    """


@dataclass
class TrafficSummary:
    cycles: int = 0
    captured: int = 0
    published: int = 0
    rejected: int = 0
    correctable_sent: int = 0
    unfixable_sent: int = 0
    plan_changes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def demo_dsn(settings: Settings) -> str:
    return _with_database(settings.pg_dsn, DEMO_DATABASE)


def prepare_demo_database(settings: Settings) -> str:
    with psycopg.connect(_with_database(settings.pg_dsn, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DATABASE,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
    dsn = demo_dsn(settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in SETUP:
            conn.execute(statement)
    return dsn


def wait_for_consumer(settings: Settings, timeout_s: float, stop: threading.Event) -> bool:
    """Until a member of the ingest group holds partitions of the topic (the standing ingest run
    the lag sensor keeps): records published before that would wait for a run to start."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            if any(group_assignments(settings, settings.consumer_group, settings.topic).values()):
                logger.info("demo: an ingest run is consuming; traffic starts")
                return True
        except LagUnavailable:
            pass  # the broker or the group is not there yet
        stop.wait(2.0)
    logger.warning("demo: no ingest run consuming after %.0f s; traffic starts anyway", timeout_s)
    return False


def _legacy_envelope(raw: bytes) -> bytes:
    """An envelope from an old capture agent: camelCase names that a correction rule renames."""
    fields = msgspec.json.decode(raw)
    fields["queryHash"] = fields.pop("query_hash")
    fields["clusterId"] = fields.pop("cluster_id")
    return msgspec.json.encode(fields)


def run_traffic(
    settings: Settings,
    *,
    duration_s: float | None = None,
    interval_s: float = 3.0,
    malformed_every: int = 5,
    plan_change_every: int = 20,
    stop: threading.Event | None = None,
    seed: int = 17,
    wait_for_consumer_s: float = 0.0,
) -> TrafficSummary:
    """Capture and publish until `duration_s` passes or `stop` is set; first wait up to
    `wait_for_consumer_s` for an ingest consumer, so the SLA measures a running pipeline."""
    stop = stop or threading.Event()
    rng = random.Random(seed)
    dsn = prepare_demo_database(settings)
    if wait_for_consumer_s > 0:
        wait_for_consumer(settings, wait_for_consumer_s, stop)
    summary = TrafficSummary()
    publisher = PlanPublisher(settings)
    deadline = None if duration_s is None else time.monotonic() + duration_s
    index_present = True
    try:
        while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
            summary.cycles += 1
            # The demo's throwaway database on the local stack, whose only role is the bootstrap superuser;
            # its UPDATE runs and is rolled back, as before capture planned DML by default.
            report = capture_workload(
                dsn, workload(rng), repeat=3, cluster_id=DEMO_CLUSTER, allow_superuser=True, dml="analyze"
            )
            summary.captured += len(report.envelopes)
            accepted = 0
            for envelope in report.envelopes:
                outcome = publisher.submit_raw(encode_envelope(envelope), source=Source(file="demo-capture"))
                accepted += not isinstance(outcome, Rejection)
                summary.rejected += isinstance(outcome, Rejection)
            summary.published += accepted
            record_capture_count(settings.pg_dsn, "demo-traffic", settings.topic, accepted)
            if malformed_every and summary.cycles % malformed_every == 0 and report.envelopes:
                publisher.submit_raw(_legacy_envelope(encode_envelope(report.envelopes[0])),
                                     source=Source(file="demo-legacy-agent"))  # fmt: skip
                publisher.submit_raw(b'{"query_hash": "broken", "plan_text": 42}', source=Source(file="demo-broken"))
                summary.correctable_sent += 1
                summary.unfixable_sent += 1
            if plan_change_every and summary.cycles % plan_change_every == 0:
                index_present = _toggle_index(dsn, index_present)
                summary.plan_changes.append("index restored" if index_present else "index dropped")
            stop.wait(interval_s)
    finally:
        publisher.close(timeout=30)
    return summary


def _toggle_index(dsn: str, present: bool) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        if present:
            conn.execute("DROP INDEX IF EXISTS demo.accounts_bid_idx")
            logger.warning("demo: dropped demo.accounts_bid_idx — the per-branch query now seq-scans")
        else:
            conn.execute(INDEX_DDL)
            logger.warning("demo: restored demo.accounts_bid_idx")
    return not present
