"""`planpipe bench …`: benchmarks, registered through `add_parsers(sub)` like the stage CLIs.

Also runnable alone: `python -m planpipe.bench.cli ingest [options]`. `bench ingest` needs the
optional extra `planpipe[bench]` (orjson, pyinstrument, psutil; `make setup` installs it with dev).
"""

import argparse
import importlib.util
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from planpipe.settings import Settings, load_settings


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


# Imported lazily by the benchmarks only; the pipeline's runtime dependencies leave them out.
BENCH_EXTRA: tuple[str, ...] = ("orjson", "pyinstrument", "psutil")


def missing_bench_modules() -> list[str]:
    return [name for name in BENCH_EXTRA if importlib.util.find_spec(name) is None]


def _require_bench_extra() -> None:
    missing = missing_bench_modules()
    if missing:
        raise SystemExit(
            f"planpipe bench needs the optional extra 'bench' ({', '.join(missing)} not installed): "
            "pip install 'planpipe[bench]' (make setup installs it)"
        )


def add_parsers(sub: "argparse._SubParsersAction[Any]") -> None:
    bench = sub.add_parser(
        "bench", help="benchmarks: ingest (planpipe vs raw Kafka vs the runbook's loop), detect (regression detection)"
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from planpipe.bench import detect

    d = bench_sub.add_parser(
        "detect",
        help="regression detection over a large synthetic observations dataset: time, peak RSS, planted changes found",
        description=detect.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    detect.add_arguments(d)
    d.set_defaults(handler=_detect)
    p = bench_sub.add_parser(
        "ingest",
        help="consume the same real-plan envelopes with a raw loop, planpipe and the runbook's loop; p95, RSS",
        description=(
            "Starts/uses the local stack, captures real plans from PostgreSQL, publishes them to fresh topics and "
            "measures (a) a raw confluent-kafka loop, (b) planpipe's IngestEngine, (c) the runbook's reference "
            "consumer, then p95 publish→commit latency at half of planpipe's rate. Prints a table; the last line "
            "is one JSON object."
        ),
    )
    p.add_argument("--messages", type=_positive_int, default=50_000, help="envelopes in the backlog (default 50000)")
    p.add_argument("--plan-kb", type=_positive_float, default=5.0, help="mean envelope size in KB (default 5)")
    p.add_argument("--partitions", type=_positive_int, default=None,
                   help="partitions of the fresh topics (default PLANPIPE_PARTITIONS, 6)")  # fmt: skip
    p.add_argument("--query-hashes", type=_positive_int, default=120, help="distinct queries captured (default 120)")
    p.add_argument("--latency-seconds", type=_positive_float, default=20.0,
                   help="length of the paced latency phase (default 20)")  # fmt: skip
    p.add_argument("--reference-parser", choices=("orjson", "json"), default="orjson",
                   help="JSON parser of the runbook loop: orjson as in its code (default), or stdlib json")  # fmt: skip
    p.add_argument("--plan-format", choices=("compact", "verbatim"), default="compact",
                   help="plan text as the runbook's producer serializes it (compact, default) or the server's "
                        "pretty-printed text (verbatim, ~2x larger)")  # fmt: skip
    p.add_argument("--repeat", type=_positive_int, default=1,
                   help="rounds of (a)(b)(c), interleaved; the median is reported (default 1)")  # fmt: skip
    p.add_argument("--batch-max-messages", type=_positive_int, default=None,
                   help="IngestEngine micro-batch size (default PLANPIPE_BATCH_MAX_MESSAGES, 500)")  # fmt: skip
    p.add_argument("--batch-max-wait", type=_positive_float, default=None,
                   help="IngestEngine micro-batch wait in seconds (default PLANPIPE_BATCH_MAX_WAIT_S, 1)")  # fmt: skip
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="also run planpipe's consumer once more under pyinstrument; reports go to DIR")  # fmt: skip
    p.add_argument("--scaleout", type=int, default=2, metavar="N",
                   help="consumers in one group for the scale-out phase (default 2; 0 skips it)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep the topics, rows and Parquet files for inspection")
    p.add_argument("--only", choices=("latency",), default=None,
                   help="latency: planpipe's backlog run (b) for the rate, then the latency phase; no (a), (c), "
                        "scale-out")  # fmt: skip
    p.add_argument("--latency-rate", type=_positive_float, default=None, metavar="EPS",
                   help="with --only latency: pace at EPS and skip (b) as well")  # fmt: skip
    p.set_defaults(handler=_ingest)


def _detect(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.bench import detect

    return detect.run(args)


def _ingest(args: argparse.Namespace, settings: Settings) -> int:
    _require_bench_extra()
    from planpipe.bench.ingest import BenchOptions, format_table, run_benchmark

    if args.latency_rate is not None and args.only != "latency":
        raise SystemExit("--latency-rate goes with --only latency")

    options = BenchOptions(
        messages=args.messages,
        plan_kb=args.plan_kb,
        partitions=args.partitions,
        query_hashes=args.query_hashes,
        latency_seconds=args.latency_seconds,
        reference_parser=args.reference_parser,
        plan_format=args.plan_format,
        repeat=args.repeat,
        batch_max_messages=args.batch_max_messages,
        batch_max_wait_s=args.batch_max_wait,
        profile_dir=args.profile,
        scaleout=args.scaleout,
        keep=args.keep,
        only=args.only,
        latency_rate=args.latency_rate,
    )
    result = run_benchmark(settings, options)
    print(format_table(result))
    print(json.dumps(result.summary()), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point until `planpipe.bench.cli` is listed in `planpipe.cli._STAGE_COMMANDS`."""
    import logging
    import os

    parser = argparse.ArgumentParser(prog="planpipe")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=os.environ.get("PLANPIPE_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr)
    handler = args.handler
    return int(handler(args, load_settings()))


if __name__ == "__main__":
    raise SystemExit(main())
