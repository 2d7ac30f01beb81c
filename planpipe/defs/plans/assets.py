"""Plan intelligence in the code location: the plan_regressions asset and the plan-status job."""

from typing import Literal, cast

import dagster as dg

from planpipe.defs.ingest.assets import BASELINES, OBSERVATIONS, STORE_GROUP
from planpipe.defs.resources import PlanpipeResource
from planpipe.plans.detector import detect_regressions
from planpipe.plans.history import set_plan_status
from planpipe.plans.verdicts import DetectionConfig

# Ingest runs are long-lived, so their assets are in progress most of the time and eager() (which
# waits for upstream runs to finish) would never fire. Detect again whenever new observations were
# committed since the last detection, at most once a minute.
_ANY_KEY = dg.AutomationCondition[dg.AssetKey | dg.AssetCheckKey]
_MINUTE_TICK = cast(_ANY_KEY, dg.AutomationCondition.cron_tick_passed("* * * * *"))  # Dagster's stubs are narrower
REDETECT = (
    _MINUTE_TICK.since_last_handled()
    & dg.AutomationCondition.any_deps_updated().since_last_handled()
    & ~dg.AutomationCondition.in_progress()
).with_label("new observations since the last detection, at most once a minute")


@dg.asset(
    deps=[BASELINES, OBSERVATIONS],
    group_name=STORE_GROUP,
    kinds={"postgres", "polars"},
    automation_condition=REDETECT,
    description=(
        "Plan flips that regressed or improved, same-plan slowdowns found at their change point, and "
        "cluster-wide slowdowns (slower with unchanged work), judged on raw latencies (Mann-Whitney U, "
        "Benjamini-Hochberg) with work evidence, a node-level plan diff and what to do (missing index, "
        "statistics, a validated pg_hint_plan hint). Findings resolve only on evidence."
    ),
)
def plan_regressions(context: dg.AssetExecutionContext, planpipe: PlanpipeResource) -> dg.MaterializeResult[None]:
    settings = planpipe.settings()
    config = DetectionConfig(
        settling_executions=settings.detect_settling_executions, resolve_executions=settings.detect_resolve_executions
    )
    result = detect_regressions(settings.pg_dsn, settings.parquet_dir, config=config)
    metadata: dict[str, dg.MetadataValue] = {}
    for key, value in result.metadata().items():
        if key == "report":
            metadata[key] = dg.MetadataValue.md(str(value))
        elif isinstance(value, int):
            metadata[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            metadata[key] = dg.MetadataValue.float(value)
        else:
            metadata[key] = dg.MetadataValue.text(str(value))
    open_findings = [f for f in result.findings if f.status == "open"]
    metadata["open_findings"] = dg.MetadataValue.int(len(open_findings))
    if result.findings:
        metadata["findings"] = dg.MetadataValue.table(
            records=[
                dg.TableRecord({
                    "id": int(f.id), "kind": f.kind, "severity": f.severity, "status": f.status,
                    "cluster": f.cluster_id, "query_hash": f.query_hash,
                    "baseline_plan": f.baseline_fingerprint[:12], "new_plan": f.new_fingerprint[:12],
                    "ratio_p50": float(f.ratio_p50) if f.ratio_p50 is not None else 0.0,
                    "change": f.speed,
                    "started": f.started_at.isoformat(timespec="seconds") if f.started_at else "",
                    "what_to_do": " · ".join(f.remediation_lines()),
                })
                for f in result.findings[:50]
            ],
        )  # fmt: skip
        top = open_findings[0] if open_findings else result.findings[0]
        metadata["top_finding_diff"] = dg.MetadataValue.md(top.to_markdown())
    # Plottable series (Dagster plots a numeric metadata key across materializations): per finding,
    # the p50/p95 of the baseline plan and of the new plan, keyed by query and plan fingerprint.
    for finding in result.findings[:20]:
        for side, fingerprint in (("baseline", finding.baseline_fingerprint), ("new", finding.new_fingerprint)):
            stats = finding.evidence.get(side, {})
            if not isinstance(stats, dict):
                continue
            for quantile in ("p50_ms", "p95_ms"):
                measured = stats.get(quantile)
                if isinstance(measured, int | float):
                    label = (
                        f"{quantile} {finding.cluster_id}/{finding.query_hash[:16]} plan {fingerprint[:12]} ({side})"
                    )
                    metadata[label] = dg.MetadataValue.float(float(measured))
    context.log.info(f"{len(result.findings)} findings, {len(result.resolved)} auto-resolved")
    return dg.MaterializeResult(metadata=metadata)


class PlanStatusConfig(dg.Config):
    cluster_id: str
    query_hash: str
    fingerprint: str
    status: Literal["accepted", "rejected"]
    by: str
    reason: str | None = None


@dg.op(description="Accept or reject one plan of a query (SQL Plan Management style); records who and when.")
def set_plan_status_op(context: dg.OpExecutionContext, config: PlanStatusConfig, planpipe: PlanpipeResource) -> None:
    update = set_plan_status(
        planpipe.settings().pg_dsn, config.cluster_id, config.query_hash, config.fingerprint, config.status,
        by=config.by, reason=config.reason,
    )  # fmt: skip
    context.log.info(f"plan status updated: {update}")


@dg.job(description="Accept or reject a plan: run with config naming the query, the plan and who decides.")
def plan_status_job() -> None:
    set_plan_status_op()


regressions_automation = dg.AutomationConditionSensorDefinition(
    "plan_regressions_automation",
    target=dg.AssetSelection.assets(plan_regressions),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
