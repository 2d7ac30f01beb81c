"""Plan intelligence end to end: a real PostgreSQL workload, real EXPLAIN ANALYZE plans and
timings, envelopes through Kafka, the ingest engine, then detection, history and statuses.

One workload is built and ingested once for the module (a baseline period three days
ago, then the changes of the acceptance scenarios in the last six hours); each test
checks one scenario against that state. The lifecycle test runs last and mutates it.
"""

import argparse
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import msgspec
import psycopg
import pytest

from planpipe.capture.explain import ExplainCapturer
from planpipe.capture.sqltext import split_statements
from planpipe.contract import Envelope
from planpipe.ingest.engine import IngestEngine
from planpipe.plans import cli as plans_cli
from planpipe.plans.fingerprint import fingerprint
from planpipe.plans.history import UnknownPlanError, plan_history, set_plan_status
from planpipe.plans.regressions import (
    DetectionConfig,
    DetectionResult,
    acknowledge_regression,
    detect_regressions,
    list_regressions,
    open_regression_candidates,
)
from planpipe.settings import Settings
from planpipe_tests.integration.workload import publish

RUNS = 25  # executions per query and period (detection needs 20 on each side)
ORDERS = 300_000  # large enough that a seq scan costs well over 10 ms more than an index scan


@dataclass
class Scenario:
    settings: Settings
    cluster: str
    schema: str
    now: datetime
    hashes: dict[str, str]  # scenario name → query_hash
    before: dict[str, list[Envelope]]
    after: dict[str, list[Envelope]]
    initial: DetectionResult  # right after the baseline period: nothing to find
    result: DetectionResult  # after the changes

    @property
    def config(self) -> DetectionConfig:
        return DetectionConfig(clusters=(self.cluster,))

    def detect(self, now: datetime | None = None) -> DetectionResult:
        return detect_regressions(
            self.settings.pg_dsn, self.settings.parquet_dir, config=self.config, now=now or self.now
        )

    def findings_of(self, name: str, result: DetectionResult | None = None) -> list[str]:
        return [f.kind for f in (result or self.result).findings if f.query_hash == self.hashes[name]]


def statements(schema: str) -> dict[str, list[str]]:
    """Per scenario: the statement(s) run in the baseline period (first) and after the change (last)."""
    s = schema
    return {
        # (a) uses orders_customer_idx until it is dropped
        "a_drop_index": [f"SELECT count(*), sum(amount) FROM {s}.orders WHERE customer_id = 4242"],
        # (b) the same statement with other constants after the change
        "b_constants": [f"SELECT * FROM {s}.orders WHERE id = 42", f"SELECT * FROM {s}.orders WHERE id = 277777"],
        # (c) a plan whose shape cannot change, whose estimates ANALYZE changes
        "c_analyze": [f"SELECT count(*) FROM {s}.events WHERE kind = 3"],
        # (d) a seq scan until an index makes it an index scan
        "d_add_index": [f"SELECT id, amount FROM {s}.orders WHERE status = 7 AND amount < 3"],
        # (e) an unchanged, not-so-cheap plan: only its timings vary
        "e_noise": [f"SELECT count(*) FROM {s}.orders WHERE note LIKE '%77%'"],
    }


def create_schema(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        # No autovacuum and no parallel workers: statistics, visibility maps and plan
        # shapes change only when a scenario changes them.
        options = "autovacuum_enabled = false, parallel_workers = 0"
        conn.execute(
            f"""CREATE TABLE {schema}.orders (id int PRIMARY KEY, customer_id int NOT NULL, status int NOT NULL,
                    amount numeric NOT NULL, note text NOT NULL) WITH ({options})"""
        )
        conn.execute(
            f"""INSERT INTO {schema}.orders
                SELECT g, (g::bigint * 7919) % 20000, g % 50, ((g::bigint * 104729) % 100000) / 100.0, md5(g::text)
                FROM generate_series(1, {ORDERS}) g"""
        )
        conn.execute(f"CREATE INDEX orders_customer_idx ON {schema}.orders (customer_id)")
        conn.execute(f"CREATE TABLE {schema}.events (id int, kind int) WITH ({options})")
        conn.execute(f"INSERT INTO {schema}.events SELECT g, g % 10 FROM generate_series(1, 20000) g")
        conn.execute(f"ANALYZE {schema}.orders")
        conn.execute(f"ANALYZE {schema}.events")


def capture(capturer: ExplainCapturer, sql: str, runs: int) -> list[Envelope]:
    statement = split_statements(sql)[0]
    out = []
    for _ in range(runs):
        outcome = capturer.capture(statement)
        assert isinstance(outcome, Envelope), outcome
        out.append(outcome)
    return out


def capture_interleaved(capturer: ExplainCapturer, first: str, second: str) -> tuple[list[Envelope], list[Envelope]]:
    """Alternate the two periods' executions, so load on the machine hits both alike."""
    a, b = [], []
    for _ in range(RUNS):
        a += capture(capturer, first, 1)
        b += capture(capturer, second, 1)
    return a, b


def at(envelopes: list[Envelope], start: datetime, step_s: float = 60.0) -> list[Envelope]:
    return [
        msgspec.structs.replace(e, execution_timestamp=start.timestamp() + i * step_s) for i, e in enumerate(envelopes)
    ]


def ingest(settings: Settings, envelopes: list[Envelope], expected: int | None = None) -> None:
    """Publish `envelopes` and ingest everything on the topic."""
    publish(settings, envelopes)
    engine = IngestEngine(settings, max_messages=500)
    try:
        summary = engine.run(until_caught_up=True, max_seconds=120)
    finally:
        engine.close()
    assert summary.caught_up and summary.valid == (expected or len(envelopes)) and summary.dlq == 0


@pytest.fixture(scope="module")
def module_settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    from planpipe.stack import kafka

    suffix = uuid.uuid4().hex[:10]
    tmp = tmp_path_factory.mktemp("plans")
    isolated = replace(
        stack_settings,
        topic=f"query-plans-{suffix}",
        dlq_topic=f"query-plans-{suffix}.dlq",
        consumer_group=f"query-plan-consumers-{suffix}",
        replay_group=f"query-plan-dlq-replay-{suffix}",
        data_dir=tmp / "data",
        spool_path=tmp / "spool.sqlite3",
    )
    kafka.ensure_topics(isolated)
    return isolated


@pytest.fixture(scope="module")
def scenario(module_settings: Settings) -> Iterator[Scenario]:
    settings = module_settings
    dsn = settings.pg_dsn
    suffix = settings.consumer_group.rsplit("-", 1)[-1]
    schema, cluster = f"pp_regress_{suffix}", f"regress-{suffix}"
    now = datetime.now(UTC).replace(microsecond=0)
    sql = statements(schema)
    create_schema(dsn, schema)
    try:
        with ExplainCapturer(dsn, cluster_id=cluster) as capturer:
            before: dict[str, list[Envelope]] = {}
            after: dict[str, list[Envelope]] = {}
            for name in ("a_drop_index", "c_analyze", "d_add_index"):
                before[name] = capture(capturer, sql[name][0], RUNS)
            # Plans that do not change: both periods captured side by side.
            before["b_constants"], after["b_constants"] = capture_interleaved(capturer, *sql["b_constants"])
            before["e_noise"], after["e_noise"] = capture_interleaved(capturer, sql["e_noise"][0], sql["e_noise"][0])

            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP INDEX {schema}.orders_customer_idx")  # (a)
                conn.execute(f"UPDATE {schema}.events SET kind = 3 WHERE kind IN (4, 5, 6)")  # (c)
                conn.execute(f"ANALYZE {schema}.events")
                conn.execute(f"CREATE INDEX orders_status_amount_idx ON {schema}.orders (status, amount)")  # (d)
            for name in ("a_drop_index", "c_analyze", "d_add_index"):
                after[name] = capture(capturer, sql[name][-1], RUNS)

        # Baseline period three days ago, the changed one in the last six hours. Published
        # in that order (a query's envelopes share a partition), so the first plan of each
        # query is the baseline period's; one ingest run for both keeps the test short.
        baseline_start, recent_start = now - timedelta(days=3), now - timedelta(hours=6)
        publish(settings, [e for envelopes in before.values() for e in at(envelopes, baseline_start)])
        ingest(settings, [e for envelopes in after.values() for e in at(envelopes, recent_start)], expected=10 * RUNS)
        hashes = {name: envelopes[0].query_hash for name, envelopes in before.items()}
        config = DetectionConfig(clusters=(cluster,))
        # As of the end of the baseline period: the changes are in its future.
        initial = detect_regressions(dsn, settings.parquet_dir, config=config, now=baseline_start + timedelta(hours=1))
        result = detect_regressions(dsn, settings.parquet_dir, config=config, now=now)
        yield Scenario(settings, cluster, schema, now, hashes, before, after, initial, result)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def plans_of(dsn: str, cluster: str, query_hash: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """SELECT fingerprint, status FROM planpipe.plan_baselines
               WHERE cluster_id = %s AND query_hash = %s ORDER BY plan_version""",
            (cluster, query_hash),
        ).fetchall()
    return [(str(f), str(s)) for f, s in rows]


def test_baseline_period_alone_has_no_findings(scenario: Scenario) -> None:
    assert scenario.initial.findings == []
    assert scenario.initial.stats.observations == RUNS * 5
    assert len(set(scenario.hashes.values())) == 5


def test_a_dropped_index_flags_exactly_that_query(scenario: Scenario) -> None:
    regressions = [f for f in scenario.result.findings if f.kind in ("plan_flip_regression", "same_plan_slower")]
    assert [(f.query_hash, f.kind) for f in regressions] == [(scenario.hashes["a_drop_index"], "plan_flip_regression")]
    finding = regressions[0]
    base_fp, new_fp = (fingerprint(scenario.before["a_drop_index"][0].plan_text),
                       fingerprint(scenario.after["a_drop_index"][0].plan_text))  # fmt: skip
    assert (finding.baseline_fingerprint, finding.new_fingerprint) == (base_fp, new_fp)
    assert "orders_customer_idx" in finding.diff_markdown
    assert "Seq Scan on orders" in finding.diff_markdown
    metadata = scenario.result.metadata()
    assert (metadata["findings_plan_flip_regression"], metadata["findings_same_plan_slower"]) == (1, 0)
    assert "orders_customer_idx" in str(metadata["report"])
    evidence = finding.evidence
    measured_new = sorted(e.total_time_ms for e in scenario.after["a_drop_index"])
    assert evidence["new"]["executions"] == evidence["baseline"]["executions"] == RUNS
    assert evidence["new"]["p50_ms"] == pytest.approx(measured_new[RUNS // 2], rel=1e-3)  # real timings
    assert evidence["ratio_p50"] >= 1.5 and evidence["delta_p50_ms"] >= 10
    assert evidence["p_value"] < 0.01 and evidence["new_plan_status"] == "candidate"
    assert finding.severity in ("high", "critical") and finding.status == "open"
    assert plans_of(scenario.settings.pg_dsn, scenario.cluster, finding.query_hash) == [
        (base_fp, "accepted"),
        (new_fp, "candidate"),
    ]


def test_b_other_constants_give_no_new_fingerprint_and_no_finding(scenario: Scenario) -> None:
    before, after = scenario.before["b_constants"], scenario.after["b_constants"]
    assert "= 42" in (before[0].query_text or "") and "= 277777" in (after[0].query_text or "")
    assert {e.query_hash for e in before + after} == {scenario.hashes["b_constants"]}
    assert {fingerprint(e.plan_text) for e in before + after} == {fingerprint(before[0].plan_text)}
    assert len(plans_of(scenario.settings.pg_dsn, scenario.cluster, scenario.hashes["b_constants"])) == 1
    assert scenario.findings_of("b_constants") == []


def test_c_analyze_changes_estimates_not_the_shape_and_no_finding(scenario: Scenario) -> None:
    def estimated_rows(envelope: Envelope) -> float:
        plan = json.loads(envelope.plan_text)[0]["Plan"]
        return float(plan["Plans"][0]["Plan Rows"])  # the Seq Scan under the Aggregate

    before, after = scenario.before["c_analyze"][0], scenario.after["c_analyze"][0]
    assert estimated_rows(after) > 3 * estimated_rows(before)  # 2,000 → ~8,000 rows estimated
    assert fingerprint(before.plan_text) == fingerprint(after.plan_text)
    assert len(plans_of(scenario.settings.pg_dsn, scenario.cluster, scenario.hashes["c_analyze"])) == 1
    assert scenario.findings_of("c_analyze") == []


def test_d_added_index_is_an_improvement_not_a_regression(scenario: Scenario) -> None:
    assert scenario.findings_of("d_add_index") == ["plan_flip_improvement"]
    finding = next(f for f in scenario.result.findings if f.query_hash == scenario.hashes["d_add_index"])
    assert finding.severity == "info" and finding.evidence["ratio_p50"] < 1 / 1.5
    assert "orders_status_amount_idx" in finding.diff_markdown
    assert scenario.hashes["d_add_index"] not in open_regression_candidates(scenario.settings.pg_dsn)


def test_e_timing_noise_on_an_unchanged_plan_is_no_finding(scenario: Scenario) -> None:
    times = sorted(e.total_time_ms for e in scenario.after["e_noise"])
    assert times[RUNS // 2] > 5  # a plan slow enough that only the ratio and the test can rule it out
    assert times[-1] != times[0]  # real timing noise
    assert len(plans_of(scenario.settings.pg_dsn, scenario.cluster, scenario.hashes["e_noise"])) == 1
    assert scenario.findings_of("e_noise") == []


def run_cli(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="planpipe")
    plans_cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args, settings))


def test_lifecycle_statuses_acknowledgement_and_auto_resolution(
    scenario: Scenario, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, settings, cluster = scenario.settings.pg_dsn, scenario.settings, scenario.cluster
    q_a, q_d = scenario.hashes["a_drop_index"], scenario.hashes["d_add_index"]
    first = {f.query_hash: f for f in scenario.result.findings}

    # Re-running detection updates the same findings in place.
    again = scenario.detect()
    assert {f.query_hash: f.id for f in again.findings} == {q: f.id for q, f in first.items()}
    assert all(f.detections == 2 and f.first_detected == first[f.query_hash].first_detected for f in again.findings)
    assert again.resolved == []

    # Open regressions feed the router; improvements do not.
    assert q_a in open_regression_candidates(dsn) and q_d not in open_regression_candidates(dsn)

    # The CLI lists them and shows the history with the diff.
    assert run_cli(settings, "regressions", "--cluster", cluster, "--format", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["query_hash"], r["kind"]) for r in listed} == {(q_a, "plan_flip_regression"),
                                                              (q_d, "plan_flip_improvement")}  # fmt: skip
    assert run_cli(settings, "plans", q_a, "--cluster", cluster) == 0
    shown = capsys.readouterr().out
    assert "accepted *" in shown and "candidate" in shown and "orders_customer_idx" in shown

    # Acknowledging records who/when; the finding leaves the router's set but stays tracked.
    finding_a = first[q_a]
    acked = acknowledge_regression(dsn, finding_a.id, by="sre-on-call", note="looking")
    assert (acked.status, acked.acknowledged_by, acked.acknowledged_note) == ("acknowledged", "sre-on-call", "looking")
    assert acked.acknowledged_at is not None
    assert q_a not in open_regression_candidates(dsn)
    still = {f.id: f.status for f in scenario.detect().findings}
    assert still[finding_a.id] == "acknowledged"

    # Rejecting the new plan records who, when and why; the baseline stays.
    new_a = finding_a.new_fingerprint
    rejected = set_plan_status(dsn, cluster, q_a, new_a, "rejected", by="alice", reason="seq scan on orders")
    assert (rejected.change.old_status, rejected.change.new_status, rejected.change.changed_by) == (
        "candidate", "rejected", "alice")  # fmt: skip
    assert rejected.baseline_fingerprint == finding_a.baseline_fingerprint
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """SELECT status, status_by, status_at FROM planpipe.plan_baselines
               WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s""",
            (cluster, q_a, new_a),
        ).fetchone()
    assert row is not None and row[:2] == ("rejected", "alice")
    assert abs(row[2] - rejected.change.changed_at) < timedelta(seconds=1)
    assert abs(row[2] - datetime.now(UTC)) < timedelta(minutes=5)

    # Accepting D's faster plan (through the CLI, by prefix) makes it the baseline and closes the finding.
    new_d = first[q_d].new_fingerprint
    assert run_cli(settings, "plan", "accept", q_d, new_d[:12], "--cluster", cluster, "--by", "bob",
                   "--reason", "index helps") == 0  # fmt: skip
    assert "candidate → accepted by bob" in capsys.readouterr().out
    [history_d] = plan_history(dsn, q_d, cluster_id=cluster, now=scenario.now)
    assert history_d.baseline_fingerprint == new_d
    assert [(c.changed_by, c.new_status, c.reason) for c in history_d.status_log] == [("bob", "accepted",
                                                                                       "index helps")]  # fmt: skip
    old_d = next(p for p in history_d.plans if p.fingerprint != new_d)
    assert (old_d.status, old_d.status_by, old_d.is_baseline) == ("accepted", "planpipe:first-plan", False)
    assert old_d.diff_markdown is not None and "Seq Scan on orders" in old_d.diff_markdown
    assert sum(w.executions for w in old_d.windows) == RUNS and all(w.p50_ms for w in old_d.windows)
    [resolved_d] = [f for f in list_regressions(dsn, cluster_id=cluster, status="all") if f.query_hash == q_d]
    assert resolved_d.status == "resolved" and "bob" in (resolved_d.resolution or "")

    # Rejecting the baseline falls back to the previously accepted plan.
    fallback = set_plan_status(dsn, cluster, q_d, new_d, "rejected", by="bob", reason="changed my mind")
    assert fallback.baseline_fingerprint == old_d.fingerprint
    with pytest.raises(UnknownPlanError):
        set_plan_status(dsn, cluster, q_d, "0" * 32, "accepted", by="bob")
    with pytest.raises(ValueError):
        set_plan_status(dsn, cluster, q_d, new_d, "accepted", by=" ")

    # The query goes back to its baseline plan: the finding resolves itself.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE INDEX orders_customer_idx ON {scenario.schema}.orders (customer_id)")
    with ExplainCapturer(dsn, cluster_id=cluster) as capturer:
        back = capture(capturer, statements(scenario.schema)["a_drop_index"][0], RUNS)
    assert {fingerprint(e.plan_text) for e in back} == {finding_a.baseline_fingerprint}
    later = scenario.now + timedelta(hours=30)
    ingest(settings, at(back, scenario.now + timedelta(hours=20)))
    final = scenario.detect(later)
    assert final.findings == []
    [resolved_a] = [r for r in final.resolved if r.query_hash == q_a]
    assert resolved_a.id == finding_a.id and resolved_a.resolved_by == "planpipe:detect"
    assert "did not run" in (resolved_a.resolution or "")
    assert q_a not in open_regression_candidates(dsn)
    assert list_regressions(dsn, cluster_id=cluster, status="unresolved") == []


def test_cli_detect_and_ack(module_settings: Settings, scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    # Runs after the lifecycle, at wall-clock time: (a)'s seq-scan executions are in the
    # window again and its earlier finding was resolved, so detection opens a new one.
    settings, cluster, q_a = module_settings, scenario.cluster, scenario.hashes["a_drop_index"]
    assert run_cli(settings, "detect", "--cluster", cluster, "--format", "json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["clusters"] == [cluster] and out["stats"]["tested"] >= 1
    reopened = [f for f in out["findings"] if f["query_hash"] == q_a]
    assert [(f["kind"], f["detections"], f["status"]) for f in reopened] == [("plan_flip_regression", 1, "open")]
    assert run_cli(settings, "regression", "ack", str(reopened[0]["id"]), "--by", "carol") == 0
    assert "acknowledged by carol" in capsys.readouterr().out
    assert run_cli(settings, "regression", "ack", "999999999", "--by", "x") == 2
    assert run_cli(settings, "regressions", "--cluster", cluster, "--status", "acknowledged") == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [str(reopened[0]["id"]), "acknowledged"] in [row[:2] for row in rows]
    assert run_cli(settings, "detect", "--cluster", cluster, "--diff") == 0
    text = capsys.readouterr().out
    assert "1 plan-flip regressions" in text and "Seq Scan on orders" in text
    assert run_cli(settings, "regressions", "--since-hours", "1", "--cluster", "no-such-cluster") == 0
    assert "no open findings" in capsys.readouterr().out
