"""`planpipe publish` and `planpipe spool …`: the routing stage's sub-commands.

Registered by `planpipe.cli` through `add_parsers(sub)`; each parser's
`handler` default is a `(args, settings) -> int` function.
"""

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Final

from planpipe.routing.producer import DEFAULT_COOLDOWN_S, PlanProducer
from planpipe.routing.publish import format_report, publish_file
from planpipe.routing.spool import Spool
from planpipe.settings import Settings

# `planpipe publish` exit codes: 0 every record is on its topic or safe in the spool,
# 2 usage error, 3 some record was refused by Kafka for good (undeliverable).
EXIT_UNDELIVERABLE: Final = 3


def _sample_rate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be within 0..100, got {value}")
    return value


# `--file -`: stdin, read line by line as it arrives (a pipe from `capture autoexplain --follow`).
STDIN: Final = Path("/dev/stdin")


def _publish(args: argparse.Namespace, settings: Settings) -> int:
    path: Path = STDIN if str(args.file) == "-" else args.file
    if path is not STDIN and not path.is_file():
        print(f"planpipe publish: no such file: {path}", file=sys.stderr)
        return 2
    if args.sample_rate is not None:
        settings = replace(settings, sample_rate_pct=args.sample_rate)
    report = publish_file(settings, path, flush_timeout_s=args.flush_timeout, cooldown_s=args.cooldown)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, sort_keys=True))
    else:
        print(format_report(report, settings, source="-" if path is STDIN else str(path)))
    # Still-spooled envelopes are safe on disk and go out with the next run or
    # `planpipe spool drain`; the summary says so, the exit code stays 0.
    # A record Kafka refused for good is lost to both topics: never a success.
    if report.undeliverable:
        print(
            f"planpipe publish: {report.undeliverable} record(s) refused by Kafka for good (see the log); "
            f"check the topics' max.message.bytes against PLANPIPE_MAX_PLAN_BYTES",
            file=sys.stderr,
        )
        return EXIT_UNDELIVERABLE
    return 0


def _spool_status(args: argparse.Namespace, settings: Settings) -> int:
    path = settings.spool_path
    if not path.exists():
        stats = {"path": str(path), "exists": False, "depth": 0, "oldest_age_s": None}
    else:
        with Spool(path) as spool:
            found = spool.stats()
        stats = {
            "path": str(path),
            "exists": True,
            "depth": found.depth,
            "oldest_age_s": None if found.oldest_age_s is None else round(found.oldest_age_s, 3),
            "oldest_enqueued_at": found.oldest_enqueued_at,
            "value_bytes": found.value_bytes,
        }
    if args.json:
        print(json.dumps(stats, indent=2, sort_keys=True))
    else:
        age = stats["oldest_age_s"]
        print(f"spool        {stats['path']}{'' if stats['exists'] else ' (not created yet)'}")
        print(f"depth        {stats['depth']:,}")
        print(f"oldest age   {'-' if age is None else f'{age:.1f} s'}")
    return 0


def _spool_drain(args: argparse.Namespace, settings: Settings) -> int:
    started = time.monotonic()
    with Spool(settings.spool_path) as spool:
        before = spool.count()
    producer = PlanProducer(settings, cooldown_s=args.cooldown)
    left = producer.flush(args.timeout)
    stats = producer.close(timeout=0.0 if left else 5.0)
    print(f"spool        {settings.spool_path}")
    print(f"before       {before:,}")
    print(f"delivered    {stats.delivered_from_spool:,}")
    print(f"still queued {stats.spool_depth:,}")
    if stats.undeliverable:
        print(f"undeliverable {stats.undeliverable:,}  (refused by Kafka for good, see the log)")
    print(f"elapsed      {time.monotonic() - started:.2f} s  (breaker {stats.breaker})")
    if stats.undeliverable:
        return EXIT_UNDELIVERABLE
    return 0 if stats.spool_depth == 0 else 1


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = sub.add_parser(
        "publish",
        help="publish a JSONL file of envelopes (bad lines go to the DLQ)",
        description="Exit status: 0 all published, dead-lettered or spooled; 2 usage error; "
        f"{EXIT_UNDELIVERABLE} some record was refused by Kafka for good (undeliverable).",
    )
    p.add_argument("--file", type=Path, required=True, help="one JSON envelope per line; - reads stdin as it arrives")
    p.add_argument(
        "--sample-rate", type=_sample_rate, default=None, help="percent kept (0..100); default from settings"
    )
    p.add_argument("--flush-timeout", type=float, default=60.0, help="seconds to wait for acks at the end")
    p.add_argument("--cooldown", type=float, default=DEFAULT_COOLDOWN_S, help="circuit breaker cool-down, seconds")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(handler=_publish)

    p = sub.add_parser("spool", help="inspect or drain the producer's local spool")
    spool_sub = p.add_subparsers(dest="spool_command", required=True)
    s = spool_sub.add_parser("status", help="depth and oldest age")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=_spool_status)
    s = spool_sub.add_parser(
        "drain",
        help=f"send spooled envelopes to Kafka now; exit 1 if some remain, {EXIT_UNDELIVERABLE} if Kafka refused some",
    )
    s.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    s.add_argument("--cooldown", type=float, default=5.0, help="circuit breaker cool-down, seconds")
    s.set_defaults(handler=_spool_drain)
