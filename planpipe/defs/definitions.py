"""The one Definitions object of the code location: each domain's own (defs/<domain>/definitions.py)
merged, plus the resources they share."""

import dagster as dg

from planpipe.defs.health.definitions import health_defs
from planpipe.defs.ingest.definitions import ingest_defs
from planpipe.defs.plans.definitions import plans_defs
from planpipe.defs.quality.definitions import quality_defs
from planpipe.defs.regions.definitions import regional_defs
from planpipe.defs.replay.definitions import replay_defs
from planpipe.defs.resources import kafka_resource, planpipe_resource, postgres_resource
from planpipe.settings import load_settings
from planpipe.topology import Topology, load_topology

# One topic asset, ingest job and lag sensor per region of PLANPIPE_TOPOLOGY_FILE (none without one,
# and none in a regional code location, which works on its PLANPIPE_REGION only).
_settings = load_settings()
region_defs = regional_defs(load_topology(_settings) if _settings.region is None else Topology())

defs = dg.Definitions.merge(
    ingest_defs,
    health_defs,
    region_defs,
    plans_defs,
    replay_defs,
    quality_defs,
    dg.Definitions(
        resources={"planpipe": planpipe_resource(), "postgres": postgres_resource(), "kafka": kafka_resource()}
    ),
)
