"""Remediation derived from real plans: missing indexes, statistics, and pg_hint_plan hints
validated by parsing them back against the baseline plan."""

import json

import pytest

from planpipe.plans.normalize import normalize_plan
from planpipe.plans.remediation import hint_for, parse_hint, remediation_for, validate_hint
from planpipe_tests.unit.plans._fixtures import all_names, plan_doc, plan_text

pytestmark = pytest.mark.unit


def test_a_dropped_index_names_it_with_its_captured_definition() -> None:
    doc = plan_doc("point_aid_42")
    doc[0]["planpipe"] = {"indexes": {"pgbench_accounts_pkey": "CREATE UNIQUE INDEX pgbench_accounts_pkey ON ..."}}
    remedy = remediation_for("plan_flip_regression", json.dumps(doc), plan_text("point_aid_42_no_index"))
    assert remedy.missing_indexes == (
        {"name": "pgbench_accounts_pkey", "table": "pgbench_accounts",
         "definition": "CREATE UNIQUE INDEX pgbench_accounts_pkey ON ..."},
    )  # fmt: skip
    assert remedy.hint is not None and remedy.hint.validated
    assert remedy.hint.text == "/*+ IndexScan(pgbench_accounts pgbench_accounts_pkey) */"
    assert any("pgbench_accounts_pkey" in line for line in remedy.lines())


def test_without_a_captured_definition_the_index_is_still_named() -> None:
    remedy = remediation_for("plan_flip_regression", plan_text("point_aid_42"), plan_text("point_aid_42_no_index"))
    assert [(i["name"], i["definition"]) for i in remedy.missing_indexes] == [("pgbench_accounts_pkey", None)]


def test_join_hint_forces_methods_and_order_of_the_baseline() -> None:
    baseline = normalize_plan(plan_text("join_order_planner"))
    hint = hint_for(baseline)
    assert hint == ("/*+ IndexScan(a pgbench_accounts_pkey) SeqScan(b) SeqScan(t) NestLoop(b t) HashJoin(a b t) "
                    "Leading((a (b t))) */")  # fmt: skip
    directives, leading = parse_hint(hint)
    assert ("HashJoin", ("a", "b", "t")) in directives and leading == ("a", ("b", "t"))
    assert validate_hint(hint, baseline) == ()
    # The new plan's hint does not force the baseline: validation says what differs.
    other = hint_for(normalize_plan(plan_text("join_order_as_written")))
    problems = validate_hint(other, baseline)
    assert problems and any("Leading" in p or "is not forced" in p or "no join" in p for p in problems)


@pytest.mark.parametrize("text", ["SeqScan(a)", "/*+ SeqScan(a */", "/*+ Leading((a b c)) */", "/*+ ?? */"])
def test_malformed_hints_are_problems_not_crashes(text: str) -> None:
    assert validate_hint(text, normalize_plan(plan_text("join_default")))


def test_every_fixture_plan_gets_a_hint_that_validates_or_says_why() -> None:
    for name in all_names():
        baseline = normalize_plan(plan_text(name))
        hint = hint_for(baseline)
        if hint:
            problems = validate_hint(hint, baseline)
            assert problems == () or all("alias appears twice" in p for p in problems), (name, hint, problems)


def test_statistics_from_estimates_that_missed_and_same_plan_notes() -> None:
    doc = plan_doc("point_aid_42")
    assert remediation_for("same_plan_slower", json.dumps(doc), json.dumps(doc)).statistics == ()
    doc[0]["Plan"]["Plan Rows"], doc[0]["Plan"]["Actual Rows"] = 1, 5000.0  # the estimate missed 5000×
    remedy = remediation_for("same_plan_slower", json.dumps(doc), json.dumps(doc))
    assert remedy.hint is None and remedy.missing_indexes == ()
    assert remedy.notes  # what to check for a same-plan slowdown
    assert [s["sql"] for s in remedy.statistics] == ["ANALYZE pgbench_accounts"]
    assert "5000" in remedy.statistics[0]["reason"]
    assert remediation_for("plan_flip_improvement", plan_text("point_aid_42"), plan_text("point_aid_42")).as_dict() == {
        "missing_indexes": [], "statistics": [], "hint": None, "notes": []}  # fmt: skip
