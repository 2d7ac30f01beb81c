import os
from collections.abc import Iterator

import dagster as dg
import pytest

from planpipe.defs.resources import PlanpipeResource
from planpipe.settings import Settings


@pytest.fixture(scope="session")
def dagster_instance(stack_settings: Settings) -> Iterator[dg.DagsterInstance]:
    """The real instance of the test stack: dagster.yaml with PostgreSQL storage."""
    os.environ["PLANPIPE_DAGSTER_PG_DSN"] = stack_settings.dagster_pg_dsn
    instance = dg.DagsterInstance.from_config(str(stack_settings.dagster_home))
    yield instance
    instance.dispose()


@pytest.fixture
def planpipe_resource(settings: Settings) -> PlanpipeResource:
    return PlanpipeResource(
        topic=settings.topic,
        dlq_topic=settings.dlq_topic,
        consumer_group=settings.consumer_group,
        replay_group=settings.replay_group,
        max_ingest_runs=2,
        ingest_max_seconds=120,
    )
