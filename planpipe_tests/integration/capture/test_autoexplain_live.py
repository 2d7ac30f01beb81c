"""`capture autoexplain` on the test server's own log files: jsonlog and stderr, rotation, restarts.

Other sessions write to the same logs, so every query carries a unique marker
(`/* m:<run>:<i> */`) and assertions look only at entries with this run's markers.
"""

import argparse
import re
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from planpipe.capture.cli import add_parsers
from planpipe.capture.explain import capture_workload
from planpipe.capture.logparse import LogFormat
from planpipe.capture.reader import AutoExplainReader
from planpipe.capture.sqltext import text_hash
from planpipe.contract import Envelope, EnvelopeDecoder, encode_envelope
from planpipe.settings import Settings
from planpipe_tests.integration.capture.conftest import AUTO_EXPLAIN_SESSION, PgbenchDb, ServerLogs, wait_for

_MARKER = re.compile(r"/\* m:(\w+):(\d+) \*/")


def _query(run: str, i: int) -> str:
    return f"SELECT count(*) FROM pgbench_accounts WHERE aid <= {10 * (i + 1)} /* m:{run}:{i} */"


def _markers(envelopes: list[Envelope], run: str) -> list[int]:
    found = []
    for envelope in envelopes:
        m = _MARKER.search(envelope.query_text or "")
        if m and m.group(1) == run:
            found.append(int(m.group(2)))
    return found


@pytest.fixture
def explained(pgbench_db: PgbenchDb) -> Any:
    """A session with auto_explain logging every plan as JSON with actual rows."""
    with psycopg.connect(pgbench_db.dsn, autocommit=True) as conn:
        for setting in AUTO_EXPLAIN_SESSION:
            conn.execute(setting)
        yield conn


def _run(conn: psycopg.Connection[Any], run: str, indexes: range) -> None:
    for i in indexes:
        conn.execute(_query(run, i))


def _rotate(conn: psycopg.Connection[Any], logs: ServerLogs) -> None:
    """pg_rotate_logfile(), making sure a new file name is used (names have one-second resolution)."""
    before = logs.current(conn, "jsonlog")
    time.sleep(1.05 - time.time() % 1.0)
    conn.execute("SELECT pg_rotate_logfile()")
    assert wait_for(lambda: logs.current(conn, "jsonlog") != before, timeout=5)


def _poll_until(reader: AutoExplainReader, out: list[Envelope], run: str, want: set[int], timeout: float = 10) -> None:
    def done() -> bool:
        out.extend(reader.poll())
        return want <= set(_markers(out, run))

    assert wait_for(done, timeout=timeout), f"saw {sorted(_markers(out, run))}, wanted {sorted(want)}"


def test_jsonlog_and_stderr_plans_from_the_real_server(
    explained: psycopg.Connection[Any], server_logs: ServerLogs, reader_dsn: str
) -> None:
    run = uuid.uuid4().hex[:8]
    jsonlog_file = server_logs.current(explained, "jsonlog")
    stderr_file = server_logs.current(explained, "stderr")
    _run(explained, run, range(4))
    explained.execute(f"UPDATE pgbench_branches SET bbalance = bbalance WHERE bid = 1 /* m:{run}:9 */")

    by_format: dict[LogFormat, list[Envelope]] = {}
    for fmt, path in ((LogFormat.JSONLOG, jsonlog_file), (LogFormat.STDERR, stderr_file)):
        out: list[Envelope] = []
        with AutoExplainReader(path, cluster_id="it") as reader:
            assert reader.format is fmt
            _poll_until(reader, out, run, {0, 1, 2, 3, 9})
            assert reader.stats["malformed"] == 0
        by_format[fmt] = [e for e in out if _markers([e], run)]

    # the same statement, captured live, gets the same query_hash as its jsonlog entry
    live = capture_workload(reader_dsn, _query(run, 0))
    for fmt, envelopes in by_format.items():
        assert sorted(_markers(envelopes, run)) == [0, 1, 2, 3, 9]
        for envelope in envelopes:
            assert EnvelopeDecoder().decode(encode_envelope(envelope)) == envelope
            plan = msgspec.json.decode(envelope.plan_text)
            assert plan[0]["Plan"]["Node Type"] in ("Aggregate", "ModifyTable")
            assert abs(envelope.execution_timestamp - time.time()) < 60
            assert envelope.total_time_ms >= 0
        counts = {i: e for e in envelopes for i in _markers([e], run)}
        assert counts[2].actual_rows == 1 and counts[2].query_type == "SELECT"
        assert counts[9].query_type == "DML"
        aggregate = msgspec.json.decode(counts[2].plan_text)[0]["Plan"]
        assert aggregate["Plans"][0]["Actual Rows"] == 30  # aid <= 30
        if fmt is LogFormat.JSONLOG:  # jsonlog carries query_id = pg_stat_statements queryid
            assert counts[0].query_hash == counts[1].query_hash == live.envelopes[0].query_hash
        else:  # stderr has no query id: normalized text, which also ignores the constants
            assert counts[0].query_hash == counts[1].query_hash == text_hash(_query(run, 0))


def test_following_across_rotations_loses_and_repeats_nothing(
    explained: psycopg.Connection[Any], server_logs: ServerLogs, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    seen: list[Envelope] = []
    lock = threading.Lock()

    def sink(batch: list[Envelope]) -> None:
        with lock:
            seen.extend(batch)

    def count() -> int:
        with lock:
            return len(_markers(seen, run))

    stop = threading.Event()
    reader = AutoExplainReader(server_logs.log_dir, cluster_id="it", fmt=LogFormat.JSONLOG,
                               state_path=tmp_path / "state.json", settle_s=0.2)  # fmt: skip
    follower = threading.Thread(target=reader.follow, args=(sink,), kwargs={"stop": stop, "poll_interval": 0.05})
    follower.start()
    try:
        _run(explained, run, range(0, 3))
        assert wait_for(lambda: count() >= 3)
        _rotate(explained, server_logs)
        _run(explained, run, range(3, 6))
        _rotate(explained, server_logs)  # the follower may still be busy with the previous file
        _run(explained, run, range(6, 9))
        assert wait_for(lambda: count() >= 9), sorted(_markers(seen, run))
        time.sleep(0.3)  # a duplicate would show up now
    finally:
        stop.set()
        follower.join(10)
        reader.close()
    assert sorted(_markers(seen, run)) == list(range(9))
    assert reader.stats["rotations"] >= 2 and reader.stats["partial_discarded"] == 0


def test_restart_resumes_exactly_where_it_stopped(
    explained: psycopg.Connection[Any], server_logs: ServerLogs, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    state = tmp_path / "cursor.json"
    _run(explained, run, range(0, 6))
    first: list[Envelope] = []
    with AutoExplainReader(server_logs.log_dir, cluster_id="it", fmt=LogFormat.JSONLOG, state_path=state) as reader:

        def partial() -> bool:
            first.extend(reader.poll(max_envelopes=1))  # one envelope per batch, committed each time
            reader.commit()
            return len(_markers(first, run)) >= 3

        assert wait_for(partial)
    # while "down": more queries and a rotation
    _run(explained, run, range(6, 8))
    _rotate(explained, server_logs)
    _run(explained, run, range(8, 10))
    second: list[Envelope] = []
    with AutoExplainReader(server_logs.log_dir, cluster_id="it", fmt=LogFormat.JSONLOG, state_path=state,
                           settle_s=0.2) as reader:  # fmt: skip
        _poll_until(reader, second, run, set(range(10)) - set(_markers(first, run)))
    union = Counter(_markers(first, run) + _markers(second, run))
    assert sorted(union) == list(range(10)) and set(union.values()) == {1}


def test_cli_one_shot_with_state(
    explained: psycopg.Connection[Any],
    server_logs: ServerLogs,
    stack_settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = uuid.uuid4().hex[:8]
    log = server_logs.current(explained, "jsonlog")
    _run(explained, run, range(3))
    parser = argparse.ArgumentParser(prog="planpipe")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    output, state = tmp_path / "plans.jsonl", tmp_path / "state.json"
    argv = ["capture", "autoexplain", "--log", str(log), "--state", str(state), "--output", str(output)]

    def seen() -> list[int]:
        args = parser.parse_args(argv)
        assert args.handler(args, stack_settings) == 0
        lines = output.read_bytes().splitlines()
        return _markers([EnvelopeDecoder().decode(line) for line in lines], run)

    assert wait_for(lambda: sorted(seen()) == [0, 1, 2], timeout=10)
    _run(explained, run, range(3, 5))
    assert wait_for(lambda: sorted(seen()) == [0, 1, 2, 3, 4], timeout=10)  # appended, nothing twice
    # the cluster id came from the data directory's pg_control
    system_id = explained.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert system_id is not None
    first = EnvelopeDecoder().decode(output.read_bytes().splitlines()[0])
    assert first.cluster_id == str(system_id[0])
    assert "capture autoexplain (jsonlog)" in capsys.readouterr().err
