"""Agent configuration: a TOML file (`--config`, or `PLANPIPE_AGENT_CONFIG`) and flags; flags win.

Keys are the flag names with underscores (`log`, `dsn`, `sample`,
`sample_interval_s`, …); see `deploy/agent/agent.example.toml`. Kafka, PostgreSQL
and Redis come from the usual PLANPIPE_* environment (`Settings`).
"""

import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

DEFAULT_HTTP_PORT: Final = 9465


@dataclass(frozen=True)
class AgentConfig:
    name: str | None = None  # default: the cluster id; names the state, capture ids and counts
    cluster_id: str | None = None  # default: system_identifier via dsn, or of the data directory around `log`
    log: Path | None = None  # auto_explain log file or PostgreSQL's log directory
    log_format: str = "auto"
    log_timezone: str = "UTC"
    all_files: bool = False
    state_dir: Path | None = None  # default: $PLANPIPE_HOME/agent/<name>
    dsn: str | None = None  # the database the agent sits beside (sampling, cluster id)
    batch_size: int = 500
    poll_interval_s: float = 0.5
    http_port: int = DEFAULT_HTTP_PORT  # metrics and health on 127.0.0.1; 0 = any free port, -1 = off
    cooldown_s: float = 30.0  # producer breaker cool-down
    # Live sampling of pg_stat_statements' top statements.
    sample: bool = False
    sample_interval_s: float = 300.0
    sample_max_statements: int = 5
    sample_statement_timeout_ms: int = 5_000
    sample_budget_pct: float = 1.0
    allow_superuser: bool = False
    # Fallback 3: Redis once Kafka is unreachable and the spool passed one of these, or the
    # broker-health sensor reports the cluster degraded.
    spool_max_rows: int = 100_000
    spool_max_bytes: int = 512 * 1024 * 1024
    spool_max_age_s: float = 300.0
    redis_ttl_s: float = 24 * 3600.0
    redis_max_entries: int = 200_000
    mode_refresh_s: float = 15.0  # how often the fallback mode (planpipe.kafka_fallback_mode) is re-read
    # After a crash, recovery looks for in-doubt records in Kafka only once requests the dead process may
    # have sent can no longer be appended: its last heartbeat + this (default: the producer's
    # request.timeout.ms + 5 s, the longest the broker works on a produce request before answering it).
    inflight_settle_s: float | None = None
    snapshot_interval_s: float = 10.0
    report_interval_s: float = 30.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.poll_interval_s <= 0:
            raise ValueError("batch_size must be >= 1 and poll_interval_s > 0")
        if self.spool_max_rows < 1 or self.spool_max_bytes < 1 or self.spool_max_age_s <= 0:
            raise ValueError("spool_max_rows, spool_max_bytes and spool_max_age_s must be positive")

    def merged(self, overrides: dict[str, Any]) -> "AgentConfig":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


_PATHS: Final = frozenset({"log", "state_dir"})
_OPTIONAL_FLOATS: Final = frozenset({"inflight_settle_s"})


def load_file(path: Path) -> AgentConfig:
    with path.open("rb") as handle:
        raw = tomllib.load(handle)
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    defaults = AgentConfig()
    for key, value in raw.items():
        default = getattr(defaults, key)
        wanted: tuple[type, ...] = (
            (bool,) if isinstance(default, bool) else (int,) if isinstance(default, int)
            else (int, float) if isinstance(default, float) or key in _OPTIONAL_FLOATS else (str,)
        )  # fmt: skip
        if not isinstance(value, wanted) or (isinstance(value, bool) and bool not in wanted):
            raise ValueError(f"{path}: {key} must be {' or '.join(t.__name__ for t in wanted)}, got {value!r}")
    values: dict[str, Any] = {key: Path(value) if key in _PATHS else value for key, value in raw.items()}
    return AgentConfig(**values)
