"""Jobs of the ingest domain."""

import dagster as dg

from planpipe.defs.ingest.assets import ingest_micro_batches

INGEST_ROLE_TAG = "planpipe/role"

# Selecting the multi-asset also selects its asset checks (SLA + GX suite).
ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.assets(ingest_micro_batches),
    tags={INGEST_ROLE_TAG: "ingest"},
    description="Long-lived ingest run: micro-batches until caught up; one consumer of the group per run.",
)
