"""Splitting, classifying and normalizing SQL text: what decides how safely a statement runs."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planpipe.capture.sqltext import (
    StatementKind,
    classify,
    normalize_statement,
    split_statements,
    strip_explain,
    text_hash,
    tokenize,
)

pytestmark = pytest.mark.unit

fuzz = settings(database=None, max_examples=200, deadline=None)


def texts(sql: str) -> list[str]:
    return [s.text for s in split_statements(sql)]


# -- splitting ---------------------------------------------------------------


def test_semicolons_inside_literals_comments_and_quotes_do_not_split() -> None:
    sql = """
    SELECT 'a;b', 'it''s;', E'x\\';y', "col;umn", $$ ; $$, $fn$ $$ ; $fn$ FROM t; -- tail ; comment
    /* block ; /* nested ; */ still comment ; */ UPDATE t SET a = 1;
    SELECT U&'d\\0061t;a', B'10', X'1F;' FROM t
    """
    assert texts(sql) == [
        """SELECT 'a;b', 'it''s;', E'x\\';y', "col;umn", $$ ; $$, $fn$ $$ ; $fn$ FROM t""",
        "UPDATE t SET a = 1",
        "SELECT U&'d\\0061t;a', B'10', X'1F;' FROM t",
    ]


def test_leading_and_trailing_comments_are_dropped_and_lines_are_reported() -> None:
    sql = "-- header\n\n/* about q1 */ SELECT 1 /* trailing */;\n\n  SELECT\n 2 -- two\n;\n-- only a comment;\n"
    statements = split_statements(sql)
    assert [(s.text, s.line, s.index) for s in statements] == [("SELECT 1", 3, 0), ("SELECT\n 2", 5, 1)]


def test_empty_statements_and_missing_final_semicolon() -> None:
    assert texts(";;  ; SELECT 1;;; SELECT 2") == ["SELECT 1", "SELECT 2"]
    assert texts("") == []
    assert texts("-- nothing here") == []


def test_dollar_parameters_and_identifiers_with_dollars_are_not_dollar_quotes() -> None:
    assert texts("SELECT a$b$ FROM t WHERE x = $1; SELECT $2") == ["SELECT a$b$ FROM t WHERE x = $1", "SELECT $2"]


def test_sql_standard_function_body_keeps_its_semicolons() -> None:
    sql = """
    CREATE OR REPLACE FUNCTION f(x int) RETURNS int LANGUAGE sql
    BEGIN ATOMIC
      SELECT CASE WHEN x > 0 THEN 1 ELSE 0 END;
      SELECT x + 1;
    END;
    SELECT f(1);
    BEGIN; SELECT 1; END;
    """
    result = texts(sql)
    assert len(result) == 5
    assert result[0].startswith("CREATE OR REPLACE FUNCTION") and result[0].endswith("END")
    assert result[1:] == ["SELECT f(1)", "BEGIN", "SELECT 1", "END"]


def test_meta_commands_stand_alone() -> None:
    sql = "\\set aid random(1, 100000)\nSELECT abalance FROM pgbench_accounts WHERE aid = :aid;\n\\sleep 1\n"
    assert texts(sql) == [
        "\\set aid random(1, 100000)",
        "SELECT abalance FROM pgbench_accounts WHERE aid = :aid",
        "\\sleep 1",
    ]


def test_unterminated_literal_swallows_the_rest() -> None:
    assert texts("SELECT 'open; SELECT 2") == ["SELECT 'open; SELECT 2"]


def test_tokens_cover_the_source_exactly() -> None:
    sql = "SELECT e'\\'' || $x$a$x$ -- c\n/* d */ FROM \"T\" WHERE a=-1.5e3;"
    assert "".join(t.text for t in tokenize(sql)) == sql


_pieces = st.sampled_from(
    ["'a;b'", "'it''s'", "E'\\';'", '"q;t"', "$$;$$", "$t$ ; $$ $t$", "/* ; */", "x", "1.5", "$1", "(", ")", ","]
)


@fuzz
@given(st.lists(st.lists(_pieces, min_size=1, max_size=8), min_size=1, max_size=6))
def test_splitting_recovers_statements_joined_with_semicolons(bodies: list[list[str]]) -> None:
    # Each ends in a significant token: trailing comments are (deliberately) not part of a statement.
    statements = ["SELECT " + " ".join(body) + " z" for body in bodies]
    assert texts(";\n".join(statements) + ";") == statements


# -- classification ----------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "kind", "verb"),
    [
        ("SELECT * FROM t", StatementKind.SELECT, "SELECT"),
        ("  select 1", StatementKind.SELECT, "SELECT"),
        ("VALUES (1), (2)", StatementKind.SELECT, "VALUES"),
        ("TABLE t", StatementKind.SELECT, "TABLE"),
        ("(SELECT 1) UNION ALL (SELECT 2)", StatementKind.SELECT, "SELECT"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", StatementKind.SELECT, "WITH"),
        (
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT * FROM r",
            StatementKind.SELECT,
            "WITH",
        ),
        ("SELECT * FROM t FOR UPDATE", StatementKind.LOCKING_SELECT, "SELECT"),
        ("SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED", StatementKind.LOCKING_SELECT, "SELECT"),
        ("SELECT * FROM t FOR KEY SHARE", StatementKind.LOCKING_SELECT, "SELECT"),
        ("SELECT substring(s FROM 1 FOR 2) FROM t", StatementKind.SELECT, "SELECT"),
        ("INSERT INTO t VALUES (1)", StatementKind.DML, "INSERT"),
        ("update t set a = 1", StatementKind.DML, "UPDATE"),
        ("DELETE FROM t", StatementKind.DML, "DELETE"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", StatementKind.DML, "MERGE"),
        ("WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone", StatementKind.DML, "WITH"),
        ("WITH x AS (SELECT 1) UPDATE t SET a = 1", StatementKind.DML, "WITH"),
        ("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x", StatementKind.LOCKING_SELECT, "WITH"),
        ("SELECT * INTO new_t FROM t", StatementKind.CTAS, "SELECT"),
        ("CREATE TABLE n AS SELECT * FROM t", StatementKind.CTAS, "CREATE"),
        ("CREATE TEMP TABLE IF NOT EXISTS n (a, b) AS VALUES (1, 2)", StatementKind.CTAS, "CREATE"),
        ("CREATE UNLOGGED TABLE n WITH (fillfactor = 70) AS (SELECT 1)", StatementKind.CTAS, "CREATE"),
        ("CREATE MATERIALIZED VIEW mv AS SELECT 1", StatementKind.CTAS, "CREATE"),
        ("CREATE TABLE t (a int GENERATED ALWAYS AS (1) STORED)", StatementKind.DDL, "CREATE"),
        ("CREATE VIEW v AS SELECT 1", StatementKind.DDL, "CREATE"),
        ("CREATE TYPE pair AS (a int, b int)", StatementKind.DDL, "CREATE"),
        ("CREATE INDEX ON t (a)", StatementKind.DDL, "CREATE"),
        ("ALTER TABLE t ADD COLUMN b int", StatementKind.DDL, "ALTER"),
        ("DROP TABLE t", StatementKind.DDL, "DROP"),
        ("TRUNCATE t", StatementKind.DDL, "TRUNCATE"),
        ("GRANT SELECT ON t TO PUBLIC", StatementKind.DDL, "GRANT"),
        ("VACUUM ANALYZE t", StatementKind.OTHER, "VACUUM"),
        ("SET work_mem = '64MB'", StatementKind.OTHER, "SET"),
        ("EXPLAIN ANALYZE SELECT 1", StatementKind.OTHER, "EXPLAIN"),
        ("COPY t TO STDOUT", StatementKind.OTHER, "COPY"),
        ("\\set aid 1", StatementKind.OTHER, "\\"),
        ("/* tagged */ SELECT 1", StatementKind.SELECT, "SELECT"),
    ],
)
def test_classify(sql: str, kind: StatementKind, verb: str) -> None:
    assert classify(sql).kind is kind
    assert classify(sql).verb == verb


def test_query_types() -> None:
    assert {k: k.query_type for k in StatementKind} == {
        StatementKind.SELECT: "SELECT",
        StatementKind.LOCKING_SELECT: "SELECT",
        StatementKind.DML: "DML",
        StatementKind.CTAS: "DDL",
        StatementKind.DDL: "DDL",
        StatementKind.OTHER: "OTHER",
    }


def test_strip_explain() -> None:
    assert strip_explain("EXPLAIN (ANALYZE, FORMAT JSON) SELECT 1") == "SELECT 1"
    assert strip_explain("explain analyze verbose UPDATE t SET a = 1") == "UPDATE t SET a = 1"
    assert strip_explain("SELECT 1") == "SELECT 1"
    assert classify(strip_explain("explain (analyze) delete from t")).kind is StatementKind.DML


# -- normalization and the fallback hash ---------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("SELECT * FROM t WHERE id = 1", "select *\n  from T\twhere ID = 42;"),
        ("SELECT 'x' || $$y$$", "SELECT E'other' || $tag$z$tag$"),
        ("SELECT * FROM t WHERE a IN (1, 2, 3)", "SELECT * FROM t WHERE a IN (7)"),
        ("SELECT * FROM t WHERE a = ANY(ARRAY[1, 2])", "SELECT * FROM t WHERE a = ANY(ARRAY[3, 4, 5, 6])"),
        ("SELECT * FROM t WHERE a = -1", "SELECT * FROM t WHERE a = 5"),
        ("SELECT * FROM t WHERE a = $1", "SELECT * FROM t WHERE a = 0x1F"),
        ("/* app=x */ SELECT 1 -- trailing", "SELECT 2"),
        ("SELECT 1.5e3, .5, 1_000", "SELECT 1, 2, 3"),
    ],
)
def test_equivalent_statements_share_a_hash(a: str, b: str) -> None:
    assert normalize_statement(a) == normalize_statement(b)
    assert text_hash(a) == text_hash(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('SELECT * FROM "T"', "SELECT * FROM t"),  # quoted identifiers keep their case
        ("SELECT * FROM t WHERE a = 1", "SELECT * FROM t WHERE b = 1"),
        ("SELECT a - 1 FROM t", "SELECT a FROM t"),  # subtraction is not a sign
        ("SELECT * FROM t WHERE a IN (1, 2)", "SELECT * FROM t WHERE a IN (1, b)"),
        ("VALUES (1, 2)", "VALUES (1, 2, 3)"),  # only IN/ARRAY lists are squashed
    ],
)
def test_different_statements_differ(a: str, b: str) -> None:
    assert text_hash(a) != text_hash(b)


def test_normalized_form_and_hash_format() -> None:
    assert normalize_statement("SELECT  A,'x' FROM T WHERE a = -1 AND b IN (1,2);") == (
        "select a , ? from t where a = ? and b in ( ? )"
    )
    digest = text_hash("SELECT 1")
    assert len(digest) == 64 and int(digest, 16) >= 0
    # Pinned: the hash must not change between releases, or baselines split in two.
    assert digest == text_hash("select 2") == "e1c71d1661ae46e09b7aaec1c390957f0d6260410df4e4bc71b9c8d681021471"


# -- what PostgreSQL's parser sees: function calls and relations ------------------


def _functions(sql: str) -> set[str]:
    return {str(f) for f in classify(sql).functions}


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT pg_terminate_backend(42)", {"pg_terminate_backend"}),
        ("SELECT pg_catalog.pg_terminate_backend(42)", {"pg_catalog.pg_terminate_backend"}),
        ('SELECT "pg_catalog"."pg_terminate_backend"(42)', {"pg_catalog.pg_terminate_backend"}),
        ("SELECT PG_TERMINATE_BACKEND(42)", {"pg_terminate_backend"}),  # unquoted names fold to lower case
        ('SELECT "PG_TERMINATE_BACKEND"(42)', {"PG_TERMINATE_BACKEND"}),  # quoted: a different function
        ("SELECT * FROM t WHERE a IN (SELECT pg_cancel_backend(pid) FROM s)", {"pg_cancel_backend"}),
        ("WITH k AS (SELECT pg_terminate_backend(1)) SELECT * FROM k", {"pg_terminate_backend"}),
        ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT nextval('s') FROM r) SELECT 1", {"nextval"}),
        ("SELECT * FROM t, LATERAL (SELECT lo_unlink(t.o)) AS l", {"lo_unlink"}),
        ("SELECT * FROM pg_create_physical_replication_slot('x')", {"pg_create_physical_replication_slot"}),
        ("SELECT coalesce(abs(pg_advisory_lock(1)::int), 0)", {"abs", "pg_advisory_lock"}),  # nested
        ("SELECT CASE WHEN a THEN upper(dblink_exec('c', 'x')) END FROM t", {"upper", "dblink_exec"}),
        ("SELECT count(*) FILTER (WHERE f(a)) OVER (ORDER BY g(b)) FROM t", {"count", "f", "g"}),
        ("SELECT 'pg_terminate_backend(1)', \"pg_terminate_backend\" FROM t", set()),  # a string, a column
        ("SELECT 1 -- pg_terminate_backend(1)", set()),  # a comment
        ("SELECT EXISTS (SELECT 1 FROM t WHERE t.x = ANY (SELECT setval('s', 1)))", {"setval"}),
        ("SELECT * FROM (VALUES (pg_reload_conf())) v", {"pg_reload_conf"}),
        ("SELECT app.fn(1) FROM app.t", {"app.fn"}),
    ],
)
def test_function_calls_are_found_anywhere_in_the_tree(sql: str, expected: set[str]) -> None:
    assert _functions(sql) == expected


def test_relations_exclude_cte_names_and_keep_schemas() -> None:
    found = classify('WITH x AS (SELECT * FROM public.a) SELECT * FROM x JOIN b ON true JOIN "Q"."V" ON true')
    assert {str(r) for r in found.relations} == {"public.a", "b", "Q.V"}


@pytest.mark.parametrize(
    ("sql", "kind", "verb"),
    [
        ("DO $$ BEGIN PERFORM pg_terminate_backend(1); END $$", StatementKind.OTHER, "DO"),
        ("CALL p()", StatementKind.OTHER, "CALL"),
        ("COPY (SELECT 1) TO PROGRAM 'rm -rf /'", StatementKind.OTHER, "COPY"),
        ("SELECT a INTO TEMP n FROM t", StatementKind.CTAS, "SELECT"),
        ("SELECT * FROM t FOR SHARE OF t NOWAIT", StatementKind.LOCKING_SELECT, "SELECT"),
        ("SELECT * FROM (SELECT * FROM t FOR UPDATE) s", StatementKind.LOCKING_SELECT, "SELECT"),
        ("SELECT 'FOR UPDATE', 'INSERT' FROM t", StatementKind.SELECT, "SELECT"),  # keywords in strings
        # the server refuses a data-modifying WITH below the top level; classified DML all the same
        ("SELECT * FROM t WHERE x = (WITH d AS (DELETE FROM u RETURNING 1) SELECT 1)", StatementKind.DML, "SELECT"),
    ],
)
def test_classify_with_the_parser(sql: str, kind: StatementKind, verb: str) -> None:
    result = classify(sql)
    assert (result.kind, result.verb, result.error) == (kind, verb, None)


def test_text_that_does_not_parse_carries_the_parser_message() -> None:
    result = classify("SELEC 1")
    assert result.kind is StatementKind.OTHER and result.error is not None and "SELEC" in result.error
    # pgbench variables are not SQL: the parser says so, before anything reaches the server
    assert classify("SELECT abalance FROM pgbench_accounts WHERE aid = :aid").error is not None


def test_several_statements_are_flagged_and_every_call_is_seen() -> None:
    result = classify("SELECT 1; SELECT pg_terminate_backend(2)")
    assert result.error == "2 statements where one was expected"
    assert result.kind is StatementKind.SELECT and _functions("SELECT 1; SELECT pg_switch_wal()") == {"pg_switch_wal"}


def test_splitting_a_workload_with_dangerous_calls_keeps_each_call_in_its_statement() -> None:
    sql = "SELECT 1; SELECT pg_terminate_backend(7) /* ; */; SELECT * FROM pg_create_physical_replication_slot('x')"
    statements = split_statements(sql)
    assert [sorted(_functions(s.text)) for s in statements] == [
        [],
        ["pg_terminate_backend"],
        ["pg_create_physical_replication_slot"],
    ]
