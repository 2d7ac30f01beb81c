"""Start, stop and inspect the local services: Kafka, PostgreSQL and the Dagster instance home."""

import shutil
import time
from dataclasses import dataclass

from planpipe.db.migrate import migrate
from planpipe.settings import REPO_ROOT, Settings
from planpipe.stack import kafka, postgres
from planpipe.stack.errors import StackError

__all__ = ["StackError", "StackReport", "down", "status", "up"]


@dataclass(frozen=True)
class StackReport:
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


def prepare_dagster_home(settings: Settings) -> None:
    """The instance home holds a copy of the repository's dagster.yaml (PostgreSQL storage)."""
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / "dagster.yaml", settings.dagster_home / "dagster.yaml")


def up(settings: Settings) -> StackReport:
    """Idempotent: starts what is not running, creates what is missing, changes nothing else."""
    started = time.monotonic()
    settings.home.mkdir(parents=True, exist_ok=True)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    postgres.start(settings)
    applied = migrate(settings.pg_dsn)
    kafka.start(settings)
    topics = kafka.ensure_topics(settings)
    prepare_dagster_home(settings)
    return StackReport(
        bootstrap_servers=settings.kafka_bootstrap,
        pg_dsn=settings.pg_dsn,
        dagster_pg_dsn=settings.dagster_pg_dsn,
        dagster_home=str(settings.dagster_home),
        data_dir=str(settings.data_dir),
        topics=topics,
        migrations_applied=applied,
        seconds=round(time.monotonic() - started, 2),
    )


def down(settings: Settings) -> dict[str, bool]:
    """Stops the local services (data is kept under PLANPIPE_HOME; `planpipe down --purge` removes it)."""
    return {"kafka_stopped": kafka.stop(settings), "postgres_stopped": postgres.stop(settings)}


def status(settings: Settings) -> dict[str, object]:
    return {
        "kafka": kafka.status(settings),
        "postgres": postgres.status(settings),
        "dagster_home": str(settings.dagster_home),
        "data_dir": str(settings.data_dir),
    }
