"""The replay domain's definitions: DLQ replay asset, its job and the DLQ sensor."""

import dagster as dg

from planpipe.defs.replay.assets import dlq_replay, replay_job
from planpipe.defs.replay.sensors import dlq_sensor

replay_defs = dg.Definitions(assets=[dlq_replay], jobs=[replay_job], sensors=[dlq_sensor])
