"""librdkafka configurations with the runbook's defaults; user passthrough always wins."""

import logging
from typing import Any, Final

from planpipe.settings import Settings

CLIENT_LOGGER: Final = logging.getLogger("planpipe.kafka.client")

# Runbook, "High-Throughput Producer".
PRODUCER_DEFAULTS: Final[dict[str, str | int | bool]] = {
    "acks": "all",
    "enable.idempotence": True,
    "compression.type": "zstd",
    "batch.size": 1_048_576,
    "linger.ms": 15,
    "max.in.flight.requests.per.connection": 5,
}

# Runbook, "Kafka Consumer Rebalancing Storms" and "Deterministic Consumer".
CONSUMER_DEFAULTS: Final[dict[str, str | int | bool]] = {
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "partition.assignment.strategy": "cooperative-sticky",
    "session.timeout.ms": 45_000,
    "heartbeat.interval.ms": 15_000,
    "max.poll.interval.ms": 300_000,
    "isolation.level": "read_committed",
}


def _base(settings: Settings) -> dict[str, str | int | bool | logging.Logger]:
    return {"bootstrap.servers": settings.kafka_bootstrap, "logger": CLIENT_LOGGER}


def producer_config(settings: Settings, **extra: str | int | bool) -> dict[str, Any]:
    conf: dict[str, Any] = {**_base(settings), **PRODUCER_DEFAULTS, **extra}
    conf.update(settings.producer_overrides)
    return conf


def consumer_config(settings: Settings, group_id: str, **extra: str | int | bool) -> dict[str, Any]:
    conf: dict[str, Any] = {**_base(settings), "group.id": group_id, **CONSUMER_DEFAULTS, **extra}
    conf.update(settings.consumer_overrides)
    return conf


def admin_config(settings: Settings, **extra: str | int | bool) -> dict[str, Any]:
    conf: dict[str, Any] = {**_base(settings), **extra}
    conf.update(settings.consumer_overrides)
    return conf
