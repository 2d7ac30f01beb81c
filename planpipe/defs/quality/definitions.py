"""The quality domain's definitions: the per-batch GX suite, nightly schema drift and its correction sensor."""

import dagster as dg

from planpipe.defs.quality.checks import (
    drift_correction_sensor,
    observations_suite,
    schema_drift,
    schema_drift_job,
    schema_drift_schedule,
)

quality_defs = dg.Definitions(
    asset_checks=[observations_suite, schema_drift],
    jobs=[schema_drift_job],
    schedules=[schema_drift_schedule],
    sensors=[drift_correction_sensor],
)
