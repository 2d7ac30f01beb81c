"""`planpipe replay` / `planpipe dlq parked` argument parsing (the handlers run in the integration tests)."""

import argparse

import pytest

from planpipe.replay import cli

pytestmark = pytest.mark.unit


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_replay_arguments() -> None:
    args = parse("replay", "--max-seconds", "30")
    assert (args.max_seconds, args.follow, args.max_messages) == (30.0, False, None)
    assert args.handler is cli._replay
    assert parse("replay").max_seconds is None


def test_dlq_parked_arguments() -> None:
    args = parse("dlq", "parked", "--limit", "5", "--reason", "malformed_json")
    assert (args.limit, args.reason, args.all_topics) == (5, "malformed_json", False)
    assert args.handler is cli._parked
    with pytest.raises(SystemExit):
        parse("dlq")  # a dlq sub-command is required
