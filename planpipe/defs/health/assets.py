"""The Kafka cluster as an observable asset: the broker health sensor records its health on it."""

import dagster as dg

from planpipe.defs.ingest.assets import KAFKA_GROUP

kafka_cluster = dg.AssetSpec(
    key=["kafka", "cluster"],
    description="The Kafka cluster behind query-plans: brokers, under-replicated and offline partitions "
    "(admin API), observed by broker_health_sensor, and the capture agents' fallback mode.",
    group_name=KAFKA_GROUP,
    kinds={"kafka"},
)
KAFKA_CLUSTER = kafka_cluster.key
