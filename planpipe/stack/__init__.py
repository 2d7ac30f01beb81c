"""Start, stop and inspect the local services: Kafka, PostgreSQL and the Dagster instance home."""

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from planpipe.db.migrate import migrate
from planpipe.redact import mask_dsn
from planpipe.settings import Settings
from planpipe.stack import kafka, postgres, redis
from planpipe.stack.errors import StackError, make_dirs
from planpipe.topology import load_topology, region_settings

logger = logging.getLogger(__name__)

__all__ = ["StackError", "StackReport", "down", "status", "up"]


@dataclass(frozen=True)
class StackReport:
    """What `up` prints: connection details with passwords masked (connect with Settings, not these)."""

    bootstrap_servers: str
    pg_dsn: str
    dagster_pg_dsn: str
    dagster_home: str
    data_dir: str
    topics: dict[str, int]
    migrations_applied: list[int]
    seconds: float

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


# The instance configuration lives beside this module, not in the repository root: `dagster dev`
# and `dagster definitions validate` read ./dagster.yaml when DAGSTER_HOME is unset, and this one
# needs PLANPIPE_DAGSTER_PG_DSN, which only `planpipe up`/`planpipe dev` provide.
DAGSTER_YAML: Final = Path(__file__).with_name("dagster.yaml")


def prepare_dagster_home(settings: Settings) -> None:
    """The instance home holds a copy of planpipe's dagster.yaml (PostgreSQL storage)."""
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DAGSTER_YAML, settings.dagster_home / "dagster.yaml")


def up(settings: Settings) -> StackReport:
    """Idempotent: starts what is not running, creates what is missing, changes nothing else.

    When a step fails, the services this call started are stopped again before the error
    propagates: a failed `up` leaves the machine as it found it (data directories aside).
    """
    started = time.monotonic()
    created = make_dirs(settings.home)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    started_here: list[tuple[str, Callable[[Settings], bool]]] = []
    try:
        if postgres.start(settings, created):
            started_here.append(("PostgreSQL", postgres.stop))
        applied = migrate(settings.pg_dsn)
        if kafka.start(settings):
            started_here.append(("Kafka", kafka.stop))
        topics = kafka.ensure_topics(settings)
        # Data residency: each region's own topics (a regional process creates only its own, above).
        for region in load_topology(settings).names if settings.region is None else ():
            topics.update(kafka.ensure_topics(region_settings(settings, region)))
        if redis.start(settings):  # only when enabled (PLANPIPE_REDIS=1) and not external
            started_here.append(("Redis", redis.stop))
        prepare_dagster_home(settings)
    except BaseException as error:
        stopped = _stop_quietly(settings, started_here)
        if stopped and isinstance(error, StackError):
            raise StackError(f"{error}; stopped {' and '.join(stopped)} again", error.details) from error
        raise
    return StackReport(
        bootstrap_servers=settings.kafka_bootstrap,
        pg_dsn=mask_dsn(settings.pg_dsn),
        dagster_pg_dsn=mask_dsn(settings.dagster_pg_dsn),
        dagster_home=str(settings.dagster_home),
        data_dir=str(settings.data_dir),
        topics=topics,
        migrations_applied=applied,
        seconds=round(time.monotonic() - started, 2),
    )


def _stop_quietly(settings: Settings, started: list[tuple[str, Callable[[Settings], bool]]]) -> list[str]:
    """Stop what a failed `up` started, newest first; a failure here must not hide the first error."""
    stopped = []
    for name, stop in reversed(started):
        try:
            stop(settings)
        except Exception:
            logger.exception("could not stop %s after a failed start", name)
            continue
        stopped.append(name)
    return stopped


def down(settings: Settings) -> dict[str, bool]:
    """Stops the local services (data is kept under PLANPIPE_HOME; `planpipe down --purge` removes it)."""
    return {
        "kafka_stopped": kafka.stop(settings),
        "postgres_stopped": postgres.stop(settings),
        "redis_stopped": redis.stop(settings),
    }


def status(settings: Settings) -> dict[str, object]:
    return {
        "kafka": kafka.status(settings),
        "postgres": postgres.status(settings),
        "redis": redis.status(settings),
        "dagster_home": str(settings.dagster_home),
        "data_dir": str(settings.data_dir),
    }
