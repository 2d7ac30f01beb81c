"""The static rules the DLQ replay re-keys with decide exactly as the capture side's router."""

import pytest

from planpipe.messaging.keys import parse_message_key
from planpipe.messaging.routes import RoutingConfig, StaticRouter
from planpipe.routing.router import Router
from planpipe_tests.unit.routing.helpers import envelope

pytestmark = pytest.mark.unit

CASES = [
    {},
    {"total_time_ms": 9_000.0},
    {"actual_rows": 5_000_000},
    {"query_type": "DDL"},
    {"route_tag": "baseline", "total_time_ms": 9_000.0},
    {"priority": "low"},
    {"priority": "regression_candidate", "query_hash": "q-0002"},
]


@pytest.mark.parametrize("rate", [100, 37, 0])
@pytest.mark.parametrize("overrides", CASES)
def test_static_router_matches_a_router_without_snapshots(overrides: dict[str, object], rate: int) -> None:
    config = RoutingConfig(sample_rate_pct=rate)
    env = envelope(**overrides)
    static = StaticRouter(config).route_envelope(env)
    routed = Router(config).route_envelope(env)
    assert (static.route, static.priority, static.key, static.sampled) == (
        routed.route,
        routed.priority,
        routed.key,
        routed.sampled,
    )
    assert parse_message_key(static.key) == (static.priority, env.query_hash)
