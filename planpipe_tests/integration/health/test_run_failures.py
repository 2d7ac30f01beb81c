"""run_failures on the real PostgreSQL: a failed run is recorded once, its message kept as bounded JSON text."""

import uuid

import psycopg

from planpipe.health.run_failures import MAX_MESSAGE_CHARS, record_run_failure
from planpipe.settings import Settings


def test_a_failure_is_recorded_once_with_a_bounded_message(settings: Settings) -> None:
    run_id = f"test-run-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.pg_dsn, autocommit=True) as conn:
        record_run_failure(conn, run_id, "ingest_job", 'boom "quoted"\n' + "x" * 10_000)
        record_run_failure(conn, run_id, "ingest_job", "seen again after a sensor restart")
        rows = conn.execute(
            "SELECT job_name, message FROM planpipe.run_failures WHERE run_id = %s", (run_id,)
        ).fetchall()
        conn.execute("DELETE FROM planpipe.run_failures WHERE run_id = %s", (run_id,))
    assert len(rows) == 1
    job_name, message = rows[0]
    assert job_name == "ingest_job"
    assert isinstance(message, str) and message.startswith('"boom \\"quoted\\"\\n')
    assert len(message) == MAX_MESSAGE_CHARS
