"""Plan intelligence in the code location: the plan_regressions asset and the plan-status job."""

from typing import Literal

import dagster as dg

from planpipe.defs.ingest.assets import BASELINES, OBSERVATIONS, STORE_GROUP
from planpipe.defs.resources import PlanpipeResource
from planpipe.plans.history import set_plan_status
from planpipe.plans.regressions import DetectionConfig, detect_regressions


@dg.asset(
    deps=[BASELINES, OBSERVATIONS],
    group_name=STORE_GROUP,
    kinds={"postgres", "polars"},
    automation_condition=dg.AutomationCondition.eager(),
    description=(
        "Queries whose recent executions use a plan other than the accepted baseline, compared on raw "
        "latencies (Mann-Whitney U): plan flips that regressed or improved, same plan slower, with "
        "evidence and a node-level plan diff. Findings stay open until resolved or acknowledged."
    ),
)
def plan_regressions(context: dg.AssetExecutionContext, planpipe: PlanpipeResource) -> dg.MaterializeResult[None]:
    settings = planpipe.settings()
    result = detect_regressions(settings.pg_dsn, settings.parquet_dir, config=DetectionConfig(fdr=True))
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
    # One plottable series per open finding: the new plan's p50 over successive detections.
    for finding in result.findings[:20]:
        new_side = finding.evidence.get("new", {})
        if isinstance(new_side, dict) and isinstance(new_side.get("p50_ms"), int | float):
            label = f"p50_ms {finding.kind} {finding.cluster_id}/{finding.query_hash[:16]}"
            metadata[label] = dg.MetadataValue.float(float(new_side["p50_ms"]))
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
