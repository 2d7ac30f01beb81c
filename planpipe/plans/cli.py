"""`planpipe detect`, `regressions`, `plans`, `plan accept|reject` and `regression ack`."""

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from planpipe.settings import Settings


def add_parsers(sub: "argparse._SubParsersAction[Any]") -> None:
    p = sub.add_parser("detect", help="recompute plan-regression findings over the Parquet dataset (as the asset does)")
    p.add_argument(
        "--window-hours",
        type=float,
        default=None,
        help="judge the last N hours against the rest instead of splitting each series at its change point",
    )
    p.add_argument("--lookback-hours", type=float, default=168.0, help="baseline executions considered (default 168)")
    p.add_argument("--min-ratio", type=float, default=1.5, help="p50 ratio threshold (default 1.5)")
    p.add_argument("--min-abs-ms", type=float, default=10.0, help="absolute p50 difference threshold (default 10)")
    p.add_argument("--min-executions", type=int, default=20, help="executions needed on each side (default 20)")
    p.add_argument("--alpha", type=float, default=0.01, help="Mann-Whitney U significance level (default 0.01)")
    p.add_argument(
        "--per-comparison-alpha",
        action="store_true",
        help="apply alpha to each comparison (default: Benjamini-Hochberg across the run's comparisons)",
    )
    p.add_argument(
        "--settling-executions", type=int, help="settling period of a query (PLANPIPE_DETECT_SETTLING_EXECUTIONS)"
    )
    p.add_argument(
        "--resolve-executions", type=int, help="executions that resolve a finding (PLANPIPE_DETECT_RESOLVE_EXECUTIONS)"
    )
    p.add_argument("--cluster", action="append", default=[], help="only this cluster (repeatable)")
    p.add_argument("--diff", action="store_true", help="print each finding's plan diff")
    _format(p)
    p.set_defaults(handler=_detect)

    p = sub.add_parser("regressions", help="list plan-regression findings")
    since = p.add_mutually_exclusive_group()
    since.add_argument("--since", type=_iso, help="last detected at or after this ISO time")
    since.add_argument("--since-hours", type=float, help="last detected within this many hours")
    p.add_argument("--cluster", help="only this cluster")
    p.add_argument(
        "--status", choices=["open", "acknowledged", "resolved", "improvement", "unresolved", "all"], default="open"
    )
    p.add_argument("--diff", action="store_true", help="print each finding's plan diff")
    _format(p)
    p.set_defaults(handler=_regressions)

    p = sub.add_parser("plans", help="a query's plans: statuses, latency, diffs against the baseline")
    p.add_argument("query_hash")
    p.add_argument("--cluster", help="only this cluster")
    p.add_argument("--window-hours", type=float, default=24.0, help="latency window width (default 24)")
    p.add_argument("--lookback-hours", type=float, default=168.0, help="windows shown (default 168)")
    _format(p)
    p.set_defaults(handler=_plans)

    p = sub.add_parser("plan", help="accept or reject a plan of a query")
    actions = p.add_subparsers(dest="action", required=True)
    for action, help_text in (("accept", "make the plan the query's baseline"), ("reject", "mark the plan rejected")):
        a = actions.add_parser(action, help=help_text)
        a.add_argument("query_hash")
        a.add_argument("fingerprint", help="the plan's fingerprint or a unique prefix of it")
        a.add_argument("--cluster", help="needed when the query runs on several clusters")
        a.add_argument("--by", required=True, help="who decides (recorded)")
        a.add_argument("--reason", help="why (recorded)")
        a.set_defaults(handler=_plan_status, status="accepted" if action == "accept" else "rejected")

    p = sub.add_parser("regression", help="act on a finding")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("ack", help="acknowledge a finding (it stays tracked until resolved)")
    a.add_argument("id", type=int)
    a.add_argument("--by", required=True, help="who acknowledges (recorded)")
    a.add_argument("--note", help="recorded with the acknowledgement")
    a.set_defaults(handler=_ack)


def _format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["table", "json"], default="table")


def _iso(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _print_json(payload: object) -> None:
    print(json.dumps(payload, indent=2, sort_keys=True, default=str))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[["" if v is None else str(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _finding_rows(findings: Sequence[Any]) -> list[list[object]]:
    rows: list[list[object]] = []
    for f in findings:
        base, new = f.evidence.get("baseline", {}), f.evidence.get("new", {})
        ratio = f.ratio_p50
        rows.append(
            [
                f.id,
                f.status,
                f.severity,
                f.kind,
                f.cluster_id,
                f.query_hash,
                f"{len(f.evidence.get('queries', []))} queries"
                if f.kind == "cluster_slowdown"
                else f"{f.baseline_fingerprint[:12]} → {f.new_fingerprint[:12]}",
                f"{base.get('p50_ms', '')} → {new.get('p50_ms', '')}",
                f.speed if ratio is not None else "-",
                f.started_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if f.started_at else "",
                f"{base.get('executions', '')}/{new.get('executions', '')}",
                f"{f.evidence['p_value']:.2g}" if isinstance(f.evidence.get("p_value"), float) else "",
                f.last_detected.astimezone(UTC).strftime("%Y-%m-%d %H:%M"),
            ]
        )
    return rows


_FINDING_HEADERS = ("id", "status", "severity", "kind", "cluster", "query", "plans", "p50 ms", "change", "started",
                    "n", "p", "last detected")  # fmt: skip


def _print_findings(findings: Sequence[Any], with_diff: bool) -> None:
    if not findings:
        return
    print(_table(_FINDING_HEADERS, _finding_rows(findings)))
    for f in findings:
        remedy = f.remediation_lines()
        if remedy:
            print(f"\n#{f.id} what to do:")
            for line in remedy:
                print(f"  - {line}")
    if with_diff:
        for f in findings:
            print(f"\n#{f.id} {f.kind} {f.cluster_id}/{f.query_hash}\n{f.diff_markdown}")


def _detect(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.plans.detector import detect_regressions
    from planpipe.plans.verdicts import DetectionConfig

    try:
        config = DetectionConfig(
            window_hours=args.window_hours,
            lookback_hours=args.lookback_hours,
            min_ratio=args.min_ratio,
            min_abs_ms=args.min_abs_ms,
            min_executions=args.min_executions,
            alpha=args.alpha,
            fdr=not args.per_comparison_alpha,
            settling_executions=args.settling_executions or settings.detect_settling_executions,
            resolve_executions=args.resolve_executions or settings.detect_resolve_executions,
            clusters=tuple(args.cluster),
        )
    except ValueError as error:
        print(f"planpipe detect: {error}", file=sys.stderr)
        return 2
    result = detect_regressions(settings.pg_dsn, settings.parquet_dir, config=config)
    if args.format == "json":
        _print_json(result.as_dict())
        return 0
    s = result.stats
    counts = result.counts()
    print(
        f"detect: {counts['plan_flip_regression']} plan-flip regressions, {counts['same_plan_slower']} same-plan "
        f"slowdowns, {counts['cluster_slowdown']} cluster slowdowns, {counts['plan_flip_improvement']} improvements, "
        f"{len(result.resolved)} resolved, {len(result.settled)} baselines settled "
        f"({s.observations:,} observations, {s.comparisons:,} comparisons, {s.tested:,} tested, "
        f"{result.elapsed_s:.1f}s)"
    )
    _print_findings(result.findings, args.diff)
    for settled in result.settled:
        print(f"baseline settled {settled.cluster_id}/{settled.query_hash}: {settled.fingerprint[:12]} "
              f"({settled.executions} of {settled.settling_executions} settling executions) replaces "
              f"{settled.replaced[:12]}")  # fmt: skip
    for r in result.resolved:
        print(f"resolved #{r.id} {r.kind} {r.cluster_id}/{r.query_hash}: {r.resolution}")
    return 0


def _regressions(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.plans.findings import list_regressions

    since = args.since
    if args.since_hours is not None:
        since = datetime.now(UTC) - timedelta(hours=args.since_hours)
    findings = list_regressions(settings.pg_dsn, since=since, cluster_id=args.cluster, status=args.status)
    if args.format == "json":
        _print_json([f.as_dict() for f in findings])
        return 0
    if not findings:
        print(f"no {args.status if args.status != 'all' else ''} findings".replace("  ", " "))
        return 0
    _print_findings(findings, args.diff)
    return 0


def _plans(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.plans.history import plan_history, statement_text

    history = plan_history(
        settings.pg_dsn,
        args.query_hash,
        cluster_id=args.cluster,
        window_hours=args.window_hours,
        lookback_hours=args.lookback_hours,
    )
    if args.format == "json":
        _print_json([h.as_dict() for h in history])
        return 0 if history else 1
    if not history:
        print(f"no plans for query {args.query_hash}", file=sys.stderr)
        return 1
    for h in history:
        print(f"query {h.query_hash} on cluster {h.cluster_id}"
              f"{f' ({h.query_type})' if h.query_type else ''}")  # fmt: skip
        if h.query_text:
            print(f"  {(statement_text(h.query_text) or '')[:160]}")
        print()
        rows = [
            [
                p.plan_version,
                p.fingerprint[:12],
                p.status + (" *" if p.is_baseline else ""),
                p.status_by,
                _when(p.status_at),
                _when(p.first_seen),
                _when(p.last_seen),
                p.executions,
                _ms(p.p50_ms),
                _ms(p.p95_ms),
                p.summary[:60],
            ]
            for p in h.plans
        ]
        print(_table(("v", "plan", "status", "by", "at", "first seen", "last seen", "executions", "≈p50 ms",
                      "≈p95 ms", "plan"), rows))  # fmt: skip
        print("  (* = the baseline: the most recently accepted plan; ≈ p50/p95 from log-scale histograms, within 5 %;")
        print("   `planpipe regressions` shows exact ones)")
        starts = sorted({w.start for p in h.plans for w in p.windows})
        if starts:
            print(f"\nlatency per {h.window_hours:g} h window: ≈p50 ms (executions)")
            by_plan = {p.plan_version: {w.start: w for w in p.windows} for p in h.plans}
            window_rows = []
            for start in starts:
                cells: list[object] = [_when(start)]
                for p in h.plans:
                    w = by_plan[p.plan_version].get(start)
                    cells.append(f"{_ms(w.p50_ms)} ({w.executions})" if w is not None else "")
                window_rows.append(cells)
            print(_table(("window", *[f"v{p.plan_version} {p.fingerprint[:8]}" for p in h.plans]), window_rows))
        if h.status_log:
            print("\nstatus changes:")
            for c in h.status_log:
                why = f": {c.reason}" if c.reason else ""
                print(
                    f"  {_when(c.changed_at)} {c.changed_by} {c.fingerprint[:12]} {c.old_status} → {c.new_status}{why}"
                )
        for p in h.plans:
            if p.diff_markdown is not None:
                print(f"\nplan v{p.plan_version} {p.fingerprint[:12]} against the baseline:\n{p.diff_markdown}")
        print()
    return 0


def _when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment is not None else ""


def _ms(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _plan_status(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.plans.history import UnknownPlanError, clusters_of, resolve_fingerprint, set_plan_status

    cluster = args.cluster
    if cluster is None:
        clusters = clusters_of(settings.pg_dsn, args.query_hash)
        if len(clusters) != 1:
            found = ", ".join(clusters) if clusters else "none"
            print(f"planpipe plan {args.action}: pass --cluster (clusters with this query: {found})", file=sys.stderr)
            return 2
        cluster = clusters[0]
    try:
        fingerprint = resolve_fingerprint(settings.pg_dsn, cluster, args.query_hash, args.fingerprint)
        update = set_plan_status(
            settings.pg_dsn, cluster, args.query_hash, fingerprint, args.status, by=args.by, reason=args.reason
        )
    except (UnknownPlanError, ValueError) as error:
        print(f"planpipe plan {args.action}: {error}", file=sys.stderr)
        return 2
    c = update.change
    print(f"{c.cluster_id}/{c.query_hash} plan {c.fingerprint[:12]}: {c.old_status} → {c.new_status} "
          f"by {c.changed_by} at {c.changed_at.isoformat(timespec='seconds')}")  # fmt: skip
    baseline = update.baseline_fingerprint
    print(f"baseline is now {baseline[:12] if baseline else 'none (no accepted plan)'}")
    if update.resolved_findings:
        print(f"resolved findings: {', '.join(f'#{i}' for i in update.resolved_findings)}")
    return 0


def _ack(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.plans.findings import RegressionNotFoundError, acknowledge_regression

    try:
        finding = acknowledge_regression(settings.pg_dsn, args.id, by=args.by, note=args.note)
    except (RegressionNotFoundError, ValueError) as error:
        print(f"planpipe regression ack: {error}", file=sys.stderr)
        return 2
    print(f"#{finding.id} acknowledged by {finding.acknowledged_by} at "
          f"{finding.acknowledged_at.isoformat(timespec='seconds') if finding.acknowledged_at else '?'}")  # fmt: skip
    return 0
