"""The lifecycle of findings: resolved only on evidence.

A finding is updated in place while it is unresolved. It resolves only when the query is
back on its baseline plan, or its latency is back, for `resolve_executions` executions (or
when a person accepts the new plan, see `history.set_plan_status`). Neither a detection
run's cluster filter nor a window ever resolves a finding: a plan that did not run is no
evidence. Improvements are closed as `improvement` when detected: they are worth knowing,
not acting on.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import psycopg

from planpipe.plans.detection import Analysis
from planpipe.plans.findings import COLUMNS, DETECTOR, Regression, record_of
from planpipe.plans.stats import ratio

__all__ = ["resolve", "unresolved"]


def unresolved(conn: psycopg.Connection[Any], clusters: Sequence[str]) -> list[tuple[Any, ...]]:
    return conn.execute(
        """SELECT id, cluster_id, query_hash, baseline_fingerprint, new_fingerprint, kind, evidence
           FROM planpipe.plan_regressions
           WHERE status IN ('open', 'acknowledged')
             AND (cardinality(%s::text[]) = 0 OR cluster_id = ANY(%s::text[]))
           ORDER BY id""",
        (list(clusters), list(clusters)),
    ).fetchall()


def _back_on_baseline(analysis: Analysis, cluster: str, query: str, base_fp: str, new_fp: str) -> str | None:
    n = analysis.config.resolve_executions
    base = analysis.recent.get((cluster, query, base_fp))
    new = analysis.recent.get((cluster, query, new_fp))
    if base is None:
        return None
    last_new = float(new.timestamps.max()) if new is not None and len(new.timestamps) else -np.inf
    since = int((base.timestamps > last_new).sum())
    if since >= n:
        return f"back on the baseline plan {base_fp[:12]} for {since} executions"
    return None


def _latency_back(analysis: Analysis, cluster: str, query: str, fp: str, baseline_p50: float | None) -> str | None:
    config = analysis.config
    recent = analysis.recent.get((cluster, query, fp))
    if recent is None or baseline_p50 is None or len(recent.total_ms) < config.resolve_executions:
        return None
    p50 = float(np.median(recent.total_ms[-config.resolve_executions :]))
    if ratio(p50, baseline_p50) < config.min_ratio or p50 - baseline_p50 < config.min_abs_ms:
        return (
            f"latency back: p50 {p50:.3f} ms over the last {config.resolve_executions} executions "
            f"(baseline {baseline_p50:.3f} ms)"
        )
    return None


def resolve(
    conn: psycopg.Connection[Any], analysis: Analysis, current: Mapping[tuple[str, str], str], detected: set[int]
) -> list[Regression]:
    resolved: list[Regression] = []
    for finding_id, cluster, query, base_fp, new_fp, kind, evidence in unresolved(conn, analysis.config.clusters):
        if finding_id in detected:
            continue
        reason: str | None = None
        if kind == "cluster_slowdown":
            queries = evidence.get("queries", [])
            backs = [
                _latency_back(analysis, cluster, q["query_hash"], q["fingerprint"], q.get("baseline_p50_ms"))
                for q in queries
            ]
            if queries and all(backs):
                reason = f"every affected query is back ({len(queries)})"
        elif kind == "same_plan_slower":
            baseline_p50 = (evidence.get("baseline") or {}).get("p50_ms")
            reason = _latency_back(analysis, cluster, query, new_fp, baseline_p50)
        else:
            accepted = current.get((cluster, query))
            if accepted is not None and accepted != base_fp:
                reason = f"the baseline changed to plan {accepted[:12]}"
            else:
                reason = _back_on_baseline(analysis, cluster, query, base_fp, new_fp)
        if reason is None:
            continue  # no evidence either way: a plan that did not run proves nothing
        row = conn.execute(
            f"""UPDATE planpipe.plan_regressions
                SET status = 'resolved', resolved_at = now(), resolved_by = %s, resolution = %s
                WHERE id = %s RETURNING {COLUMNS}""",
            (DETECTOR, reason, finding_id),
        ).fetchone()
        assert row is not None
        resolved.append(record_of(row))
    return resolved
