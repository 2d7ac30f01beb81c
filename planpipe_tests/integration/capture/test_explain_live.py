"""`capture explain` against the real server: plans captured, DML rolled back or planned, DDL never run."""

import argparse
import json
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from planpipe.capture.cli import add_parsers
from planpipe.capture.explain import capture_workload
from planpipe.capture.sqltext import text_hash
from planpipe.contract import Envelope, EnvelopeDecoder, encode_envelope
from planpipe.settings import Settings
from planpipe_tests.integration.capture.conftest import PgbenchDb

WORKLOAD = """
-- reads
SELECT abalance FROM pgbench_accounts WHERE aid = 42;
SELECT b.bid, count(*) AS tellers
  FROM pgbench_branches b JOIN pgbench_tellers t ON t.bid = b.bid
 GROUP BY b.bid;
SELECT a.aid, t.tid FROM pgbench_accounts a JOIN pgbench_tellers t ON t.bid = a.bid
 WHERE a.aid <= 250 ORDER BY a.aid LIMIT 100;
SELECT * FROM pgbench_branches FOR UPDATE;
-- writes: must leave no trace
UPDATE pgbench_accounts SET abalance = abalance + 1000 WHERE aid <= 500;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime)
  SELECT 1, 1, aid, 5, now() FROM pgbench_accounts WHERE aid <= 50;
DELETE FROM pgbench_tellers WHERE tid > 5;
WITH moved AS (DELETE FROM pgbench_history RETURNING *) SELECT count(*) FROM moved;
-- DDL: never executed
CREATE TABLE capture_probe (id int);
ALTER TABLE pgbench_accounts ADD COLUMN capture_col int;
DROP TABLE pgbench_branches;
TRUNCATE pgbench_accounts;
CREATE TABLE capture_ctas AS SELECT aid FROM pgbench_accounts WHERE aid < 10;
SELECT * INTO capture_select_into FROM pgbench_tellers;
-- failures do not stop the workload
SELECT * FROM no_such_table;
SELECT nextval('capture_seq');
VACUUM pgbench_history;
SELECT count(*) FROM pgbench_tellers
"""


def _fingerprint(conn: psycopg.Connection[Any]) -> dict[str, object]:
    """Everything the workload's writes would change."""
    queries = {
        "accounts": "SELECT count(*), sum(abalance) FROM pgbench_accounts",
        "tellers": "SELECT count(*) FROM pgbench_tellers",
        "history": "SELECT count(*) FROM pgbench_history",
        "branches": "SELECT count(*) FROM pgbench_branches",
        "tables": "SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class WHERE relname LIKE 'capture_%'",
        "columns": "SELECT count(*) FROM pg_attribute WHERE attrelid = 'pgbench_accounts'::regclass AND attnum > 0",
        "seq": "SELECT last_value FROM capture_seq",
    }
    return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}


def _by_text(envelopes: list[Envelope], fragment: str) -> Envelope:
    [found] = [e for e in envelopes if fragment in str(e.query_text)]
    return found


def test_workload_capture_is_safe_and_complete(pgbench_db: PgbenchDb, bench: psycopg.Connection[Any]) -> None:
    """As a superuser with DML executed (`dml="analyze"`): the most a capture can do, still without a trace."""
    before = _fingerprint(bench)
    report = capture_workload(
        pgbench_db.dsn, WORKLOAD, statement_timeout_ms=10_000, allow_superuser=True, dml="analyze"
    )
    assert _fingerprint(bench) == before  # DML rolled back, DDL not run, the sequence untouched

    assert report.statements == 18
    assert [s.statement.text.split()[0] for s in report.skipped] == [
        "CREATE", "ALTER", "DROP", "TRUNCATE", "SELECT", "VACUUM"
    ]  # fmt: skip
    [refused] = [s for s in report.skipped if s.verb == "SELECT"]
    assert refused.statement.text == "SELECT nextval('capture_seq')"
    assert refused.reason == "refused: calls nextval(): sequence changes are never rolled back"
    assert [(f.statement.text, f.sqlstate) for f in report.failed] == [("SELECT * FROM no_such_table", "42P01")]
    assert len(report.envelopes) == 11  # 4 reads, 4 writes, 2 CTAS, 1 trailing read

    decoder = EnvelopeDecoder()
    system_id = bench.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    assert system_id is not None
    for envelope in report.envelopes:
        assert decoder.decode(encode_envelope(envelope)) == envelope
        plan = json.loads(envelope.plan_text)
        assert isinstance(plan, list) and "Plan" in plan[0]
        assert envelope.cluster_id == str(system_id[0])
        if envelope.query_type == "DDL":  # CTAS: the text hash, not the inner SELECT's query id
            assert envelope.query_hash == text_hash(str(envelope.query_text))
        else:  # compute_query_id is on: real query ids
            assert envelope.query_hash.lstrip("-").isdigit()

    point = _by_text(report.envelopes, "aid = 42")
    assert (point.query_type, point.actual_rows) == ("SELECT", 1)
    assert json.loads(point.plan_text)[0]["Plan"]["Node Type"] == "Index Scan"
    assert "Shared Hit Blocks" in json.loads(point.plan_text)[0]["Plan"]  # BUFFERS
    assert _by_text(report.envelopes, "GROUP BY b.bid").actual_rows == 1
    assert _by_text(report.envelopes, "LIMIT 100").actual_rows == 100
    assert _by_text(report.envelopes, "count(*) FROM pgbench_tellers").actual_rows == 1
    assert _by_text(report.envelopes, "FOR UPDATE").query_type == "SELECT"

    update = _by_text(report.envelopes, "UPDATE pgbench_accounts")
    assert update.query_type == "DML" and update.total_time_ms > 0
    update_plan = json.loads(update.plan_text)[0]["Plan"]
    assert update_plan["Node Type"] == "ModifyTable" and update_plan["Operation"] == "Update"
    assert update_plan["Plans"][0]["Actual Rows"] == 500  # really executed, then rolled back
    assert _by_text(report.envelopes, "WITH moved").query_type == "DML"

    for fragment in ("capture_ctas", "capture_select_into"):
        ctas = _by_text(report.envelopes, fragment)
        assert (ctas.query_type, ctas.actual_rows, ctas.total_time_ms) == ("DDL", 0, 0.0)
        assert "Actual Rows" not in json.loads(ctas.plan_text)[0]["Plan"]  # planned, not executed


def test_query_hash_is_the_pg_stat_statements_queryid(reader_dsn: str, bench: psycopg.Connection[Any]) -> None:
    statement = "SELECT bid, bbalance FROM pgbench_branches WHERE bid = 1"
    report = capture_workload(reader_dsn, statement)
    [envelope] = report.envelopes
    bench.execute("SELECT pg_stat_statements_reset()")
    bench.execute(statement)
    row = bench.execute(
        "SELECT queryid FROM pg_stat_statements WHERE query LIKE 'SELECT bid, bbalance FROM pgbench_branches%'"
    ).fetchone()
    assert row is not None and envelope.query_hash == str(row[0])


def test_repeat_timeout_and_explicit_cluster_id(reader_dsn: str) -> None:
    progress: list[tuple[int, int]] = []
    report = capture_workload(
        reader_dsn,
        "SELECT 1; DROP TABLE pgbench_accounts; SELECT pg_sleep(5)",
        repeat=2,
        cluster_id="pg-test-1",
        statement_timeout_ms=200,
        on_progress=lambda done, total, *_: progress.append((done, total)),
    )
    assert progress == [(i, 6) for i in range(1, 7)]
    assert len(report.envelopes) == 2 and {e.cluster_id for e in report.envelopes} == {"pg-test-1"}
    assert len(report.skipped) == 1  # reported once, not per pass
    assert [f.sqlstate for f in report.failed] == ["57014", "57014"]  # canceled by statement_timeout
    assert "2 captured, 1 skipped, 2 failed" in report.summary()


def test_cli_writes_jsonl_and_reports(
    reader_dsn: str, stack_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = tmp_path / "workload.sql"
    workload.write_text("SELECT count(*) FROM pgbench_tellers;\nCREATE TABLE nope (a int);\nSELECT * FROM nope;\n")
    output = tmp_path / "plans.jsonl"
    parser = argparse.ArgumentParser(prog="planpipe")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["capture", "explain", "--dsn", reader_dsn, "--workload", str(workload),
                              "--output", str(output), "--cluster-id", "cli-test"])  # fmt: skip
    assert args.handler(args, stack_settings) == 1  # one statement failed
    lines = output.read_bytes().splitlines()
    envelopes = [EnvelopeDecoder().decode(line) for line in lines]
    assert [(e.query_text, e.cluster_id) for e in envelopes] == [("SELECT count(*) FROM pgbench_tellers", "cli-test")]
    err = capsys.readouterr().err
    assert "[1/3] line 1: captured SELECT" in err
    assert "1 captured, 1 skipped, 1 failed" in err
    assert 'failed  line 3: 42P01: relation "nope" does not exist' in err
    assert msgspec.json.decode(lines[0])["query_type"] == "SELECT"
