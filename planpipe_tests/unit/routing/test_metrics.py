"""The router's metrics: guide names, own registry, HTTP exposition."""

import urllib.request

import prometheus_client
import pytest
from prometheus_client import generate_latest

from planpipe.contract import PRIORITIES, ROUTES
from planpipe.routing import metrics

pytestmark = pytest.mark.unit

NAMES = [
    "explain_router_ingested_total",
    "explain_router_dropped_total",
    "explain_router_queue_depth",
    "explain_router_route_evaluation_duration_ms_bucket",
    "explain_router_batch_flush_duration_ms_bucket",
]


def test_guide_metric_names_are_exposed() -> None:
    text = generate_latest(metrics.REGISTRY).decode()
    for name in NAMES:
        assert f"\n{name}" in text, name


def test_series_exist_before_first_use() -> None:
    for route in ROUTES:
        for priority in PRIORITIES:
            labels: dict[str, str] = {"route": route, "priority": priority}
            assert metrics.REGISTRY.get_sample_value("explain_router_ingested_total", labels) is not None
    for reason in metrics.DROP_REASONS:
        assert metrics.REGISTRY.get_sample_value("explain_router_dropped_total", {"reason": reason}) is not None


def test_dedicated_registry_keeps_the_global_one_clean() -> None:
    assert metrics.REGISTRY is not prometheus_client.REGISTRY
    assert prometheus_client.REGISTRY.get_sample_value("explain_router_queue_depth") is None


def test_batch_flush_histogram_observes_milliseconds() -> None:
    name = "explain_router_batch_flush_duration_ms_bucket"
    before = metrics.REGISTRY.get_sample_value(name, {"le": "1200.0"}) or 0.0
    metrics.BATCH_FLUSH_MS.observe(900.0)
    assert metrics.REGISTRY.get_sample_value(name, {"le": "1200.0"}) == before + 1


def test_metrics_server_serves_registry_on_loopback() -> None:
    server, thread = metrics.start_metrics_server(0)
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert "explain_router_queue_depth" in body
        assert "python_gc_objects_collected_total" not in body  # only the router's registry
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
