"""`planpipe capture …` through the top-level CLI, and `--follow` stopping cleanly on SIGTERM."""

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import planpipe.cli
from planpipe.capture.logparse import LogFormat
from planpipe.capture.reader import load_state
from planpipe.contract import EnvelopeDecoder
from planpipe_tests.unit.capture import logfmt

pytestmark = pytest.mark.unit

_RUNNER = "import sys, planpipe.cli as c; sys.exit(c.main(sys.argv[1:]))"


def test_explain_safety_options_and_help(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(planpipe.cli, "_STAGE_COMMANDS", ("planpipe.capture.cli",))
    parser = planpipe.cli.build_parser()
    args = parser.parse_args(["capture", "explain", "--workload", "w.sql"])
    assert (args.allow_superuser, args.dml, args.deny_function, args.allow_function) == (False, "plan", [], [])
    args = parser.parse_args(
        ["capture", "explain", "--workload", "w.sql", "--allow-superuser", "--dml", "skip",
         "--deny-function", "app.*", "--deny-function", "pg_sleep", "--allow-function", "nextval"]
    )  # fmt: skip
    assert (args.allow_superuser, args.dml, args.deny_function, args.allow_function) == (
        True, "skip", ["app.*", "pg_sleep"], ["nextval"]
    )  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["capture", "explain", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for needle in ("NOT a superuser", "GRANT pg_read_all_data", "pg_read_all_stats", "pg_terminate_backend",
                   "pg_create_*_replication_slot", "--allow-superuser"):  # fmt: skip
        assert needle in help_text, needle


def test_sub_commands_register_through_the_stage_convention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planpipe.cli, "_STAGE_COMMANDS", ("planpipe.capture.cli",))
    parser = planpipe.cli.build_parser()
    args = parser.parse_args(["capture", "explain", "--workload", "w.sql", "--repeat", "3"])
    assert (args.repeat, args.output, args.statement_timeout, args.dsn) == (3, "-", 60_000, None)
    assert args.handler.__name__ == "_explain"
    args = parser.parse_args(["capture", "autoexplain", "--log", "pg.json", "--follow", "--state", "s.json"])
    assert (args.follow, args.state, args.format, args.output) == (True, "s.json", "auto", "-")
    assert args.handler.__name__ == "_autoexplain"
    with pytest.raises(SystemExit):
        parser.parse_args(["capture", "explain", "--workload", "w.sql", "--repeat", "0"])


def test_autoexplain_without_a_cluster_id_says_how_to_get_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(planpipe.cli, "_STAGE_COMMANDS", ("planpipe.capture.cli",))
    (tmp_path / "pg.json").write_bytes(b"")
    assert planpipe.cli.main(["capture", "autoexplain", "--log", str(tmp_path / "pg.json")]) == 2
    assert "--cluster-id" in capsys.readouterr().err


def _lines(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _wait(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_follow_stops_on_sigterm_with_its_cursor_saved(tmp_path: Path) -> None:
    log, state, output = tmp_path / "pg.json", tmp_path / "state.json", tmp_path / "out.jsonl"
    log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 0) + logfmt.plan_entry(LogFormat.JSONLOG, 1))
    argv = ["capture", "autoexplain", "--log", str(log), "--state", str(state), "--output", str(output),
            "--cluster-id", "c", "--poll-interval", "0.05"]  # fmt: skip
    follower = subprocess.Popen([sys.executable, "-c", _RUNNER, *argv, "--follow"], stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: _lines(output) == 2)
        with log.open("ab") as f:
            f.write(logfmt.plan_entry(LogFormat.JSONLOG, 2))
        assert _wait(lambda: _lines(output) == 3)
    finally:
        follower.send_signal(signal.SIGTERM)
        _, err = follower.communicate(timeout=20)
    assert follower.returncode == 0, err
    assert b"plans 3" in err
    saved = load_state(state)
    assert saved is not None and saved.offset == log.stat().st_size
    # a second run resumes at the end: nothing is appended twice
    done = subprocess.run([sys.executable, "-c", _RUNNER, *argv], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    envelopes = [EnvelopeDecoder().decode(line) for line in output.read_bytes().splitlines()]
    assert [e.query_hash for e in envelopes] == ["1000", "1001", "1002"]
