"""Routing guide dimensions: cluster topology (regions, their topics) and latency multipliers
against the query's baseline p95."""

import json
from pathlib import Path

import psycopg
import pytest

from planpipe.contract import Envelope, encode_envelope
from planpipe.routing.candidates import BaselineLatencies
from planpipe.routing.router import Router, RoutingConfig, RoutingDecision, ingest_route, route_for
from planpipe.settings import load_settings
from planpipe.topology import (
    Topology,
    TopologyError,
    load_topology,
    parse_topology,
    region_settings,
)


def _envelope(ms: float, cluster: str = "pg-eu-1", query: str = "q1", **extra: object) -> Envelope:
    return Envelope(
        query_hash=query, execution_timestamp=1.0, cluster_id=cluster, plan_text="[{}]", actual_rows=1,
        total_time_ms=ms, **extra,  # type: ignore[arg-type]
    )  # fmt: skip


TOPOLOGY = {"regions": {"eu": {"clusters": ["pg-eu-*", "billing-fra"]}, "us": {"clusters": ["pg-us-*"],
            "topic": "plans-us"}}}  # fmt: skip


def test_clusters_map_to_regions_with_their_own_topics() -> None:
    topology = parse_topology(TOPOLOGY, "query-plans")
    assert topology.names == ("eu", "us")
    assert topology.region_of("pg-eu-7") == "eu"
    assert topology.region_of("billing-fra") == "eu"
    assert topology.region_of("pg-us-1") == "us"
    assert topology.region_of("pg-apac-1") is None  # unmapped: the base topics
    assert (topology.region("eu").topic, topology.region("eu").dlq_topic) == ("query-plans.eu", "query-plans.eu.dlq")
    assert (topology.region("us").topic, topology.region("us").dlq_topic) == ("plans-us", "plans-us.dlq")


@pytest.mark.parametrize(
    "bad",
    [
        {"regions": {"EU!": {"clusters": ["a"]}}},
        {"regions": {"eu": {"clusters": []}}},
        {"regions": {"eu": {"clusters": ["a"], "topic": "query-plans"}}},
        {"regions": {"eu": {"clusters": ["a"], "topic": "x"}, "us": {"clusters": ["b"], "topic": "x"}}},
        {"regions": ["eu"]},
    ],
)
def test_inconsistent_topologies_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(TopologyError):
        parse_topology(bad, "query-plans")


def test_region_settings_and_planpipe_region(tmp_path: Path) -> None:
    path = tmp_path / "topology.json"
    path.write_text(json.dumps(TOPOLOGY))
    env = {"PLANPIPE_HOME": str(tmp_path), "PLANPIPE_TOPOLOGY_FILE": str(path)}
    base = load_settings(env)
    assert base.region is None and base.topic == "query-plans"
    assert load_topology(base, env).names == ("eu", "us")
    eu = region_settings(base, "eu", load_topology(base, env))
    assert (eu.topic, eu.dlq_topic, eu.consumer_group) == ("query-plans.eu", "query-plans.eu.dlq",
                                                            "query-plan-consumers.eu")  # fmt: skip
    assert eu.parquet_dir == base.data_dir / "region=eu" / "observations"
    regional = load_settings({**env, "PLANPIPE_REGION": "eu"})
    assert regional.region == "eu" and regional.topic == "query-plans.eu"
    with pytest.raises(TopologyError, match="not in the topology"):
        load_settings({**env, "PLANPIPE_REGION": "apac"})
    with pytest.raises(TopologyError):
        region_settings(eu, "us")


def test_latency_multiplier_routes_slow_plans_critical_after_the_explicit_tag() -> None:
    config = RoutingConfig(latency_multiplier=3.0)
    assert route_for(_envelope(301.0), config, baseline_p95_ms=100.0) == "critical"
    assert route_for(_envelope(300.0), config, baseline_p95_ms=100.0) == "baseline"  # strictly slower
    assert route_for(_envelope(301.0), config, baseline_p95_ms=None) == "baseline"  # no baseline yet
    assert route_for(_envelope(301.0, route_tag="baseline"), config, baseline_p95_ms=100.0) == "baseline"
    assert route_for(_envelope(301.0, query_type="DDL"), config, baseline_p95_ms=100.0) == "critical"
    assert route_for(_envelope(301.0), RoutingConfig(latency_multiplier=None), baseline_p95_ms=100.0) == "baseline"
    with pytest.raises(ValueError):
        RoutingConfig(latency_multiplier=float("nan"))


def test_router_consults_baselines_and_topology() -> None:
    topology = parse_topology(TOPOLOGY, "query-plans")
    router = Router(
        RoutingConfig(),
        baselines=lambda: {("pg-eu-1", "q1"): 10.0},
        region_of=topology.region_of,
    )
    slow = router.route_raw(encode_envelope(_envelope(45.0)))
    assert isinstance(slow, RoutingDecision)
    assert (slow.route, slow.priority, slow.region, slow.baseline_p95_ms) == ("critical", "critical", "eu", 10.0)
    other = router.route_raw(encode_envelope(_envelope(45.0, cluster="pg-apac-1")))
    assert isinstance(other, RoutingDecision)
    assert (other.route, other.region, other.baseline_p95_ms) == ("baseline", None, None)


def test_baseline_cache_refreshes_per_ttl_and_keeps_the_last_snapshot_on_errors() -> None:
    calls: list[int] = []

    def loader(dsn: str) -> dict[tuple[str, str], float]:
        calls.append(1)
        if len(calls) == 2:
            raise psycopg.OperationalError("store down")
        return {("c", "q"): float(len(calls))}

    cache = BaselineLatencies("postgresql://unused", ttl_s=0.0, loader=loader)
    assert cache() == {("c", "q"): 1.0}
    assert cache() == {("c", "q"): 1.0}  # the failed refresh kept the last snapshot
    assert cache() == {("c", "q"): 3.0}
    slow = BaselineLatencies("postgresql://unused", ttl_s=3600, loader=loader)
    slow()
    slow()
    assert len(calls) == 4  # one load within the TTL


def test_topology_without_regions_changes_nothing() -> None:
    assert Topology().region_of("anything") is None


def test_ingest_recovers_the_routers_latency_verdict_from_the_key() -> None:
    config = RoutingConfig()
    assert ingest_route(_envelope(45.0), "critical", config) == "critical"  # flagged by the multiplier
    assert ingest_route(_envelope(45.0), "standard", config) == "baseline"
    assert ingest_route(_envelope(45.0, priority="critical"), "critical", config) == "baseline"  # explicit
    assert ingest_route(_envelope(45.0, route_tag="ddl"), "critical", config) == "ddl"
