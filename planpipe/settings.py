"""Environment → typed settings. The one place that decides local vs. external services.

Every knob is an environment variable with a local default (see the table in the
README). librdkafka options pass through unchanged:

    PLANPIPE_KAFKA__SECURITY_PROTOCOL=SASL_SSL   → security.protocol (producer and consumer)
    PLANPIPE_PRODUCER__LINGER_MS=5               → linger.ms (producer only)
    PLANPIPE_CONSUMER__FETCH_MAX_BYTES=...       → fetch.max.bytes (consumer only)

Double underscore separates the prefix; single underscores become dots.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypedDict

from planpipe.redact import mask_dsn, mask_kafka_config
from planpipe.topology import apply_region

REPO_ROOT: Final = Path(__file__).resolve().parent.parent

# Local service ports stay below 32768, outside Linux's ephemeral range (32768–60999): a
# client's source port can never take them, so `up` right after `down` always binds.
DEFAULT_KAFKA_PORT: Final = 19092  # controller: port + 1
DEFAULT_PG_PORT: Final = 15432
DEFAULT_REDIS_PORT: Final = 16379

_PASSTHROUGH_PREFIXES: Final = {
    "PLANPIPE_KAFKA__": "common",
    "PLANPIPE_PRODUCER__": "producer",
    "PLANPIPE_CONSUMER__": "consumer",
}


def _env(environ: Mapping[str, str], name: str, default: str) -> str:
    value = environ.get(name, "").strip()
    return value or default


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = _env(environ, name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = _env(environ, name, str(default))
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


def librdkafka_passthrough(environ: Mapping[str, str], scope: str) -> dict[str, str]:
    """librdkafka options for `scope` ("producer" or "consumer"): common ones, then scoped ones."""
    options: dict[str, str] = {}
    for wanted in ("common", scope):
        for name, value in environ.items():
            for prefix, prefix_scope in _PASSTHROUGH_PREFIXES.items():
                if prefix_scope == wanted and name.startswith(prefix) and len(name) > len(prefix):
                    options[name[len(prefix) :].lower().replace("_", ".")] = value
    return options


@dataclass(frozen=True)
class Settings:
    home: Path
    cache_dir: Path
    data_dir: Path
    kafka_bootstrap: str
    kafka_external: bool
    kafka_port: int
    kafka_controller_port: int
    kafka_heap: str
    pg_dsn: str
    pg_external: bool
    pg_port: int
    dagster_pg_dsn: str
    topic: str
    dlq_topic: str
    partitions: int
    replication_factor: int
    consumer_group: str
    replay_group: str
    sample_rate_pct: int
    max_plan_bytes: int
    batch_max_messages: int
    batch_max_wait_s: float
    spool_path: Path
    metrics_port: int
    producer_overrides: dict[str, str] = field(default_factory=dict)
    consumer_overrides: dict[str, str] = field(default_factory=dict)
    # The agent's last-resort queue (runbook fallback 3): "" = none; a local redis-server
    # started by `planpipe up` when PLANPIPE_REDIS=1, or an existing one (PLANPIPE_REDIS_URL).
    redis_url: str = ""
    redis_external: bool = False
    redis_port: int = DEFAULT_REDIS_PORT
    redis_maxmemory: str = "256mb"
    # Routing guide: a plan slower than k x its query's baseline p95 is critical (0: rule off).
    latency_multiplier: float = 3.0
    # Plan-regression detection: a query's settling period (its automatic baseline becomes the plan
    # that dominated its first N executions) and the executions back to normal that resolve a finding.
    detect_settling_executions: int = 30
    detect_resolve_executions: int = 20
    # PLANPIPE_REGION: this process works on one region's topics, groups and data (topology.py).
    region: str | None = None

    def __repr__(self) -> str:  # the dataclass repr would show DSN passwords and SASL secrets
        shown = {
            name: mask_dsn(value) if name.endswith(("dsn", "_url")) and isinstance(value, str) else value
            for name, value in self.__dict__.items()
        }
        shown["producer_overrides"] = mask_kafka_config(self.producer_overrides)
        shown["consumer_overrides"] = mask_kafka_config(self.consumer_overrides)
        return f"Settings({', '.join(f'{name}={value!r}' for name, value in shown.items())})"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"

    @property
    def parquet_dir(self) -> Path:
        return self.data_dir / "observations"


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    home = Path(_env(env, "PLANPIPE_HOME", str(REPO_ROOT / ".planpipe"))).resolve()
    kafka_port = _env_int(env, "PLANPIPE_KAFKA_PORT", DEFAULT_KAFKA_PORT)
    pg_port = _env_int(env, "PLANPIPE_PG_PORT", DEFAULT_PG_PORT)
    external_bootstrap = env.get("PLANPIPE_KAFKA_BOOTSTRAP", "").strip()
    external_dsn = env.get("PLANPIPE_PG_DSN", "").strip()
    local_dsn = f"postgresql://postgres@127.0.0.1:{pg_port}/planpipe"
    pg_dsn = external_dsn or local_dsn
    settings = Settings(
        home=home,
        cache_dir=Path(_env(env, "PLANPIPE_CACHE_DIR", str(Path.home() / ".cache" / "planpipe"))),
        data_dir=Path(_env(env, "PLANPIPE_DATA_DIR", str(home / "data"))),
        kafka_bootstrap=external_bootstrap or f"127.0.0.1:{kafka_port}",
        kafka_external=bool(external_bootstrap),
        kafka_port=kafka_port,
        kafka_controller_port=_env_int(env, "PLANPIPE_KAFKA_CONTROLLER_PORT", kafka_port + 1),
        kafka_heap=_env(env, "PLANPIPE_KAFKA_HEAP", "512m"),
        pg_dsn=pg_dsn,
        pg_external=bool(external_dsn),
        pg_port=pg_port,
        dagster_pg_dsn=_env(env, "PLANPIPE_DAGSTER_PG_DSN", _sqlalchemy_url(_with_database(pg_dsn, "dagster"))),
        topic=_env(env, "PLANPIPE_TOPIC", "query-plans"),
        dlq_topic=_env(env, "PLANPIPE_DLQ_TOPIC", "query-plans.dlq"),
        partitions=_env_int(env, "PLANPIPE_PARTITIONS", 6),
        replication_factor=_env_int(env, "PLANPIPE_REPLICATION_FACTOR", 1),
        consumer_group=_env(env, "PLANPIPE_CONSUMER_GROUP", "query-plan-consumers"),
        replay_group=_env(env, "PLANPIPE_REPLAY_GROUP", "query-plan-dlq-replay"),
        sample_rate_pct=_env_int(env, "PLANPIPE_SAMPLE_RATE_PCT", 100),
        max_plan_bytes=_env_int(env, "PLANPIPE_MAX_PLAN_BYTES", 8 * 1024 * 1024),
        batch_max_messages=_env_int(env, "PLANPIPE_BATCH_MAX_MESSAGES", 500),
        batch_max_wait_s=_env_float(env, "PLANPIPE_BATCH_MAX_WAIT_S", 0.25),
        spool_path=Path(_env(env, "PLANPIPE_SPOOL_PATH", str(home / "spool.sqlite3"))),
        metrics_port=_env_int(env, "PLANPIPE_METRICS_PORT", 9464),
        producer_overrides=librdkafka_passthrough(env, "producer"),
        consumer_overrides=librdkafka_passthrough(env, "consumer"),
        **_redis(env),
        latency_multiplier=_env_float(env, "PLANPIPE_LATENCY_MULTIPLIER", 3.0),
        detect_settling_executions=_env_int(env, "PLANPIPE_DETECT_SETTLING_EXECUTIONS", 30),
        detect_resolve_executions=_env_int(env, "PLANPIPE_DETECT_RESOLVE_EXECUTIONS", 20),
    )
    return apply_region(settings, env)


class _RedisSettings(TypedDict):
    redis_url: str
    redis_external: bool
    redis_port: int
    redis_maxmemory: str


def _redis(env: Mapping[str, str]) -> _RedisSettings:
    external = env.get("PLANPIPE_REDIS_URL", "").strip()
    port = _env_int(env, "PLANPIPE_REDIS_PORT", DEFAULT_REDIS_PORT)
    local = _env(env, "PLANPIPE_REDIS", "0").lower() in ("1", "true", "yes", "on")
    return {
        "redis_url": external or (f"redis://127.0.0.1:{port}/0" if local else ""),
        "redis_external": bool(external),
        "redis_port": port,
        "redis_maxmemory": _env(env, "PLANPIPE_REDIS_MAXMEMORY", "256mb"),
    }


def _with_database(dsn: str, database: str) -> str:
    """Same server, another database: `postgresql://u@h:p/x?o` → `postgresql://u@h:p/<database>?o`."""
    head, sep, query = dsn.partition("?")
    scheme, slashes, rest = head.partition("://")
    if not slashes:
        raise ValueError(f"PostgreSQL DSN must be a URL (postgresql://…), got {mask_dsn(dsn)!r}")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{database}{sep}{query}"


def _sqlalchemy_url(dsn: str) -> str:
    """dagster-postgres issues `NOTIFY channel, %(param)s`, which only psycopg2's client-side
    binding supports; SQLAlchemy 2.1 defaults `postgresql://` to psycopg 3, so name the driver."""
    scheme, sep, rest = dsn.partition("://")
    return f"postgresql+psycopg2://{rest}" if scheme in ("postgresql", "postgres") and sep else dsn
