"""Detection with its defaults (no window) end to end: capture, Kafka, ingest, detect.

Plan shapes and their work (blocks, rows) are real: every plan is captured live with
EXPLAIN (ANALYZE, BUFFERS) from a schema the scenarios change for real (a planner setting
that rules out hash joins, a table that grows 5×, constants that pick another plan, a
one-off first plan). Latencies are chosen (seeded) and published in the envelopes, as in
test_detector.py: wall-clock timings on a shared 2-core machine would make the
statistics flaky. The CPU hog is such a choice: the same plans doing the same work, 1.7×
slower on the whole cluster.

One workload per module: a baseline period three hours ago, the changes in the last hour,
on two clusters (B runs the same queries, unchanged).
"""

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from planpipe.capture.explain import ExplainCapturer
from planpipe.contract import Envelope
from planpipe.plans.detector import DetectionResult, detect_regressions
from planpipe.plans.findings import list_regressions
from planpipe.plans.fingerprint import fingerprint
from planpipe.plans.verdicts import DetectionConfig
from planpipe.settings import Settings
from planpipe_tests.conftest import isolated_settings
from planpipe_tests.integration.plans.test_detector import capture, capture_role, drop_schema, ingest, publish

N = 30  # executions per query and period
STEP_S = 60.0
HOGGED = ("hog_lookup", "hog_count", "hog_sum")


def chosen(seed: int, median_ms: float, n: int = N, sigma: float = 0.1) -> list[float]:
    values = np.random.default_rng(seed).lognormal(np.log(median_ms), sigma, n)
    return [round(float(v), 3) for v in values]


def at(envelopes: list[Envelope], timings: list[float], start: datetime, cluster: str) -> list[Envelope]:
    """One envelope per chosen latency, cycling through the captured plans, STEP_S apart."""
    return [
        msgspec.structs.replace(
            envelopes[i % len(envelopes)],
            total_time_ms=ms,
            cluster_id=cluster,
            execution_timestamp=start.timestamp() + i * STEP_S,
        )
        for i, ms in enumerate(timings)
    ]


def create_schema(dsn: str, s: str) -> None:
    options = "autovacuum_enabled = false, parallel_workers = 0"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {s}")
        conn.execute(f"CREATE TABLE {s}.customers (id int PRIMARY KEY, region int NOT NULL) WITH ({options})")
        conn.execute(f"INSERT INTO {s}.customers SELECT g, g % 50 FROM generate_series(1, 5000) g")
        conn.execute(
            f"CREATE TABLE {s}.orders (id int PRIMARY KEY, customer_id int NOT NULL, status int NOT NULL, "
            f"amount numeric NOT NULL) WITH ({options})"
        )
        # status: 0 for 95 % of the rows, 1..49 rare, so the plan depends on the constant.
        conn.execute(
            f"""INSERT INTO {s}.orders SELECT g, (g * 7919) % 5000 + 1,
                       CASE WHEN g % 20 = 0 THEN g % 49 + 1 ELSE 0 END, (g % 1000) / 10.0
                FROM generate_series(1, 60000) g"""
        )
        conn.execute(f"CREATE INDEX orders_customer_idx ON {s}.orders (customer_id)")
        conn.execute(f"CREATE INDEX orders_status_idx ON {s}.orders (status)")
        conn.execute(f"CREATE TABLE {s}.events (id int, kind int, payload text) WITH ({options})")
        conn.execute(f"INSERT INTO {s}.events SELECT g, g % 10, md5(g::text) FROM generate_series(1, 20000) g")
        for table in ("customers", "orders", "events"):
            conn.execute(f"ANALYZE {s}.{table}")


def statements(s: str) -> dict[str, str]:
    return {
        "join": f"SELECT count(*) FROM {s}.orders o JOIN {s}.customers c ON c.id = o.customer_id WHERE c.region = 3",
        "growth": f"SELECT count(*), max(payload) FROM {s}.events WHERE kind = 3",
        "hog_lookup": f"SELECT amount FROM {s}.orders WHERE id = 4242",
        "hog_count": f"SELECT count(*) FROM {s}.customers WHERE region = 7",
        "hog_sum": f"SELECT sum(amount) FROM {s}.orders WHERE customer_id = 99",
        "multi_common": f"SELECT count(*), sum(amount) FROM {s}.orders WHERE status = 0",
        "multi_rare": f"SELECT count(*), sum(amount) FROM {s}.orders WHERE status = 17",
        "oneoff": f"SELECT count(*) FROM {s}.orders WHERE customer_id = 1234",
    }


@dataclass
class World:
    settings: Settings
    shots: dict[str, list[Envelope]]
    now: datetime
    a: str  # the cluster where things change
    b: str  # the same queries, unchanged
    hashes: dict[str, str]
    plans: dict[str, tuple[str, ...]]  # name → fingerprints captured (before, after)
    change_at: dict[str, float]  # name → epoch of the first changed execution
    result: DetectionResult

    def findings(self, name: str, cluster: str | None = None) -> list[str]:
        return [f.kind for f in self.result.findings
                if f.query_hash == self.hashes[name] and f.cluster_id == (cluster or self.a)]  # fmt: skip


@pytest.fixture(scope="module")
def world(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    settings = replace(isolated_settings(stack_settings, tmp_path_factory.mktemp("evidence")), sample_rate_pct=100)
    suffix = uuid.uuid4().hex[:10]
    dsn, schema = settings.pg_dsn, f"pp_evidence_{suffix}"
    a, b = f"evidence-a-{suffix}", f"evidence-b-{suffix}"
    sql = statements(schema)
    now = datetime.now(UTC).replace(microsecond=0)
    before_at, after_at = now - timedelta(hours=3), now - timedelta(hours=1)
    with ExitStack() as cleanup:
        cleanup.callback(drop_schema, dsn, schema)
        create_schema(dsn, schema)
        capture_dsn = cleanup.enter_context(capture_role(dsn, f"pp_evidence_{suffix}"))
        no_hash = make_conninfo(capture_dsn, options="-c enable_hashjoin=off -c enable_mergejoin=off")
        no_index = make_conninfo(capture_dsn, options="-c enable_indexscan=off -c enable_bitmapscan=off")
        with ExplainCapturer(capture_dsn, cluster_id=a) as capturer:
            shot = {name: capture(capturer, text, runs=2) for name, text in sql.items()}
            # A planner setting rules hash joins out: the same join runs as a nested loop.
            with ExplainCapturer(no_hash, cluster_id=a) as other:
                shot["join_after"] = capture(other, sql["join"], runs=2)
            # A one-off first execution under other settings: a seq scan, never seen again.
            with ExplainCapturer(no_index, cluster_id=a) as other:
                shot["oneoff_first"] = capture(other, sql["oneoff"], runs=1)
            # The events table grows 5×: same plan, 5× the rows and blocks.
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"INSERT INTO {schema}.events SELECT g, g % 10, md5(g::text) "
                             "FROM generate_series(20001, 100000) g")  # fmt: skip
                conn.execute(f"ANALYZE {schema}.events")
            shot["growth_after"] = capture(capturer, sql["growth"], runs=2)

        def phases(name: str, before: list[float], after: list[float], changed: str | None = None) -> list[Envelope]:
            return at(shot[name], before, before_at, a) + at(shot[changed or name], after, after_at, a)

        published = [
            *phases("join", chosen(1, 20), chosen(2, 90), "join_after"),
            *phases("growth", chosen(3, 16), chosen(4, 59), "growth_after"),
            *[e for i, name in enumerate(HOGGED) for e in phases(name, chosen(10 + i, 30), chosen(20 + i, 51))],
            # Constants pick the plan: both plans alternate before and after, no change.
            *[e for i in range(2 * N) for e in at(shot["multi_common" if i % 2 else "multi_rare"],
                                                 [40.0 if i % 2 else 1.5], (before_at if i < N else after_at)
                                                 + timedelta(seconds=i % N * STEP_S), a)],
            *at(shot["oneoff_first"], [60.0], before_at - timedelta(minutes=5), a),
            *phases("oneoff", chosen(5, 1.0, N - 1), chosen(6, 1.0)),
            # Cluster B: the join and the growth query, unchanged in both periods.
            *at(shot["join"], chosen(7, 20, 2 * N), before_at, b),
            *at(shot["growth"], chosen(8, 16, 2 * N), before_at, b),
        ]  # fmt: skip
        publish(settings, published)
        ingest(settings, expected=len(published))
        hashes = {name: envelopes[0].query_hash for name, envelopes in shot.items()}
        plans = {name: tuple(dict.fromkeys(fingerprint(e.plan_text) for e in shot[name])) for name in shot}
        change_at = {"join": after_at.timestamp(), "growth": after_at.timestamp()}
        result = detect_regressions(dsn, settings.parquet_dir, config=DetectionConfig(), now=now)
        yield World(settings, shot, now, a, b, hashes, plans, change_at, result)


def test_join_method_change_is_a_plan_flip_from_its_first_execution(world: World) -> None:
    assert world.plans["join"] != world.plans["join_after"]
    [finding] = [f for f in world.result.findings if f.query_hash == world.hashes["join"] and f.cluster_id == world.a]
    assert (finding.kind, finding.severity) == ("plan_flip_regression", "high")
    assert finding.started_at is not None and finding.started_at.timestamp() == world.change_at["join"]
    assert "Hash Join" in finding.diff_markdown and "Nested Loop" in finding.diff_markdown
    assert " › " in finding.diff_markdown  # positions as node labels
    hint = finding.remediation["hint"]
    assert hint["validated"] and "HashJoin(" in hint["text"] and "Leading(" in hint["text"]
    # The work on both sides comes from the real plans.
    assert finding.evidence["baseline"]["work"]["blocks"] and finding.evidence["new"]["work"]["blocks"]


def test_data_growth_is_same_plan_slower_with_more_work_found_at_its_start(world: World) -> None:
    assert world.plans["growth"] == world.plans["growth_after"]  # same plan, 5× the data
    [finding] = [f for f in world.result.findings if f.query_hash == world.hashes["growth"] and f.cluster_id == world.a]
    assert finding.kind == "same_plan_slower"
    assert finding.evidence["split"] == "change_point"
    assert finding.evidence["work_ratio_blocks"] > 3 and finding.evidence["work_ratio_rows"] is not None
    assert finding.started_at is not None
    assert abs(finding.started_at.timestamp() - world.change_at["growth"]) <= 2 * STEP_S
    assert "data growth" in finding.evidence["reason"]


def test_a_whole_cluster_slower_with_the_same_work_is_one_cluster_slowdown_and_no_query_finding(world: World) -> None:
    for name in HOGGED:
        assert world.findings(name) == [], name
    [slowdown] = [f for f in world.result.findings if f.kind == "cluster_slowdown"]
    assert slowdown.cluster_id == world.a and slowdown.query_hash == "*"
    assert {q["query_hash"] for q in slowdown.evidence["queries"]} == {world.hashes[n] for n in HOGGED}
    assert 1.5 < slowdown.evidence["ratio_p50"] < 2.0
    assert world.result.stats.environment_slowdowns == len(HOGGED)


def test_constants_that_pick_another_plan_make_a_multi_plan_query_not_a_flip(world: World) -> None:
    assert world.hashes["multi_common"] == world.hashes["multi_rare"]
    assert world.plans["multi_common"] != world.plans["multi_rare"]
    assert world.findings("multi_common") == []
    assert world.result.stats.multi_plan_queries == 2  # this one and the one-off's below
    # Its plans ran as often as each other in the settling period: the first one stays the baseline.
    assert all(s.query_hash != world.hashes["multi_common"] for s in world.result.settled)


def test_a_one_off_first_plan_does_not_become_the_baseline(world: World) -> None:
    assert world.findings("oneoff") == []
    [settled] = [s for s in world.result.settled if s.query_hash == world.hashes["oneoff"]]
    assert settled.fingerprint == world.plans["oneoff"][0] and settled.replaced == world.plans["oneoff_first"][0]
    with psycopg.connect(world.settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT fingerprint, status_by FROM planpipe.current_baselines WHERE cluster_id = %s AND query_hash = %s",
            (world.a, world.hashes["oneoff"]),
        ).fetchone()
    assert row == (world.plans["oneoff"][0], "planpipe:settling")


def test_two_clusters_stay_separate(world: World) -> None:
    assert world.findings("join", world.b) == [] and world.findings("growth", world.b) == []
    changed = (world.hashes["join"], world.hashes["growth"])
    assert {f.cluster_id for f in world.result.findings if f.query_hash in changed} == {world.a}


def test_a_cluster_filter_resolves_nothing_and_findings_resolve_only_on_evidence(world: World) -> None:
    dsn, parquet = world.settings.pg_dsn, world.settings.parquet_dir
    before = {f.id for f in list_regressions(dsn, cluster_id=world.a, status="unresolved")}
    assert before
    only_b = detect_regressions(dsn, parquet, config=DetectionConfig(clusters=(world.b,)))
    assert only_b.resolved == [] and only_b.findings == []
    after = {f.id for f in list_regressions(dsn, cluster_id=world.a, status="unresolved")}
    assert after == before


def test_findings_resolve_when_the_latency_is_back(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    """Runs last: the machine and the events query are fast again for resolve_executions executions."""
    from planpipe.plans import cli as plans_cli
    from planpipe_tests.integration.plans.test_detector import run_cli

    dsn, settings, config = world.settings.pg_dsn, world.settings, DetectionConfig()
    open_ids = {f.kind: f.id for f in list_regressions(dsn, cluster_id=world.a, status="unresolved")}
    assert {"same_plan_slower", "cluster_slowdown", "plan_flip_regression"} <= set(open_ids)
    back_at = world.now + timedelta(minutes=5)
    n = config.resolve_executions
    again = [
        *at(world.shots["growth_after"], chosen(30, 16, n), back_at, world.a),
        *[e for i, name in enumerate(HOGGED) for e in at(world.shots[name], chosen(31 + i, 30, n), back_at, world.a)],
    ]
    publish(settings, again)
    ingest(settings, expected=len(again))
    later = back_at + timedelta(seconds=n * STEP_S + 60)
    result = detect_regressions(dsn, settings.parquet_dir, config=config, now=later)
    resolved = {r.kind: r for r in result.resolved if r.cluster_id == world.a}
    assert set(resolved) == {"same_plan_slower", "cluster_slowdown"}
    assert resolved["same_plan_slower"].id == open_ids["same_plan_slower"]
    assert (resolved["same_plan_slower"].resolution or "").startswith("latency back")
    assert "every affected query is back" in (resolved["cluster_slowdown"].resolution or "")
    # The join still runs its nested loop: that finding stays open.
    assert [f.kind for f in list_regressions(dsn, cluster_id=world.a, status="unresolved")] == ["plan_flip_regression"]
    assert plans_cli is not None and run_cli(settings, "regressions", "--cluster", world.a, "--status", "all") == 0
    shown = capsys.readouterr().out
    assert "resolved" in shown and "× slower" in shown and "what to do" in shown
