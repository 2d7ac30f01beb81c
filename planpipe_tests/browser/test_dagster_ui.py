"""The Dagster UI of the code location, driven in headless Chromium against the real test instance.

One materialization of the ingest asset with its checks is produced first, so the UI has a real
asset check evaluation to show. Then the test opens, asserts and screenshots:

* the global asset lineage with both groups expanded: nodes and edges of the ingest lineage
  (edges read from the SVG geometry, and cross-checked with the webserver's GraphQL);
* the automation page and the sensor page: kafka_lag_sensor is running (its default status);
* the checks tab of plan_observations: dlq_rate_sla passed, including in this test's run.
"""

import re
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
from playwright.sync_api import Browser, Page, expect

from planpipe.defs.ingest.assets import OBSERVATIONS, ingest_micro_batches
from planpipe.defs.ingest.checks import sla_checks
from planpipe.settings import Settings
from planpipe_tests.browser.conftest import VIEWPORT, Webserver
from planpipe_tests.integration.workload import MALFORMED, capture_plans, create_workload, make_envelopes, publish

pytestmark = [pytest.mark.browser, pytest.mark.integration]

LOCATION = "planpipe"
REPOSITORY = "__repository__"  # the implicit repository of a `python_module` code location
# Display name in the graph → asset key.
LINEAGE_NODES = {
    "query_plans": ("kafka", "query_plans"),
    "plan_observations": ("plan_observations",),
    "plan_baselines": ("plan_baselines",),
    "plan_rollups_hourly": ("plan_rollups_hourly",),
}
LINEAGE_EDGES = {
    ("query_plans", "plan_observations"),
    ("plan_observations", "plan_baselines"),
    ("plan_observations", "plan_rollups_hourly"),
}
UI_TIMEOUT_MS = 30_000

# Asset nodes and edges of the lineage graph, in page coordinates. Edges are unlabeled SVG paths
# from the right side of the upstream node to (just before the arrowhead) the left side of the
# downstream one, so they are matched to nodes by their end points.
GRAPH_GEOMETRY_JS = """
() => {
  const svg = document.querySelector('svg[class*="AssetGraphExplorer_svgContainer"]');
  const nodes = [...svg.querySelectorAll('[class*="AssetNode_assetNodeBox"]')].map((box) => {
    const name = box.querySelector('[class*="AssetNode_assetName"] [data-tooltip]');
    const r = box.getBoundingClientRect();
    return {name: name ? name.getAttribute('data-tooltip') : null, x: r.left, y: r.top, w: r.width, h: r.height};
  });
  const edges = [...svg.querySelectorAll('path[marker-end]')].map((path) => {
    const ctm = path.getScreenCTM();
    const start = path.getPointAtLength(0).matrixTransform(ctm);
    const end = path.getPointAtLength(path.getTotalLength()).matrixTransform(ctm);
    return {from: [start.x, start.y], to: [end.x, end.y]};
  });
  return {nodes, edges};
}
"""

GRAPHQL_QUERY = """
query BrowserTest($sensor: SensorSelector!) {
  assetNodes { assetKey { path } groupName dependencyKeys { path } }
  sensorOrError(sensorSelector: $sensor) {
    __typename
    ... on Sensor { name sensorState { status } }
  }
}
"""


def _shot(page: Page, directory: Path, name: str) -> Path:
    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot {name}: {path}  ({page.url})")
    return path


def _node_at(nodes: list[dict[str, Any]], point: list[float], side: str) -> str | None:
    """The node whose left/right side is at `point` (x, y), allowing for the arrowhead gap."""
    x, y = point
    for node in nodes:
        edge_x = node["x"] + node["w"] if side == "right" else node["x"]
        tolerance = max(8.0, 0.05 * node["w"])
        if abs(x - edge_x) <= tolerance and node["y"] <= y <= node["y"] + node["h"]:
            return str(node["name"])
    return None


def _materialize_with_checks(settings: Settings, instance: dg.DagsterInstance, resources: dict[str, object]) -> str:
    with psycopg.connect(settings.pg_dsn) as conn:
        (workload,) = conn.execute("SELECT to_regclass('pp_workload.accounts') IS NOT NULL").fetchone() or (False,)
    if not workload:
        create_workload(settings.pg_dsn)
    plans = capture_plans(settings.pg_dsn)
    publish(settings, make_envelopes(plans, 1200, "browser"), MALFORMED[:1])  # 1 in 1201: 0.083 % < 0.15 %
    result = dg.materialize(
        [ingest_micro_batches, *sla_checks],
        instance=instance,
        resources=resources,
        selection=dg.AssetSelection.assets(ingest_micro_batches),
    )
    assert result.success
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["dlq_rate_sla"].passed
    assert evaluations["dlq_rate_sla"].asset_key == OBSERVATIONS
    return result.run_id


def test_dagster_ui_shows_lineage_sensors_and_checks(
    browser: Browser,  # first: a missing chromium fails the test before the stack and webserver start
    page: Page,
    dagster_webserver: Webserver,
    dagster_instance: dg.DagsterInstance,
    settings: Settings,
    dagster_resources: dict[str, object],
    screenshot_dir: Path,
) -> None:
    run_id = _materialize_with_checks(settings, dagster_instance, dagster_resources)
    base = dagster_webserver.url

    # The webserver's GraphQL: the lineage and the sensor state the UI is built from.
    response = page.request.post(
        f"{base}/graphql",
        data={
            "query": GRAPHQL_QUERY,
            "variables": {
                "sensor": {
                    "repositoryLocationName": LOCATION,
                    "repositoryName": REPOSITORY,
                    "sensorName": "kafka_lag_sensor",
                }
            },
        },
    )
    assert response.ok, response.text()
    data = response.json()["data"]
    dependencies = {
        tuple(node["assetKey"]["path"]): {tuple(dep["path"]) for dep in node["dependencyKeys"]}
        for node in data["assetNodes"]
    }
    assert set(LINEAGE_NODES.values()) <= set(dependencies)
    for upstream, downstream in LINEAGE_EDGES:
        assert LINEAGE_NODES[upstream] in dependencies[LINEAGE_NODES[downstream]], (upstream, downstream)
    assert data["sensorOrError"] == {
        "__typename": "Sensor",
        "name": "kafka_lag_sensor",
        "sensorState": {"status": "RUNNING"},
    }

    # (a) Global asset lineage with every group expanded (group ids in both of the UI's formats).
    groups = sorted({node["groupName"] for node in data["assetNodes"] if node["groupName"]})
    expanded = ",".join([f"global@global:{g}" for g in groups] + [f"{REPOSITORY}@{LOCATION}:{g}" for g in groups])
    page.goto(f"{base}/asset-groups?expanded={expanded}")
    expect(page.get_by_text("Global asset lineage")).to_be_visible(timeout=UI_TIMEOUT_MS)
    graph = page.locator('svg[class*="AssetGraphExplorer_svgContainer"]')
    nodes = graph.locator('[class*="AssetNode_assetNodeContainer"]')
    expect(nodes.nth(len(LINEAGE_NODES) - 1)).to_be_attached(timeout=UI_TIMEOUT_MS)  # the graph is laid out
    minimal = graph.locator('[class*="AssetNode_minimalAssetNodeBox"]').count()
    assert minimal == 0, (
        f"the lineage graph is drawn zoomed out ({minimal} of {nodes.count()} nodes minimal, names truncated): "
        f"the viewport {VIEWPORT} is too small for this many assets — enlarge VIEWPORT"
    )
    for name in LINEAGE_NODES:
        node_name = graph.locator(f'[class*="AssetNode_assetName"] [data-tooltip="{name}"]')
        expect(node_name).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(graph.get_by_text("Loading...")).to_have_count(0, timeout=UI_TIMEOUT_MS)
    geometry = page.evaluate(GRAPH_GEOMETRY_JS)
    drawn = {
        (
            _node_at(geometry["nodes"], edge["from"], side="right"),
            _node_at(geometry["nodes"], edge["to"], side="left"),
        )
        for edge in geometry["edges"]
    }
    assert drawn >= LINEAGE_EDGES, f"edges drawn: {drawn}; nodes: {geometry['nodes']}"
    _shot(page, screenshot_dir, "1-asset-lineage")

    # (b) Sensors: listed on the automation page with the running switch on, and "Running" on their page.
    page.goto(f"{base}/automation")
    row = page.locator('div[class*="ListItem_listItem__"]').filter(
        has=page.locator(f'a[href="/locations/{LOCATION}/sensors/kafka_lag_sensor"]')
    )
    expect(row).to_have_count(1, timeout=UI_TIMEOUT_MS)
    expect(row).to_contain_text("Standard sensor")
    expect(row.locator('label[class*="Checkbox_formatSwitch"] input[type="checkbox"]')).to_be_checked()
    _shot(page, screenshot_dir, "2-automation")

    page.goto(f"{base}/locations/{LOCATION}/sensors/kafka_lag_sensor")
    running = page.locator("tr").filter(has=page.locator("td", has_text=re.compile(r"^\s*Running\s*$")))
    expect(running).to_have_count(1, timeout=UI_TIMEOUT_MS)
    expect(running.locator('input[type="checkbox"]')).to_be_checked()
    expect(page.get_by_text("Polls consumer-group lag on query-plans")).to_be_visible()
    _shot(page, screenshot_dir, "3-kafka-lag-sensor")

    # (c) The check result: plan_observations → Checks → dlq_rate_sla succeeded, latest evaluation passed …
    page.goto(f"{base}/assets/plan_observations?view=checks")
    check_row = page.locator('[class*="AssetChecks_checkRow"]').filter(has_text="dlq_rate_sla")
    expect(check_row).to_have_count(1, timeout=UI_TIMEOUT_MS)
    expect(check_row).to_contain_text("Succeeded")
    expect(check_row.locator('[aria-label="check_circle"]')).to_be_visible()
    evaluation = page.get_by_text("Evaluation result", exact=True).locator("xpath=..")
    expect(evaluation).to_contain_text("Passed")
    expect(page.get_by_text("This is a blocking asset check.")).to_be_visible()
    _shot(page, screenshot_dir, "4-plan-observations-checks")

    # … and this test's run is in its execution history as passed.
    page.get_by_text("Execution history", exact=True).click()
    ours = page.locator("tr").filter(has=page.locator(f'a[href^="/runs/{run_id}"]'))
    expect(ours.first).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(ours.first).to_contain_text("Passed")
    _shot(page, screenshot_dir, "5-dlq-rate-sla-history")
