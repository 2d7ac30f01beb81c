"""Real plans captured by planpipe_tests/fixtures/plans/capture_fixtures.py."""

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "plans"


# Property tests check behaviour, not speed: no per-example deadline and no "too slow"
# health check, which a busy machine trips (a slow rerun reads as flaky timing).
UNTIMED = settings(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plan_text(name: str) -> str:
    return (FIXTURES / f"{name}.json").read_text()


def plan_doc(name: str) -> Any:
    """The fixture parsed with stdlib json, for tests that edit a real plan."""
    return json.loads(plan_text(name))


def all_names() -> list[str]:
    return sorted(p.stem for p in FIXTURES.glob("*.json"))


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [node]
    for child in node.get("Plans", []):
        nodes.extend(walk(child))
    return nodes


def expected_work(plan_text: str) -> tuple[int | None, int | None, float | None, int | None]:
    """The top node's work totals read with stdlib json: an oracle for `plan_work`'s columns."""
    doc = json.loads(plan_text)
    top = (doc[0] if isinstance(doc, list) else doc)["Plan"]

    def total(a: str, b: str) -> int | None:
        return None if a not in top and b not in top else top.get(a, 0) + top.get(b, 0)

    rows = top.get("Actual Rows")
    return (
        total("Shared Hit Blocks", "Shared Read Blocks"),
        total("Temp Read Blocks", "Temp Written Blocks"),
        None if rows is None else float(rows),
        top.get("Actual Loops"),
    )
