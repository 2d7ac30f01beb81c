"""`planpipe publish` and `planpipe spool` against the real broker: keys, values, headers, DLQ coordinates."""

import argparse
import collections
import json
from pathlib import Path

import msgspec
import pytest

from planpipe.dlq import H_FIELD, H_REASON, H_SOURCE_FILE, H_STAGE, H_TRACE_ID
from planpipe.routing.cli import add_parsers
from planpipe.routing.metrics import REGISTRY
from planpipe.routing.publish import H_ROUTE, H_SOURCE_LINE, format_report, publish_file
from planpipe.routing.router import is_sampled
from planpipe.routing.spool import OutRecord, Spool
from planpipe.settings import Settings
from planpipe_tests.integration.routing.kafka_read import read_all

PLAN = '[{"Plan": {"Node Type": "Index Scan", "Relation Name": "accounts", "Actual Rows": 1}}]'


def envelope(query_hash: str, **extra: object) -> bytes:
    body: dict[str, object] = {
        "query_hash": query_hash,
        "execution_timestamp": 1_700_000_000.5,
        "cluster_id": "pg-eu-1",
        "plan_text": PLAN,
        "actual_rows": 1,
        "total_time_ms": 0.8,
        **extra,
    }
    return msgspec.json.encode(body)


# (line bytes, expected key or None for DLQ, expected route or DLQ reason)
GOOD = [
    (envelope("q-base", trace_id="t-1"), b"standard:q-base", "baseline"),
    (envelope("q-slow", total_time_ms=5000.5), b"critical:q-slow", "critical"),
    (envelope("q-rows", actual_rows=1_000_001), b"critical:q-rows", "critical"),
    (envelope("q-ddl", query_type="DDL"), b"standard:q-ddl", "ddl"),
    (envelope("q-low", priority="low", route_tag="baseline"), b"low:q-low", "baseline"),
    # Key order and spacing are the agent's business: the bytes travel untouched.
    (b'{ "total_time_ms": 1.0, "query_hash": "q-spaced", "execution_timestamp": 1.0,'
     b' "cluster_id": "c", "plan_text": "[{}]", "actual_rows": 0 }', b"standard:q-spaced", "baseline"),
]  # fmt: skip
BAD = [
    (b'{"query_hash": "q-broken", ', "malformed_json", None),
    (envelope("q-neg", actual_rows=-1), "out_of_range", "actual_rows"),
    (b'{"query_hash": "q-missing"}', "missing_field", "execution_timestamp"),
    (envelope("q-extra", colour="blue"), "unknown_field", "colour"),
    (b"\xff\xfe not utf-8", "malformed_json", None),
    (b"[1, 2, 3]", "not_an_object", None),
]


def write_jsonl(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_publish_file_routes_valid_lines_and_dead_letters_bad_ones(settings: Settings, tmp_path: Path) -> None:
    lines = [GOOD[0][0], BAD[0][0], GOOD[1][0], GOOD[2][0], BAD[1][0], b"", GOOD[3][0], BAD[2][0]]
    lines += [BAD[3][0], GOOD[4][0], BAD[4][0], GOOD[5][0], BAD[5][0]]
    source = tmp_path / "envelopes.jsonl"
    write_jsonl(source, lines)
    flushes_before = REGISTRY.get_sample_value("explain_router_batch_flush_duration_ms_count") or 0.0

    report = publish_file(settings, source, flush_timeout_s=30)
    print("\n" + format_report(report, settings, str(source)))

    assert report.lines_read == len(lines) and report.blank_lines == 1
    assert sum(report.published.values()) == len(GOOD)
    assert report.published == {"baseline/standard": 2, "critical/critical": 2, "ddl/standard": 1, "baseline/low": 1}
    assert report.dead_lettered == {
        "malformed_json": 2,
        "out_of_range": 1,
        "missing_field": 1,
        "unknown_field": 1,
        "not_an_object": 1,
    }
    assert report.still_spooled == 0 and report.producer.spooled == 0
    # Each send batch was timed until acknowledged; the queue is empty again.
    assert (REGISTRY.get_sample_value("explain_router_batch_flush_duration_ms_count") or 0.0) > flushes_before
    assert REGISTRY.get_sample_value("explain_router_queue_depth") == 0

    published = read_all(settings, settings.topic)
    by_value = {r.value: r for r in published}
    assert len(published) == len(GOOD)
    for raw, key, route in GOOD:
        record = by_value[raw]  # the original bytes, untouched
        assert record.key == key
        assert record.headers[H_ROUTE] == route
    assert by_value[GOOD[0][0]].headers[H_TRACE_ID] == "t-1"

    dead = read_all(settings, settings.dlq_topic)
    line_of = {raw: number for number, raw in enumerate(lines, start=1)}
    assert sorted(r.value for r in dead) == sorted(raw for raw, _, _ in BAD)
    for raw, reason, field in BAD:
        record = next(r for r in dead if r.value == raw)
        assert record.key is None
        assert record.headers[H_REASON] == reason
        assert record.headers[H_STAGE] == "router"
        assert record.headers[H_SOURCE_FILE] == str(source)
        assert record.headers[H_SOURCE_LINE] == str(line_of[raw])
        assert record.headers.get(H_FIELD) == field


def run_cli(argv: list[str], settings: Settings) -> int:
    """The same wiring as planpipe.cli: add_parsers registers a `handler` default."""
    parser = argparse.ArgumentParser(prog="planpipe")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.handler(args, settings)
    return code


def test_cli_publish_with_sampling_and_spool_commands(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hashes = [f"q-sample-{i}" for i in range(60)]
    source = tmp_path / "sampled.jsonl"
    write_jsonl(source, [envelope(h) for h in hashes] + [b"not json"])

    assert run_cli(["publish", "--file", str(source), "--sample-rate", "30", "--json"], settings) == 0
    summary = json.loads(capsys.readouterr().out)
    kept = [h for h in hashes if is_sampled(h, 30)]
    assert 0 < len(kept) < len(hashes)
    assert summary["published_total"] == len(kept)
    assert summary["sampled_out"] == len(hashes) - len(kept)
    assert summary["dead_lettered"] == {"malformed_json": 1}
    assert summary["still_spooled"] == 0
    assert sorted(r.key or b"" for r in read_all(settings, settings.topic)) == sorted(
        f"standard:{h}".encode() for h in kept
    )

    # Text summary, as a person sees it.
    assert run_cli(["publish", "--file", str(source), "--sample-rate", "30"], settings) == 0
    text = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + text)
    assert "published" in text and "still spooled" in text

    assert run_cli(["spool", "status", "--json"], settings) == 0
    assert json.loads(capsys.readouterr().out)["depth"] == 0
    assert run_cli(["publish", "--file", str(tmp_path / "nope.jsonl")], settings) == 2


def test_spool_drain_sends_leftovers_in_order(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    # Rows left behind by an earlier run (e.g. the broker was down at exit).
    with Spool(settings.spool_path) as spool:
        spool.append(OutRecord(settings.topic, b"standard:q-left", f"{i}".encode(), (("n", b"x"),)) for i in range(300))

    assert run_cli(["spool", "status"], settings) == 0
    assert "300" in capsys.readouterr().out
    assert run_cli(["spool", "drain", "--timeout", "30"], settings) == 0
    with capsys.disabled():
        print("\n" + capsys.readouterr().out)

    values = [int(r.value) for r in read_all(settings, settings.topic)]
    assert values == list(range(300))  # one key → one partition → spool order
    with Spool(settings.spool_path) as spool:
        assert spool.count() == 0
    counts = collections.Counter(values)
    assert max(counts.values()) == 1
