"""Resources of the code location: the one place where Dagster learns about planpipe's settings.

Connection details come from the environment (`planpipe.settings`); in
production set PLANPIPE_KAFKA_BOOTSTRAP / PLANPIPE_PG_DSN and nothing is started.
`PlanpipeResource` carries the engine settings; `PostgresResource` hands checks and
sensors their PostgreSQL connections (they never call `psycopg.connect` themselves), and
`KafkaResource` their consumer-group lag (they never build a Kafka client themselves).
"""

import os
from dataclasses import replace

import dagster as dg
import psycopg
from pydantic import PrivateAttr

from planpipe.ingest.lag import PartitionLag, group_assignments, group_lag
from planpipe.settings import Settings, load_settings
from planpipe.topology import region_settings

# An ingest run tagged with a region (by its region's lag sensor) works on that region's topics.
REGION_TAG = "planpipe/region"


class PlanpipeResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """Settings for engine calls; each field defaults to the environment's value."""

    topic: str | None = None
    dlq_topic: str | None = None
    consumer_group: str | None = None
    replay_group: str | None = None
    max_ingest_runs: int = 2
    # Ingest runs kept consuming even with no lag, so a record never waits for a run to start.
    min_ingest_runs: int = 1
    ingest_max_seconds: float = 1800.0
    # A trickle of DLQ messages is replayed at most this often (a large backlog at once).
    replay_interval_s: float = 120.0
    # Caught up with nothing new for this long: the run ends (the lag sensor starts the next).
    ingest_idle_s: float = 120.0
    # Lag > 0 and no committed batch for this long: the run is stuck (watchdog, check, sensor).
    ingest_stall_after_s: float = 60.0
    # The environment is read once per resource instance (Dagster builds one per run or tick).
    _environment: list[Settings] = PrivateAttr(default_factory=list)

    def settings(self, region: str | None = None) -> Settings:
        """The code location's settings; with `region`, those of that region of the topology."""
        if not self._environment:
            self._environment.append(load_settings())
        base = self._environment[0]
        if base.region is not None:
            # A regional code location (PLANPIPE_REGION): its topics and groups derive from the same
            # environment; the fields would put the base topics back.
            return base
        own = replace(
            base,
            topic=self.topic or base.topic,
            dlq_topic=self.dlq_topic or base.dlq_topic,
            consumer_group=self.consumer_group or base.consumer_group,
            replay_group=self.replay_group or base.replay_group,
        )
        return own if region is None else region_settings(own, region)


class PostgresResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """planpipe's PostgreSQL (baseline store and operations tables)."""

    # None: the local stack's database (PLANPIPE_PG_PORT), as `planpipe.settings` derives it.
    dsn: str | None = None
    connect_timeout_s: int = 10
    _local_dsn: list[str] = PrivateAttr(default_factory=list)

    def connect(
        self, *, autocommit: bool = False, timeout_s: int | None = None
    ) -> psycopg.Connection[tuple[object, ...]]:
        """A new connection; use it as a context manager (commits on success, closes on exit).
        `timeout_s` overrides the connect timeout (sensors keep theirs short to stay within a tick)."""
        if self.dsn is None and not self._local_dsn:
            self._local_dsn.append(load_settings().pg_dsn)
        dsn = self.dsn if self.dsn is not None else self._local_dsn[0]
        return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=timeout_s or self.connect_timeout_s)


class KafkaResource(dg.ConfigurableResource):  # type: ignore[type-arg]
    """planpipe's Kafka as sensors and checks see it: consumer-group lag and membership on a topic."""

    # None: the bootstrap `planpipe.settings` derives (PLANPIPE_KAFKA_BOOTSTRAP or the local stack).
    bootstrap_servers: str | None = None
    # Short enough for a sensor tick; no answer in time raises LagUnavailable (the tick skips).
    lag_timeout_s: float = 5.0

    def group_lag(self, settings: Settings, group: str, topic: str) -> list[PartitionLag]:
        """Per-partition lag of `group` on `topic` (read_committed). Client options other than the
        bootstrap (security, librdkafka pass-through) come from `settings`, a region's included."""
        return group_lag(self._own(settings), group, topic, timeout_s=self.lag_timeout_s)

    def group_assignments(self, settings: Settings, group: str, topic: str) -> dict[str, set[int]]:
        """Which partitions of `topic` each member (client id) of `group` holds."""
        return group_assignments(self._own(settings), group, topic)

    def _own(self, settings: Settings) -> Settings:
        return replace(settings, kafka_bootstrap=self.bootstrap_servers) if self.bootstrap_servers else settings


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    return int(raw) if raw else default


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def _from_env(name: str) -> dg.EnvVar | None:
    # EnvVar keeps the value out of the run config and shows its source in the UI;
    # unset variables fall back to planpipe's local defaults.
    return dg.EnvVar(name) if os.environ.get(name, "").strip() else None


def planpipe_resource() -> PlanpipeResource:
    return PlanpipeResource(
        topic=_from_env("PLANPIPE_TOPIC"),
        dlq_topic=_from_env("PLANPIPE_DLQ_TOPIC"),
        consumer_group=_from_env("PLANPIPE_CONSUMER_GROUP"),
        replay_group=_from_env("PLANPIPE_REPLAY_GROUP"),
        max_ingest_runs=_env_int("PLANPIPE_MAX_INGEST_RUNS", 2),
        min_ingest_runs=_env_int("PLANPIPE_MIN_INGEST_RUNS", 1),
        ingest_max_seconds=_env_float("PLANPIPE_INGEST_MAX_SECONDS", 1800.0),
        ingest_idle_s=_env_float("PLANPIPE_INGEST_IDLE_S", 120.0),
        replay_interval_s=_env_float("PLANPIPE_REPLAY_INTERVAL_S", 120.0),
        ingest_stall_after_s=_env_float("PLANPIPE_INGEST_STALL_AFTER_S", 60.0),
    )


def postgres_resource() -> PostgresResource:
    return PostgresResource(dsn=_from_env("PLANPIPE_PG_DSN"))


def kafka_resource() -> KafkaResource:
    return KafkaResource(bootstrap_servers=_from_env("PLANPIPE_KAFKA_BOOTSTRAP"))
