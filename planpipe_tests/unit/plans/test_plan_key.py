"""The plan key the ingest writes and detection groups by: stable, and filled in for rows without it."""

import polars as pl
import pytest

from planpipe.plans.plan_key import PLAN_KEY, fill_plan_keys, plan_key, plan_keys

pytestmark = pytest.mark.unit


def test_the_key_is_the_same_in_every_process_and_version() -> None:
    # Files written months apart must agree: a changed function would split every plan's history.
    assert plan_key("a", "1", "x") == 6133634798504614996
    assert plan_key("a", "1", "x") != plan_key("a", "1x", "") != plan_key("b", "1", "x")


def test_keys_per_row_and_null_without_a_plan() -> None:
    frame = pl.DataFrame(
        {"cluster_id": ["a", "b", None, "a"], "query_hash": ["1", "1", "2", "1"], "fingerprint": ["x", "x", "y", "x"]}
    )
    a, b = plan_key("a", "1", "x"), plan_key("b", "1", "x")
    assert plan_keys(frame).to_list() == [a, b, None, a]


@pytest.mark.parametrize("colliding_hashes", [False, True])
def test_rows_without_a_key_get_it_in_place(monkeypatch: pytest.MonkeyPatch, colliding_hashes: bool) -> None:
    names = [("c1", f"q{i % 7}", f"f{i % 3}") for i in range(40)]
    frame = pl.DataFrame(
        {
            "cluster_id": [n[0] for n in names] + [None],
            "query_hash": [n[1] for n in names] + ["q0"],
            "fingerprint": [n[2] for n in names] + ["f0"],
            "order": list(range(41)),
            # Half the rows were written with their key (one of them wrong, to show it is kept as written).
            PLAN_KEY: [plan_key(*n) if i % 2 else None for i, n in enumerate(names)] + [None],
        },
        schema_overrides={PLAN_KEY: pl.UInt64},
    ).with_columns(pl.when(pl.col("order") == 1).then(7).otherwise(pl.col(PLAN_KEY)).alias(PLAN_KEY))
    if colliding_hashes:  # two plans with one polars hash: looked up by their names instead
        monkeypatch.setattr(pl.Expr, "hash", lambda self, *a, **k: self.is_null().cast(pl.UInt64))
    filled = fill_plan_keys(frame.lazy()).collect()
    assert filled.columns == frame.columns
    assert filled["order"].to_list() == list(range(41))
    expected = [7 if i == 1 else plan_key(*n) for i, n in enumerate(names)] + [None]
    assert filled[PLAN_KEY].to_list() == expected
    without_column = fill_plan_keys(frame.drop(PLAN_KEY).lazy()).collect()
    assert without_column[PLAN_KEY].to_list() == [plan_key(*n) for n in names] + [None]
