"""Plan intelligence end to end: real PostgreSQL plans, envelopes through the real router
and Kafka, the ingest engine, then detection, history and statuses.

What is real and what is chosen. Plan shapes come from a real workload: every plan is
captured live with EXPLAIN ANALYZE, and the scenarios (a dropped index, other constants,
ANALYZE, an added index, an unchanged plan) change them for real. The latencies that
detection judges are chosen: each period's envelopes carry the captured plan text with
`total_time_ms` values drawn from a seeded distribution, then go through the router,
Kafka, ingest and Parquet like any other envelope. Verdicts then depend on the
thresholds and the statistics only, never on how fast this machine runs a seq scan:
with measured timings, a 300,000-row seq scan took 8-17 ms here against the 10 ms
`min_abs_ms` threshold, so a faster machine (or a lucky one) turned the dropped index
into noise and a busier one into a finding.

One workload is built and ingested once for the module (a baseline period three days
ago, then the changes of the acceptance scenarios in the last six hours); each test
checks one scenario against that state. The lifecycle test runs last and mutates it.
"""

import argparse
import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import msgspec
import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from planpipe.capture.explain import ExplainCapturer
from planpipe.capture.sqltext import split_statements
from planpipe.contract import Envelope, encode_envelope
from planpipe.ingest.engine import IngestEngine
from planpipe.plans import cli as plans_cli
from planpipe.plans.detection import Analysis, find_regressions
from planpipe.plans.detector import DetectionResult, detect_regressions
from planpipe.plans.findings import (
    acknowledge_regression,
    current_baselines,
    list_regressions,
    open_regression_candidates,
)
from planpipe.plans.fingerprint import fingerprint
from planpipe.plans.history import UnknownPlanError, plan_history, set_plan_status
from planpipe.plans.scan import scan_observations
from planpipe.plans.stats import mann_whitney_u
from planpipe.plans.verdicts import DetectionConfig
from planpipe.routing.publish import PlanPublisher
from planpipe.settings import Settings
from planpipe_tests.conftest import isolated_settings

RUNS = 25  # executions per query and period (detection needs 20 on each side)
CAPTURES = 3  # live EXPLAIN ANALYZE executions per statement and period: the plan shapes
ORDERS = 300_000  # a seq scan on orders stays a seq scan, the point lookups stay index scans
NAMES = ("a_drop_index", "b_constants", "c_analyze", "d_add_index", "e_noise")


def lognormal(seed: int, median_ms: float, sigma: float = 0.2) -> list[float]:
    """RUNS chosen latencies around `median_ms`, rounded like EXPLAIN's "Execution Time"."""
    values = np.random.default_rng(seed).lognormal(np.log(median_ms), sigma, RUNS)
    return [round(float(v), 3) for v in values]


def two_modes(seed: int, fast: int) -> list[float]:
    """RUNS latencies from one unchanged distribution with two modes (cache hits near 12 ms,
    misses near 40 ms), `fast` of them hits: 13 puts the median in the fast mode, 12 in
    the slow one, while the distribution stays the same."""
    rng = np.random.default_rng(seed)
    values = np.concatenate([rng.lognormal(np.log(12), 0.1, fast), rng.lognormal(np.log(40), 0.1, RUNS - fast)])
    rng.shuffle(values)
    return [round(float(v), 3) for v in values]


# Per scenario: the chosen latencies (ms) of the baseline period and of the recent one.
TIMINGS: dict[str, tuple[list[float], list[float]]] = {
    # (a) index scan → seq scan: 800× slower
    "a_drop_index": (lognormal(11, 0.05), lognormal(12, 40.0, 0.15)),
    # (b), (c): the same plan at the same speed
    "b_constants": (lognormal(21, 0.04), lognormal(22, 0.04)),
    "c_analyze": (lognormal(31, 2.0), lognormal(32, 2.0)),
    # (d) seq scan → index scan: 80× faster
    "d_add_index": (lognormal(41, 40.0, 0.15), lognormal(42, 0.5)),
    # (e) the medians jump from one mode to the other (ratio and difference both past the
    # thresholds), the distribution does not: only the significance test rules it out.
    "e_noise": (two_modes(51, fast=13), two_modes(52, fast=12)),
}


@dataclass
class Scenario:
    settings: Settings
    capture_dsn: str  # a read-only role, as capture agents connect
    cluster: str
    schema: str
    now: datetime
    hashes: dict[str, str]  # scenario name → query_hash
    captured_before: dict[str, list[Envelope]]  # live captures: the plan shapes
    captured_after: dict[str, list[Envelope]]
    before: dict[str, list[Envelope]]  # what was published: captured plans, chosen timings
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

    def analysis(self) -> Analysis:
        """The statistical core on the ingested dataset, noise verdicts included."""
        with psycopg.connect(self.settings.pg_dsn) as conn:
            baselines = current_baselines(conn, (self.cluster,))
        return find_regressions(scan_observations(self.settings.parquet_dir), baselines, self.config, now=self.now)

    def open_candidates(self) -> set[str]:
        """This cluster's share of the router's regression_candidate set."""
        return open_regression_candidates(self.settings.pg_dsn, cluster_id=self.cluster)

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
        # (e) an unchanged plan: only its timings vary
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


@contextmanager
def capture_role(dsn: str, name: str) -> Iterator[str]:
    """A login role with pg_read_all_data only (what capture needs); yields its DSN."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {name} LOGIN IN ROLE pg_read_all_data")
    try:
        yield make_conninfo(dsn, user=name)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP ROLE IF EXISTS {name}")


def capture(capturer: ExplainCapturer, sql: str, runs: int = CAPTURES) -> list[Envelope]:
    statement = split_statements(sql)[0]
    out = []
    for _ in range(runs):
        outcome = capturer.capture(statement)
        assert isinstance(outcome, Envelope), outcome
        out.append(outcome)
    # One plan per statement and period: a scenario changes plans, nothing else does.
    assert len({fingerprint(e.plan_text) for e in out}) == 1
    return out


def timed(captured: list[Envelope], timings: list[float], start: datetime, step_s: float = 60.0) -> list[Envelope]:
    """One envelope per chosen latency: the captured plans in turn, executed `step_s` apart from `start`."""
    return [
        msgspec.structs.replace(
            captured[i % len(captured)], total_time_ms=ms, execution_timestamp=start.timestamp() + i * step_s
        )
        for i, ms in enumerate(timings)
    ]


def publish(settings: Settings, envelopes: list[Envelope]) -> None:
    """Through the router and producer that capture agents use, in order (a query's
    envelopes share a key, hence a partition)."""
    publisher = PlanPublisher(settings)
    try:
        for envelope in envelopes:
            publisher.submit_raw(encode_envelope(envelope))
    finally:
        report = publisher.close(60)
    assert report.submitted == len(envelopes) and report.rejected == {} and report.sampled_out == 0
    assert sum(report.published.values()) == len(envelopes) and report.undeliverable == 0


def ingest(settings: Settings, expected: int) -> None:
    """Ingest everything on the topic; `expected` envelopes are new."""
    engine = IngestEngine(settings, max_messages=500)
    try:
        summary = engine.run(until_caught_up=True, max_seconds=120)
    finally:
        engine.close()
    assert summary.caught_up and summary.valid == expected and summary.dlq == 0


@pytest.fixture(scope="module")
def module_settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return replace(isolated_settings(stack_settings, tmp_path_factory.mktemp("plans")), sample_rate_pct=100)


@pytest.fixture(scope="module")
def scenario(module_settings: Settings) -> Iterator[Scenario]:
    settings = module_settings
    dsn = settings.pg_dsn
    suffix = settings.consumer_group.rsplit("-", 1)[-1]
    schema, cluster = f"pp_regress_{suffix}", f"regress-{suffix}"
    now = datetime.now(UTC).replace(microsecond=0)
    sql = statements(schema)
    with ExitStack() as cleanup:
        cleanup.callback(drop_schema, dsn, schema)
        create_schema(dsn, schema)
        capture_dsn = cleanup.enter_context(capture_role(dsn, f"pp_capture_{suffix}"))
        with ExplainCapturer(capture_dsn, cluster_id=cluster) as capturer:
            captured_before = {name: capture(capturer, sql[name][0]) for name in NAMES}
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"DROP INDEX {schema}.orders_customer_idx")  # (a)
                conn.execute(f"UPDATE {schema}.events SET kind = 3 WHERE kind IN (4, 5, 6)")  # (c)
                conn.execute(f"ANALYZE {schema}.events")
                conn.execute(f"CREATE INDEX orders_status_amount_idx ON {schema}.orders (status, amount)")  # (d)
            captured_after = {name: capture(capturer, sql[name][-1]) for name in NAMES}

        # Baseline period three days ago, the changed one in the last six hours. Published
        # in that order by one publisher (a query's envelopes share a key, which the router
        # derives from the query and its priority, hence a partition), so the first plan of
        # each query is the baseline period's; one ingest run for both keeps the test short.
        baseline_start, recent_start = now - timedelta(days=3), now - timedelta(hours=6)
        before = {name: timed(captured_before[name], TIMINGS[name][0], baseline_start) for name in NAMES}
        after = {name: timed(captured_after[name], TIMINGS[name][1], recent_start) for name in NAMES}
        publish(settings, [e for name in NAMES for e in before[name]] + [e for name in NAMES for e in after[name]])
        ingest(settings, expected=2 * len(NAMES) * RUNS)
        hashes = {name: envelopes[0].query_hash for name, envelopes in before.items()}
        config = DetectionConfig(clusters=(cluster,))
        # As of the end of the baseline period: the changes are in its future.
        initial = detect_regressions(dsn, settings.parquet_dir, config=config, now=baseline_start + timedelta(hours=1))
        result = detect_regressions(dsn, settings.parquet_dir, config=config, now=now)
        yield Scenario(settings, capture_dsn, cluster, schema, now, hashes, captured_before, captured_after,
                       before, after, initial, result)  # fmt: skip


def drop_schema(dsn: str, schema: str) -> None:
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


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]  # RUNS is odd


def test_chosen_timings_pass_or_miss_the_thresholds_by_a_wide_margin() -> None:
    """The data behind each verdict, checked on its own: no scenario sits near a threshold."""
    config = DetectionConfig()

    def ratio_and_delta(name: str) -> tuple[float, float]:
        before, after = TIMINGS[name]
        return median(after) / median(before), median(after) - median(before)

    ratio, delta = ratio_and_delta("a_drop_index")
    assert ratio > 100 * config.min_ratio and delta > 3 * config.min_abs_ms
    ratio, delta = ratio_and_delta("d_add_index")
    assert 1 / ratio > 10 * config.min_ratio and -delta > 3 * config.min_abs_ms
    for name in ("b_constants", "c_analyze"):
        ratio, delta = ratio_and_delta(name)
        assert ratio < config.min_ratio and abs(delta) < config.min_abs_ms / 4
    ratio, delta = ratio_and_delta("e_noise")
    assert ratio > 2 and delta > 1.5 * config.min_abs_ms
    assert mann_whitney_u(*TIMINGS["e_noise"]).p_value > 20 * config.alpha
    assert mann_whitney_u(*TIMINGS["a_drop_index"]).p_value < config.alpha / 1000


def test_baseline_period_alone_has_no_findings(scenario: Scenario) -> None:
    assert scenario.initial.findings == []
    stats = scenario.initial.stats
    assert stats.observations == RUNS * len(NAMES)
    # Every plan ran only in the window: no history to compare against yet.
    assert (stats.comparisons, stats.too_few_executions, stats.tested) == (len(NAMES), len(NAMES), 0)
    assert len(set(scenario.hashes.values())) == len(NAMES)


def test_every_comparison_ends_as_its_scenario_says(scenario: Scenario) -> None:
    stats = scenario.result.stats
    assert stats.observations == 2 * RUNS * len(NAMES) and stats.plans == len(NAMES) + 2
    assert stats.queries == len(NAMES) and stats.queries_without_baseline == 0
    # Two plan flips (a, d) and five plan series; the flips are tested exactly, no series has a change.
    assert (stats.comparisons, stats.tested, stats.multi_plan_queries) == (7, 2, 0)
    assert {(f.query_hash, f.kind) for f in scenario.result.findings} == {
        (scenario.hashes["a_drop_index"], "plan_flip_regression"),
        (scenario.hashes["d_add_index"], "plan_flip_improvement"),
    }


def test_a_dropped_index_flags_exactly_that_query(scenario: Scenario) -> None:
    regressions = [f for f in scenario.result.findings if f.kind in ("plan_flip_regression", "same_plan_slower")]
    assert [(f.query_hash, f.kind) for f in regressions] == [(scenario.hashes["a_drop_index"], "plan_flip_regression")]
    finding = regressions[0]
    base_fp = fingerprint(scenario.captured_before["a_drop_index"][0].plan_text)
    new_fp = fingerprint(scenario.captured_after["a_drop_index"][0].plan_text)
    assert base_fp != new_fp
    assert (finding.baseline_fingerprint, finding.new_fingerprint) == (base_fp, new_fp)
    assert "orders_customer_idx" in finding.diff_markdown
    assert "Seq Scan on orders" in finding.diff_markdown
    metadata = scenario.result.metadata()
    assert (metadata["findings_plan_flip_regression"], metadata["findings_same_plan_slower"]) == (1, 0)
    assert "orders_customer_idx" in str(metadata["report"])
    # The evidence is computed from exactly the latencies published, after Kafka, ingest and Parquet.
    evidence = finding.evidence
    chosen_before, chosen_after = TIMINGS["a_drop_index"]
    assert evidence["new"]["executions"] == evidence["baseline"]["executions"] == RUNS
    assert evidence["baseline"]["p50_ms"] == pytest.approx(median(chosen_before), abs=1e-4)
    assert evidence["new"]["p50_ms"] == pytest.approx(median(chosen_after), abs=1e-4)
    expected = mann_whitney_u(chosen_before, chosen_after)
    assert (evidence["u"], evidence["p_value"]) == (expected.u, pytest.approx(expected.p_value, rel=1e-9))
    assert evidence["ratio_p50"] >= 1.5 and evidence["delta_p50_ms"] >= 10 and evidence["p_value"] < 0.01
    assert evidence["new_plan_status"] == "candidate"
    # When it started: the new plan's first execution, as published.
    assert finding.started_at == datetime.fromtimestamp(scenario.after["a_drop_index"][0].execution_timestamp, UTC)
    # Work on both sides, read from the real plans: the seq scan reads the whole table.
    assert evidence["new"]["work"]["blocks"] > 50 * evidence["baseline"]["work"]["blocks"]
    # What to do: the index the baseline used, and a hint that forces the baseline plan, validated.
    remedy = finding.remediation
    assert [i["name"] for i in remedy["missing_indexes"]] == ["orders_customer_idx"]
    # Its definition was read from the target's catalog at capture time, while it existed.
    assert remedy["missing_indexes"][0]["definition"].startswith("CREATE INDEX orders_customer_idx ON ")
    assert remedy["hint"]["validated"] and "orders_customer_idx" in remedy["hint"]["text"]
    assert finding.severity == "critical" and finding.status == "open"  # p50 ratio ≥ 5
    assert plans_of(scenario.settings.pg_dsn, scenario.cluster, finding.query_hash) == [
        (base_fp, "accepted"),
        (new_fp, "candidate"),
    ]


def test_b_other_constants_give_no_new_fingerprint_and_no_finding(scenario: Scenario) -> None:
    before, after = scenario.captured_before["b_constants"], scenario.captured_after["b_constants"]
    assert "= 42" in (before[0].query_text or "") and "= 277777" in (after[0].query_text or "")
    assert {e.query_hash for e in before + after} == {scenario.hashes["b_constants"]}
    assert {fingerprint(e.plan_text) for e in before + after} == {fingerprint(before[0].plan_text)}
    assert len(plans_of(scenario.settings.pg_dsn, scenario.cluster, scenario.hashes["b_constants"])) == 1
    assert scenario.findings_of("b_constants") == []


def test_c_analyze_changes_estimates_not_the_shape_and_no_finding(scenario: Scenario) -> None:
    def estimated_rows(envelope: Envelope) -> float:
        plan = json.loads(envelope.plan_text)[0]["Plan"]
        return float(plan["Plans"][0]["Plan Rows"])  # the Seq Scan under the Aggregate

    before, after = scenario.captured_before["c_analyze"][0], scenario.captured_after["c_analyze"][0]
    assert estimated_rows(after) > 3 * estimated_rows(before)  # 2,000 → ~8,000 rows estimated
    assert fingerprint(before.plan_text) == fingerprint(after.plan_text)
    assert len(plans_of(scenario.settings.pg_dsn, scenario.cluster, scenario.hashes["c_analyze"])) == 1
    assert scenario.findings_of("c_analyze") == []


def test_d_added_index_is_an_improvement_not_a_regression(scenario: Scenario) -> None:
    assert scenario.findings_of("d_add_index") == ["plan_flip_improvement"]
    finding = next(f for f in scenario.result.findings if f.query_hash == scenario.hashes["d_add_index"])
    assert finding.severity == "info" and finding.evidence["ratio_p50"] < 1 / 1.5
    assert finding.evidence["new"]["p50_ms"] == pytest.approx(median(TIMINGS["d_add_index"][1]), abs=1e-4)
    assert "orders_status_amount_idx" in finding.diff_markdown
    assert scenario.hashes["d_add_index"] not in scenario.open_candidates()


def test_e_timing_noise_on_an_unchanged_plan_is_no_finding(scenario: Scenario) -> None:
    q_e = scenario.hashes["e_noise"]
    assert len(plans_of(scenario.settings.pg_dsn, scenario.cluster, q_e)) == 1
    assert scenario.findings_of("e_noise") == []
    # The medians moved past both thresholds, the distribution did not: either no change point
    # splits the series, or the split fails the Mann-Whitney test.
    verdicts = [v for v in scenario.analysis().verdicts if v.query_hash == q_e]
    assert all(v.kind == "noise" and v.evidence.comparison == "same_plan" for v in verdicts)


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

    # Open regressions feed the router; improvements do not. The router's set spans all
    # clusters (a query has the same identifier everywhere), so other clusters' findings
    # for these queries are left out of what this test asserts.
    assert q_a in open_regression_candidates(dsn)
    assert scenario.open_candidates() == {q_a}

    # The CLI lists them and shows the history with the diff.
    assert run_cli(settings, "regressions", "--cluster", cluster, "--format", "json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["query_hash"], r["kind"]) for r in listed} == {(q_a, "plan_flip_regression")}
    # Improvements are closed as such when detected, with the change said the way people say it.
    assert run_cli(settings, "regressions", "--cluster", cluster, "--status", "improvement") == 0
    improvements = capsys.readouterr().out
    assert "plan_flip_improvement" in improvements and "× faster" in improvements
    assert first[q_d].status == "improvement"
    assert run_cli(settings, "plans", q_a, "--cluster", cluster) == 0
    shown = capsys.readouterr().out
    assert "accepted *" in shown and "candidate" in shown and "orders_customer_idx" in shown
    # The statement as every execution runs it (constants as $n), p50/p95 marked approximate.
    assert "customer_id = $1" in shown and "customer_id = 4242" not in shown and "≈p50 ms" in shown

    # Acknowledging records who/when; the finding leaves the router's set but stays tracked.
    finding_a = first[q_a]
    acked = acknowledge_regression(dsn, finding_a.id, by="sre-on-call", note="looking")
    assert (acked.status, acked.acknowledged_by, acked.acknowledged_note) == ("acknowledged", "sre-on-call", "looking")
    assert acked.acknowledged_at is not None
    assert scenario.open_candidates() == set()
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
    with ExplainCapturer(dsn, cluster_id=cluster, allow_superuser=True) as capturer:
        back = capture(capturer, statements(scenario.schema)["a_drop_index"][0])
    assert {fingerprint(e.plan_text) for e in back} == {finding_a.baseline_fingerprint}
    later = scenario.now + timedelta(hours=30)
    publish(settings, timed(back, lognormal(61, 0.05), scenario.now + timedelta(hours=20)))
    ingest(settings, expected=RUNS)
    final = scenario.detect(later)
    # Only D's faster plan (rejected by bob, the old plan is the baseline again) is still an improvement.
    assert [(f.query_hash, f.status) for f in final.findings] == [(q_d, "improvement")]
    [resolved_a] = [r for r in final.resolved if r.query_hash == q_a]
    assert resolved_a.id == finding_a.id and resolved_a.resolved_by == "planpipe:detect"
    assert "back on the baseline plan" in (resolved_a.resolution or "")
    assert scenario.open_candidates() == set()
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
    assert scenario.open_candidates() == {q_a} and q_a in open_regression_candidates(settings.pg_dsn)
    assert open_regression_candidates(settings.pg_dsn, cluster_id="no-such-cluster") == set()
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
