"""What live capture refuses to run: functions with effects outside the transaction, and superusers.

`EXPLAIN ANALYZE` executes the statement. Capture runs it in a `READ ONLY`
transaction that always ends in ROLLBACK, but some functions act outside any
transaction: they signal other backends, create replication slots, take
session-level locks, write WAL, files or other databases, or advance a
sequence. No rollback undoes them, and a read-only transaction does not stop
them. So before a statement runs:

1. PostgreSQL's parser (pglast) lists every function called anywhere in the
   statement (subqueries, CTEs, LATERAL, nested calls; schema-qualified or
   quoted names).
2. For each relation referenced, capture looks through the catalog: a view's
   definition (`pg_get_viewdef`) and the row-level-security policies of a
   table are parsed the same way, recursively, since they run as part of the
   statement.
3. A called function that is not built in (`pg_catalog`), not part of an
   installed extension and written in SQL has its body parsed and checked the
   same way; one in any other language (PL/pgSQL, C, …) cannot be checked and
   is refused unless allowed.
4. A statement calling a function on the deny list (and not on the allow
   list) is refused: not executed, not planned, reported as skipped with the
   reason. It is not explained without ANALYZE either: the planner evaluates
   immutable functions while planning, so a mislabelled function would run.

Patterns are shell globs matched against the function name (`pg_advisory_*`)
or, when they contain a dot, against `schema.name` (`app.*`). The allow list
wins over the deny list. Defaults: `DEFAULT_DENY`; extend or relax them with
`--deny-function` / `--allow-function` or `PLANPIPE_CAPTURE_DENY_FUNCTIONS` /
`PLANPIPE_CAPTURE_ALLOW_FUNCTIONS` (comma-separated).

Not denied, on purpose: `set_config` and `pg_notify` (GUC changes and
notifications are undone or never sent when the transaction rolls back),
`pg_sleep` (bounded by the statement timeout).

What a parse cannot see: operators and casts backed by user functions, domain
checks, triggers and column defaults of DML (which is why DML is only planned
by default, see `capture.explain`). The first line of defence is the role:
capture refuses a superuser unless explicitly allowed, and a role with only
`pg_read_all_data` (+ `pg_read_all_stats`) can neither signal other roles'
sessions nor create replication slots.
"""

import fnmatch
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg

from planpipe.capture.sqltext import Classification, QualifiedName, classify, split_statements
from planpipe.errors import PlanpipeError

ENV_DENY: Final = "PLANPIPE_CAPTURE_DENY_FUNCTIONS"
ENV_ALLOW: Final = "PLANPIPE_CAPTURE_ALLOW_FUNCTIONS"

_SIGNAL = "signals another server process"
_SLOT = "replication slots and origins persist outside the transaction"
_ADVISORY = "advisory locks are taken outside the transaction's rollback"
_REMOTE = "acts on another database through dblink"
_LARGE_OBJECT = "large-object function (lo_import and lo_export read and write server files)"
_SERVER = "changes server state outside the transaction"
_SEQUENCE = "sequence changes are never rolled back"
_STATS = "statistics resets and restores are not rolled back"
_FILES = "writes server files (adminpack)"
_DYNAMIC = "runs SQL given as text, which cannot be checked"

# pattern → why a statement calling it is refused
DEFAULT_DENY: Final[Mapping[str, str]] = {
    "pg_terminate_backend": _SIGNAL,
    "pg_cancel_backend": _SIGNAL,
    "pg_log_backend_memory_contexts": _SIGNAL,
    "pg_create_*_replication_slot": _SLOT,
    "pg_copy_*_replication_slot": _SLOT,
    "pg_drop_replication_slot": _SLOT,
    "pg_replication_slot_advance": _SLOT,
    "pg_sync_replication_slots": _SLOT,
    "pg_logical_slot_*": _SLOT,
    "pg_logical_emit_message": "writes a WAL message outside the transaction",
    "pg_replication_origin_*": _SLOT,
    "pg_advisory_*": _ADVISORY,
    "pg_try_advisory_*": _ADVISORY,
    "dblink*": _REMOTE,
    "lo_*": _LARGE_OBJECT,
    "loread": _LARGE_OBJECT,
    "lowrite": _LARGE_OBJECT,
    "pg_reload_conf": _SERVER,
    "pg_rotate_logfile*": _SERVER,
    "pg_switch_wal": _SERVER,
    "pg_promote": _SERVER,
    "pg_wal_replay_*": _SERVER,
    "pg_backup_start": _SERVER,
    "pg_backup_stop": _SERVER,
    "pg_create_restore_point": _SERVER,
    "pg_log_standby_snapshot": _SERVER,
    "pg_import_system_collations": _SERVER,
    "nextval": _SEQUENCE,
    "setval": _SEQUENCE,
    "pg_stat_reset*": _STATS,
    "pg_stat_statements_reset": _STATS,
    "pg_restore_*_stats": _STATS,
    "pg_clear_*_stats": _STATS,
    "pg_file_*": _FILES,
    "query_to_xml*": _DYNAMIC,
    "cursor_to_xml*": _DYNAMIC,
    "ts_stat": _DYNAMIC,
}

_BUILTIN_SCHEMAS: Final = frozenset({"pg_catalog", "information_schema"})
_MAX_DEPTH: Final = 8


class SuperuserRefused(PlanpipeError):
    """The capture role is a superuser and the caller did not allow it."""

    def __init__(self, role: str) -> None:
        super().__init__(
            f'refusing to capture as superuser "{role}": connect as a role with pg_read_all_data '
            "(and pg_read_all_stats for pg_stat_statements), or pass --allow-superuser"
        )
        self.role = role


def check_role(conn: psycopg.Connection[Any], *, allow_superuser: bool) -> None:
    """Raise `SuperuserRefused` when connected as a superuser that was not explicitly allowed."""
    if allow_superuser:
        return
    row = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
    if row is not None and row[1]:
        raise SuperuserRefused(str(row[0]))


def _split_patterns(raw: str | None) -> tuple[str, ...]:
    return tuple(p.strip().lower() for p in (raw or "").split(",") if p.strip())


@dataclass(frozen=True)
class FunctionPolicy:
    """Deny and allow lists of function-name globs; allow wins."""

    deny: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_DENY))
    allow: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        *,
        deny: Iterable[str] = (),
        allow: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> "FunctionPolicy":
        """The defaults, extended by the environment's lists and then by the given patterns."""
        env = os.environ if env is None else env
        denied = dict(DEFAULT_DENY)
        for pattern in (*_split_patterns(env.get(ENV_DENY)), *(p.lower() for p in deny)):
            denied.setdefault(pattern, "on the capture deny list")
        allowed = (*_split_patterns(env.get(ENV_ALLOW)), *(p.lower() for p in allow))
        return cls(denied, allowed)

    @staticmethod
    def _matches(pattern: str, function: QualifiedName) -> bool:
        if "." in pattern:
            return function.schema is not None and fnmatch.fnmatchcase(str(function).lower(), pattern)
        return fnmatch.fnmatchcase(function.name.lower(), pattern)

    def allowed(self, function: QualifiedName) -> bool:
        return any(self._matches(p, function) for p in self.allow)

    def denial(self, function: QualifiedName) -> str | None:
        """Why a call to `function` is refused, or None."""
        if self.allowed(function):
            return None
        for pattern, why in self.deny.items():
            if self._matches(pattern, function):
                return f"calls {function}(): {why}"
        return None

    def refusal(self, classification: Classification) -> str | None:
        """The first reason (in name order) to refuse a statement, judged from its own text only."""
        for function in sorted(classification.functions, key=lambda f: (f.name, f.schema or "")):
            if (why := self.denial(function)) is not None:
                return why
        return None


@dataclass(frozen=True)
class _Function:
    oid: int
    name: QualifiedName
    language: str
    from_extension: bool


class CatalogGuard:
    """Looks through views, row-level-security policies and SQL functions for denied calls.

    Needs only catalog read access. Decisions are cached per statement text, so a
    repeated workload asks the catalog once per statement.
    """

    def __init__(self, policy: FunctionPolicy) -> None:
        self.policy = policy
        self._cache: dict[str, str | None] = {}

    def refusal(self, conn: psycopg.Connection[Any], text: str, classification: Classification) -> str | None:
        if text not in self._cache:
            self._cache[text] = self._check(conn, classification, via="", depth=0, seen=set())
        return self._cache[text]

    def _check(
        self, conn: psycopg.Connection[Any], found: Classification, *, via: str, depth: int, seen: set[int]
    ) -> str | None:
        if (why := self.policy.refusal(found)) is not None:
            return f"{why}{via}"
        if depth >= _MAX_DEPTH:
            return f"definitions nested deeper than {_MAX_DEPTH} levels{via}"
        for relation in sorted(found.relations):
            for what, body in self._relation_bodies(conn, relation, seen):
                if (why := self._check_text(conn, body, via=f" (in {what}{via})", depth=depth, seen=seen)) is not None:
                    return why
        for name in sorted(found.functions):
            for function in self._user_functions(conn, name, seen):
                if self.policy.allowed(function.name):
                    continue
                if function.language != "sql":
                    return (
                        f"calls {function.name}(), a {function.language} function whose body cannot be checked "
                        f"(allow it with --allow-function {function.name}){via}"
                    )
                body = self._sql_body(conn, function.oid)
                why = self._check_text(conn, body, via=f" (in function {function.name}{via})", depth=depth, seen=seen)
                if why is not None:
                    return why
        return None

    def _check_text(
        self, conn: psycopg.Connection[Any], body: str, *, via: str, depth: int, seen: set[int]
    ) -> str | None:
        for statement in split_statements(body):
            inner = classify(statement.text)
            if inner.error is not None:
                return f"cannot parse a definition it depends on: {inner.error}{via}"
            if (why := self._check(conn, inner, via=via, depth=depth + 1, seen=seen)) is not None:
                return why
        return None

    @staticmethod
    def _relation_bodies(
        conn: psycopg.Connection[Any], relation: QualifiedName, seen: set[int]
    ) -> list[tuple[str, str]]:
        """SQL that runs when `relation` is read: a view's query, the tables' RLS policy conditions."""
        row = conn.execute(
            "SELECT c.oid, c.relkind, c.relrowsecurity, format('%%I.%%I', n.nspname, c.relname),"
            " CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END"
            " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE c.oid = to_regclass(CASE WHEN %(schema)s::text IS NULL THEN quote_ident(%(name)s)"
            "                           ELSE format('%%I.%%I', %(schema)s, %(name)s) END)",
            {"schema": relation.schema, "name": relation.name},
        ).fetchone()
        if row is None or row[0] in seen:
            return []
        oid, relkind, rls, qualified, viewdef = row
        seen.add(oid)
        bodies: list[tuple[str, str]] = []
        if relkind == "v" and viewdef:
            bodies.append((f"view {qualified}", str(viewdef)))
        if rls:
            policies = conn.execute(
                "SELECT polname, pg_get_expr(polqual, polrelid) FROM pg_policy"
                " WHERE polrelid = %s AND polqual IS NOT NULL",
                [oid],
            ).fetchall()
            bodies += [(f"policy {name} on {qualified}", f"SELECT {expr}") for name, expr in policies]
        return bodies

    @staticmethod
    def _user_functions(conn: psycopg.Connection[Any], name: QualifiedName, seen: set[int]) -> list[_Function]:
        """Functions the call may resolve to that are neither built in nor from an extension."""
        rows = conn.execute(
            "SELECT p.oid, n.nspname, p.proname, l.lanname,"
            " EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid"
            "         AND d.deptype = 'e')"
            " FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace JOIN pg_language l ON l.oid = p.prolang"
            " WHERE p.proname = %s AND CASE WHEN %s::text IS NULL THEN n.nspname = ANY (current_schemas(true))"
            "     ELSE n.nspname = %s END",
            [name.name, name.schema, name.schema],
        ).fetchall()
        found = []
        for oid, schema, proname, language, from_extension in rows:
            if schema in _BUILTIN_SCHEMAS or from_extension or oid in seen:
                continue
            seen.add(oid)
            found.append(_Function(oid, QualifiedName(schema, proname), language, from_extension))
        return found

    @staticmethod
    def _sql_body(conn: psycopg.Connection[Any], oid: int) -> str:
        # SQL-standard bodies (BEGIN ATOMIC / RETURN) live in prosqlbody; the others in prosrc.
        row = conn.execute(
            "SELECT CASE WHEN p.prosqlbody IS NOT NULL THEN pg_get_function_sqlbody(p.oid) ELSE p.prosrc END"
            " FROM pg_proc p WHERE p.oid = %s",
            [oid],
        ).fetchone()
        body = str(row[0]) if row is not None and row[0] is not None else ""
        return _unwrap_sql_body(body)


def _unwrap_sql_body(body: str) -> str:
    """`BEGIN ATOMIC s1; s2; END` → `s1; s2`, and `RETURN expr` → `SELECT expr`; other bodies unchanged."""
    stripped = body.strip()
    upper = stripped.upper()
    if upper.startswith("BEGIN ATOMIC") and upper.endswith("END"):
        return stripped[len("BEGIN ATOMIC") : -len("END")]
    if upper.startswith("RETURN"):
        return "SELECT " + stripped[len("RETURN") :]
    return body
