"""Which plan is a query's yardstick: the accepted plan, or — when it was accepted
automatically — the dominant plan of the query's settling period; the other plans of that
period are the query's alternatives (a plan that depends on constants)."""

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl

from planpipe.plans.scan import Scope, group_keys_of, query_key
from planpipe.plans.verdicts import DetectionConfig

__all__ = ["Baselines", "SettledBaseline", "baseline_frame", "settle"]

Baselines = Mapping[tuple[str, str], str] | pl.DataFrame


def baseline_frame(baselines: Baselines, auto_accepted: Iterable[tuple[str, str]]) -> pl.DataFrame:
    """(cluster, query) → accepted fingerprint, and whether that plan was accepted automatically."""
    if isinstance(baselines, pl.DataFrame):
        frame = baselines.select(pl.col("cluster_id", "query_hash", "fingerprint").cast(pl.String))
    else:
        keys = list(baselines)
        frame = pl.DataFrame(
            {
                "cluster_id": [k[0] for k in keys],
                "query_hash": [k[1] for k in keys],
                "fingerprint": [baselines[k] for k in keys],
            },
            schema={"cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String},
        )
    auto = set(auto_accepted)
    flags = [(c, q) in auto for c, q in frame.select("cluster_id", "query_hash").rows()] if auto else None
    return frame.select(
        query_key().alias("qk"),
        group_keys_of(frame).alias("accepted_gk"),
        pl.Series("auto", flags if flags is not None else [False] * frame.height, dtype=pl.Boolean),
    )


@dataclass(frozen=True)
class SettledBaseline:
    """An automatic baseline that its settling period replaced."""

    cluster_id: str
    query_hash: str
    fingerprint: str  # the settling period's dominant plan
    replaced: str  # the automatically accepted first plan
    executions: int  # of the dominant plan in the settling period
    settling_executions: int  # of the query in the settling period


def settle(
    groups: pl.DataFrame, base: pl.DataFrame, slots: pl.DataFrame, scope: Scope, config: DetectionConfig
) -> tuple[pl.DataFrame, list[SettledBaseline]]:
    """Each plan with its query's baseline plan (`base_gk`) and whether it is an alternative.

    The settling period of a query: its first time slots up to `settling_executions`
    executions or `settling_hours` after its first execution, whichever ends first.
    """
    with_query = slots.join(groups.select("gk", "qk"), on="gk", how="inner")
    per_slot = with_query.group_by("qk", "slot").agg(pl.col("n").sum()).sort("qk", "slot")
    first_slot = per_slot.group_by("qk").agg(pl.col("slot").min().alias("first_slot"))
    hours_slots = math.ceil(config.settling_hours * 3600 / scope.slot_s)
    by_count = pl.col("slot").filter(pl.col("cum") >= config.settling_executions).min()
    by_time = pl.col("first_slot").first() + hours_slots
    settle = (
        per_slot.join(first_slot, on="qk")
        .with_columns(pl.col("n").cum_sum().over("qk").alias("cum"))
        .group_by("qk")
        .agg(
            pl.min_horizontal(by_count.fill_null(by_time), by_time).alias("settle_slot"),
            ((pl.col("cum").max() >= config.settling_executions) | (by_time < scope.slot_of(scope.end))).alias(
                "settled"
            ),
        )
    )
    in_period = (
        with_query.join(settle, on="qk")
        .filter(pl.col("slot") <= pl.col("settle_slot"))
        .group_by("qk", "gk")
        .agg(pl.col("n").sum().alias("n_settling"))
    )
    total = in_period.group_by("qk").agg(pl.col("n_settling").sum().alias("settling_total"))
    dominant = in_period.sort("n_settling", "gk", descending=[True, False]).group_by("qk").first()
    queries = (
        base.join(settle, on="qk", how="inner")
        .join(
            dominant.select("qk", pl.col("gk").alias("dominant_gk"), pl.col("n_settling").alias("dominant_n")),
            on="qk",
            how="left",
        )
        .join(total, on="qk", how="left")
        .join(
            in_period.select("qk", pl.col("gk").alias("accepted_gk"), pl.col("n_settling").alias("accepted_n")),
            on=["qk", "accepted_gk"],
            how="left",
        )
        .with_columns(
            # Replaced only by a plan that ran more often than the first one: a tie keeps it.
            base_gk=pl.when(
                pl.col("auto")
                & pl.col("settled")
                & pl.col("dominant_gk").is_not_null()
                & (pl.col("dominant_n") > pl.col("accepted_n").fill_null(0))
            )
            .then(pl.col("dominant_gk"))
            .otherwise(pl.col("accepted_gk"))
        )
    )
    plans = (
        groups.join(queries.select("qk", "base_gk", "accepted_gk", "settle_slot"), on="qk", how="inner")
        .join(in_period.select("gk", "n_settling"), on="gk", how="left")
        .with_columns(
            alternative=(pl.col("gk") != pl.col("base_gk")) & pl.col("n_settling").is_not_null(),
        )
    )
    names = {
        int(g): (str(c), str(q), str(f))
        for g, c, q, f in groups.select("gk", "cluster_id", "query_hash", "fingerprint").rows()
    }
    settled = []
    for base_gk, accepted_gk, dominant_n, total_n in (
        queries.filter(pl.col("base_gk") != pl.col("accepted_gk"))
        .select("base_gk", "accepted_gk", "dominant_n", "settling_total")
        .rows()
    ):
        if int(base_gk) in names and int(accepted_gk) in names:
            c, q, fp = names[int(base_gk)]
            settled.append(SettledBaseline(c, q, fp, names[int(accepted_gk)][2], int(dominant_n), int(total_n)))
    return plans, settled
