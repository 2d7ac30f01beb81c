"""One detection run end to end: the accepted baselines and open findings from PostgreSQL,
the statistical core over the Parquet dataset (`detection.find_regressions`), then — under
the findings lock — settled baselines persisted, findings upserted with their plan diff and
remediation, and the unresolved findings that evidence closes resolved (`lifecycle`)."""

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import polars as pl
import psycopg
from psycopg.types.json import Jsonb

from planpipe.plans.detection import DetectionStats, find_regressions
from planpipe.plans.diff import diff_plans
from planpipe.plans.findings import (
    AUTO_ACCEPTED_BY,
    CLUSTER_WIDE,
    COLUMNS,
    FINDINGS_LOCK,
    SETTLER,
    Regression,
    baselines_with_origin,
    current_baselines,
    record_of,
)
from planpipe.plans.lifecycle import resolve, unresolved
from planpipe.plans.normalize import PlanParseError
from planpipe.plans.remediation import captured_index_definitions, remediation_for
from planpipe.plans.scan import scan_observations
from planpipe.plans.settling import SettledBaseline
from planpipe.plans.verdicts import (
    FINDING_KINDS,
    REGRESSION_KINDS,
    SEVERITY_ORDER,
    ClusterSlowdown,
    DetectionConfig,
    Verdict,
    speed,
)

__all__ = ["DetectionResult", "detect_regressions"]

log = logging.getLogger(__name__)


def _diff_markdown(verdict: Verdict, texts: Mapping[str, str]) -> str:
    if verdict.kind == "same_plan_slower":
        return f"Same plan `{verdict.new_fingerprint[:12]}` as the baseline: no plan change. {verdict.reason}."
    before, after = texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint)
    if before is None or after is None:
        return "Plan diff unavailable: plan text missing from plan_catalog."
    try:
        return diff_plans(before, after).to_markdown()
    except PlanParseError as error:
        return f"Plan diff unavailable: {error}"


@dataclass(frozen=True)
class DetectionResult:
    """One detection run: its findings as stored, what it resolved, and its statistics."""

    now: datetime
    config: DetectionConfig
    findings: list[Regression]
    resolved: list[Regression]
    stats: DetectionStats
    elapsed_s: float
    settled: list[SettledBaseline] = field(default_factory=list)

    @property
    def regressions(self) -> list[Regression]:
        return [f for f in self.findings if f.kind in REGRESSION_KINDS]

    @property
    def improvements(self) -> list[Regression]:
        return [f for f in self.findings if f.kind == "plan_flip_improvement"]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(FINDING_KINDS, 0)
        for finding in self.findings:
            counts[finding.kind] += 1
        return counts

    def to_markdown(self) -> str:
        s = self.stats
        split = f"window {self.config.window_hours:g} h" if self.config.window_hours is not None else "change points"
        test = "Benjamini-Hochberg" if self.config.fdr else "per-comparison alpha"
        lines = [
            f"**{len(self.regressions)} regression(s), {len(self.improvements)} improvement(s), "
            f"{self.counts()['cluster_slowdown']} cluster slowdown(s), {len(self.resolved)} resolved** — {split}, "
            f"{test}, lookback {self.config.lookback_hours:g} h ending {self.now.isoformat(timespec='seconds')}",
            "",
            f"{s.observations:,} observations, {s.plans:,} plans, {s.comparisons:,} comparisons: "
            f"{s.too_few_executions:,} with too few executions, {s.screened_out:,} screened out, "
            f"{s.tested:,} tested exactly ({s.noise:,} noise, {s.environment_slowdowns:,} environment); "
            f"{s.multi_plan_queries:,} multi-plan queries, {s.settled_baselines:,} baselines settled, "
            f"{s.queries_without_baseline:,} queries without an accepted plan.",
        ]
        if self.findings:
            lines += [
                "",
                "| id | severity | kind | status | cluster | query | started | p50 base → new ms | change | p-value |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            for f in self.findings:
                base, new = f.evidence.get("baseline", {}), f.evidence.get("new", {})
                started = f.started_at.isoformat(timespec="seconds") if f.started_at else ""
                p = f.evidence.get("p_value")
                lines.append(
                    f"| {f.id} | {f.severity} | {f.kind} | {f.status} | `{f.cluster_id}` | `{f.query_hash}` | "
                    f"{started} | {base.get('p50_ms', '')} → {new.get('p50_ms', '')} | {f.speed} | "
                    f"{'' if p is None else f'{p:.3g}'} |"
                )
            lines += ["", *[f"{f.to_markdown()}\n" for f in self.findings]]
        if self.resolved:
            lines += ["", "Resolved:"]
            lines += [f"- #{r.id} {r.kind} `{r.query_hash}`: {r.resolution}" for r in self.resolved]
        return "\n".join(lines)

    def metadata(self) -> dict[str, str | int | float]:
        """Plain values for Dagster metadata (wrap `report` as markdown)."""
        return {
            **{f"findings_{kind}": count for kind, count in self.counts().items()},
            "auto_resolved": len(self.resolved),
            "observations": self.stats.observations,
            "comparisons": self.stats.comparisons,
            "tested": self.stats.tested,
            "environment_slowdowns": self.stats.environment_slowdowns,
            "settled_baselines": self.stats.settled_baselines,
            "split": "change_point" if self.config.window_hours is None else f"window {self.config.window_hours:g} h",
            "elapsed_s": round(self.elapsed_s, 3),
            "report": self.to_markdown(),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "config": self.config.as_dict(),
            "findings": [f.as_dict() for f in self.findings],
            "resolved": [r.as_dict() for r in self.resolved],
            "settled": [s.__dict__ for s in self.settled],
            "stats": self.stats.as_dict(),
            "elapsed_s": round(self.elapsed_s, 3),
        }


def _watch(rows: Sequence[tuple[Any, ...]]) -> list[tuple[str, str, str]]:
    keys: list[tuple[str, str, str]] = []
    for _, cluster, query, base_fp, new_fp, kind, evidence in rows:
        if kind == "cluster_slowdown":
            keys += [(cluster, q["query_hash"], q["fingerprint"]) for q in evidence.get("queries", [])]
        else:
            keys += [(cluster, query, base_fp), (cluster, query, new_fp)]
    return keys


def detect_regressions(
    dsn: str,
    parquet_root: Path,
    *,
    config: DetectionConfig | None = None,
    now: datetime | None = None,
) -> DetectionResult:
    """Recompute findings over the dataset, upsert them into plan_regressions, settle
    automatic baselines and resolve the unresolved findings (in scope) that evidence closes."""
    started = time.perf_counter()
    config = config or DetectionConfig()
    moment = now or datetime.now(UTC)
    with psycopg.connect(dsn) as conn:
        origins = baselines_with_origin(conn, config.clusters)
        watched = _watch(unresolved(conn, config.clusters))
    baselines = {key: fp for key, (fp, _, _) in origins.items()}
    # Settling needs the query's first executions in sight: an automatic baseline older than the
    # lookback stays (the plan dominating the lookback may be the regression itself).
    horizon = moment - timedelta(hours=config.lookback_hours)
    auto = [key for key, (_, by, first) in origins.items() if by == AUTO_ACCEPTED_BY and first >= horizon]
    analysis = find_regressions(
        scan_observations(parquet_root), baselines, config, now=moment, auto_accepted=auto, watch=watched
    )
    found = analysis.findings
    with psycopg.connect(dsn) as conn:
        fingerprints = sorted({v.baseline_fingerprint for v in found} | {v.new_fingerprint for v in found})
        texts: dict[str, str] = dict(
            conn.execute(
                "SELECT fingerprint, sample_plan_text FROM planpipe.plan_catalog WHERE fingerprint = ANY(%s)",
                (fingerprints,),
            ).fetchall()
        )
        diffs = {id(v): _diff_markdown(v, texts) for v in found}
        remedies = {id(v): _remedy(v, texts, parquet_root) for v in found}
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (FINDINGS_LOCK,))
            settled = _persist_settled(conn, analysis.settled)
            # Re-read under the lock: a plan accepted while we computed changes the comparison.
            current = current_baselines(conn, config.clusters)
            statuses = _plan_statuses(conn, found)
            findings = [
                _upsert(
                    conn,
                    v,
                    diffs[id(v)],
                    remedies[id(v)],
                    statuses.get((v.cluster_id, v.query_hash, v.new_fingerprint)),
                )
                for v in found
                if current.get((v.cluster_id, v.query_hash)) == v.baseline_fingerprint
                or (v.evidence.comparison == "same_plan" and (v.cluster_id, v.query_hash) in current)
            ]
            findings += [_upsert_cluster(conn, c) for c in analysis.clusters]
            resolved = resolve(conn, analysis, current, {f.id for f in findings})
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind, f.cluster_id, f.query_hash))
    elapsed = time.perf_counter() - started
    log.info("detection: %d findings, %d resolved in %.1fs", len(findings), len(resolved), elapsed)
    return DetectionResult(moment, config, findings, resolved, analysis.stats, elapsed, settled)


def _remedy(verdict: Verdict, texts: Mapping[str, str], parquet_root: Path) -> dict[str, Any]:
    """Remediation from the catalog's plan texts; an index definition the catalog's sample lacks
    (sampled before capture recorded definitions) is read from the baseline plan's last captured
    text, in the one date partition of its last execution."""
    remedy = remediation_for(verdict.kind, texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint))
    if not any(index.get("definition") is None for index in remedy.missing_indexes):
        return remedy.as_dict()
    latest = _latest_plan_text(parquet_root, verdict, verdict.evidence.baseline_end)
    if latest is None:
        return remedy.as_dict()
    definitions = captured_index_definitions(latest)
    return remediation_for(
        verdict.kind, texts.get(verdict.baseline_fingerprint), texts.get(verdict.new_fingerprint), definitions
    ).as_dict()


def _latest_plan_text(parquet_root: Path, verdict: Verdict, when: datetime) -> str | None:
    files = list(parquet_root.glob(f"route=*/date={when.astimezone(UTC).date().isoformat()}/*.parquet"))
    if not files:
        return None
    try:
        rows = (
            pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore",
                            schema={"cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String,
                                    "execution_timestamp": pl.Float64, "plan_text": pl.String})
            .filter(pl.col("cluster_id") == verdict.cluster_id, pl.col("query_hash") == verdict.query_hash,
                    pl.col("fingerprint") == verdict.baseline_fingerprint)
            .sort("execution_timestamp", descending=True)
            .head(1)
            .select("plan_text")
            .collect()
        )  # fmt: skip
    except (pl.exceptions.PolarsError, OSError) as error:
        log.warning("detection: could not read the baseline plan text for its index definitions: %s", error)
        return None
    return str(rows.item()) if rows.height else None


def _persist_settled(conn: psycopg.Connection[Any], settled: Sequence[SettledBaseline]) -> list[SettledBaseline]:
    """Accept each settling period's dominant plan in place of the automatic first plan
    (recorded in plan_status_history), unless someone changed the baseline meanwhile."""
    done = []
    for s in settled:
        row = conn.execute(
            """SELECT fingerprint, status_by FROM planpipe.current_baselines
               WHERE cluster_id = %s AND query_hash = %s""",
            (s.cluster_id, s.query_hash),
        ).fetchone()
        if row is None or row[0] != s.replaced or row[1] != AUTO_ACCEPTED_BY:
            continue
        why = (
            f"dominant plan of the settling period ({s.executions} of {s.settling_executions} executions); "
            f"the first plan {s.replaced[:12]} was a minority"
        )
        for fp, status in ((s.replaced, "candidate"), (s.fingerprint, "accepted")):
            conn.execute(
                """INSERT INTO planpipe.plan_status_history
                       (cluster_id, query_hash, fingerprint, old_status, new_status, changed_by, changed_at, reason)
                   SELECT cluster_id, query_hash, fingerprint, status, %s, %s, clock_timestamp(), %s
                   FROM planpipe.plan_baselines WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s""",
                (status, SETTLER, why, s.cluster_id, s.query_hash, fp),
            )
            conn.execute(
                """UPDATE planpipe.plan_baselines SET status = %s, status_by = %s, status_at = clock_timestamp()
                   WHERE cluster_id = %s AND query_hash = %s AND fingerprint = %s""",
                (status, SETTLER, s.cluster_id, s.query_hash, fp),
            )
        done.append(s)
    return done


def _plan_statuses(conn: psycopg.Connection[Any], verdicts: Sequence[Verdict]) -> dict[tuple[str, str, str], str]:
    if not verdicts:
        return {}
    rows = conn.execute(
        """SELECT b.cluster_id, b.query_hash, b.fingerprint, b.status
           FROM planpipe.plan_baselines b
           JOIN unnest(%s::text[], %s::text[], %s::text[]) AS k(c, q, f)
             ON (b.cluster_id, b.query_hash, b.fingerprint) = (k.c, k.q, k.f)""",
        (
            [v.cluster_id for v in verdicts],
            [v.query_hash for v in verdicts],
            [v.new_fingerprint for v in verdicts],
        ),
    ).fetchall()
    return {(str(c), str(q), str(f)): str(s) for c, q, f, s in rows}


_UPSERT: Final = f"""INSERT INTO planpipe.plan_regressions AS r
        (cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, severity, evidence, diff_markdown,
         status, started_at, remediation)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (cluster_id, query_hash, new_fingerprint, kind) WHERE status <> 'resolved'
    DO UPDATE SET baseline_fingerprint = excluded.baseline_fingerprint, severity = excluded.severity,
                  evidence = excluded.evidence, diff_markdown = excluded.diff_markdown,
                  started_at = excluded.started_at, remediation = excluded.remediation,
                  last_detected = now(), detections = r.detections + 1
    RETURNING {COLUMNS}"""


def _upsert(
    conn: psycopg.Connection[Any], verdict: Verdict, diff: str, remediation: dict[str, Any], new_status: str | None
) -> Regression:
    evidence = verdict.evidence.as_dict() | {"new_plan_status": new_status, "reason": verdict.reason}
    status = "improvement" if verdict.kind == "plan_flip_improvement" else "open"
    row = conn.execute(
        _UPSERT,
        (
            verdict.cluster_id,
            verdict.query_hash,
            verdict.baseline_fingerprint,
            verdict.new_fingerprint,
            verdict.kind,
            verdict.severity,
            Jsonb(evidence),
            diff,
            status,
            verdict.evidence.window_start,
            Jsonb(remediation),
        ),
    ).fetchone()
    assert row is not None
    return record_of(row)


def _upsert_cluster(conn: psycopg.Connection[Any], slowdown: ClusterSlowdown) -> Regression:
    queries = ", ".join(f"`{v.query_hash}`" for v in slowdown.affected)
    text = (
        f"{len(slowdown.affected)} queries of `{slowdown.cluster_id}` slowed together ({speed(slowdown.ratio_p50)}, "
        f"median) with unchanged work: {queries}. Look at the machine (CPU, I/O, memory pressure), not the plans."
    )
    remediation = {"notes": ["check the host's load (CPU, I/O, memory) and neighbours around the start time"]}
    row = conn.execute(
        _UPSERT,
        (
            slowdown.cluster_id,
            CLUSTER_WIDE,
            CLUSTER_WIDE,
            CLUSTER_WIDE,
            "cluster_slowdown",
            "medium",
            Jsonb(slowdown.as_dict()),
            text,
            "open",
            slowdown.started,
            Jsonb(remediation),
        ),
    ).fetchone()
    assert row is not None
    return record_of(row)
