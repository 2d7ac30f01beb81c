"""Failed Dagster runs of planpipe, kept in PostgreSQL next to the other operations tables."""

import json

import psycopg

# The message is diagnostics: stored as JSON text, cut so one huge stack trace cannot bloat the table.
MAX_MESSAGE_CHARS = 4000


def record_run_failure(conn: psycopg.Connection[tuple[object, ...]], run_id: str, job_name: str, message: str) -> None:
    """Idempotent: a run's failure is recorded once (a sensor may see it again after a restart)."""
    conn.execute(
        """INSERT INTO planpipe.run_failures (run_id, job_name, message) VALUES (%s, %s, %s)
           ON CONFLICT (run_id) DO NOTHING""",
        (run_id, job_name, json.dumps(message)[:MAX_MESSAGE_CHARS]),
    )
