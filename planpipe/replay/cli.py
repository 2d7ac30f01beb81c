"""`planpipe replay` and `planpipe dlq parked`: the DLQ replay outside Dagster.

Registered through `planpipe.cli._STAGE_COMMANDS`; `python -m planpipe.replay.cli …`
runs the same commands standalone.
"""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from planpipe.settings import Settings, load_settings


def add_parsers(sub: "argparse._SubParsersAction[Any]") -> None:
    p = sub.add_parser("replay", help="correct DLQ messages and republish them exactly once; park the rest")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.add_argument("--follow", action="store_true", help="keep running after catching up (until --max-seconds)")
    p.add_argument("--max-messages", type=int, default=None, help="DLQ records per transaction (default 500)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(handler=_replay)

    p = sub.add_parser("dlq", help="inspect the dead-letter queue's replay outcomes")
    dlq = p.add_subparsers(dest="dlq_command", required=True)
    p = dlq.add_parser("parked", help="list messages the replay could not correct (newest first)")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--reason", default=None, help="only this DLQ reason (e.g. malformed_json)")
    p.add_argument("--all-topics", action="store_true", help="not only the configured DLQ topic")
    p.set_defaults(handler=_parked)


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.replay.engine import ReplaySummary, run_replay

    def progress(summary: ReplaySummary) -> None:
        print(
            f"\rconsumed {summary.consumed:>8}  republished {summary.republished:>8}  parked {summary.parked:>6}  "
            f"duplicates {summary.duplicates:>6}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    summary = run_replay(
        settings,
        max_seconds=args.max_seconds,
        until_caught_up=not args.follow,
        max_messages=args.max_messages,
        progress=None if args.quiet else progress,
    )
    if not args.quiet and summary.consumed:
        print(file=sys.stderr)
    print(json.dumps(summary.as_dict(), sort_keys=True))
    return 0


def _parked(args: argparse.Namespace, settings: Settings) -> int:
    from planpipe.replay.store import parked_messages

    topic = None if args.all_topics else settings.dlq_topic
    rows = parked_messages(settings.pg_dsn, dlq_topic=topic, limit=args.limit, reason=args.reason)
    print(json.dumps(rows, indent=2, sort_keys=True, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="planpipe-replay", description=__doc__)
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("PLANPIPE_LOG_LEVEL", "WARNING").upper(), stream=sys.stderr)
    handler = args.handler
    result: int = handler(args, load_settings())
    return result


if __name__ == "__main__":
    raise SystemExit(main())
