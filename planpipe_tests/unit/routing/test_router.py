"""Routing rules, priorities, message keys and the Router facade."""

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planpipe.contract import PRIORITIES, ROUTES, Priority, Reason, Route
from planpipe.routing.router import (
    RETENTION_DAYS,
    Rejection,
    Router,
    RoutingConfig,
    RoutingDecision,
    message_key,
    parse_message_key,
    priority_for,
    route_for,
)
from planpipe_tests.unit.routing.helpers import envelope, raw_envelope, sample

pytestmark = pytest.mark.unit

CRITICAL_MS = 5000.0
CRITICAL_ROWS = 1_000_000

# --- route_for -------------------------------------------------------------------------------

ROUTE_CASES: list[tuple[str, dict[str, Any], Route]] = [
    ("small-select", {"query_type": "SELECT"}, "baseline"),
    ("no-query-type", {}, "baseline"),
    ("time-exactly-threshold", {"total_time_ms": CRITICAL_MS}, "baseline"),
    ("time-just-above", {"total_time_ms": 5000.001}, "critical"),
    ("time-just-below", {"total_time_ms": 4999.999}, "baseline"),
    ("rows-exactly-threshold", {"actual_rows": CRITICAL_ROWS}, "baseline"),
    ("rows-just-above", {"actual_rows": CRITICAL_ROWS + 1}, "critical"),
    ("both-exactly-threshold", {"total_time_ms": CRITICAL_MS, "actual_rows": CRITICAL_ROWS}, "baseline"),
    ("rows-above-time-small", {"actual_rows": 5_000_000, "total_time_ms": 0.1}, "critical"),
    ("dml-slow", {"query_type": "DML", "total_time_ms": 60_000.0}, "critical"),
    ("ddl", {"query_type": "DDL"}, "ddl"),
    ("ddl-lowercase", {"query_type": "ddl"}, "ddl"),
    ("ddl-mixed-case", {"query_type": "Ddl"}, "ddl"),
    ("ddl-beats-critical-time", {"query_type": "DDL", "total_time_ms": 90_000.0}, "ddl"),
    ("ddl-beats-critical-rows", {"query_type": "DDL", "actual_rows": 10**9}, "ddl"),
    ("ddl-prefix-is-not-ddl", {"query_type": "DDLX"}, "baseline"),
    ("padded-ddl-is-not-ddl", {"query_type": " DDL"}, "baseline"),
    ("tag-baseline-beats-ddl", {"route_tag": "baseline", "query_type": "DDL"}, "baseline"),
    ("tag-baseline-beats-critical", {"route_tag": "baseline", "total_time_ms": 90_000.0}, "baseline"),
    ("tag-ddl-beats-critical", {"route_tag": "ddl", "actual_rows": 10**9}, "ddl"),
    ("tag-critical-on-fast-query", {"route_tag": "critical", "query_type": "SELECT"}, "critical"),
    ("tag-critical-beats-ddl", {"route_tag": "critical", "query_type": "DDL"}, "critical"),
]


@pytest.mark.parametrize(("overrides", "expected"), [pytest.param(o, r, id=i) for i, o, r in ROUTE_CASES])
def test_route_for(overrides: dict[str, Any], expected: Route) -> None:
    assert route_for(envelope(**overrides), RoutingConfig()) == expected


def test_route_for_uses_config_thresholds() -> None:
    config = RoutingConfig(critical_time_ms=100.0, critical_rows=10)
    assert route_for(envelope(total_time_ms=100.0, actual_rows=10), config) == "baseline"
    assert route_for(envelope(total_time_ms=100.5), config) == "critical"
    assert route_for(envelope(actual_rows=11), config) == "critical"


def test_retention_days() -> None:
    assert dict(RETENTION_DAYS) == {"critical": 7, "baseline": 30, "ddl": 30}
    assert set(RETENTION_DAYS) == set(ROUTES)
    with pytest.raises(TypeError):
        RETENTION_DAYS["critical"] = 1  # type: ignore[index]


# --- priority_for ----------------------------------------------------------------------------

PRIORITY_CASES: list[tuple[str, dict[str, Any], Route, frozenset[str], Priority]] = [
    ("explicit-low-on-critical", {"priority": "low"}, "critical", frozenset(), "low"),
    ("explicit-low-beats-candidate", {"priority": "low"}, "baseline", frozenset({"q-0001"}), "low"),
    ("explicit-standard-beats-candidate", {"priority": "standard"}, "critical", frozenset({"q-0001"}), "standard"),
    ("explicit-critical-on-baseline", {"priority": "critical"}, "baseline", frozenset(), "critical"),
    ("candidate-beats-critical", {}, "critical", frozenset({"q-0001"}), "regression_candidate"),
    ("candidate-on-baseline", {}, "baseline", frozenset({"q-0001"}), "regression_candidate"),
    ("other-candidate", {}, "baseline", frozenset({"q-9999"}), "standard"),
    ("critical-route", {}, "critical", frozenset(), "critical"),
    ("baseline-route", {}, "baseline", frozenset(), "standard"),
    ("ddl-route", {}, "ddl", frozenset(), "standard"),
]


@pytest.mark.parametrize(
    ("overrides", "route", "candidates", "expected"),
    [pytest.param(o, r, c, p, id=i) for i, o, r, c, p in PRIORITY_CASES],
)
def test_priority_for(overrides: dict[str, Any], route: Route, candidates: frozenset[str], expected: Priority) -> None:
    assert priority_for(envelope(**overrides), route, candidates) == expected


@pytest.mark.parametrize("route", ROUTES)
def test_low_only_when_the_agent_says_so(route: Route) -> None:
    assert priority_for(envelope(), route, {"q-0001"}) != "low"
    assert priority_for(envelope(), route, ()) != "low"


# --- message keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("priority", PRIORITIES)
@pytest.mark.parametrize("query_hash", ["5f1c2a9e", "a:b:c", "ünïcode-😀", "-123"])
def test_message_key_round_trip(priority: Priority, query_hash: str) -> None:
    key = message_key(priority, query_hash)
    assert key == f"{priority}:{query_hash}".encode()
    assert parse_message_key(key) == (priority, query_hash)


def test_message_key_format() -> None:
    assert message_key("regression_candidate", "abc123") == b"regression_candidate:abc123"


@settings(database=None)
@given(st.sampled_from(PRIORITIES), st.text(min_size=1))
def test_message_key_round_trip_property(priority: Priority, query_hash: str) -> None:
    assert parse_message_key(message_key(priority, query_hash)) == (priority, query_hash)


@pytest.mark.parametrize(
    "key",
    [b"", b"abc123", b"low", b"low:", b":abc", b"urgent:abc", b"LOW:abc", b" low:abc", b"\xff:abc", b"low:\xff"],
)
def test_parse_message_key_rejects(key: bytes) -> None:
    with pytest.raises(ValueError):
        parse_message_key(key)


# --- RoutingConfig ---------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = RoutingConfig()
    assert (config.critical_time_ms, config.critical_rows) == (5000.0, 1_000_000)
    assert (config.sample_rate_pct, config.queue_capacity) == (100, 10_000)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sample_rate_pct = 50  # type: ignore[misc]


@pytest.mark.parametrize("rate", [0, 1, 50, 100])
def test_config_accepts_rates(rate: int) -> None:
    assert RoutingConfig(sample_rate_pct=rate).sample_rate_pct == rate


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sample_rate_pct": -1}, ValueError),
        ({"sample_rate_pct": 101}, ValueError),
        ({"sample_rate_pct": 50.0}, TypeError),
        ({"sample_rate_pct": True}, TypeError),
        ({"critical_time_ms": -1.0}, ValueError),
        ({"critical_time_ms": float("nan")}, ValueError),
        ({"critical_time_ms": float("inf")}, ValueError),
        ({"critical_rows": -1}, ValueError),
        ({"queue_capacity": 0}, ValueError),
    ],
)
def test_config_rejects(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        RoutingConfig(**kwargs)


# --- Router ----------------------------------------------------------------------------------

INGESTED = "explain_router_ingested_total"
DROPPED = "explain_router_dropped_total"
EVAL_COUNT = "explain_router_route_evaluation_duration_ms_count"


def test_route_raw_decision_and_metrics() -> None:
    before = sample(INGESTED, route="critical", priority="critical")
    evaluations = sample(EVAL_COUNT)

    decision = Router().route_raw(raw_envelope(query_hash="slow-1", total_time_ms=7000.0))

    assert isinstance(decision, RoutingDecision)
    assert (decision.route, decision.priority, decision.sampled) == ("critical", "critical", True)
    assert decision.key == b"critical:slow-1"
    assert decision.query_hash == "slow-1"
    assert decision.retention_days == 7
    assert decision.envelope.total_time_ms == 7000.0
    assert sample(INGESTED, route="critical", priority="critical") == before + 1
    assert sample(EVAL_COUNT) == evaluations + 1


def test_route_raw_rejection_keeps_bytes_untouched() -> None:
    raw = raw_envelope(actual_rows=-5)
    before = sample(DROPPED, reason="schema_violation")
    evaluations = sample(EVAL_COUNT)

    rejection = Router().route_raw(raw)

    assert isinstance(rejection, Rejection)
    assert rejection.raw is raw
    assert (rejection.reason, rejection.field) == (Reason.OUT_OF_RANGE, "actual_rows")
    assert rejection.detail
    assert sample(DROPPED, reason="schema_violation") == before + 1
    assert sample(EVAL_COUNT) == evaluations + 1


@pytest.mark.parametrize("raw", [b"", b"\xff", b"[]", b"{}"])
def test_route_raw_never_raises_on_garbage(raw: bytes) -> None:
    assert isinstance(Router().route_raw(raw), Rejection)


def test_sampled_out_is_counted_not_ingested() -> None:
    dropped = sample(DROPPED, reason="sampled_out")
    ingested = sample(INGESTED, route="baseline", priority="standard")

    decision = Router(RoutingConfig(sample_rate_pct=0)).route_raw(raw_envelope())

    assert isinstance(decision, RoutingDecision)
    assert decision.sampled is False
    assert decision.key == b"standard:q-0001"  # still fully routed, for logs and replays
    assert sample(DROPPED, reason="sampled_out") == dropped + 1
    assert sample(INGESTED, route="baseline", priority="standard") == ingested


def test_regression_candidates_provider_is_consulted_per_message() -> None:
    candidates: set[str] = set()
    router = Router(regression_candidates=lambda: candidates)

    first = router.route_envelope(envelope(query_hash="h1"))
    candidates.add("h1")
    second = router.route_envelope(envelope(query_hash="h1"))

    assert (first.priority, second.priority) == ("standard", "regression_candidate")
    assert second.key == b"regression_candidate:h1"


def test_explicit_tags_flow_through_router() -> None:
    decision = Router().route_raw(raw_envelope(query_type="DDL", route_tag="critical", priority="low"))
    assert isinstance(decision, RoutingDecision)
    assert (decision.route, decision.priority, decision.key) == ("critical", "low", b"low:q-0001")
