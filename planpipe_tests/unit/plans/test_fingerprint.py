import hashlib
import json
import os
import random
import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planpipe.plans.fingerprint import (
    FINGERPRINT_PERSON,
    fingerprint,
    fingerprint_node,
    identify_plan,
    normalized_json,
)
from planpipe.plans.normalize import load_normalized, normalize_plan, plan_summary
from planpipe_tests.unit.plans._fixtures import FIXTURES, UNTIMED, all_names, plan_doc, plan_text, walk

pytestmark = pytest.mark.unit


def fp(name: str) -> str:
    return fingerprint(plan_text(name))


def raw_values(name: str, key: str) -> list[Any]:
    doc = plan_doc(name)
    return [node[key] for node in walk(doc[0]["Plan"]) if key in node]


# --- one statement, one plan ------------------------------------------------------


@pytest.mark.parametrize(
    "group",
    [
        ["point_aid_42", "point_aid_7", "point_aid_99999"],
        # A generic plan ($1) and auto_explain's log form are the same plan too.
        ["point_aid_42", "point_aid_generic", "point_aid_42_autoexplain"],
        ["filter_const_a", "filter_const_b"],
        ["in_list_a", "in_list_b"],
    ],
)
def test_other_constants_give_the_same_fingerprint(group: list[str]) -> None:
    assert len({fp(name) for name in group}) == 1


def test_sort_method_does_not_change_the_fingerprint() -> None:
    assert raw_values("sort_quicksort", "Sort Method") == ["quicksort"]
    assert raw_values("sort_external", "Sort Method") == ["external merge"]
    assert fp("sort_quicksort") == fp("sort_external")


def test_fresh_statistics_do_not_change_the_fingerprint() -> None:
    assert raw_values("stats_before_analyze", "Plan Rows") != raw_values("stats_after_analyze", "Plan Rows")
    assert fp("stats_before_analyze") == fp("stats_after_analyze")


def test_workers_launched_do_not_change_the_fingerprint() -> None:
    names = ["parallel_2", "parallel_2_one_launched", "parallel_2_none_launched"]
    assert [raw_values(name, "Workers Launched") for name in names] == [[2], [1], [0]]
    assert len({fp(name) for name in names}) == 1


def test_triggers_do_not_change_the_fingerprint() -> None:
    assert plan_doc("update_fk_trigger")[0]["Triggers"]
    doc = plan_doc("update_fk_trigger")
    doc[0]["Triggers"] = []
    assert fingerprint(json.dumps(doc)) == fp("update_fk_trigger")


# --- other plans ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("baseline", "other"),
    [
        ("point_aid_42", "point_aid_42_no_index"),  # dropped index → Seq Scan
        ("point_aid_42", "point_aid_42_no_index_parallel"),  # → Gather + Parallel Seq Scan
        ("join_default", "join_no_hashjoin"),  # Hash Join → Nested Loop
        ("join_default", "join_merge"),  # Hash Join → Merge Join
        ("join_order_planner", "join_order_as_written"),  # join order
        ("parallel_0", "parallel_2"),  # serial vs parallel
    ],
)
def test_another_plan_gives_another_fingerprint(baseline: str, other: str) -> None:
    assert fp(baseline) != fp(other)


def test_distinct_shapes_have_distinct_fingerprints() -> None:
    # One representative per equivalence group above; every other fixture is its own plan.
    same_as = {
        "point_aid_7": "point_aid_42",
        "point_aid_99999": "point_aid_42",
        "point_aid_generic": "point_aid_42",
        "point_aid_42_autoexplain": "point_aid_42",
        "filter_const_b": "filter_const_a",
        "in_list_b": "in_list_a",
        "sort_external": "sort_quicksort",
        "stats_after_analyze": "stats_before_analyze",
        "parallel_2_one_launched": "parallel_2",
        "parallel_2_none_launched": "parallel_2",
        "update_fk_trigger": "update",  # the SET list is not in a non-VERBOSE plan
    }
    representatives = [name for name in all_names() if name not in same_as]
    fingerprints = {name: fp(name) for name in representatives}
    assert len(set(fingerprints.values())) == len(representatives), fingerprints
    for name, representative in same_as.items():
        assert fp(name) == fp(representative), name


# --- volatile fields, mutated in real plans ---------------------------------------------

VOLATILE_NUMBERS = [
    "Startup Cost",
    "Total Cost",
    "Plan Rows",
    "Plan Width",
    "Actual Startup Time",
    "Actual Total Time",
    "Actual Rows",
    "Actual Loops",
    "Rows Removed by Filter",
    "Rows Removed by Join Filter",
    "Rows Removed by Index Recheck",
    "Heap Fetches",
    "Exact Heap Blocks",
    "Lossy Heap Blocks",
    "Shared Hit Blocks",
    "Shared Read Blocks",
    "Shared Dirtied Blocks",
    "Shared Written Blocks",
    "Local Hit Blocks",
    "Local Read Blocks",
    "Temp Read Blocks",
    "Temp Written Blocks",
    "Shared I/O Read Time",
    "Shared I/O Write Time",
    "Workers Planned",
    "Workers Launched",
    "Sort Space Used",
    "Hash Buckets",
    "Original Hash Buckets",
    "Hash Batches",
    "Original Hash Batches",
    "Peak Memory Usage",
    "Disk Usage",
    "HashAgg Batches",
    "Planned Partitions",
    "Cache Hits",
    "Cache Misses",
    "Cache Evictions",
    "Cache Overflows",
    "Index Searches",
    "Maximum Storage",
]
VOLATILE_TEXT = {
    "Sort Method": ["quicksort", "external merge", "top-N heapsort"],
    "Sort Space Type": ["Memory", "Disk"],
    "Storage": ["Memory", "Disk"],
}
VOLATILE_TOP_LEVEL = ["Planning Time", "Execution Time", "Triggers", "Planning", "JIT", "Settings", "Query Identifier"]


def mutate(doc: Any, rng: random.Random) -> Any:
    top = doc[0] if isinstance(doc, list) else doc
    for node in walk(top["Plan"]):
        for key in rng.sample(VOLATILE_NUMBERS, k=rng.randint(1, len(VOLATILE_NUMBERS))):
            node[key] = rng.choice([0, 1, rng.randint(0, 10**9), round(rng.uniform(0, 1e6), 3)])
        for key, choices in VOLATILE_TEXT.items():
            if rng.random() < 0.5:
                node[key] = rng.choice(choices)
        node["Disabled"] = rng.random() < 0.5
        node["Async Capable"] = rng.random() < 0.5
        if rng.random() < 0.3:
            node["Output"] = ["a", "b"]
            node["Workers"] = [{"Worker Number": 0, "Actual Rows": rng.randint(0, 99)}]
    for key in VOLATILE_TOP_LEVEL:
        top[key] = rng.choice([None, 1.5, [], {"Timing": {"Total": 3.2}}])
    return doc


@pytest.mark.parametrize("name", ["join_memoize", "report", "parallel_2", "sort_external", "grouping_sets", "cte"])
@given(seed=st.integers(0, 2**32 - 1))
@settings(UNTIMED, max_examples=25)
def test_volatile_fields_never_change_the_fingerprint(name: str, seed: int) -> None:
    rng = random.Random(seed)
    mutated = mutate(plan_doc(name), rng)
    assert fingerprint(json.dumps(mutated)) == fp(name)


@pytest.mark.parametrize("name", ["report", "bitmap_or"])
def test_key_order_and_whitespace_do_not_change_the_fingerprint(name: str) -> None:
    def shuffled(value: Any, rng: random.Random) -> Any:
        if isinstance(value, dict):
            items = list(value.items())
            rng.shuffle(items)
            return {k: shuffled(v, rng) for k, v in items}
        if isinstance(value, list):
            return [shuffled(v, rng) for v in value]
        return value

    doc = shuffled(plan_doc(name), random.Random(7))
    assert fingerprint(json.dumps(doc, separators=(",", ":"))) == fp(name)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Node Type", "Bitmap Heap Scan"),
        ("Index Name", "some_other_idx"),
        ("Relation Name", "pgbench_tellers"),
        ("Alias", "x"),
        ("Join Type", "Left"),
        ("Parent Relationship", "Outer"),
        ("Index Cond", "(bid = 1)"),
        ("Filter", "(abalance > 0)"),
        ("Parallel Aware", True),
    ],
)
def test_structural_fields_do_change_the_fingerprint(key: str, value: Any) -> None:
    doc = plan_doc("join_no_hashjoin")
    doc[0]["Plan"]["Plans"][1][key] = value
    assert fingerprint(json.dumps(doc)) != fp("join_no_hashjoin")


# --- the digest itself -------------------------------------------------------------------

TINY = '[{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t", "Alias": "t", "Filter": "(a = 42)"}}]'


def test_fingerprint_is_the_digest_of_the_normalized_json() -> None:
    text = plan_text("report")
    digest = hashlib.blake2b(normalized_json(text).encode(), digest_size=16, person=FINGERPRINT_PERSON)
    assert fingerprint(text) == digest.hexdigest()
    assert re.fullmatch(r"[0-9a-f]{32}", fingerprint(text))


def test_normalized_json_is_canonical() -> None:
    assert normalized_json(TINY) == '{"Node Type":"Seq Scan","Relation Name":"t","Alias":"t","Filter":"(a = ?)"}'
    doc = json.loads(normalized_json(plan_text("report")))
    assert doc["Node Type"] == "Limit"
    assert "Actual Total Time" not in normalized_json(plan_text("report"))
    assert load_normalized(normalized_json(plan_text("report"))) == normalize_plan(plan_text("report"))


def test_fingerprint_is_pinned() -> None:
    # Changing normalization or PlanNode changes every stored fingerprint: bump
    # FINGERPRINT_VERSION/FINGERPRINT_PERSON and update this value on purpose.
    assert fingerprint(TINY) == "459074661918c6866dd0c5417327c3b6"


def test_fingerprint_is_stable_across_processes() -> None:
    code = (
        "import sys; from planpipe.plans.fingerprint import fingerprint; print(fingerprint(open(sys.argv[1]).read()))"
    )
    path = str(FIXTURES / "report.json")
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code, path],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("0", "1", "12345")
    }
    assert outputs == {fp("report")}


def test_identify_plan_agrees_with_the_single_functions() -> None:
    text = plan_text("join_memoize")
    identity = identify_plan(text)
    assert identity.fingerprint == fingerprint(text) == fingerprint_node(identity.root)
    assert identity.normalized_json == normalized_json(text)
    assert identity.summary == plan_summary(text)
