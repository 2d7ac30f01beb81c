"""`planpipe loadtest`: the runbook's replay test at 2x throughput, with a JSON summary."""

import argparse
import json
from typing import Any

from planpipe.settings import Settings


def _positive(kind: type[int] | type[float]) -> "Any":
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_parsers(sub: "argparse._SubParsersAction[Any]") -> None:
    p = sub.add_parser(
        "loadtest",
        help="inject synthetic envelopes at FACTOR x RATE with a broker outage in the middle; verify scaling, "
        "breaker, spool and that nothing is lost or duplicated",
        description=(
            "Runs against the local stack (or PLANPIPE_KAFKA_BOOTSTRAP/PLANPIPE_PG_DSN with --no-outage) on topics, "
            "groups, spool and Parquet directory of its own. The lag sensor's scaling rule starts ingest runs up to "
            "--max-runs and they end when idle; the broker is stopped for --outage seconds halfway; the ingest "
            "breaker (p95 > 1,200 ms for --breaker-window s) may drop only low priority. Prints one JSON summary; "
            "exit 0 when every verdict holds, 1 otherwise."
        ),
    )
    p.add_argument("--rate", type=_positive(float), required=True, help="stated production rate, envelopes/s")
    p.add_argument("--factor", type=_positive(float), default=2.0, help="multiple of --rate to inject (default 2)")
    p.add_argument("--duration", type=_positive(float), default=120.0, help="seconds of injection (default 120)")
    p.add_argument("--max-runs", type=_positive(int), default=None,
                   help="ingest runs the scaler may start (default PLANPIPE_MAX_INGEST_RUNS, 2)")  # fmt: skip
    p.add_argument("--lag-per-run", type=_positive(int), default=None,
                   help="backlog per extra run (default the lag sensor's, 20000)")  # fmt: skip
    p.add_argument("--sensor-interval", type=_positive(float), default=15.0, help="scaler tick, s (default 15)")
    p.add_argument("--idle", type=_positive(float), default=10.0, help="a run ends this long caught up (default 10)")
    p.add_argument("--breaker-window", type=float, default=60.0, help="breach before the breaker opens (default 60)")
    p.add_argument("--outage", type=_positive(float), default=10.0, help="broker outage in seconds (default 10)")
    p.add_argument("--no-outage", action="store_true", help="no broker outage (an external cluster)")
    p.add_argument("--producer-cooldown", type=_positive(float), default=30.0,
                   help="router breaker cool-down before it retries the broker (default 30)")  # fmt: skip
    p.add_argument("--agent-rate", type=float, default=0.0,
                   help="also feed an in-process planpipe agent this many envelopes/s from a synthetic "
                        "auto_explain log; under the outage it falls back to Redis "
                        "(needs PLANPIPE_REDIS=1 or PLANPIPE_REDIS_URL)")  # fmt: skip
    p.add_argument("--agent-spool-rows", type=_positive(int), default=50,
                   help="the agent's spool rows before it falls back to Redis (default 50)")  # fmt: skip
    p.set_defaults(handler=_loadtest)


def _loadtest(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from planpipe import stack
    from planpipe.loadtest.runner import Loadtest, LoadtestConfig

    stack.up(settings)
    max_runs = args.max_runs or int(os.environ.get("PLANPIPE_MAX_INGEST_RUNS", "").strip() or 2)
    config = LoadtestConfig(
        rate=args.rate, factor=args.factor, duration_s=args.duration, max_runs=max_runs,
        lag_per_run=args.lag_per_run, sensor_interval_s=args.sensor_interval, idle_s=args.idle,
        breaker_window_s=args.breaker_window, outage_s=None if args.no_outage else args.outage,
        producer_cooldown_s=args.producer_cooldown, agent_rate=args.agent_rate, agent_spool_rows=args.agent_spool_rows,
    )  # fmt: skip
    summary = Loadtest(settings, config).run()
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary["passed"] else 1
