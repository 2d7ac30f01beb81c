"""Test fixtures. Unit tests need nothing; integration tests get the real local stack.

The stack for tests lives in its own PLANPIPE_HOME and ports, so it never touches
the development stack. Ports are free ones below 32768 unless PLANPIPE_KAFKA_PORT /
PLANPIPE_PG_PORT say otherwise; they are recorded in the test home so a kept stack is
found again (planpipe_tests/ports.py). It is started once per session (a few seconds) and
stopped at the end unless it was already running (PLANPIPE_TEST_KEEP_STACK=1
keeps it for faster reruns).
"""

import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from planpipe.settings import REPO_ROOT, Settings, load_settings
from planpipe_tests.ports import stack_ports

if TYPE_CHECKING:
    import dagster as dg

    from planpipe.defs.resources import PlanpipeResource

TEST_ENV = {
    "PLANPIPE_HOME": str(REPO_ROOT / ".planpipe" / "test"),
    "PLANPIPE_PARTITIONS": "6",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.path) and item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.integration)
        elif "/unit/" in str(item.path) and item.get_closest_marker("unit") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def stack_settings() -> Iterator[Settings]:
    from planpipe import stack
    from planpipe.stack import kafka, postgres

    for key, value in TEST_ENV.items():
        os.environ.setdefault(key, value)
    # Ports: PLANPIPE_*_PORT if set, else those recorded for a kept stack, else free ones below 32768.
    home = load_settings().home
    probe = load_settings({"PLANPIPE_HOME": str(home)})  # is_running looks at the home, not the ports
    running = kafka.is_running(probe) or postgres.is_running(probe)
    os.environ.update(stack_ports(home, os.environ, stack_running=running))
    settings = load_settings()
    was_running = kafka.is_running(settings) and postgres.is_running(settings)
    stack.up(settings)
    yield settings
    if not was_running and os.environ.get("PLANPIPE_TEST_KEEP_STACK") != "1":
        stack.down(settings)


def isolated_settings(stack_settings: Settings, tmp_path: Path, label: str = "") -> Settings:
    """Topics, consumer groups and a data directory of one test's own, the topics created."""
    from planpipe.stack import kafka

    suffix = f"{label}{uuid.uuid4().hex[:10]}"
    isolated = replace(
        stack_settings,
        topic=f"query-plans-{suffix}",
        dlq_topic=f"query-plans-{suffix}.dlq",
        consumer_group=f"query-plan-consumers-{suffix}",
        replay_group=f"query-plan-dlq-replay-{suffix}",
        data_dir=tmp_path / "data",
        spool_path=tmp_path / "spool.sqlite3",
    )
    kafka.ensure_topics(isolated)
    return isolated


@pytest.fixture
def settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    """Per-test topics, consumer groups and data directory: tests never see each other's messages."""
    return isolated_settings(stack_settings, tmp_path)


@pytest.fixture
def pg(stack_settings: Settings) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(stack_settings.pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture(scope="session")
def dagster_instance(stack_settings: Settings) -> "Iterator[dg.DagsterInstance]":
    """The real instance of the test stack: dagster.yaml with PostgreSQL storage."""
    import dagster as dg

    os.environ["PLANPIPE_DAGSTER_PG_DSN"] = stack_settings.dagster_pg_dsn
    instance = dg.DagsterInstance.from_config(str(stack_settings.dagster_home))
    yield instance
    instance.dispose()


@pytest.fixture
def planpipe_resource(settings: Settings) -> "PlanpipeResource":
    """The code location's resource pointed at this test's topics and groups."""
    from planpipe.defs.resources import PlanpipeResource

    return PlanpipeResource(
        topic=settings.topic,
        dlq_topic=settings.dlq_topic,
        consumer_group=settings.consumer_group,
        replay_group=settings.replay_group,
        max_ingest_runs=2,
        min_ingest_runs=0,
        ingest_max_seconds=120,
        ingest_idle_s=0,
        replay_interval_s=0,
    )


@pytest.fixture
def dagster_resources(settings: Settings, planpipe_resource: "PlanpipeResource") -> dict[str, object]:
    """Every resource the code location binds, pointed at this test's stack, topics and groups."""
    from planpipe.defs.resources import KafkaResource, PostgresResource

    return {
        "planpipe": planpipe_resource,
        "postgres": PostgresResource(dsn=settings.pg_dsn),
        "kafka": KafkaResource(bootstrap_servers=settings.kafka_bootstrap),
    }
