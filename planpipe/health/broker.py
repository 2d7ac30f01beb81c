"""Broker health from the admin API, and the runbook's degradation rule.

The admin client's cluster metadata lists, per partition, its replicas, its in-sync
replicas and its leader. A partition whose ISR is smaller than its replica set is
under-replicated (what `kafka_server_ReplicaManager_UnderReplicatedPartitions` counts
on the brokers); one without a leader is offline (`OfflinePartitionsCount`).

Runbook, fallback 3: "If Kafka cluster health degrades (UnderReplicatedPartitions > 5
for > 2m), temporarily route EXPLAIN output directly to a lightweight Redis queue".
`next_state` applies that rule to successive measurements, with hysteresis on the way
back so a flapping ISR does not flip the agents every tick. Pure and unit-tested; the
Dagster sensor (`planpipe/defs/health/`) keeps the state in its cursor.
"""

import enum
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import msgspec
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from planpipe.errors import PlanpipeError
from planpipe.kafka_config import admin_config
from planpipe.settings import Settings

URP_THRESHOLD: Final = 5  # UnderReplicatedPartitions > 5 ...
DEGRADED_AFTER_S: Final = 120.0  # ... for > 2 minutes
# Back to Kafka only after health held this long (hysteresis against a flapping ISR).
RECOVERED_AFTER_S: Final = 60.0


class HealthUnavailable(PlanpipeError, RuntimeError):
    """The cluster did not answer the metadata request."""


@dataclass(frozen=True, slots=True)
class PartitionState:
    topic: str
    partition: int
    leader: int
    replicas: int
    in_sync: int

    @property
    def under_replicated(self) -> bool:
        return self.in_sync < self.replicas

    @property
    def offline(self) -> bool:
        return self.leader < 0


@dataclass(frozen=True)
class BrokerHealth:
    measured_at: float
    brokers: int
    partitions: int
    under_replicated: tuple[PartitionState, ...] = ()
    offline: tuple[PartitionState, ...] = ()

    @property
    def urp(self) -> int:
        return len(self.under_replicated)

    def by_topic(self) -> dict[str, dict[str, int]]:
        """{topic: {"under_replicated": n, "offline": m}} for topics with any."""
        out: dict[str, dict[str, int]] = {}
        for kind, states in (("under_replicated", self.under_replicated), ("offline", self.offline)):
            for state in states:
                out.setdefault(state.topic, {"under_replicated": 0, "offline": 0})[kind] += 1
        return out


def health_from_metadata(topics: Mapping[str, Any], brokers: int, *, measured_at: float) -> BrokerHealth:
    """From `ClusterMetadata.topics` (TopicMetadata → PartitionMetadata); internal topics included,
    as the broker's own URP count includes them."""
    total = 0
    under: list[PartitionState] = []
    offline: list[PartitionState] = []
    for name in sorted(topics):
        for pid, meta in sorted(topics[name].partitions.items()):
            total += 1
            state = PartitionState(name, int(pid), int(meta.leader), len(meta.replicas), len(meta.isrs))
            if state.under_replicated:
                under.append(state)
            if state.offline:
                offline.append(state)
    return BrokerHealth(measured_at, brokers, total, tuple(under), tuple(offline))


def measure(settings: Settings, timeout_s: float = 5.0) -> BrokerHealth:
    """One metadata round trip; bounded by `timeout_s` so a sensor tick never hangs."""
    client = AdminClient(admin_config(settings, **{"socket.timeout.ms": int(timeout_s * 1000)}))
    try:
        metadata = client.list_topics(timeout=timeout_s)
    except KafkaException as error:
        raise HealthUnavailable(str(error)) from error
    if not metadata.brokers:
        raise HealthUnavailable("no brokers in the cluster metadata")
    return health_from_metadata(metadata.topics, len(metadata.brokers), measured_at=time.time())


class FallbackMode(enum.StrEnum):
    """What capture agents should do with envelopes."""

    KAFKA = "kafka"  # normal: producer, spool on outages
    REDIS = "redis"  # runbook fallback 3: the cluster is degraded


@dataclass(frozen=True)
class DegradationState:
    """What the sensor carries from tick to tick (JSON in its cursor)."""

    mode: FallbackMode = FallbackMode.KAFKA
    breached_since: float | None = None  # URP above the threshold since
    healthy_since: float | None = None  # while in REDIS mode: URP at or below it since
    changed_at: float | None = None
    reason: str = ""
    history: list[tuple[float, int, int]] = field(default_factory=list)  # (ts, urp, offline), newest last

    def to_json(self) -> str:
        return msgspec.json.encode(asdict(self)).decode()

    @classmethod
    def from_json(cls, text: str | None) -> "DegradationState":
        if not text:
            return cls()
        try:
            data = msgspec.json.decode(text)
            data["mode"] = FallbackMode(data["mode"])
            data["history"] = [tuple(item) for item in data.get("history", [])]
            return cls(**data)
        except (msgspec.DecodeError, KeyError, TypeError, ValueError):
            return cls()  # a cursor from an older version: start afresh (it re-measures at once)


def _breached(health: BrokerHealth, threshold: int) -> bool:
    # Offline partitions are under-replicated too (their ISR is empty or short), so they count.
    return health.urp > threshold


def next_state(
    state: DegradationState,
    health: BrokerHealth,
    *,
    threshold: int = URP_THRESHOLD,
    degraded_after_s: float = DEGRADED_AFTER_S,
    recovered_after_s: float = RECOVERED_AFTER_S,
    history: int = 60,
) -> DegradationState:
    """The runbook's rule over successive measurements (pure)."""
    now = health.measured_at
    breached = _breached(health, threshold)
    breached_since = (now if state.breached_since is None else state.breached_since) if breached else None
    mode, changed_at, reason = state.mode, state.changed_at, state.reason
    healthy_since = state.healthy_since
    if mode is FallbackMode.KAFKA:
        healthy_since = None
        if breached_since is not None and now - breached_since > degraded_after_s:
            mode, changed_at = FallbackMode.REDIS, now
            reason = (
                f"UnderReplicatedPartitions {health.urp} > {threshold} for {now - breached_since:.0f} s "
                f"(> {degraded_after_s:.0f} s), offline {len(health.offline)}"
            )
    else:
        healthy_since = None if breached else (now if state.healthy_since is None else state.healthy_since)
        if healthy_since is not None and now - healthy_since >= recovered_after_s:
            mode, changed_at = FallbackMode.KAFKA, now
            reason = f"UnderReplicatedPartitions {health.urp} <= {threshold} for {now - healthy_since:.0f} s"
    points = [*state.history, (now, health.urp, len(health.offline))][-history:]
    return DegradationState(mode, breached_since, healthy_since, changed_at, reason, points)


def describe(partitions: Iterable[PartitionState], limit: int = 20) -> list[dict[str, int | str]]:
    """A table-friendly list (the first `limit`)."""
    return [
        {"topic": p.topic, "partition": p.partition, "leader": p.leader, "replicas": p.replicas, "isr": p.in_sync}
        for p in list(partitions)[:limit]
    ]
