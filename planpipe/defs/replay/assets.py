"""The DLQ replay: correct what can be corrected, republish it exactly once, park the rest."""

import dagster as dg

from planpipe.defs.ingest.assets import KAFKA_GROUP, dlq_topic
from planpipe.defs.resources import PlanpipeResource
from planpipe.replay import RULES, run_replay

DLQ_REPLAY = dg.AssetKey(["kafka", "dlq_replay"])


@dg.asset(
    key=DLQ_REPLAY,
    deps=[dlq_topic.key],
    group_name=KAFKA_GROUP,
    kinds={"kafka", "postgres"},
    description=(
        "Replays query-plans.dlq through the correction rules (" + ", ".join(r.name for r in RULES) + "): "
        "corrected envelopes go back to query-plans in a Kafka transaction with the DLQ offsets; "
        "the rest is parked in planpipe.dlq_parked."
    ),
)
def dlq_replay(context: dg.AssetExecutionContext, planpipe: PlanpipeResource) -> dg.MaterializeResult[None]:
    summary = run_replay(planpipe.settings(), max_seconds=planpipe.ingest_max_seconds)
    context.log.info(f"replay summary: {summary.as_dict()}")
    return dg.MaterializeResult(
        metadata={
            "consumed": dg.MetadataValue.int(summary.consumed),
            "republished": dg.MetadataValue.int(summary.republished),
            "parked": dg.MetadataValue.int(summary.parked),
            "duplicates": dg.MetadataValue.int(summary.duplicates),
            "by_rule": dg.MetadataValue.json(summary.by_rule),
            "by_reason": dg.MetadataValue.json(summary.by_reason),
            "caught_up": dg.MetadataValue.bool(summary.caught_up),
        }
    )


replay_job = dg.define_asset_job(
    "dlq_replay_job",
    selection=dg.AssetSelection.assets(dlq_replay),
    tags={"planpipe/role": "replay"},
    description="Replay and correction of the dead-letter queue (its own consumer group).",
)
