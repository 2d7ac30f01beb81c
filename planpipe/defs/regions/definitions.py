"""Per region of PLANPIPE_TOPOLOGY_FILE: `kafka/<region>/query_plans`, `ingest_job_<region>` and
`kafka_lag_sensor_<region>`.

A region's ingest runs are `ingest_micro_batches` runs tagged `planpipe/region`: they read the region's
topic with the region's consumer group and write the region's Parquet directory (topology.py),
so its plans are stored by its own runs only. The region's sensor records the region topic's lag as
observations and in planpipe.lag_samples (as `kafka_lag_sensor` does), and launches runs by the same rule
as `kafka_lag_sensor` (one more per 20,000 behind, up to PLANPIPE_MAX_INGEST_RUNS per region; runs end
when idle). A regional code location (PLANPIPE_REGION)
already works on its region only and gets none of these.
"""

import dagster as dg

from planpipe.defs.ingest.assets import KAFKA_GROUP, ingest_micro_batches
from planpipe.defs.ingest.jobs import INGEST_ROLE_TAG
from planpipe.defs.ingest.sensors import runs_in_flight, wanted_runs
from planpipe.defs.resources import REGION_TAG, KafkaResource, PlanpipeResource
from planpipe.ingest.lag import LagUnavailable
from planpipe.ingest.reconcile import record_lag_sample
from planpipe.topology import Topology


def region_topic(region: str, topic: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=["kafka", region, "query_plans"],
        description=f"Kafka topic `{topic}`: the plans of region {region}'s clusters (data residency).",
        group_name=f"{KAFKA_GROUP}_{region}",
        kinds={"kafka"},
    )


def region_ingest_job(region: str) -> "dg.UnresolvedAssetJobDefinition":
    return dg.define_asset_job(
        f"ingest_job_{region}",
        # The SLA checks of the selection measure the base consumer group: a region's run leaves them out.
        selection=dg.AssetSelection.assets(ingest_micro_batches).without_checks(),
        tags={INGEST_ROLE_TAG: "ingest", REGION_TAG: region},
        description=f"Ingest run of region {region}: its topic, consumer group and Parquet directory.",
    )


def region_lag_sensor(region: str, job: "dg.UnresolvedAssetJobDefinition", topic: dg.AssetSpec) -> dg.SensorDefinition:
    @dg.sensor(
        name=f"kafka_lag_sensor_{region}",
        job=job,
        minimum_interval_seconds=15,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Lag of region {region}'s topic as observations; launches its ingest runs when there is lag.",
    )
    def sensor(
        context: dg.SensorEvaluationContext, planpipe: PlanpipeResource, kafka: KafkaResource
    ) -> dg.SensorResult:
        settings = planpipe.settings(region=region)
        try:
            lags = kafka.group_lag(settings, settings.consumer_group, settings.topic)
        except LagUnavailable as error:
            return dg.SensorResult(skip_reason=f"Kafka not answering: {error}")
        total = sum(p.lag for p in lags)
        # As the main lag sensor: the region's group and topic get their rows (lag SLA, reconciliation).
        record_lag_sample(settings.pg_dsn, settings.consumer_group, settings.topic, lags)
        in_flight = runs_in_flight(context.instance, job.name, max_seconds=planpipe.ingest_max_seconds)
        launched = int(context.cursor or 0)
        requests = [
            dg.RunRequest(run_key=f"ingest-{region}-{launched + i + 1}", tags={"planpipe/lag": str(total)})
            for i in range(wanted_runs(total, len(in_flight), planpipe.max_ingest_runs))
        ]
        observation = dg.AssetObservation(
            asset_key=topic.key,
            metadata={
                "region": dg.MetadataValue.text(region),
                "total_lag": dg.MetadataValue.int(total),
                "max_partition_lag": dg.MetadataValue.int(max((p.lag for p in lags), default=0)),
                "lag_by_partition": dg.MetadataValue.json({str(p.partition): p.lag for p in lags}),
                "ingest_runs_in_flight": dg.MetadataValue.int(len(in_flight)),
            },
        )
        return dg.SensorResult(run_requests=requests, asset_events=[observation], cursor=str(launched + len(requests)))

    return sensor


def regional_defs(topology: Topology) -> dg.Definitions:
    specs, jobs, sensors = [], [], []
    for region in topology.regions:
        spec = region_topic(region.name, region.topic)
        job = region_ingest_job(region.name)
        specs.append(spec)
        jobs.append(job)
        sensors.append(region_lag_sensor(region.name, job, spec))
    return dg.Definitions(assets=specs, jobs=jobs, sensors=sensors)
