import contextlib
import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planpipe.plans.normalize import (
    PlanNode,
    PlanParseError,
    load_normalized,
    node_label,
    normalize_expression,
    normalize_plan,
    plan_summary,
    summarize,
)
from planpipe_tests.unit.plans._fixtures import FIXTURES, UNTIMED, all_names, plan_doc, plan_text

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("expression", "normalized"),
    [
        ("(aid = 42)", "(aid = ?)"),
        ("(aid = 7)", "(aid = ?)"),
        ("((abalance)::numeric > 3.5)", "((abalance)::numeric > ?)"),
        # ruleutils prints negative int4 and integral numeric quoted with a cast:
        # the same constant as a bare one.
        ("((abalance)::numeric > '-12'::numeric)", "((abalance)::numeric > ?)"),
        ("(abalance > '-5'::integer)", "(abalance > ?)"),
        ("(x > 1.5e+10)", "(x > ?)"),
        ("(x > -0.25)", "(x > ?)"),
        ("(a - 5)", "(a - ?)"),
        ("(filler = 'it''s'::bpchar)", "(filler = ?::bpchar)"),
        ("(filler <> 'plain'::bpchar)", "(filler <> ?::bpchar)"),
        ("(path = E'C:\\\\tmp'::text)", "(path = ?::text)"),
        ("(aid = '42'::bigint)", "(aid = ?::bigint)"),
        ("(aid = ANY ('{1,2,3}'::integer[]))", "(aid = ANY (?::integer[]))"),
        ("(aid = ANY ('{-1,20}'::integer[]))", "(aid = ANY (?::integer[]))"),
        ("(aid = $1)", "(aid = ?)"),
        ("(aid = ANY (ARRAY[$1, $2, $3]))", "(aid = ANY (ARRAY[?]))"),
        ("(ts > '2024-01-01 00:00:00+00'::timestamp with time zone)", "(ts > ?::timestamp with time zone)"),
        ("(ctid = '(0,1)'::tid)", "(ctid = ?::tid)"),
        # Not constants: identifiers, generated names, type modifiers.
        ("(t1.col2 = t2.col3)", "(t1.col2 = t2.col3)"),
        ("(\"Col 1\" = 'x'::text)", '("Col 1" = ?::text)'),
        ('("it\'s" > 5)', '("it\'s" > ?)'),
        ("((bbalance)::numeric >= (InitPlan 1).col1)", "((bbalance)::numeric >= (InitPlan 1).col1)"),
        ("(NOT (ANY (tid = (hashed SubPlan 1).col1)))", "(NOT (ANY (tid = (hashed SubPlan 1).col1)))"),
        ("((price)::numeric(10,2) > 3.50)", "((price)::numeric(10,2) > ?)"),
        ("((price)::numeric(10,2) = '3'::numeric(10,2))", "((price)::numeric(10,2) = ?::numeric(10,2))"),
        ("((price)::numeric(10,2) = 3.50::numeric(10,2))", "((price)::numeric(10,2) = ?::numeric(10,2))"),
        ('("t1"."c2" = 3)', '("t1"."c2" = ?)'),
        ("(col1 = t2.col2)", "(col1 = t2.col2)"),
        ("(x = 'SubPlan 1'::text)", "(x = ?::text)"),
        (
            "((name)::character varying(20) = 'a'::character varying(20))",
            "((name)::character varying(20) = ?::character varying(20))",
        ),
        ("(flag AND (x IS NULL))", "(flag AND (x IS NULL))"),
        (
            "w1 AS (PARTITION BY bid ORDER BY abalance ROWS UNBOUNDED PRECEDING)",
            "w1 AS (PARTITION BY bid ORDER BY abalance ROWS UNBOUNDED PRECEDING)",
        ),
    ],
)
def test_constants_are_replaced(expression: str, normalized: str) -> None:
    assert normalize_expression(expression) == normalized
    assert normalize_expression(normalized) == normalized  # idempotent


@given(st.text())
@settings(UNTIMED, max_examples=300)
def test_expression_normalization_is_total_and_idempotent(text: str) -> None:
    once = normalize_expression(text)
    assert normalize_expression(once) == once


def test_only_structural_fields_are_kept() -> None:
    root = normalize_plan(plan_text("join_merge"))
    encoded = msgspec.json.encode(root).decode()
    for volatile in ("Cost", "Actual", "Rows", "Width", "Blocks", "Sort Method", "Sort Space", "Disabled", "Async"):
        assert volatile not in encoded
    assert root.node_type == "Merge Join"
    assert root.merge_cond == "(a.aid = h.aid)"
    sort = root.plans[1]
    assert (sort.node_type, sort.parent_relationship, sort.sort_key) == ("Sort", "Inner", ("h.aid",))
    assert sort.plans[0].filter == "(delta > ?)"


def test_structural_fields_of_other_node_kinds() -> None:
    grouping = normalize_plan(plan_text("grouping_sets"))
    assert grouping.strategy == "Mixed"
    assert grouping.grouping_sets is not None
    assert [g.hash_keys for g in grouping.grouping_sets] == [(("bid", "tid"),), (("bid",),), None]
    memoize = normalize_plan(plan_text("join_memoize")).plans[0].plans[1]
    assert (memoize.node_type, memoize.cache_key) == ("Memoize", "h.tid")
    incremental = normalize_plan(plan_text("incremental_sort")).plans[0]
    assert (incremental.sort_key, incremental.presorted_key) == (("aid", "abalance"), ("aid",))
    cte = normalize_plan(plan_text("cte"))
    assert [(n.parent_relationship, n.subplan_name, n.cte_name) for n in cte.plans][:2] == [
        ("InitPlan", "CTE per_branch", None),
        ("Outer", None, "per_branch"),
    ]
    update = normalize_plan(plan_text("update"))
    assert (update.node_type, update.operation, update.relation_name) == ("ModifyTable", "Update", "pgbench_accounts")
    assert normalize_plan(plan_text("tid_scan")).tid_cond == "(ctid = ?::tid)"
    assert normalize_plan(plan_text("index_only_backward")).plans[0].scan_direction == "Backward"
    assert normalize_plan(plan_text("parallel_2")).plans[0].plans[0].parallel_aware


def test_every_fixture_decodes_and_is_in_the_manifest() -> None:
    names = all_names()
    assert len(names) >= 30
    manifest = [json.loads(line) for line in (FIXTURES / "manifest.jsonl").read_text().splitlines()]
    assert sorted(entry["name"] for entry in manifest) == names
    for name in names:
        assert normalize_plan(plan_text(name)).node_type


def test_bare_object_and_auto_explain_forms() -> None:
    array_form = plan_text("point_aid_42")
    bare_object = json.dumps(json.loads(array_form)[0])
    auto_explain = plan_text("point_aid_42_autoexplain")
    assert "Query Text" in auto_explain
    expected = normalize_plan(array_form)
    assert normalize_plan(bare_object) == expected
    assert normalize_plan(auto_explain) == expected
    assert normalize_plan(array_form.encode()) == expected


def test_direct_construction_normalizes_too() -> None:
    node = PlanNode(node_type="Seq Scan", relation_name="t", alias="t", filter="(a = 1)", sort_key=("(b + 2)",))
    assert (node.filter, node.sort_key) == ("(a = ?)", ("(b + ?)",))


def test_temp_schema_number_is_dropped() -> None:
    text = '{"Plan": {"Node Type": "Seq Scan", "Relation Name": "t", "Schema": "pg_temp_7", "Alias": "t"}}'
    assert normalize_plan(text).schema == "pg_temp"


def test_load_normalized_round_trips() -> None:
    for name in ("report", "cte", "grouping_sets"):
        root = normalize_plan(plan_text(name))
        assert load_normalized(msgspec.json.encode(root)) == root
    with pytest.raises(PlanParseError):
        load_normalized("[]")


@pytest.mark.parametrize(
    ("name", "summary"),
    [
        ("point_aid_42", "Index Scan using pgbench_accounts_pkey on pgbench_accounts"),
        ("point_aid_42_no_index", "Seq Scan on pgbench_accounts"),
        ("join_default", "Hash Join → Seq Scan on pgbench_accounts a, Seq Scan on pgbench_history h"),
        (
            "join_no_hashjoin",
            "Nested Loop → Seq Scan on pgbench_history h, Index Scan using pgbench_accounts_pkey on pgbench_accounts a",
        ),
        ("parallel_2", "Aggregate → Gather → Parallel Seq Scan on pgbench_accounts"),
        ("group_by", "HashAggregate → Seq Scan on pgbench_accounts"),
        ("update", "Update on pgbench_accounts → Index Scan using pgbench_accounts_pkey on pgbench_accounts"),
        ("index_only_backward", "Limit → Index Only Scan Backward using pgbench_accounts_pkey on pgbench_accounts"),
        ("bitmap_or", "Aggregate → Bitmap Heap Scan on pgbench_accounts"),
        (
            "cte",
            "Nested Loop → Seq Scan on pgbench_accounts, CTE Scan on per_branch p, Seq Scan on pgbench_branches b",
        ),
    ],
)
def test_plan_summary(name: str, summary: str) -> None:
    assert plan_summary(plan_text(name)) == summary


def test_summary_of_a_wide_plan_stays_short() -> None:
    members = tuple(
        PlanNode(node_type="Seq Scan", relation_name=f"p{i}", alias=f"p{i}", parent_relationship="Member")
        for i in range(300)
    )
    summary = summarize(PlanNode(node_type="Append", plans=members))
    assert summary == "Append → " + ", ".join(f"Seq Scan on p{i}" for i in range(8)) + ", … 292 more"


def test_labels_follow_text_explain() -> None:
    assert node_label(PlanNode(node_type="Hash Join", join_type="Left")) == "Hash Left Join"
    assert node_label(PlanNode(node_type="Nested Loop", join_type="Anti")) == "Nested Loop Anti Join"
    assert node_label(PlanNode(node_type="Aggregate", strategy="Sorted", partial_mode="Finalize")) == (
        "Finalize GroupAggregate"
    )
    assert node_label(PlanNode(node_type="Bitmap Index Scan", index_name="i")) == "Bitmap Index Scan on i"
    assert node_label(PlanNode(node_type="Function Scan", function_name="generate_series", alias="g")) == (
        "Function Scan on generate_series g"
    )
    assert node_label(PlanNode(node_type="Seq Scan", relation_name="t", schema="public", alias="x")) == (
        "Seq Scan on public.t x"
    )


# --- unparseable input ---------------------------------------------------------

TWO_PLANS = '[{"Plan": {"Node Type": "Result"}}, {"Plan": {"Node Type": "Result"}}]'
TEXT_FORMAT = "Seq Scan on pgbench_accounts  (cost=0.00..2890.00 rows=1 width=4)\n  Filter: (aid = 42)"
PSQL_OUTPUT = 'QUERY PLAN\n----------\n[{"Plan": {"Node Type": "Result"}}]'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not valid JSON"),
        ("   ", "not valid JSON"),
        (TEXT_FORMAT, "not valid JSON"),
        (PSQL_OUTPUT, "not valid JSON"),
        ('[{"Plan": {"Node Type": "Result"}', "not valid JSON"),
        ("null", "not an EXPLAIN JSON plan"),
        ('"[{\\"Plan\\": {}}]"', "not an EXPLAIN JSON plan"),
        ("42", "not an EXPLAIN JSON plan"),
        ("[]", "exactly one plan, found 0"),
        (TWO_PLANS, "exactly one plan, found 2"),
        ("[1]", "not an EXPLAIN JSON plan"),
        ("{}", "missing required field `Plan`"),
        ('{"Query Text": "select 1"}', "missing required field `Plan`"),
        ('{"Plan": {}}', "missing required field `Node Type`"),
        ('{"Plan": {"Node Type": 5}}', "Node Type"),
        ('{"Plan": {"Node Type": "Seq Scan", "Plans": "x"}}', "Plans"),
        ('{"Plan": {"Node Type": "Seq Scan", "Filter": ["x"]}}', "Filter"),
        ('{"Plan": {"Node Type": "Seq Scan", "Parallel Aware": "yes"}}', "Parallel Aware"),
        ("\ud800", "UTF-8"),
    ],
)
def test_unparseable_text_raises_plan_parse_error(text: str, message: str) -> None:
    with pytest.raises(PlanParseError, match=message) as raised:
        normalize_plan(text)
    assert isinstance(raised.value, ValueError)


def test_truncated_real_plan_is_unparseable() -> None:
    text = plan_text("report")
    with pytest.raises(PlanParseError):
        normalize_plan(text[: len(text) // 2])


def test_invalid_utf8_bytes_are_unparseable() -> None:
    with pytest.raises(PlanParseError):
        normalize_plan(b'{"Plan": {"Node Type": "\xff"}}')


def test_absurdly_deep_nesting_is_unparseable() -> None:
    depth = 5000
    text = '{"Plan": ' + '{"Node Type": "Limit", "Plans": [' * depth + '{"Node Type": "Result"}' + "]}" * depth + "}"
    with pytest.raises(PlanParseError, match="nested too deeply"):
        normalize_plan(text)


@given(st.text())
@settings(UNTIMED, max_examples=500)
def test_arbitrary_text_raises_nothing_but_plan_parse_error(text: str) -> None:
    with contextlib.suppress(PlanParseError):
        normalize_plan(text)


@given(st.binary())
@settings(UNTIMED, max_examples=200)
def test_arbitrary_bytes_raise_nothing_but_plan_parse_error(data: bytes) -> None:
    with contextlib.suppress(PlanParseError):
        normalize_plan(data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
_NODE_KEYS = st.sampled_from(["Node Type", "Plans", "Filter", "Sort Key", "Parallel Aware", "Grouping Sets", "Alias"])
_NODEISH = st.recursive(
    st.dictionaries(_NODE_KEYS, _JSON, max_size=4),
    lambda inner: st.dictionaries(_NODE_KEYS, inner | st.lists(inner, max_size=3) | _JSON, max_size=5),
    max_leaves=10,
)


@given(st.one_of(_JSON, _NODEISH.map(lambda n: {"Plan": n}), _NODEISH.map(lambda n: [{"Plan": n}])))
@settings(UNTIMED, max_examples=500)
def test_arbitrary_json_raises_nothing_but_plan_parse_error(document: object) -> None:
    try:
        root = normalize_plan(json.dumps(document))
    except PlanParseError:
        return
    assert isinstance(root, PlanNode)


def test_a_real_plan_with_garbage_in_a_structural_field_is_unparseable() -> None:
    doc = plan_doc("join_default")
    doc[0]["Plan"]["Plans"][1]["Plans"][0]["Filter"] = 17
    with pytest.raises(PlanParseError, match=r"Plans\[1\]\.Plans\[0\]\.Filter"):
        normalize_plan(json.dumps(doc))
