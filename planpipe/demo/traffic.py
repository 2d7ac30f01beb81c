"""Demo traffic for the main job: a workload on the demo database, captured by a real agent.

Every cycle runs the demo workload as plain queries; auto_explain (on for the demo
database only) logs each plan and the `planpipe agent` that `planpipe dev` / `planpipe demo`
supervise tails that log and publishes the plans (`planpipe.demo.agent`). Now and then
the traffic itself sends malformed envelopes as an old capture agent of another cluster
would (one that a DLQ correction rule can repair, one that must be parked), and it
induces a plan change by dropping the index a query relies on (restoring it later), so
a newcomer sees the sensors fire, DLQ replays, and a plan regression being detected.
"""

import logging
import random
import threading
import time
from dataclasses import dataclass, field

import msgspec
import psycopg

from planpipe.contract import Envelope, encode_envelope
from planpipe.demo.agent import enable_auto_explain
from planpipe.ingest.lag import LagUnavailable, group_assignments
from planpipe.ingest.reconcile import latest_settled
from planpipe.routing.publish import PlanPublisher, Source
from planpipe.settings import Settings, _with_database

logger = logging.getLogger("planpipe.demo")

DEMO_DATABASE = "demo_target"
DEMO_CLUSTER = "demo-cluster"
LEGACY_CLUSTER = "demo-legacy-agent"  # the old agent whose envelopes the DLQ corrects or parks
REPEAT = 3  # each statement runs this often per cycle
SETTLED_SAMPLE_WAIT_S = 60.0  # two quiet lag-sensor ticks, on a loaded machine
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


def workload(rng: random.Random) -> list[str]:
    """Five statements with fresh constants each cycle: constants never change a fingerprint."""
    aid, bid = rng.randint(1, 300_000), rng.randint(1, 200)
    return [
        f"SELECT * FROM demo.accounts WHERE aid = {aid}",
        f"SELECT count(*), sum(abalance) FROM demo.accounts WHERE bid = {bid}",
        f"""SELECT b.bid, sum(a.abalance) FROM demo.accounts a JOIN demo.branches b ON a.bid = b.bid
            WHERE b.bid <= {1 + bid % 5} GROUP BY b.bid""",
        "SELECT aid, abalance FROM demo.accounts ORDER BY abalance DESC LIMIT 10",
        f"UPDATE demo.accounts SET abalance = abalance + 1 WHERE aid = {aid}",
    ]


@dataclass
class TrafficSummary:
    cycles: int = 0
    statements_run: int = 0  # each one logged by auto_explain: the agent's to capture
    correctable_sent: int = 0
    unfixable_sent: int = 0
    plan_changes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def demo_dsn(settings: Settings) -> str:
    return _with_database(settings.pg_dsn, DEMO_DATABASE)


def prepare_demo_database(settings: Settings) -> str:
    """The demo database with its tables, and auto_explain logging every plan of its sessions."""
    with psycopg.connect(_with_database(settings.pg_dsn, "postgres"), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DATABASE,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{DEMO_DATABASE}"')
        enable_auto_explain(conn, DEMO_DATABASE)
    dsn = demo_dsn(settings)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET auto_explain.log_min_duration = -1")  # the set-up is not the demo's workload
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


def wait_for_settled_sample(settings: Settings, timeout_s: float, stop: threading.Event) -> bool:
    """Until the lag sensor has a settled sample of the topic (nothing moved until its next tick):
    `lag_reconciliation`'s window can then start before the traffic and judge all of it."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            if latest_settled(settings.pg_dsn, settings.consumer_group, settings.topic) is not None:
                return True
        except psycopg.Error as error:
            logger.debug("demo: no settled lag sample yet: %s", error)
        stop.wait(2.0)
    logger.warning("demo: no settled lag sample after %.0f s; lag_reconciliation judges from a later one", timeout_s)
    return False


_LEGACY_PLAN = '[{"Plan": {"Node Type": "Result", "Actual Rows": 1, "Actual Loops": 1}, "Execution Time": 0.01}]'


def _legacy_envelope(now: float) -> bytes:
    """An envelope from an old capture agent: camelCase names that a correction rule renames."""
    envelope = Envelope(
        query_hash="demo-legacy-select-1", execution_timestamp=now, cluster_id=LEGACY_CLUSTER,
        plan_text=_LEGACY_PLAN, actual_rows=1, total_time_ms=0.01, query_type="SELECT", query_text="SELECT 1",
    )  # fmt: skip
    fields = msgspec.json.decode(encode_envelope(envelope))
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
    """Run the workload (the agent captures it) until `duration_s` passes or `stop` is set; first
    wait up to `wait_for_consumer_s` for an ingest consumer, so the SLA measures a running pipeline,
    and for a settled lag sample (the start of the reconciled window)."""
    stop = stop or threading.Event()
    rng = random.Random(seed)
    dsn = prepare_demo_database(settings)
    if wait_for_consumer_s > 0:
        wait_for_consumer(settings, wait_for_consumer_s, stop)
        wait_for_settled_sample(settings, SETTLED_SAMPLE_WAIT_S, stop)
    summary = TrafficSummary()
    publisher = PlanPublisher(settings)
    deadline = None if duration_s is None else time.monotonic() + duration_s
    index_present = True
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                summary.cycles += 1
                for statement in workload(rng):
                    for _ in range(REPEAT):
                        conn.execute(statement)
                        summary.statements_run += 1
                if malformed_every and summary.cycles % malformed_every == 0:
                    publisher.submit_raw(_legacy_envelope(time.time()), source=Source(file="demo-legacy-agent"))
                    publisher.submit_raw(
                        b'{"query_hash": "broken", "plan_text": 42}', source=Source(file="demo-broken")
                    )
                    summary.correctable_sent += 1
                    summary.unfixable_sent += 1
                if plan_change_every and summary.cycles % plan_change_every == 0:
                    index_present = _toggle_index(conn, index_present)
                    summary.plan_changes.append("index restored" if index_present else "index dropped")
                stop.wait(interval_s)
    finally:
        publisher.close(timeout=30)
    return summary


def _toggle_index(conn: psycopg.Connection[tuple[object, ...]], present: bool) -> bool:
    if present:
        conn.execute("DROP INDEX IF EXISTS demo.accounts_bid_idx")
        logger.warning("demo: dropped demo.accounts_bid_idx — the per-branch query now seq-scans")
    else:
        conn.execute(INDEX_DDL)
        logger.warning("demo: restored demo.accounts_bid_idx")
    return not present
