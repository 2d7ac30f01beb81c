"""Synthetic executions in time order, with their work, for the statistical core's tests."""

from datetime import UTC, datetime

import numpy as np
import polars as pl

NOW = datetime(2026, 3, 10, 12, tzinfo=UTC)
END = NOW.timestamp()
STEP = 60.0


class Series:
    """Executions in time order: each `add` continues where the query's previous one stopped."""

    def __init__(self, seed: int = 3) -> None:
        self.rng = np.random.default_rng(seed)
        self.rows: list[dict[str, object]] = []
        self.clock: dict[tuple[str, str], float] = {}

    def add(self, cluster: str, query: str, fp: str, n: int, median: float, blocks: float | None = 100.0,
            start: float | None = None) -> float:  # fmt: skip
        t = start if start is not None else self.clock.get((cluster, query), END - 2 * 86400)
        first = t
        for ms in self.rng.lognormal(np.log(median), 0.1, n):
            known = blocks is not None
            self.rows.append({"cluster_id": cluster, "query_hash": query, "fingerprint": fp, "execution_timestamp": t,
                              "total_time_ms": float(ms), "shared_blocks": None if blocks is None else int(blocks),
                              "temp_blocks": 0, "top_rows": 10.0 if known else None, "top_loops": 1})  # fmt: skip
            t += STEP
        self.clock[(cluster, query)] = t
        return first

    def frame(self) -> pl.LazyFrame:
        return pl.DataFrame(self.rows, schema={
            "cluster_id": pl.String, "query_hash": pl.String, "fingerprint": pl.String,
            "execution_timestamp": pl.Float64, "total_time_ms": pl.Float64, "shared_blocks": pl.Int64,
            "temp_blocks": pl.Int64, "top_rows": pl.Float64, "top_loops": pl.Int64}).lazy()  # fmt: skip
