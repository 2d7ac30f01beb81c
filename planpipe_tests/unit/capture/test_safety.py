"""The function deny/allow lists: what capture refuses, with which reason, and how users change it."""

import pytest

from planpipe.capture.safety import DEFAULT_DENY, ENV_ALLOW, ENV_DENY, FunctionPolicy, _unwrap_sql_body
from planpipe.capture.sqltext import QualifiedName, classify

pytestmark = pytest.mark.unit

SAFE = FunctionPolicy.build(env={})


def refusal(sql: str, policy: FunctionPolicy = SAFE) -> str | None:
    return policy.refusal(classify(sql))


@pytest.mark.parametrize(
    ("sql", "function"),
    [
        ("SELECT pg_terminate_backend(123)", "pg_terminate_backend"),
        ("SELECT pg_catalog.pg_cancel_backend(123)", "pg_catalog.pg_cancel_backend"),
        ("SELECT * FROM pg_create_physical_replication_slot('x')", "pg_create_physical_replication_slot"),
        ("SELECT pg_create_logical_replication_slot('x', 'pgoutput')", "pg_create_logical_replication_slot"),
        ("SELECT pg_drop_replication_slot('x')", "pg_drop_replication_slot"),
        ("SELECT pg_replication_slot_advance('x', '0/0')", "pg_replication_slot_advance"),
        ("SELECT pg_logical_emit_message(false, 'p', 'm')", "pg_logical_emit_message"),
        ("SELECT * FROM pg_logical_slot_get_changes('x', NULL, NULL)", "pg_logical_slot_get_changes"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock"),
        ("SELECT pg_try_advisory_lock(1)", "pg_try_advisory_lock"),
        ("SELECT * FROM dblink('c', 'DELETE FROM t') AS r(a int)", "dblink"),
        ("SELECT lo_export(1, '/tmp/x')", "lo_export"),
        ("SELECT pg_reload_conf()", "pg_reload_conf"),
        ("SELECT pg_rotate_logfile()", "pg_rotate_logfile"),
        ("SELECT pg_switch_wal()", "pg_switch_wal"),
        ("SELECT pg_promote()", "pg_promote"),
        ("SELECT nextval('s')", "nextval"),
        ("SELECT setval('s', 1)", "setval"),
        ("SELECT pg_stat_reset()", "pg_stat_reset"),
        ("SELECT pg_stat_reset_shared('io')", "pg_stat_reset_shared"),
        ("SELECT pg_stat_statements_reset()", "pg_stat_statements_reset"),
        ("SELECT pg_file_write('f', 'x', false)", "pg_file_write"),
        ("SELECT query_to_xml('SELECT pg_terminate_backend(1)', true, true, '')", "query_to_xml"),
        # hidden in a subquery, a CTE, a LATERAL join, a nested call
        ("SELECT * FROM t WHERE EXISTS (SELECT pg_terminate_backend(t.pid))", "pg_terminate_backend"),
        (
            "WITH s AS (SELECT * FROM pg_create_physical_replication_slot('x')) SELECT 1",
            "pg_create_physical_replication_slot",
        ),
        ("SELECT * FROM t, LATERAL (SELECT pg_advisory_lock(t.id)) l", "pg_advisory_lock"),
        ("SELECT coalesce(nullif(pg_terminate_backend(1)::int, 0), 1)", "pg_terminate_backend"),
        ('SELECT "pg_catalog"."pg_terminate_backend"(1)', "pg_catalog.pg_terminate_backend"),
        ('SELECT "PG_TERMINATE_BACKEND"(1)', "PG_TERMINATE_BACKEND"),  # another function; refused all the same
    ],
)
def test_functions_with_effects_outside_the_transaction_are_refused(sql: str, function: str) -> None:
    why = refusal(sql)
    assert why is not None and why.startswith(f"calls {function}(): ")


def test_the_reason_says_what_the_function_would_do() -> None:
    assert refusal("SELECT pg_terminate_backend(1)") == "calls pg_terminate_backend(): signals another server process"
    assert refusal("SELECT nextval('s')") == "calls nextval(): sequence changes are never rolled back"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 42",
        "SELECT count(*), now(), pg_sleep(0.01), set_config('work_mem', '1MB', true) FROM t",
        "SELECT pg_notify('c', 'x')",  # sent only at commit: capture always rolls back
        "SELECT 'pg_terminate_backend(1)' AS text_only",
        "SELECT pg_backend_pid(), pg_current_wal_lsn(), pg_stat_get_activity(NULL)",
    ],
)
def test_harmless_calls_pass(sql: str) -> None:
    assert refusal(sql) is None


def test_allow_list_wins_and_deny_list_extends(monkeypatch: pytest.MonkeyPatch) -> None:
    policy = FunctionPolicy.build(deny=["app.purge_*", "my_side_effect"], allow=["pg_advisory_xact_lock"], env={})
    assert refusal("SELECT pg_advisory_xact_lock(1)", policy) is None
    assert refusal("SELECT pg_advisory_lock(1)", policy) is not None
    assert refusal("SELECT app.purge_all()", policy) == "calls app.purge_all(): on the capture deny list"
    assert refusal("SELECT purge_all()", policy) is None  # a dotted pattern needs the schema
    assert refusal("SELECT other.my_side_effect()", policy) is not None  # a bare pattern matches any schema
    env = {ENV_DENY: " pg_sleep , ", ENV_ALLOW: "nextval,setval"}
    from_env = FunctionPolicy.build(env=env)
    assert refusal("SELECT pg_sleep(1)", from_env) is not None
    assert refusal("SELECT nextval('s'), setval('s', 1)", from_env) is None
    assert refusal("SELECT pg_terminate_backend(1)", from_env) is not None  # defaults stay
    monkeypatch.setenv(ENV_ALLOW, "PG_TERMINATE_BACKEND")  # patterns are case-insensitive
    assert refusal("SELECT pg_terminate_backend(1)", FunctionPolicy.build()) is None


def test_defaults_cover_the_families_the_issue_names() -> None:
    policy = FunctionPolicy.build(env={})
    for name in ("pg_copy_logical_replication_slot", "pg_replication_origin_create", "dblink_connect",
                 "lo_import", "pg_wal_replay_pause", "pg_advisory_unlock_all", "pg_file_unlink",
                 "pg_restore_relation_stats"):  # fmt: skip
        assert policy.denial(QualifiedName(None, name)) is not None, name
    assert len(DEFAULT_DENY) >= 30


def test_sql_function_bodies_unwrap_to_statements() -> None:
    assert _unwrap_sql_body("BEGIN ATOMIC\n SELECT 1;\n SELECT 2;\nEND").strip() == "SELECT 1;\n SELECT 2;"
    assert _unwrap_sql_body("RETURN pg_terminate_backend(1)") == "SELECT  pg_terminate_backend(1)"
    assert _unwrap_sql_body(" SELECT 1 ") == " SELECT 1 "
