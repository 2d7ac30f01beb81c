"""Live capture: run a workload under `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` and build envelopes.

Who runs it: a role that is not a superuser. Capture refuses a superuser
(`SuperuserRefused`) unless `allow_superuser` is set. What the role needs:
`pg_read_all_data` (SELECT on every table), plus `pg_read_all_stats` when the
workload reads pg_stat_statements or other statistics views; nothing else.

Safety rules, per statement (see `sqltext.classify` and `safety`):

* The statement is parsed with PostgreSQL's own parser (pglast). Text that
  does not parse is reported as failed (42601) and never sent.
* A statement that calls a function on the deny list — in its own text, in a
  view it reads, in a row-level-security policy or in a SQL function it calls
  — is refused and reported as skipped with the reason (`safety`).
* SELECT (and VALUES/TABLE, or WITH without data modification) runs in a
  `READ ONLY` transaction, so a volatile function cannot write either.
* SELECT … FOR UPDATE/SHARE (refused by a read-only transaction) runs in a
  read-write transaction that is always rolled back.
* DML (INSERT/UPDATE/DELETE/MERGE, or a WITH containing one): by default
  (`dml="plan"`) planned with `EXPLAIN (FORMAT JSON)`, never executed —
  triggers, column defaults (`serial` → `nextval`) and foreign-key actions
  are invisible in the text and a rollback does not undo sequence increments.
  `dml="analyze"` executes it under EXPLAIN ANALYZE in a transaction that is
  always rolled back (the old behaviour); `dml="skip"` leaves it out.
* CREATE TABLE AS / SELECT INTO / CREATE MATERIALIZED VIEW AS get a plain
  `EXPLAIN (FORMAT JSON)` — planned, never executed — with query_type "DDL".
* Any other DDL is never executed and, since EXPLAIN cannot plan it, skipped.
* Utility statements (SET, VACUUM, EXPLAIN, COPY, DO, CALL, psql
  meta-commands…) are skipped.

A statement that is planned but not executed has `actual_rows` 0 and
`total_time_ms` 0 (there is no execution to measure).

Every transaction, including the read-only ones, ends in ROLLBACK and starts
with `SET LOCAL statement_timeout`. Statements are sent with the extended query
protocol, which refuses a string holding more than one command: a splitting
mistake can never smuggle a `COMMIT` past the rollback.

Envelope fields:

* `query_hash`: the statement's query identifier — the value pg_stat_statements
  stores as `queryid` and jsonlog logs as `query_id` — read from the "Query
  Identifier" of an extra `EXPLAIN (VERBOSE, FORMAT JSON)` in the same
  transaction (PostgreSQL 14+ with `compute_query_id` on, or `auto` with
  pg_stat_statements loaded), as a signed decimal string. Otherwise the
  fallback `sqltext.text_hash` (sha256 hex of the normalized text). CREATE
  TABLE AS & co. always use the fallback: EXPLAIN shows the identifier of the
  inner SELECT there, which would file the DDL under that SELECT's baseline.
* `execution_timestamp`: `time.time()` just before the EXPLAIN ANALYZE is sent.
* `total_time_ms`: the plan's "Execution Time" only. "Planning Time" is left
  out because it depends on plan-cache and catalog-cache state rather than on
  the plan; it stays available inside `plan_text`.
* `actual_rows`: rows produced by the top plan node: "Actual Rows" × "Actual
  Loops", rounded (PostgreSQL 18 prints per-loop averages with two decimals).
  DML without RETURNING therefore reports 0, as EXPLAIN does.
* `cluster_id`: the caller's, else the server's `system_identifier` as an
  unsigned decimal (what `pg_controldata` prints).
"""

import contextlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

import msgspec
import psycopg
from psycopg.types.string import TextBinaryLoader, TextLoader

from planpipe import tracing
from planpipe.capture.safety import CatalogGuard, FunctionPolicy, check_role
from planpipe.capture.sqltext import Statement, StatementKind, classify, split_statements, text_hash
from planpipe.contract import Envelope
from planpipe.errors import PlanpipeError

DEFAULT_STATEMENT_TIMEOUT_MS: Final = 60_000
APPLICATION_NAME: Final = "planpipe-capture"

DmlMode = Literal["plan", "analyze", "skip"]
DML_MODES: Final[tuple[str, ...]] = get_args(DmlMode)
DEFAULT_DML_MODE: Final[DmlMode] = "plan"

_SKIP_REASONS: Final = {
    StatementKind.DDL: "DDL is never executed, and EXPLAIN cannot plan it",
    StatementKind.OTHER: "not a statement EXPLAIN can take",
}


# The server checks table privileges even for a plan that never executes.
_WRITE_PRIVILEGE_HINT: Final = (
    " (planning DML or SELECT … FOR UPDATE needs the table's write privilege, e.g. pg_write_all_data: "
    "capture still plans DML in a READ ONLY transaction; or --dml skip)"
)


class PlanShapeError(PlanpipeError, ValueError):
    """EXPLAIN output that does not look like PostgreSQL's JSON format."""


def top_plan_rows(entry: dict[str, Any]) -> int:
    """Rows produced by the top plan node; 0 when the plan has no actuals (no ANALYZE)."""
    node = entry.get("Plan")
    if not isinstance(node, dict):
        raise PlanShapeError("no top-level Plan node")
    rows = node.get("Actual Rows")
    if not isinstance(rows, int | float) or isinstance(rows, bool):
        return 0
    loops = node.get("Actual Loops", 1)
    if not isinstance(loops, int | float) or isinstance(loops, bool):
        loops = 1
    return max(0, round(float(rows) * float(loops)))


def query_identifier(entry: dict[str, Any]) -> str | None:
    """The "Query Identifier" of an EXPLAIN VERBOSE entry as a decimal string; None when absent or 0."""
    value = entry.get("Query Identifier")
    if isinstance(value, int) and not isinstance(value, bool) and value != 0:
        return str(value)
    return None


def first_entry(plan_text: str) -> dict[str, Any]:
    """The single object of an `EXPLAIN (FORMAT JSON)` result (`[{"Plan": …}]`)."""
    try:
        decoded = msgspec.json.decode(plan_text)
    except msgspec.DecodeError as error:
        raise PlanShapeError(f"EXPLAIN output is not JSON: {error}") from None
    if not (isinstance(decoded, list) and decoded and isinstance(decoded[0], dict)):
        raise PlanShapeError("EXPLAIN output is not a one-element JSON array")
    return decoded[0]


def connect(dsn: str, *, connect_timeout: int = 10) -> psycopg.Connection[tuple[Any, ...]]:
    conn = psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout, application_name=APPLICATION_NAME)
    # Keep the server's JSON text verbatim for plan_text instead of a re-serialized dict.
    conn.adapters.register_loader("json", TextLoader)
    conn.adapters.register_loader("json", TextBinaryLoader)
    return conn


def server_cluster_id(conn: psycopg.Connection[Any]) -> str:
    """The server's system_identifier; `host:port` where a managed service hides pg_control_system()."""
    try:
        row = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
    except psycopg.Error:
        row = None
    if row is None or row[0] is None:
        return f"{conn.info.host}:{conn.info.port}"
    return str(int(row[0]) & 0xFFFF_FFFF_FFFF_FFFF)  # bigint on the wire, unsigned in pg_control


def _explain(conn: psycopg.Connection[Any], options: str, text: str) -> str:
    # binary=True forces the extended protocol: one command per call, enforced by the server.
    # prepare=False: never turn a workload statement into a server-side prepared statement.
    row = conn.execute(f"EXPLAIN ({options}) {text}", prepare=False, binary=True).fetchone()
    if row is None or not isinstance(row[0], str):
        raise PlanShapeError("EXPLAIN returned no plan")
    return row[0]


_INDEX_NAME: Final = re.compile(r'"Index Name": ("(?:[^"\\]|\\.)*")')
INDEX_METADATA_KEY: Final = "planpipe"


def with_index_definitions(conn: psycopg.Connection[Any], plan_text: str) -> str:
    """The plan with the definitions of the indexes it uses next to it (`"planpipe": {"indexes":
    {name: CREATE INDEX ...}}` in the EXPLAIN entry): a regression's remediation can then say
    how to recreate an index the new plan no longer has. Read from the target's catalog now,
    while the index exists. The server's text is otherwise kept verbatim (one key spliced in);
    fingerprints and work never read that key. A catalog error leaves the plan as it was."""
    names = sorted({msgspec.json.decode(m.group(1)) for m in _INDEX_NAME.finditer(plan_text)})
    start = plan_text.find("{")
    if not names or start < 0:
        return plan_text
    try:
        with conn.cursor() as cur:
            cur.execute("SAVEPOINT planpipe_indexes")
            rows = cur.execute(
                """SELECT c.relname, pg_get_indexdef(c.oid) FROM pg_class c
                   JOIN pg_index i ON i.indexrelid = c.oid
                   WHERE c.relname = ANY(%s)
                   ORDER BY c.relname, pg_table_is_visible(i.indrelid) DESC""",
                (names,),
            ).fetchall()
            cur.execute("RELEASE SAVEPOINT planpipe_indexes")
    except psycopg.Error:
        with contextlib.suppress(psycopg.Error):
            conn.execute("ROLLBACK TO SAVEPOINT planpipe_indexes")
        return plan_text
    definitions: dict[str, str] = {}
    for name, definition in rows:
        definitions.setdefault(str(name), str(definition))  # the visible one first when names repeat
    if not definitions:
        return plan_text
    spliced = msgspec.json.encode({"indexes": definitions}).decode()
    return f'{plan_text[: start + 1]}"{INDEX_METADATA_KEY}": {spliced}, {plan_text[start + 1 :]}'


@dataclass(frozen=True)
class Skipped:
    statement: Statement
    verb: str
    reason: str


@dataclass(frozen=True)
class Failed:
    statement: Statement
    error: str
    sqlstate: str | None = None


Outcome = Envelope | Skipped | Failed


@dataclass
class CaptureReport:
    envelopes: list[Envelope] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    statements: int = 0
    repeat: int = 1

    def add(self, outcome: Outcome) -> None:
        if isinstance(outcome, Envelope):
            self.envelopes.append(outcome)
        elif isinstance(outcome, Skipped):
            self.skipped.append(outcome)
        else:
            self.failed.append(outcome)

    def summary(self) -> str:
        lines = [
            f"capture explain: {self.statements} statements x {self.repeat} passes: "
            f"{len(self.envelopes)} captured, {len(self.skipped)} skipped, {len(self.failed)} failed"
        ]
        lines += [f"  skipped line {s.statement.line} ({s.verb or '?'}): {s.reason}" for s in self.skipped]
        lines += [f"  failed  line {f.statement.line}: {f.error}" for f in self.failed]
        return "\n".join(lines)


def _describe(error: psycopg.Error) -> tuple[str, str | None]:
    sqlstate = error.sqlstate
    message = (error.diag.message_primary if error.diag else None) or str(error).strip().splitlines()[0]
    return (f"{sqlstate}: {message}" if sqlstate else message), sqlstate


class ExplainCapturer:
    """Captures statements one at a time on one connection; reconnects after a broken connection."""

    def __init__(
        self,
        dsn: str,
        *,
        cluster_id: str | None = None,
        statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
        allow_superuser: bool = False,
        policy: FunctionPolicy | None = None,
        dml: DmlMode = DEFAULT_DML_MODE,
    ) -> None:
        if statement_timeout_ms < 0:
            raise ValueError("statement_timeout_ms must be >= 0 (0 disables the timeout)")
        if dml not in DML_MODES:
            raise ValueError(f"dml must be one of {', '.join(DML_MODES)}")
        self.dsn = dsn
        self.statement_timeout_ms = int(statement_timeout_ms)
        self.allow_superuser = allow_superuser
        self.dml: DmlMode = dml
        self._guard = CatalogGuard(policy or FunctionPolicy.build())
        self._conn: psycopg.Connection[tuple[Any, ...]] | None = None
        try:
            self.cluster_id = cluster_id or server_cluster_id(self._connection())
        except BaseException:
            self.close()
            raise

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            conn = connect(self.dsn)
            try:
                check_role(conn, allow_superuser=self.allow_superuser)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ExplainCapturer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def capture(self, statement: Statement) -> Outcome:
        classification = classify(statement.text)
        kind = classification.kind
        if classification.verb == "\\":
            return Skipped(statement, "\\", "psql/pgbench meta-command")
        if classification.error is not None:
            return Failed(statement, f"42601: does not parse: {classification.error}", "42601")
        if kind in _SKIP_REASONS:
            reason = _SKIP_REASONS[kind]
            if classification.verb == "EXPLAIN":
                reason = "already an EXPLAIN statement"
            return Skipped(statement, classification.verb, reason)
        if kind is StatementKind.DML and self.dml == "skip":
            return Skipped(statement, classification.verb, "DML is not captured (--dml skip)")
        try:
            refusal = self._guard.refusal(self._connection(), statement.text, classification)
            if refusal is not None:
                return Skipped(statement, classification.verb, f"refused: {refusal}")
            return self._run(statement, kind)
        except psycopg.Error as error:
            message, sqlstate = _describe(error)
            if sqlstate == "42501" and kind in (StatementKind.DML, StatementKind.LOCKING_SELECT):
                message += _WRITE_PRIVILEGE_HINT
            return Failed(statement, message, sqlstate)
        except PlanShapeError as error:
            return Failed(statement, str(error))

    def _run(self, statement: Statement, kind: StatementKind) -> Envelope:
        conn = self._connection()
        executed = kind is not StatementKind.CTAS and (kind is not StatementKind.DML or self.dml == "analyze")
        # Only what executes with write access needs a read-write transaction; EXPLAIN without
        # ANALYZE plans DML in a read-only one.
        read_only = not executed or kind is StatementKind.SELECT
        conn.execute("BEGIN READ ONLY" if read_only else "BEGIN")
        try:
            conn.execute(f"SET LOCAL statement_timeout = {self.statement_timeout_ms}")
            query_id: str | None = None
            if kind is not StatementKind.CTAS:
                # Plain EXPLAIN VERBOSE plans without executing: it only yields the query identifier.
                query_id = query_identifier(first_entry(_explain(conn, "VERBOSE, FORMAT JSON", statement.text)))
            executed_at = time.time()
            options = "ANALYZE, BUFFERS, FORMAT JSON" if executed else "FORMAT JSON"
            plan_text = _explain(conn, options, statement.text)
            plan_text = with_index_definitions(conn, plan_text)
        finally:
            self._rollback(conn)
        entry = first_entry(plan_text)
        execution_ms = entry.get("Execution Time", 0.0) if executed else 0.0
        if not isinstance(execution_ms, int | float) or isinstance(execution_ms, bool):
            raise PlanShapeError("Execution Time is not a number")
        envelope = Envelope(
            query_hash=query_id or text_hash(statement.text),
            execution_timestamp=executed_at,
            cluster_id=self.cluster_id,
            plan_text=plan_text,
            actual_rows=top_plan_rows(entry) if executed else 0,
            total_time_ms=float(execution_ms),
            query_type=kind.query_type,
            query_text=statement.text,
        )
        return tracing.stamp(envelope)  # a sampled share gets a W3C traceparent: the trace starts at capture

    @staticmethod
    def _rollback(conn: psycopg.Connection[Any]) -> None:
        # A broken connection has no transaction left to roll back: the server aborted it.
        if conn.broken or conn.closed:
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.OperationalError:
            with contextlib.suppress(psycopg.Error):
                conn.close()


ProgressCallback = Callable[[int, int, Statement, Outcome], None]


def capture_workload(
    dsn: str,
    workload: str | Sequence[Statement],
    *,
    repeat: int = 1,
    cluster_id: str | None = None,
    statement_timeout_ms: int = DEFAULT_STATEMENT_TIMEOUT_MS,
    allow_superuser: bool = False,
    policy: FunctionPolicy | None = None,
    dml: DmlMode = DEFAULT_DML_MODE,
    on_envelope: Callable[[Envelope], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> CaptureReport:
    """Run every statement `repeat` times (whole passes, in order); a failure never stops the workload.

    Skips are reported once, from the first pass. `on_envelope` sees each envelope as soon as it
    exists, so a caller can stream them out of a long workload.
    """
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    statements = split_statements(workload) if isinstance(workload, str) else list(workload)
    report = CaptureReport(statements=len(statements), repeat=repeat)
    total = len(statements) * repeat
    done = 0
    with ExplainCapturer(
        dsn,
        cluster_id=cluster_id,
        statement_timeout_ms=statement_timeout_ms,
        allow_superuser=allow_superuser,
        policy=policy,
        dml=dml,
    ) as capturer:
        for run in range(repeat):
            for statement in statements:
                outcome = capturer.capture(statement)
                done += 1
                if not (isinstance(outcome, Skipped) and run > 0):
                    report.add(outcome)
                if isinstance(outcome, Envelope) and on_envelope is not None:
                    on_envelope(outcome)
                if on_progress is not None:
                    on_progress(done, total, statement, outcome)
    return report


def print_progress(done: int, total: int, statement: Statement, outcome: Outcome) -> None:
    """Progress line on stderr: `[i/N] line L VERB: result`."""
    if isinstance(outcome, Envelope):
        result = f"captured {outcome.query_type} {outcome.total_time_ms:.3f} ms, {outcome.actual_rows} rows"
    elif isinstance(outcome, Skipped):
        result = f"skipped: {outcome.reason}"
    else:
        result = f"FAILED: {outcome.error}"
    print(f"[{done}/{total}] line {statement.line}: {result}", file=sys.stderr, flush=True)
