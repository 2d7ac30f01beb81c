"""`planpipe ingest` and `planpipe retention`: the engine outside Dagster, for operators and tests."""

import argparse
import json
import signal
import sys
from typing import Any

from planpipe.settings import Settings

# `--until-caught-up` that stopped short (--max-seconds, or a stop request): scripts must not read success.
EXIT_NOT_CAUGHT_UP = 3


def add_parsers(sub: "argparse._SubParsersAction[Any]") -> None:
    p = sub.add_parser("ingest", help="consume query-plans into Parquet and the baseline store")
    p.add_argument("--until-caught-up", action="store_true", help="stop once lag is zero on every partition")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--max-messages", type=int, default=None, help="micro-batch size (default 500)")
    p.add_argument("--max-wait", type=float, default=None, help="micro-batch wait in seconds (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on 127.0.0.1:PORT (PLANPIPE_METRICS_PORT is the usual choice)",
    )
    p.set_defaults(handler=_ingest)

    p = sub.add_parser("retention", help="delete Parquet partitions and rows past their route's retention")
    p.set_defaults(handler=_retention)


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.ingest.engine import BatchReport, IngestEngine

    totals = {"batches": 0, "valid": 0, "dlq": 0}

    def progress(report: BatchReport) -> None:
        totals["batches"] += 1
        totals["valid"] += report.valid
        totals["dlq"] += report.dlq
        if not args.quiet:
            p95 = f"{report.p95_latency_ms:.0f}" if report.p95_latency_ms is not None else "-"
            print(
                f"\rbatches {totals['batches']:>6}  observations {totals['valid']:>9}  dlq {totals['dlq']:>6}  "
                f"p95 {p95:>6} ms  lock wait {report.lock_wait_ms:6.1f} ms",
                end="",
                file=sys.stderr,
                flush=True,
            )

    if args.metrics_port is not None:
        from planpipe.messaging.metrics import start_metrics_server

        start_metrics_server(args.metrics_port)
    engine = IngestEngine(settings, max_messages=args.max_messages, max_wait_s=args.max_wait, on_batch=progress)
    # SIGTERM (a supervisor, `kill`) and Ctrl-C end the run cleanly: the batch in hand is
    # committed or abandoned uncommitted, never half-done.
    previous = {sig: signal.signal(sig, lambda *_: engine.stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        summary = engine.run(until_caught_up=args.until_caught_up, max_seconds=args.max_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.close()
    if not args.quiet:
        print(file=sys.stderr)
    print(json.dumps(summary.as_dict(), sort_keys=True))
    if args.until_caught_up and not summary.caught_up:
        behind = summary.behind
        where = ", ".join(f"partition {p}: {n}" for p, n in behind.items()) or "lag unknown"
        print(f"planpipe ingest: not caught up after {summary.seconds:.0f} s ({where})", file=sys.stderr)
        return EXIT_NOT_CAUGHT_UP
    return 0


def _retention(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.ingest.retention import apply_retention

    print(json.dumps(apply_retention(settings.parquet_dir, settings.pg_dsn).as_dict(), sort_keys=True))
    return 0
