"""Shared builders for the routing unit tests."""

from typing import Any

import msgspec

from planpipe.contract import Envelope
from planpipe.routing.metrics import REGISTRY

BASE: dict[str, Any] = {
    "query_hash": "q-0001",
    "execution_timestamp": 1_700_000_000.0,
    "cluster_id": "pg-eu-1",
    "plan_text": '[{"Plan": {"Node Type": "Index Scan"}}]',
    "actual_rows": 10,
    "total_time_ms": 1.5,
}


def envelope(**overrides: Any) -> Envelope:
    return msgspec.convert({**BASE, **overrides}, Envelope)


def raw_envelope(**overrides: Any) -> bytes:
    return msgspec.json.encode({**BASE, **overrides})


def sample(name: str, **labels: str) -> float:
    """Current value of one series in the router's registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
