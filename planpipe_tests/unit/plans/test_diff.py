import json

import pytest

from planpipe.plans.diff import PlanDiff, diff_nodes, diff_plans
from planpipe.plans.normalize import PlanNode, PlanParseError, normalize_plan
from planpipe_tests.unit.plans._fixtures import plan_text

pytestmark = pytest.mark.unit


def diff(baseline: str, new: str) -> PlanDiff:
    return diff_plans(plan_text(baseline), plan_text(new))


def described(result: PlanDiff) -> list[tuple[str, str | None, str | None]]:
    return [(c.kind, c.before, c.after) for c in result.changes]


@pytest.mark.parametrize(
    ("baseline", "new"),
    [("report", "report"), ("point_aid_42", "point_aid_7"), ("parallel_2", "parallel_2_none_launched")],
)
def test_same_plan_gives_an_empty_diff(baseline: str, new: str) -> None:
    result = diff(baseline, new)
    assert result.changes == []
    assert result.identical
    assert result.baseline_fingerprint == result.new_fingerprint
    assert result.to_markdown().startswith("No plan changes")


def test_dropped_index_names_the_index_and_the_new_scan() -> None:
    result = diff("point_aid_42", "point_aid_42_no_index")
    assert described(result) == [
        ("changed", "Index Scan using pgbench_accounts_pkey on pgbench_accounts", "Seq Scan on pgbench_accounts")
    ]
    change = result.changes[0]
    assert change.description == (
        "Index Scan using pgbench_accounts_pkey on pgbench_accounts → Seq Scan on pgbench_accounts"
    )
    assert "Index Name: pgbench_accounts_pkey → —" in change.details
    assert "Filter: — → (aid = ?)" in change.details
    markdown = result.to_markdown()
    assert "pgbench_accounts_pkey" in markdown and "`Seq Scan on pgbench_accounts`" in markdown


def test_dropped_index_with_a_parallel_scan_reports_the_new_gather() -> None:
    result = diff("point_aid_42", "point_aid_42_no_index_parallel")
    assert described(result) == [
        ("added", None, "Gather"),
        (
            "changed",
            "Index Scan using pgbench_accounts_pkey on pgbench_accounts",
            "Parallel Seq Scan on pgbench_accounts",
        ),
    ]
    assert [(c.path, c.baseline_path) for c in result.changes] == [("0", None), ("0.0", "0")]


def test_join_method_change() -> None:
    result = diff("join_default", "join_no_hashjoin")
    assert ("changed", "Hash Join", "Nested Loop") in described(result)
    assert result.changes[0].description == "Hash Join → Nested Loop"
    assert (
        "changed",
        "Seq Scan on pgbench_accounts a",
        "Index Scan using pgbench_accounts_pkey on pgbench_accounts a",
    ) in described(result)
    assert ("removed", "Hash", None) in described(result)
    assert "`Hash Join` → `Nested Loop`" in result.to_markdown()


def test_join_method_change_the_other_way() -> None:
    result = diff("join_no_hashjoin", "join_default")
    assert result.changes[0].description == "Nested Loop → Hash Join"
    assert ("added", None, "Hash") in described(result)


def test_hash_join_to_merge_join() -> None:
    assert described(diff("join_default", "join_merge")) == [
        ("changed", "Hash Join", "Merge Join"),
        ("changed", "Seq Scan on pgbench_accounts a", "Index Scan using pgbench_accounts_pkey on pgbench_accounts a"),
        ("changed", "Hash", "Sort"),
    ]


def test_join_order_change_reports_the_moved_scan() -> None:
    result = diff("join_order_planner", "join_order_as_written")
    moved = [c for c in result.changes if c.before == "Seq Scan on pgbench_branches b"]
    assert len(moved) == 1
    assert (moved[0].baseline_path, moved[0].path) == ("0.0.1.0.0", "0.0.0")
    assert "moved" in moved[0].description
    assert {c.kind for c in result.changes} >= {"added", "removed", "changed"}


def test_parallel_plan_adds_a_gather() -> None:
    assert described(diff("parallel_0", "parallel_2")) == [
        ("added", None, "Gather"),
        ("changed", "Seq Scan on pgbench_accounts", "Parallel Seq Scan on pgbench_accounts"),
    ]


def test_condition_change_is_a_changed_node_with_details() -> None:
    doc = json.loads(plan_text("join_default"))
    doc[0]["Plan"]["Plans"][1]["Plans"][0]["Filter"] = "(delta < 0)"
    result = diff_plans(plan_text("join_default"), json.dumps(doc))
    assert len(result.changes) == 1
    change = result.changes[0]
    assert (change.kind, change.path, change.before, change.after) == (
        "changed",
        "0.1.0",
        "Seq Scan on pgbench_history h",
        "Seq Scan on pgbench_history h",
    )
    assert change.details == ("Filter: (delta > ?) → (delta < ?)",)
    assert change.description == "Seq Scan on pgbench_history h: Filter: (delta > ?) → (delta < ?)"


def test_markdown_lists_every_change_with_both_summaries() -> None:
    result = diff("join_default", "join_no_hashjoin")
    markdown = result.to_markdown()
    assert markdown.startswith(f"**{len(result.changes)} node changes**")
    assert result.baseline_summary in markdown and result.new_summary in markdown
    assert markdown.count("\n- **") == len(result.changes)


def test_markdown_keeps_backticks_inside_code_spans() -> None:
    baseline = PlanNode(node_type="Seq Scan", relation_name="t", alias="t", filter="(a = 1)")
    new = PlanNode(node_type="Seq Scan", relation_name="t", alias="t", filter='("we`ird" = 1)')
    markdown = diff_nodes(baseline, new).to_markdown()
    assert '`` Filter: (a = ?) → ("we`ird" = ?) ``' in markdown


def _chain(depth: int, leaf: str) -> PlanNode:
    node = PlanNode(node_type="Seq Scan", relation_name=leaf, alias=leaf, parent_relationship="Outer")
    for _ in range(depth):
        node = PlanNode(node_type="Limit", parent_relationship="Outer", plans=(node,))
    return node


def test_very_deep_plans_fall_back_to_positional_alignment() -> None:
    result = diff_nodes(_chain(400, "a"), _chain(400, "b"))
    assert described(result) == [("removed", "Seq Scan on a", None), ("added", None, "Seq Scan on b")]
    assert result.changes[0].path == "0" + ".0" * 400


def test_wide_plans_stay_fast() -> None:
    members = tuple(
        PlanNode(node_type="Seq Scan", relation_name=f"part_{i}", alias=f"part_{i}", parent_relationship="Member")
        for i in range(150)
    )
    baseline = PlanNode(node_type="Append", plans=members)
    new = PlanNode(node_type="Append", plans=members[:70] + members[71:])
    assert described(diff_nodes(baseline, new)) == [("removed", "Seq Scan on part_70", None)]


def test_diff_of_normalized_trees_matches_diff_of_texts() -> None:
    a, b = plan_text("join_default"), plan_text("join_merge")
    assert diff_nodes(normalize_plan(a), normalize_plan(b)) == diff_plans(a, b)


def test_unparseable_input_raises_plan_parse_error() -> None:
    with pytest.raises(PlanParseError):
        diff_plans(plan_text("report"), "Seq Scan on t")


def _scan(name: str, relationship: str = "Member") -> PlanNode:
    return PlanNode(node_type="Seq Scan", relation_name=name, alias=name, parent_relationship=relationship)


def test_new_inner_node_adopting_all_children() -> None:
    baseline = PlanNode(node_type="Append", plans=(_scan("a"), _scan("b")))
    merge = PlanNode(node_type="Merge Append", parent_relationship="Member", plans=(_scan("a"), _scan("b")))
    new = PlanNode(node_type="Append", plans=(merge, _scan("c")))
    result = diff_nodes(baseline, new)
    assert [(c.kind, c.path, c.after) for c in result.changes] == [
        ("added", "0.0", "Merge Append"),
        ("added", "0.1", "Seq Scan on c"),
    ]
    back = diff_nodes(new, baseline)
    assert [(c.kind, c.path, c.before) for c in back.changes] == [
        ("removed", "0.0", "Merge Append"),
        ("removed", "0.1", "Seq Scan on c"),
    ]


VARIED = [
    "point_aid_42",
    "point_aid_42_no_index_parallel",
    "join_default",
    "join_no_hashjoin",
    "join_merge",
    "join_memoize",
    "join_order_planner",
    "join_order_as_written",
    "cte",
    "subplan",
    "hashed_subplan",
    "grouping_sets",
    "bitmap_or",
    "incremental_sort",
    "report",
]


@pytest.mark.parametrize("baseline", VARIED)
def test_alignment_accounts_for_every_node_exactly_once(baseline: str) -> None:
    # Internal invariant of the edit script: each baseline node is mapped or removed,
    # each new node mapped or added, never both, never twice.
    from planpipe.plans.diff import _Aligner, _flatten

    for new in VARIED:
        a, b = _flatten(normalize_plan(plan_text(baseline))), _flatten(normalize_plan(plan_text(new)))
        aligner = _Aligner(a, b)
        aligner.emit_tree(0, 0)
        left = [i for i, _ in aligner.mapped] + aligner.deleted
        right = [j for _, j in aligner.mapped] + aligner.inserted
        assert sorted(left) == list(range(len(a.nodes))), (baseline, new)
        assert sorted(right) == list(range(len(b.nodes))), (baseline, new)
        # Mapped pairs keep ancestry: a mapped node's mapped ancestors map to its ancestors.
        mapping = dict(aligner.mapped)
        for i, j in aligner.mapped:
            parent = a.parents[i]
            while parent >= 0 and parent not in mapping:
                parent = a.parents[parent]
            if parent >= 0:
                assert b.paths[j].startswith(b.paths[mapping[parent]] + "."), (baseline, new)
        cost = aligner.tree(0, 0)
        assert cost == 0 if baseline == new else cost > 0
