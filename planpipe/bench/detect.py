"""`planpipe bench detect`: regression detection over a large synthetic observations dataset, time and peak memory.

    planpipe bench detect                         # 10 M observations, 5,000 queries
    planpipe bench detect --per-comparison-alpha  # alpha per comparison instead of BH
    planpipe bench detect --observations 3e7 --dir /tmp/detect-bench --naive

A first child process writes a Parquet dataset laid out like the ingest's
(`route=*/date=*/*.parquet`, zstd) with only the columns detection reads, one chunk at
a time. Queries follow a Zipf popularity over several clusters; each has an accepted
plan, some have a harmless alternative plan in the recent window or old candidates,
and a handful carry planted changes: plan flips that regress, plan flips that improve,
same-plan slowdowns with more work (data growth), and one cluster whose machine slowed
(several queries slower with unchanged work: one cluster_slowdown, no query finding).
Every row carries the plan's work (blocks, rows) as the ingest writes it. A second
child runs detection (`find_regressions`, the statistical core of `detect_regressions`,
without PostgreSQL) and reports its own `resource.getrusage(RUSAGE_SELF).ru_maxrss`.
This parent imports nothing heavy (the `planpipe` CLI with its stage parsers: ~50 MB): Linux
carries a parent's RSS into a vfork()ed child's ru_maxrss, so a big parent would inflate the figure.
Exit status 1 when a planted change is missed.
"""

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

NOW = datetime(2026, 6, 15, 12, tzinfo=UTC)
DAY = 86_400.0
PLANS_PER_QUERY = 4  # 0 accepted, 1 harmless alternative, 2 old candidate, 3 planted change
CLUSTERS = 4
KINDS = ("plan_flip_regression", "plan_flip_improvement", "same_plan_slower")
SLOW_CLUSTER = "cluster-1"  # its machine slows down in the last day: same plans, same work, more time
SLOW_QUERIES = 6


def _generate(root: Path, observations: int, queries: int, planted_per_kind: int, chunk: int, seed: int) -> None:
    """Child 1: the dataset, the baselines (accepted plan per query) and the planted truth."""
    import numpy as np
    import polars as pl

    from planpipe.plans.plan_key import plan_keys

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, queries + 1, dtype=np.float64)
    weights = 1 / ranks**1.05
    weights /= weights.sum()
    median = np.exp(rng.uniform(math.log(0.05), math.log(2000), queries))
    sigma = rng.uniform(0.15, 0.8, queries)
    alternative = rng.random(queries) < 0.3  # a harmless second plan, same latency
    old_candidate = rng.random(queries) < 0.2  # another plan that ran days ago
    kind_code = np.zeros(queries, dtype=np.int8)
    factor_of = np.ones(queries)
    blocks_of = np.exp(rng.uniform(0, 10, queries))  # work per execution of each query's plan
    # Planted queries sit in the middle of the popularity curve: thousands of executions.
    for i, q in enumerate(rng.permutation(np.arange(30, min(queries, 300)))[: planted_per_kind * len(KINDS)]):
        kind_code[q] = 1 + i // planted_per_kind
        factor_of[q] = rng.uniform(3, 20)
        median[q] = max(median[q], 25.0)  # the absolute difference passes 10 ms either way
        alternative[q] = old_candidate[q] = False
    clusters = [f"cluster-{q % CLUSTERS}" for q in range(queries)]
    # The slow machine: popular-enough queries of one cluster, none of them planted.
    slow = np.zeros(queries, dtype=bool)
    choices = [q for q in range(300, min(queries, 900)) if clusters[q] == SLOW_CLUSTER and not kind_code[q]]
    slow[rng.permutation(choices)[:SLOW_QUERIES]] = True
    median[slow] = np.maximum(median[slow], 25.0)
    alternative[slow] = old_candidate[slow] = False
    hashes = [str(int(x)) for x in rng.integers(-(2**63), 2**63 - 1, queries, dtype=np.int64)]
    fingerprints = [f"{int(a):016x}{int(b):016x}" for a, b in rng.integers(0, 2**63, (queries * PLANS_PER_QUERY, 2))]

    lookup_q = pl.DataFrame({"q": np.arange(queries, dtype=np.int64), "cluster_id": clusters, "query_hash": hashes})
    lookup_p = pl.DataFrame({"pid": np.arange(len(fingerprints), dtype=np.int64), "fingerprint": fingerprints})
    end = NOW.timestamp()
    in_memory = written = part = 0
    while written < observations:
        n = min(chunk, observations - written)
        q = rng.choice(queries, size=n, p=weights)
        ts = end - rng.uniform(0, 7 * DAY, n)
        recent = ts >= end - DAY
        plan = np.zeros(n, dtype=np.int64)
        factor = np.ones(n)
        coin = rng.random(n)
        plan[alternative[q] & recent & (coin < 0.5)] = 1
        plan[old_candidate[q] & ~recent & (coin < 0.1)] = 2
        kinds = kind_code[q]
        flip, better, slower = (
            (kinds == 1) & recent & (coin < 0.9),
            (kinds == 2) & recent & (coin < 0.9),
            (kinds == 3) & recent,
        )
        plan[flip | better] = 3
        factor[flip | slower] = factor_of[q][flip | slower]
        factor[better] = 1 / factor_of[q][better]
        # Work follows the plan and the data: flips and data growth change it, a slow machine does not.
        work = blocks_of[q] * np.where(plan == 3, factor, 1.0) * np.where(slower, factor, 1.0)
        factor[slow[q] & recent] = 2.5
        ms = median[q] * factor * rng.lognormal(0.0, sigma[q])
        frame = (
            pl.DataFrame(
                {
                    "q": q.astype(np.int64),
                    "pid": q.astype(np.int64) * PLANS_PER_QUERY + plan,
                    "execution_timestamp": ts,
                    "total_time_ms": np.round(ms, 3),
                    "shared_blocks": np.round(work * rng.uniform(0.98, 1.02, n)).astype(np.int64),
                    "temp_blocks": np.zeros(n, dtype=np.int64),
                    "top_rows": np.round(work / 10),
                    "top_loops": np.ones(n, dtype=np.int64),
                }
            )
            .join(lookup_q, on="q", how="left")
            .join(lookup_p, on="pid", how="left")
            .select(
                "query_hash",
                "cluster_id",
                "fingerprint",
                "execution_timestamp",
                "total_time_ms",
                "shared_blocks",
                "temp_blocks",
                "top_rows",
                "top_loops",
            )
        )
        frame = frame.with_columns(plan_keys(frame))  # as the ingest writes it
        in_memory += int(frame.estimated_size())
        dated = frame.with_columns(
            pl.from_epoch("execution_timestamp", time_unit="s").dt.date().cast(pl.String).alias("date")
        )
        for (date,), rows in dated.group_by(["date"]):
            directory = root / "observations" / "route=baseline" / f"date={date}"
            directory.mkdir(parents=True, exist_ok=True)
            rows.drop("date").write_parquet(directory / f"bench+0+{part:020d}-{part:020d}.parquet", compression="zstd")
        written, part = written + n, part + 1
        print(f"  generated {written:,} / {observations:,} observations", file=sys.stderr, flush=True)

    pl.DataFrame(
        {"cluster_id": clusters, "query_hash": hashes, "fingerprint": fingerprints[::PLANS_PER_QUERY]}
    ).write_parquet(root / "baselines.parquet")
    planted = [
        [clusters[q], hashes[q], fingerprints[q * PLANS_PER_QUERY + (0 if kind_code[q] == 3 else 3)],
         KINDS[kind_code[q] - 1]]
        for q in np.flatnonzero(kind_code)
    ]  # fmt: skip
    slowed = sorted(hashes[q] for q in np.flatnonzero(slow))
    (root / "truth.json").write_text(json.dumps({"planted": planted, "in_memory_bytes": in_memory,
                                                 "observations": observations, "queries": queries,
                                                 "slow_cluster": SLOW_CLUSTER, "slowed": slowed,
                                                 "change_at": end - DAY}))  # fmt: skip


def _detect(root: Path, per_comparison: bool, naive: bool) -> dict[str, Any]:
    """Child 2: detection only, so this process's ru_maxrss is detection's own peak."""
    import polars as pl

    from planpipe.plans.detection import find_regressions
    from planpipe.plans.scan import scan_observations
    from planpipe.plans.verdicts import DetectionConfig

    started = time.perf_counter()
    result: dict[str, Any]
    if naive:
        # For comparison: what holding the same columns in memory costs.
        frame = pl.scan_parquet(str(root / "observations" / "route=*" / "date=*" / "*.parquet")).collect()
        medians = frame.group_by("cluster_id", "query_hash", "fingerprint").agg(pl.col("total_time_ms").median())
        result = {"rows": frame.height, "groups": medians.height}
    else:
        config = DetectionConfig(fdr=not per_comparison)
        baselines = pl.read_parquet(root / "baselines.parquet")
        analysis = find_regressions(scan_observations(root / "observations"), baselines, config, now=NOW)
        result = {
            "findings": sorted([v.cluster_id, v.query_hash, v.new_fingerprint, v.kind] for v in analysis.findings),
            "starts": [v.evidence.window_start.timestamp() for v in analysis.findings],
            "clusters": [[c.cluster_id, sorted(v.query_hash for v in c.affected)] for c in analysis.clusters],
            "stats": analysis.stats.as_dict(),
        }
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _child(*args: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "planpipe.bench.detect", *args]
    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `planpipe bench detect` (also those of `python -m planpipe.bench.detect`)."""
    parser.add_argument("--observations", type=float, default=10_000_000)
    parser.add_argument("--queries", type=int, default=5_000)
    parser.add_argument("--planted", type=int, default=4, help="planted changes per kind (default 4)")
    parser.add_argument("--chunk", type=int, default=1_000_000, help="observations per written chunk")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dir", type=Path, help="dataset directory (default: a temporary one, removed after)")
    parser.add_argument("--reuse", action="store_true", help="reuse the dataset already in --dir")
    parser.add_argument(
        "--per-comparison-alpha",
        action="store_true",
        help="DetectionConfig(fdr=False): alpha per comparison instead of Benjamini-Hochberg",
    )
    parser.add_argument("--naive", action="store_true", help="also measure collect() + exact medians in memory")
    parser.add_argument("--stage", choices=["generate", "detect", "naive"], help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    """Exit status 1 when a planted change is missed."""
    observations = int(args.observations)
    if args.stage == "generate":
        _generate(args.dir, observations, args.queries, args.planted, args.chunk, args.seed)
        print("{}")
        return 0
    if args.stage in ("detect", "naive"):
        print(json.dumps(_detect(args.dir, args.per_comparison_alpha, args.stage == "naive")))
        return 0

    base_dir = args.dir or Path(tempfile.mkdtemp(prefix="planpipe-detect-bench-"))
    try:
        if not (args.reuse and (base_dir / "truth.json").exists()):
            shutil.rmtree(base_dir / "observations", ignore_errors=True)
            started = time.perf_counter()
            _child("--stage", "generate", "--dir", str(base_dir), "--observations", str(observations),
                   "--queries", str(args.queries), "--planted", str(args.planted), "--chunk", str(args.chunk),
                   "--seed", str(args.seed))  # fmt: skip
            print(f"generated in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        truth = json.loads((base_dir / "truth.json").read_text())
        flags = ["--per-comparison-alpha"] if args.per_comparison_alpha else []
        report = _child("--stage", "detect", "--dir", str(base_dir), *flags)
        on_disk = sum(p.stat().st_size for p in (base_dir / "observations").rglob("*.parquet"))
        in_memory_mb = truth["in_memory_bytes"] / 2**20
        found = {tuple(f) for f in report["findings"]}
        expected = {tuple(f) for f in truth["planted"]}
        stats = report["stats"]
        print(f"dataset     : {truth['observations']:,} observations, {truth['queries']:,} queries, "
              f"{stats['plans']:,} plans, {len(expected)} planted changes")  # fmt: skip
        print(f"size        : {on_disk / 2**20:,.0f} MB of Parquet on disk, "
              f"{in_memory_mb:,.0f} MB for its ten columns in memory")  # fmt: skip
        print(f"detection   : {report['seconds']:.1f}s, peak RSS (ru_maxrss) {report['maxrss_mb']:,.0f} MB "
              f"= {report['maxrss_mb'] / in_memory_mb:.0%} of the columns in memory"
              f"{', alpha per comparison' if args.per_comparison_alpha else ', Benjamini-Hochberg'}")  # fmt: skip
        print(f"comparisons : {stats['comparisons']:,} ({stats['too_few_executions']:,} too few executions, "
              f"{stats['screened_out']:,} screened out, {stats['tested']:,} tested exactly)")  # fmt: skip
        print(f"findings    : {len(found)}: planted {len(found & expected)}/{len(expected)} found, "
              f"{len(found - expected)} not planted")  # fmt: skip
        for finding in sorted(found - expected):
            print(f"  not planted: {' '.join(finding)}")
        lag = [abs(t - truth["change_at"]) / 60 for t in report["starts"]]
        print(f"start times : within {max(lag, default=0):.1f} min of the planted change (worst finding)")
        slowed_found = [f for f in found if f[1] in set(truth["slowed"])]
        matched = [c for c in report["clusters"] if c[0] == truth["slow_cluster"] and set(c[1]) <= set(truth["slowed"])]
        machines = ", ".join(f"{c[0]}: {len(c[1])} queries" for c in report["clusters"])
        print(f"slow machine: {len(report['clusters'])} cluster_slowdown ({machines}); "
              f"{len(slowed_found)} query findings among its {len(truth['slowed'])} slowed queries")  # fmt: skip
        ok = expected <= found and not slowed_found and len(matched) == 1 == len(report["clusters"])
        if args.naive:
            naive = _child("--stage", "naive", "--dir", str(base_dir))
            print(f"naive       : collect() + exact medians {naive['seconds']:.1f}s, "
                  f"peak RSS {naive['maxrss_mb']:,.0f} MB")  # fmt: skip
        return 0 if ok else 1
    finally:
        if args.dir is None:
            shutil.rmtree(base_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
