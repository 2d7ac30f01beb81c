"""The health domain's definitions: the Kafka cluster asset, broker health and trace SLA checks, the
broker health sensor (capture agents' fallback mode)."""

import dagster as dg

from planpipe.defs.health.assets import kafka_cluster
from planpipe.defs.health.checks import health_check_job, health_checks, health_schedule
from planpipe.defs.health.sensors import broker_health_sensor

health_defs = dg.Definitions(
    assets=[kafka_cluster],
    asset_checks=health_checks,
    jobs=[health_check_job],
    schedules=[health_schedule],
    sensors=[broker_health_sensor],
)
