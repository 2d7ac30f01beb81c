"""`planpipe bench`: the benchmarks' commands and the optional extra they need."""

import argparse
import importlib.util

import pytest

from planpipe.bench import cli

pytestmark = pytest.mark.unit


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="planpipe")
    cli.add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def test_detect_and_ingest_are_bench_commands() -> None:
    detect = _parser().parse_args(["bench", "detect", "--observations", "2e5", "--queries", "50", "--naive"])
    assert detect.handler is cli._detect
    assert (detect.observations, detect.queries, detect.naive) == (2e5, 50, True)
    ingest = _parser().parse_args(["bench", "ingest", "--messages", "1000"])
    assert ingest.handler is cli._ingest and ingest.messages == 1000


def test_a_missing_bench_extra_is_one_clear_message(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "orjson" else real(name, *a))
    with pytest.raises(SystemExit, match=r"optional extra 'bench' \(orjson not installed\).*planpipe\[bench\]"):
        cli._ingest(_parser().parse_args(["bench", "ingest"]), settings=None)  # type: ignore[arg-type]


def test_the_bench_extra_is_installed_with_dev() -> None:
    assert cli.missing_bench_modules() == []
