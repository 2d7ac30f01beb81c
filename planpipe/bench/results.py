"""The ingest benchmark's options, results and report: the targets, the last JSON line, the table."""

import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from planpipe.ingest.batch import BATCH_GROWTH

# Issue 10's targets: the hot path against the bare read loop and the runbook's loop, latency at
# half of planpipe's rate, live capacity against the backlog rate, memory.
TARGETS: Final = {
    "ratio_vs_raw": 0.1,
    "ratio_vs_reference": 3.0,
    "p95_ms": 1200.0,
    "live_capacity_ratio": 0.8,
    "peak_rss_mb": 400.0,
}


@dataclass
class BenchOptions:
    messages: int = 50_000
    plan_kb: float = 5.0
    partitions: int | None = None  # None: the settings' (PLANPIPE_PARTITIONS, 6)
    query_hashes: int = 120
    variants: int = 3
    plan_format: str = "compact"
    latency_seconds: float = 20.0
    latency_fraction: float = 0.5
    reference_parser: str = "orjson"
    repeat: int = 1
    # IngestEngine micro-batch knobs for the planpipe runs; None: the settings' (500 records, 1 s).
    batch_max_messages: int | None = None
    batch_max_wait_s: float | None = None
    profile_dir: Path | None = None
    # Consumers of the scale-out phase (one group, side by side); 0 or 1 skips it.
    scaleout: int = 2
    keep: bool = False
    # "latency": the paced phase alone at `latency_rate` (no backlog runs, so no b/a, b/c, live ratio).
    only: str | None = None
    latency_rate: float | None = None
    worker_timeout_s: float = 600.0


@dataclass
class BenchResult:
    options: BenchOptions
    run_id: str
    partitions: int
    plans: int
    query_hashes: int
    fingerprints: int
    mean_envelope_bytes: float
    produce_eps: float
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    scaleout: dict[str, Any] = field(default_factory=dict)
    # phase → CpuMeter.delta (the last round of each consumer)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    profile: str | None = None
    batch_max_messages: int = 0
    batch_max_wait_s: float = 0.0
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def summary(self) -> dict[str, float | None]:
        """The figures the last output line carries."""
        # --only latency runs no backlog consumer: their figures are None.
        raw = self.workers.get("raw", {}).get("eps")
        ours = self.workers.get("planpipe", {}).get("eps")
        ref = self.workers.get("reference", {}).get("eps")
        rss = [self.workers["planpipe"]["peak_rss_mb"]] if "planpipe" in self.workers else []
        if self.latency.get("peak_rss_mb") is not None:
            rss.append(self.latency["peak_rss_mb"])
        live = self.latency.get("live_capacity_eps")
        if self.scaleout.get("peak_rss_mb") is not None:
            rss.append(self.scaleout["peak_rss_mb"])
        return {
            "raw_eps": raw,
            "planpipe_eps": ours,
            "reference_eps": ref,
            "ratio_vs_raw": round(ours / raw, 3) if raw and ours else None,
            "ratio_vs_reference": round(ours / ref, 2) if ref and ours else None,
            "p95_ms": self.latency.get("p95_ms"),
            "live_capacity_eps": live,
            "live_capacity_ratio": round(live / ours, 2) if live and ours else None,
            "scaleout_consumers": self.scaleout.get("consumers"),
            "scaleout_eps": self.scaleout.get("eps"),
            "scaleout_ratio": round(self.scaleout["eps"] / ours, 2) if self.scaleout.get("eps") and ours else None,
            "peak_rss_mb": max(rss) if rss else None,
            # Load-robust companion of b/c: CPU spent per envelope (consumer + PostgreSQL + broker).
            "cpu_us_per_envelope_planpipe": self.cpu_per_envelope_us("planpipe"),
            "cpu_us_per_envelope_reference": self.cpu_per_envelope_us("reference"),
        }

    def cpu_per_envelope_us(self, variant: str) -> float | None:
        """The consumer's own CPU in its measured window, plus PostgreSQL's and the broker's over
        the run, per envelope (the consumer's start-up, imports and group join left out)."""
        d, w = self.cpu.get(variant), self.workers.get(variant)
        if not d or not w or not w.get("measured") or w.get("window_cpu_s") is None:
            return None
        consumer = float(w["window_cpu_s"]) / float(w["measured"])
        return round(1e6 * (consumer + (d["postgresql"] + d["broker"]) / self.options.messages), 1)


def _status(value: float | None, ok: Callable[[float], bool]) -> str:
    if value is None:
        return "n/a"
    return "ok" if ok(value) else "MISS"


def format_table(result: BenchResult) -> str:
    s = result.summary()
    w = result.workers
    o = result.options
    lat = result.latency
    cpu = os.cpu_count()
    lines = [
        f"planpipe bench ingest — {o.messages:,} envelopes of real plans, "
        f"mean {result.mean_envelope_bytes / 1024:.2f} KB "
        f"({result.query_hashes} query hashes, {result.fingerprints} distinct plans, {o.plan_format} plan text), "
        f"{result.partitions} partitions, {cpu} CPUs, Python {platform.python_version()}",
        f"IngestEngine micro-batches: {result.batch_max_messages} records (growing up to {BATCH_GROWTH}× under lag) "
        f"or {result.batch_max_wait_s:g}s; "
        f"{o.repeat} round(s) per consumer, median shown",
        "",
        f"{'consumer':<44} {'envelopes/s':>12} {'seconds':>8} {'startup s':>10} {'peak RSS MB':>12}",
    ]
    labels = {
        "raw": "(a) raw confluent-kafka loop (ceiling)",
        "planpipe": "(b) planpipe IngestEngine (end to end)",
        "reference": f"(c) runbook reference loop ({o.reference_parser})",
    }
    for variant, label in labels.items():
        if variant not in w:
            continue
        r = w[variant]
        runs = "" if len(r.get("all_eps", [])) < 2 else "  runs: " + ", ".join(f"{e:,.0f}" for e in r["all_eps"])
        lines.append(
            f"{label:<44} {r['eps']:>12,.0f} {r['seconds']:>8.2f} {r['startup_s']:>10.2f} {r['peak_rss_mb']:>12.0f}"
            f"{runs}"
        )
    lines += [
        f"{'publisher (build envelope + produce, zstd)':<44} {result.produce_eps:>12,.0f}",
        "",
        f"{'figure':<44} {'measured':>12} {'target':>10}",
        f"{'b/a planpipe vs raw':<44} {s['ratio_vs_raw'] or 0:>12.3f} {'≥ 0.1':>10}  "
        f"{_status(s['ratio_vs_raw'], lambda v: v >= TARGETS['ratio_vs_raw'])}",
        f"{'b/c planpipe vs runbook reference':<44} {s['ratio_vs_reference'] or 0:>12.2f} {'≥ 3':>10}  "
        f"{_status(s['ratio_vs_reference'], lambda v: v >= TARGETS['ratio_vs_reference'])}",
        f"{'p95 publish→commit ms (record-weighted)':<44} {_fmt(s['p95_ms']):>12} {'≤ 1200':>10}  "
        f"{_status(s['p95_ms'], lambda v: v <= TARGETS['p95_ms'])}",
        f"{'live capacity / backlog rate':<44} {s['live_capacity_ratio'] or 0:>12.2f} {'≥ 0.8':>10}  "
        f"{_status(s['live_capacity_ratio'], lambda v: v >= TARGETS['live_capacity_ratio'])}",
        f"{'peak RSS MB of planpipe consumer':<44} {s['peak_rss_mb'] or 0:>12.0f} {'< 400':>10}  "
        f"{_status(s['peak_rss_mb'], lambda v: v < TARGETS['peak_rss_mb'])}",
        f"{'scale-out: consumers in one group vs one':<44} {s['scaleout_ratio'] or 0:>12.2f} {'measured':>10}  "
        + (
            f"{s['scaleout_consumers']} consumers: {s['scaleout_eps'] or 0:,.0f} envelopes/s, "
            f"shares {result.scaleout.get('shares')}"
            if result.scaleout
            else "skipped"
        ),
        "",
        f"latency phase: {lat.get('rate_achieved_eps', 0):,.0f} envelopes/s paced (target "
        f"{lat.get('rate_target_eps', 0):,.0f} = {o.latency_fraction:g} × planpipe) for {lat.get('seconds', 0):.0f}s, "
        f"{lat.get('records', 0):,} records in {lat.get('batches', 0)} batches: p50 {_fmt(lat.get('p50_ms'))} ms, "
        f"p95 {_fmt(lat.get('p95_ms'))} ms, p99 {_fmt(lat.get('p99_ms'))} ms, max {_fmt(lat.get('max_ms'))} ms "
        f"(worst per-batch p95 from the engine {_fmt(lat.get('max_batch_p95_ms'))} ms); "
        f"consumer peak RSS {lat.get('peak_rss_mb', 0):.0f} MB",
        f"  {lat.get('mean_batch_records', 0):.0f} records per batch, batch processing p50 "
        f"{_fmt(lat.get('batch_duration_p50_ms'))} ms / max {_fmt(lat.get('batch_duration_max_ms'))} ms; engine busy "
        f"{lat.get('busy_pct') or 0:.0f}% of the time, i.e. live capacity ≈ {lat.get('live_capacity_eps') or 0:,.0f} "
        f"envelopes/s",
    ]
    if lat.get("handed_p50_ms") is not None:
        lines.append(
            f"  publish → handed to the engine (its batch started) p50 {_fmt(lat.get('handed_p50_ms'))} ms, "
            f"p95 {_fmt(lat.get('handed_p95_ms'))} ms: the rest of each record's latency is its batch in the engine"
        )
    for title, run in (("(b) backlog", w.get("planpipe", {})), ("latency phase", lat)):
        stages = run.get("stages")
        if not stages:
            continue
        window = run.get("window_s", run.get("seconds")) or 0.0
        lines += ["", f"where planpipe's consumer spends the measured window — {title} "
                      f"({window:.2f}s wall, {run.get('cpu_s', 0):.2f}s CPU of its own process):",
                  f"  {'step':<24} {'wall s':>8} {'CPU s':>8} {'% wall':>7} {'µs/record':>10}"]  # fmt: skip
        records = run.get("measured") or 1
        accounted = 0.0
        for name, (wall, cpu_s) in sorted(stages.items(), key=lambda kv: -kv[1][0]):
            accounted += wall
            lines.append(f"  {name:<24} {wall:>8.2f} {cpu_s:>8.2f} {100 * wall / window if window else 0:>6.1f}% "
                         f"{1e6 * wall / records:>10.0f}")  # fmt: skip
        lines.append(f"  {'engine loop, other':<24} {max(0.0, window - accounted):>8.2f}")
    ours_cpu, ref_cpu = result.cpu_per_envelope_us("planpipe"), result.cpu_per_envelope_us("reference")
    if ours_cpu and ref_cpu:
        lines += [
            "",
            f"CPU per envelope (consumer + PostgreSQL + broker): planpipe {ours_cpu:,.0f} µs, reference "
            f"{ref_cpu:,.0f} µs: a cost ratio of {ref_cpu / ours_cpu:.2f} (outside load moves it less than b/c)",
        ]
    if result.cpu:
        lines += ["", "CPU seconds used during each run, by process (the machine has "
                      f"{cpu} CPUs: {cpu} CPU-seconds per second; 'other' = jobs outside the benchmark):",
                  f"  {'run':<22} {'wall s':>7} {'consumer':>9} {'postgresql':>11} {'broker':>7} {'publisher':>10} "
                  f"{'other':>7}"]  # fmt: skip
        for phase, d in result.cpu.items():
            lines.append(
                f"  {phase:<22} {d['wall']:>7.1f} {d['consumer']:>9.1f} {d['postgresql']:>11.1f} {d['broker']:>7.1f} "
                f"{d['publisher']:>10.1f} {d['other']:>7.1f}"
            )
    lines.append(
        f"\nmachine load average (1/5/15 min): {_load(result.load_before)} before, {_load(result.load_after)} after"
    )
    if result.profile:
        lines.append(f"profile of planpipe's consumer: {result.profile} (and .html)")
    return "\n".join(lines)


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"
