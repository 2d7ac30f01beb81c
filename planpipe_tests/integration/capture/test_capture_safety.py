"""Capture never acts outside its transaction: refused calls leave other sessions and the server as they were.

Each dangerous workload runs as a superuser (with `allow_superuser`), the role that could
really terminate a session or create a slot: what stops it is the parse check, not a privilege.
"""

import argparse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest

from planpipe.capture.cli import add_parsers
from planpipe.capture.explain import capture_workload
from planpipe.capture.safety import FunctionPolicy, SuperuserRefused
from planpipe.contract import EnvelopeDecoder
from planpipe.settings import Settings
from planpipe_tests.integration.capture.conftest import PgbenchDb


@dataclass(frozen=True)
class Hidden:
    """Database objects that hide a dangerous call from the statement's text."""

    slot: str
    view: str  # a view whose definition terminates a backend
    sql_function: str  # a SQL function that creates a replication slot
    plpgsql_function: str  # a PL/pgSQL function: its body cannot be checked
    rls_table: str  # a table whose row-level-security policy takes an advisory lock


@pytest.fixture
def hidden(bench: psycopg.Connection[Any]) -> Iterator[Hidden]:
    tag = uuid.uuid4().hex[:8]
    h = Hidden(
        slot=f"guard_slot_{tag}",
        view=f"guard_view_{tag}",
        sql_function=f"guard_sqlfn_{tag}",
        plpgsql_function=f"guard_plfn_{tag}",
        rls_table=f"guard_rls_{tag}",
    )
    bench.execute(
        f"CREATE VIEW {h.view} AS SELECT pid, pg_terminate_backend(pid) AS gone FROM pg_stat_activity"
        " WHERE application_name = 'guard-victim'"
    )
    bench.execute(
        f"CREATE FUNCTION {h.sql_function}() RETURNS text LANGUAGE sql"
        f" RETURN (SELECT slot_name::text FROM pg_create_physical_replication_slot('{h.slot}'))"
    )
    bench.execute(f"CREATE FUNCTION {h.plpgsql_function}() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$")
    bench.execute(f"CREATE TABLE {h.rls_table} (id int)")
    bench.execute(f"ALTER TABLE {h.rls_table} ENABLE ROW LEVEL SECURITY")
    bench.execute(f"CREATE POLICY p ON {h.rls_table} USING (pg_try_advisory_lock(id))")
    try:
        yield h
    finally:
        bench.execute(f"DROP VIEW IF EXISTS {h.view}")
        bench.execute(f"DROP FUNCTION IF EXISTS {h.sql_function}(), {h.plpgsql_function}()")
        bench.execute(f"DROP TABLE IF EXISTS {h.rls_table}")
        bench.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name LIKE 'guard_slot_%'"
        )


@pytest.fixture
def victim(pgbench_db: PgbenchDb) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    """Another live session, as a capture target's application would hold one."""
    with psycopg.connect(pgbench_db.dsn, autocommit=True, application_name="guard-victim") as conn:
        yield conn


def _pid(conn: psycopg.Connection[Any]) -> int:
    return conn.info.backend_pid


def _alive(bench: psycopg.Connection[Any], conn: psycopg.Connection[Any]) -> bool:
    row = bench.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [_pid(conn)]).fetchone()
    return row is not None and row[0] == 1 and conn.execute("SELECT 1").fetchone() == (1,)


def _server_state(bench: psycopg.Connection[Any]) -> dict[str, object]:
    queries = {
        "slots": "SELECT count(*) FROM pg_replication_slots",
        "advisory": "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
        "seq": "SELECT last_value, is_called FROM capture_seq",
    }
    return {name: bench.execute(sql).fetchall() for name, sql in queries.items()}


def test_calls_with_effects_outside_the_transaction_are_refused_with_reasons(
    pgbench_db: PgbenchDb,
    bench: psycopg.Connection[Any],
    victim: psycopg.Connection[Any],
    hidden: Hidden,
) -> None:
    pid = _pid(victim)
    before = _server_state(bench)
    statements = [
        f"SELECT pg_terminate_backend({pid})",
        f"SELECT * FROM pg_create_physical_replication_slot('{hidden.slot}')",
        f"SELECT count(*) FROM pgbench_branches WHERE bid IN (SELECT pg_catalog.pg_cancel_backend({pid})::int)",
        "WITH l AS (SELECT pg_advisory_lock(42)) SELECT * FROM l",
        "SELECT t.tid, n.v FROM pgbench_tellers t, LATERAL (SELECT nextval('capture_seq') AS v) n",
        f"SELECT * FROM {hidden.view}",
        f"SELECT {hidden.sql_function}()",
        f"SELECT {hidden.plpgsql_function}()",
        f"SELECT count(*) FROM {hidden.rls_table}",
        "SELECT count(*) FROM pgbench_accounts WHERE aid < 100",
    ]
    report = capture_workload(pgbench_db.dsn, ";\n".join(statements), allow_superuser=True)

    assert _alive(bench, victim)  # not terminated, not cancelled
    assert _server_state(bench) == before  # no slot, no advisory lock held, the sequence untouched
    reasons = {s.statement.line: s.reason for s in report.skipped}
    assert reasons == {
        1: "refused: calls pg_terminate_backend(): signals another server process",
        2: "refused: calls pg_create_physical_replication_slot(): replication slots and origins persist outside "
        "the transaction",
        3: "refused: calls pg_catalog.pg_cancel_backend(): signals another server process",
        4: "refused: calls pg_advisory_lock(): advisory locks are taken outside the transaction's rollback",
        5: "refused: calls nextval(): sequence changes are never rolled back",
        6: f"refused: calls pg_terminate_backend(): signals another server process (in view public.{hidden.view})",
        7: "refused: calls pg_create_physical_replication_slot(): replication slots and origins persist outside "
        f"the transaction (in function public.{hidden.sql_function})",
        8: f"refused: calls public.{hidden.plpgsql_function}(), a plpgsql function whose body cannot be checked "
        f"(allow it with --allow-function public.{hidden.plpgsql_function})",
        9: "refused: calls pg_try_advisory_lock(): advisory locks are taken outside the transaction's rollback "
        f"(in policy p on public.{hidden.rls_table})",
    }
    [captured] = report.envelopes
    assert captured.query_text == statements[-1] and captured.actual_rows == 1
    assert not report.failed


def test_allow_list_lets_a_named_function_run(pgbench_db: PgbenchDb, hidden: Hidden) -> None:
    policy = FunctionPolicy.build(allow=[f"public.{hidden.plpgsql_function}"], env={})
    sql = f"SELECT {hidden.plpgsql_function}()"
    report = capture_workload(pgbench_db.dsn, sql, allow_superuser=True, policy=policy)
    [envelope] = report.envelopes
    assert envelope.actual_rows == 1 and not report.skipped


def test_cli_lists_refused_statements_and_the_victim_survives(
    pgbench_db: PgbenchDb,
    bench: psycopg.Connection[Any],
    victim: psycopg.Connection[Any],
    hidden: Hidden,
    stack_settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    workload = tmp_path / "workload.sql"
    workload.write_text(
        f"SELECT pg_terminate_backend({_pid(victim)});\n"
        f"SELECT * FROM pg_create_physical_replication_slot('{hidden.slot}');\n"
        "SELECT count(*) FROM pgbench_tellers;\n"
    )
    output = tmp_path / "plans.jsonl"
    args = _parse(["--dsn", pgbench_db.dsn, "--workload", str(workload), "--output", str(output), "--allow-superuser"])
    assert args.handler(args, stack_settings) == 0  # refusals are not failures
    assert _alive(bench, victim)
    slots = bench.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", [hidden.slot])
    assert slots.fetchone() == (0,)
    [envelope] = [EnvelopeDecoder().decode(line) for line in output.read_bytes().splitlines()]
    assert envelope.query_text == "SELECT count(*) FROM pgbench_tellers"
    err = capsys.readouterr().err
    assert "[1/3] line 1: skipped: refused: calls pg_terminate_backend(): signals another server process" in err
    assert "1 captured, 2 skipped, 0 failed" in err
    assert "  skipped line 2 (SELECT): refused: calls pg_create_physical_replication_slot()" in err


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="planpipe")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["capture", "explain", *argv])


def test_superuser_is_refused_unless_allowed(
    pgbench_db: PgbenchDb, stack_settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    workload = tmp_path / "workload.sql"
    workload.write_text("SELECT 1;\n")
    output = tmp_path / "plans.jsonl"
    args = _parse(["--dsn", pgbench_db.dsn, "--workload", str(workload), "--output", str(output)])
    assert args.handler(args, stack_settings) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith('planpipe capture explain: refusing to capture as superuser "')
    assert "pg_read_all_data" in err and "--allow-superuser" in err
    assert output.read_bytes() == b""  # nothing ran
    with pytest.raises(SuperuserRefused):
        capture_workload(pgbench_db.dsn, "SELECT 1")


def test_a_pg_read_all_data_role_captures_selects(reader_dsn: str, bench: psycopg.Connection[Any]) -> None:
    before = bench.execute("SELECT count(*), sum(abalance) FROM pgbench_accounts").fetchone()
    report = capture_workload(
        reader_dsn,
        "SELECT abalance FROM pgbench_accounts WHERE aid = 7;\n"
        "SELECT calls FROM pg_stat_statements LIMIT 1;\n"  # an extension's view: its functions are vetted
        "CREATE TABLE capture_reader_ctas AS SELECT aid FROM pgbench_accounts WHERE aid < 5;\n"  # planned only
        "SELECT * FROM pgbench_branches FOR UPDATE;\n"  # the server wants UPDATE privilege, even to plan
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 10;\n"
        "SELECT pg_terminate_backend(pg_backend_pid());\n",  # refused for this role too
    )
    assert [(e.query_text, e.query_type) for e in report.envelopes] == [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 7", "SELECT"),
        ("SELECT calls FROM pg_stat_statements LIMIT 1", "SELECT"),
        ("CREATE TABLE capture_reader_ctas AS SELECT aid FROM pgbench_accounts WHERE aid < 5", "DDL"),
    ]
    assert report.envelopes[0].actual_rows == 1
    assert [(f.statement.line, f.sqlstate) for f in report.failed] == [(4, "42501"), (5, "42501")]
    assert all("pg_write_all_data" in f.error and "--dml skip" in f.error for f in report.failed)
    [refused] = report.skipped
    assert refused.reason == "refused: calls pg_terminate_backend(): signals another server process"
    assert bench.execute("SELECT count(*), sum(abalance) FROM pgbench_accounts").fetchone() == before


@pytest.fixture
def serial_table(bench: psycopg.Connection[Any]) -> Iterator[str]:
    name = f"guard_serial_{uuid.uuid4().hex[:8]}"
    bench.execute(f"CREATE TABLE {name} (id serial PRIMARY KEY, note text)")
    try:
        yield name
    finally:
        bench.execute(f"DROP TABLE {name}")


def _sequence(bench: psycopg.Connection[Any], table: str) -> tuple[Any, ...] | None:
    return bench.execute(f"SELECT last_value, is_called FROM {table}_id_seq").fetchone()


def test_dml_is_planned_not_executed_by_default(
    pgbench_db: PgbenchDb, bench: psycopg.Connection[Any], serial_table: str
) -> None:
    """A serial column's default calls nextval, invisible in the text: only planning leaves no trace."""
    insert = f"INSERT INTO {serial_table} (note) SELECT 'x' FROM generate_series(1, 5)"
    before = _sequence(bench, serial_table)

    planned = capture_workload(pgbench_db.dsn, insert, allow_superuser=True)
    [envelope] = planned.envelopes
    plan = msgspec.json.decode(envelope.plan_text)[0]["Plan"]
    assert (envelope.query_type, envelope.actual_rows, envelope.total_time_ms) == ("DML", 0, 0.0)
    assert plan["Node Type"] == "ModifyTable" and "Actual Rows" not in plan
    assert envelope.query_hash.lstrip("-").isdigit()  # the server's query id, as for executed statements
    assert _sequence(bench, serial_table) == before

    skipped = capture_workload(pgbench_db.dsn, insert, allow_superuser=True, dml="skip")
    assert [s.reason for s in skipped.skipped] == ["DML is not captured (--dml skip)"]

    # What the default avoids: executed and rolled back, the rows are gone but the sequence moved on.
    executed = capture_workload(pgbench_db.dsn, insert, allow_superuser=True, dml="analyze")
    assert executed.envelopes[0].total_time_ms > 0
    assert bench.execute(f"SELECT count(*) FROM {serial_table}").fetchone() == (0,)
    assert _sequence(bench, serial_table) == (5, True)


def test_cli_output_to_a_device(reader_dsn: str, stack_settings: Settings, tmp_path: Path) -> None:
    """`--output /dev/null` (a dry run) works: only regular files are fsynced."""
    workload = tmp_path / "workload.sql"
    workload.write_text("SELECT count(*) FROM pgbench_branches;\n")
    args = _parse(["--dsn", reader_dsn, "--workload", str(workload), "--output", "/dev/null", "--quiet"])
    assert args.handler(args, stack_settings) == 0
