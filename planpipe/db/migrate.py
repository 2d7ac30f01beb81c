"""Versioned, idempotent schema migrations from `sql/NNN_name.sql`.

Each file runs once, in its own transaction, recorded with its checksum in
`planpipe.schema_migrations`. An advisory lock serialises concurrent callers
(several Dagster runs may start at once). A changed file that was already
applied is an error: migrations are append-only.
"""

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import psycopg

from planpipe.errors import PlanpipeError
from planpipe.settings import REPO_ROOT

_LOCK_KEY: Final = 0x706C616E  # "plan"
_NAME: Final = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


def migrations_dir() -> Path:
    # The repository's `sql/` in a checkout; the copy shipped inside the wheel otherwise.
    for candidate in (REPO_ROOT / "sql", Path(__file__).resolve().parent.parent / "_sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("planpipe's sql/ migrations directory was not found")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover(directory: Path | None = None) -> list[Migration]:
    found = []
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise ValueError(f"migration file name must look like 001_name.sql: {path.name}")
        found.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {directory}")
    return found


class MigrationError(PlanpipeError, RuntimeError):
    pass


def migrate(dsn: str, directory: Path | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call."""
    applied_now: list[int] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_KEY,))
        try:
            conn.execute("CREATE SCHEMA IF NOT EXISTS planpipe")
            conn.execute(
                """CREATE TABLE IF NOT EXISTS planpipe.schema_migrations (
                       version integer PRIMARY KEY, name text NOT NULL,
                       checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {row[0]: row[1] for row in conn.execute("SELECT version, checksum FROM planpipe.schema_migrations")}
            for migration in discover(directory):
                if migration.version in done:
                    if done[migration.version] != migration.checksum:
                        raise MigrationError(
                            f"migration {migration.version:03d}_{migration.name} changed after it was applied; "
                            "add a new migration instead"
                        )
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute("SET search_path TO DEFAULT")
                    conn.execute(
                        "INSERT INTO planpipe.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (migration.version, migration.name, migration.checksum),
                    )
                applied_now.append(migration.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_KEY,))
    return applied_now


def applied_versions(dsn: str) -> list[int]:
    with psycopg.connect(dsn) as conn:
        return [row[0] for row in conn.execute("SELECT version FROM planpipe.schema_migrations ORDER BY version")]
