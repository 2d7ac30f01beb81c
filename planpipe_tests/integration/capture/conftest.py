"""A throwaway pgbench database on the test server, and the server's log files."""

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from planpipe.settings import Settings, _with_database
from planpipe.stack.postgres import binary

AUTO_EXPLAIN_SESSION = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_format = json",
)


@dataclass(frozen=True)
class PgbenchDb:
    dsn: str
    name: str


@pytest.fixture(scope="session")
def pgbench_db(stack_settings: Settings) -> Iterator[PgbenchDb]:
    """`pgbench -i -s 1` in a database of its own (100,000 accounts, 10 tellers, 1 branch)."""
    name = f"capture_{uuid.uuid4().hex[:10]}"
    admin = _with_database(stack_settings.pg_dsn, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = _with_database(stack_settings.pg_dsn, name)
    try:
        subprocess.run([str(binary("pgbench")), "-i", "-s", "1", "-q", dsn], check=True, capture_output=True,
                       timeout=120)  # fmt: skip
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            conn.execute("CREATE SEQUENCE capture_seq")
        yield PgbenchDb(dsn, name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def reader_dsn(pgbench_db: PgbenchDb) -> Iterator[str]:
    """The pgbench database as the role the README recommends for capture: not a superuser,
    member of pg_read_all_data and pg_read_all_stats only."""
    role = f"capture_reader_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pgbench_db.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN IN ROLE pg_read_all_data, pg_read_all_stats")
    try:
        yield make_conninfo(pgbench_db.dsn, user=role)
    finally:
        with psycopg.connect(pgbench_db.dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])
            conn.execute(f"DROP ROLE IF EXISTS {role}")


@pytest.fixture
def bench(pgbench_db: PgbenchDb) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
    with psycopg.connect(pgbench_db.dsn, autocommit=True) as conn:
        yield conn


@dataclass(frozen=True)
class ServerLogs:
    data_dir: Path
    log_dir: Path

    def current(self, conn: psycopg.Connection[Any], fmt: str) -> Path:
        row = conn.execute("SELECT pg_current_logfile(%s)", [fmt]).fetchone()
        assert row is not None and row[0], f"the server does not log {fmt}"
        return self.data_dir / str(row[0])


@pytest.fixture(scope="session")
def server_logs(stack_settings: Settings) -> ServerLogs:
    with psycopg.connect(stack_settings.pg_dsn, autocommit=True) as conn:
        row = conn.execute("SELECT current_setting('data_directory'), current_setting('log_directory')").fetchone()
    assert row is not None
    data_dir = Path(row[0])
    return ServerLogs(data_dir, data_dir / row[1])


def wait_for(check: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return check()
