"""auto_explain entries in jsonlog, csvlog and stderr format → envelopes."""

from datetime import UTC
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from planpipe.capture.logparse import LogFormat, MalformedEntry, frame, parse_entry, parse_log_timestamp, plan_message
from planpipe.capture.reader import AutoExplainReader, detect_format
from planpipe.capture.sqltext import text_hash
from planpipe.contract import EnvelopeDecoder, encode_envelope
from planpipe_tests.unit.capture import logfmt

pytestmark = pytest.mark.unit

FORMATS = list(LogFormat)
DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("fmt", FORMATS)
def test_plan_entry_becomes_a_valid_envelope(fmt: LogFormat) -> None:
    query = "SELECT * FROM t WHERE a = 1"
    raw = logfmt.entry(fmt, logfmt.plan_message(query, duration_ms=12.345, rows=2.5, loops=4), query_id=-77)
    [(start, end)] = frame(raw, fmt, final=False)
    assert (start, end) == (0, len(raw))
    envelope = parse_entry(raw, fmt, "cluster-a")
    assert envelope is not None
    assert EnvelopeDecoder().decode(encode_envelope(envelope)) == envelope
    assert envelope.total_time_ms == 12.345
    assert envelope.actual_rows == 10  # 2.50 per loop x 4 loops
    assert envelope.execution_timestamp == pytest.approx(logfmt.TS, abs=1e-3)
    assert envelope.query_text == query
    assert envelope.query_type == "SELECT"
    assert envelope.cluster_id == "cluster-a"
    # stderr carries no query id: the normalized-text hash stands in.
    assert envelope.query_hash == (text_hash(query) if fmt is LogFormat.STDERR else "-77")
    plan = msgspec.json.decode(envelope.plan_text)
    assert isinstance(plan, list) and plan[0]["Plan"]["Node Type"] == "Seq Scan"
    assert plan[0]["Query Text"] == query


@pytest.mark.parametrize("fmt", FORMATS)
def test_non_plan_entries_are_not_envelopes(fmt: LogFormat) -> None:
    assert parse_entry(logfmt.noise_entry(fmt, 1), fmt, "c") is None
    assert parse_entry(logfmt.entry(fmt, "duration: 1.000 ms  statement: SELECT 1"), fmt, "c") is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_format_plans_are_rejected_not_guessed(fmt: LogFormat) -> None:
    raw = logfmt.entry(fmt, "duration: 1.000 ms  plan:\nQuery Text: SELECT 1\nResult  (cost=0.00..0.01 rows=1)")
    with pytest.raises(MalformedEntry, match="log_format = json"):
        parse_entry(raw, fmt, "c")


def test_query_hash_prefers_the_plans_own_identifier_then_query_id_then_text() -> None:
    fmt = LogFormat.JSONLOG
    verbose = logfmt.plan_message("SELECT 1", **{"Query Identifier": 123456789})
    assert (envelope := parse_entry(logfmt.jsonlog(verbose, query_id=-5), fmt, "c")) is not None
    assert envelope.query_hash == "123456789"
    assert (envelope := parse_entry(logfmt.jsonlog(logfmt.plan_message("SELECT 1"), query_id=-5), fmt, "c"))
    assert envelope.query_hash == "-5"
    assert (envelope := parse_entry(logfmt.jsonlog(logfmt.plan_message("SELECT 1"), query_id=0), fmt, "c"))
    assert envelope.query_hash == text_hash("SELECT 2")


def test_query_type_of_dml_and_of_explained_statements() -> None:
    for text, expected in [("UPDATE t SET a = 1", "DML"), ("EXPLAIN (ANALYZE) DELETE FROM t", "DML"),
                           ("create table n as select 1", "DDL"), ("VALUES (1)", "SELECT")]:  # fmt: skip
        envelope = parse_entry(logfmt.jsonlog(logfmt.plan_message(text)), LogFormat.JSONLOG, "c")
        assert envelope is not None and envelope.query_type == expected


def test_plan_message_requires_a_complete_json_object() -> None:
    complete = logfmt.plan_message("SELECT 1")
    found = plan_message(complete)
    assert found is not None and found.duration_ms == 1.5
    assert plan_message("connection received: host=[local]") is None
    with pytest.raises(MalformedEntry):
        plan_message(complete[:-3])
    with pytest.raises(MalformedEntry, match="no Plan"):
        plan_message('duration: 1.000 ms  plan:\n{"Query Text": "SELECT 1"}')


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-22 04:51:42.601 UTC", 1_795_323_102.601),
        ("2026-11-22 04:51:42 GMT [12] ", 1_795_323_102.0),
        ("2026-11-22 06:51:42.601 +02", 1_795_323_102.601),
        ("2026-11-21 23:21:42.601 -0530", 1_795_323_102.601),
        ("2026-11-22 10:21:42.601 +05:30", 1_795_323_102.601),
        ("1795323102.601 [12] ", 1_795_323_102.601),
    ],
)
def test_log_timestamps(text: str, expected: float) -> None:
    assert parse_log_timestamp(text) == pytest.approx(expected, abs=1e-6)


def test_ambiguous_zone_abbreviations_use_the_configured_log_timezone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    assert parse_log_timestamp("2026-11-22 05:51:42.601 CET", berlin) == pytest.approx(1_795_323_102.601)
    assert parse_log_timestamp("2026-07-01 14:00:00 CEST", berlin) == pytest.approx(1_782_907_200.0)
    assert parse_log_timestamp("2026-11-22 04:51:42.601 CET", UTC) == pytest.approx(1_795_323_102.601)
    assert parse_log_timestamp("[12] no time here") is None


def test_stderr_entry_without_timestamp_gets_the_reading_time() -> None:
    raw = b"[12] LOG:  " + logfmt.plan_message("SELECT 1").replace("\n", "\n\t").encode() + b"\n"
    envelope = parse_entry(raw, LogFormat.STDERR, "c")
    assert envelope is not None and envelope.execution_timestamp > logfmt.TS


def test_framing_never_returns_an_incomplete_trailing_entry() -> None:
    for fmt in FORMATS:
        whole = logfmt.plan_entry(fmt, 1) + logfmt.noise_entry(fmt, 2) + logfmt.plan_entry(fmt, 3)
        boundaries = {0}
        for piece in (logfmt.plan_entry(fmt, 1), logfmt.noise_entry(fmt, 2), logfmt.plan_entry(fmt, 3)):
            boundaries.add(max(boundaries) + len(piece))
        for cut in range(len(whole) + 1):
            entries = frame(whole[:cut], fmt, final=False)
            ends = [end for _, end in entries]
            assert all(end in boundaries for end in ends), (fmt, cut)
            complete = [b for b in boundaries if 0 < b <= cut]
            # stderr may hold back a finished non-plan entry until the next one starts
            assert len(ends) >= len(complete) - (1 if fmt is LogFormat.STDERR else 0), (fmt, cut)


def test_stderr_continuation_lines_and_the_final_flag() -> None:
    noise = logfmt.noise_entry(LogFormat.STDERR, 1)
    assert frame(noise, LogFormat.STDERR, final=False) == []  # more tab lines could follow
    assert frame(noise, LogFormat.STDERR, final=True) == [(0, len(noise))]
    plan = logfmt.plan_entry(LogFormat.STDERR, 2)
    assert frame(plan, LogFormat.STDERR, final=False) == [(0, len(plan))]  # complete JSON: done


def test_csv_quotes_spanning_lines_and_doubled_quotes() -> None:
    message = logfmt.plan_message("SELECT '\"x\"\n;' AS y")
    raw = logfmt.csvlog(message)
    assert raw.count(b"\n") > 5
    assert frame(raw[:-1], LogFormat.CSVLOG, final=True) == []
    envelope = parse_entry(raw, LogFormat.CSVLOG, "c")
    assert envelope is not None and envelope.query_text == "SELECT '\"x\"\n;' AS y"


def test_format_detection(tmp_path: Path) -> None:
    (a := tmp_path / "pg.json").write_bytes(b"")
    (b := tmp_path / "pg.csv").write_bytes(b"")
    (c := tmp_path / "postgresql.log").write_bytes(logfmt.stderr("hello"))
    (d := tmp_path / "current").write_bytes(logfmt.jsonlog("hello"))
    (e := tmp_path / "other").write_bytes(logfmt.csvlog("hello"))
    assert [detect_format(p) for p in (a, b, c, d, e)] == [
        LogFormat.JSONLOG, LogFormat.CSVLOG, LogFormat.STDERR, LogFormat.JSONLOG, LogFormat.CSVLOG,
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["pg18-europe-berlin.csv", "pg18-europe-berlin.log"])
def test_real_postgresql_18_logs(name: str) -> None:
    """Files written by a PostgreSQL 18 server with log_timezone Europe/Berlin and csvlog + stderr."""
    with AutoExplainReader(DATA / name, cluster_id="c", log_timezone="Europe/Berlin") as reader:
        [envelope] = reader.poll()
    assert envelope.query_text == "select 'a\"b' as x, 1 where 1=1"
    assert envelope.execution_timestamp == pytest.approx(1_795_323_711.479)  # 06:01:51.479 CET
    assert envelope.total_time_ms == 0.008
    assert envelope.actual_rows == 1
    expected_hash = "-9059459776766385738" if name.endswith(".csv") else text_hash(envelope.query_text)
    assert envelope.query_hash == expected_hash
    assert reader.stats["malformed"] == 0
