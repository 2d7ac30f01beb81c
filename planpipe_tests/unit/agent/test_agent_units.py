"""Agent pieces without services: configuration, state transactions, snapshot choice, sampler filters, streams."""

import time
from dataclasses import replace
from pathlib import Path

import pytest

from planpipe.agent.config import AgentConfig, load_file
from planpipe.agent.ledger import Snapshot, Watermarks, capture_id
from planpipe.agent.sampler import Sampler, SamplerConfig
from planpipe.agent.state import AgentState, hour_of
from planpipe.routing.redis_queue import DLQ_STREAM, stream_for
from planpipe.routing.spool import OutRecord
from planpipe.settings import load_settings


def test_config_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('name = "orders"\nlog = "/var/log/postgresql"\nsample = true\nsample_budget_pct = 2.5\n')
    config = load_file(path).merged({"sample_budget_pct": 1.0, "dsn": None})
    assert (config.name, config.log, config.sample, config.sample_budget_pct) == (
        "orders",
        Path("/var/log/postgresql"),
        True,
        1.0,
    )
    path.write_text('lgo = "typo"\n')
    with pytest.raises(ValueError, match="unknown key"):
        load_file(path)
    path.write_text('batch_size = "many"\n')
    with pytest.raises(ValueError, match="batch_size must be int"):
        load_file(path)
    with pytest.raises(ValueError):
        AgentConfig(spool_max_rows=0)


def test_state_commits_cursor_intent_counts_and_skips_together(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "state.sqlite3")
    intent = state.open_intent(["a/1:1@0", "a/1:1@10"], {"t": {0: 5}})
    assert [i.capture_ids for i in state.open_intents()] == [("a/1:1@0", "a/1:1@10")]
    assert state.scan_from() == {"t": {0: 5}}
    state.resolve_recovery([], {"a/1:1@0": "t"}, now=7200.0)
    state.commit_batch(intent_id=intent, cursor=b"{}", captured={"t": 1}, used_skips=["a/1:1@0"], now=7300.0)
    assert state.open_intents() == [] and state.cursor() == b"{}" and state.skip_ids() == set()
    state.add_dropped({"t": 3}, now=7300.0)
    rows = state.counts(dirty_only=True)
    assert [(r.hour, r.captured, r.dropped) for r in rows] == [(7200, 2, 3)]
    state.mark_reported(rows)
    assert state.counts(dirty_only=True) == []
    state.commit_batch(intent_id=None, cursor=None, captured={"t": 1}, now=7300.0)
    assert [r.captured for r in state.counts(dirty_only=True)] == [3]
    state.close()
    assert hour_of(7199.9) == 3600


def test_scan_from_is_the_newest_snapshot_not_after_the_bound() -> None:
    marks = Watermarks(load_settings({"PLANPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1"}), "unit")
    assert marks.scan_from(time.time()) is None
    marks._ring = [Snapshot(10.0, {"t": {0: 1}}), Snapshot(20.0, {"t": {0: 2}}), Snapshot(30.0, {"t": {0: 3}})]
    assert marks.scan_from(25.0) == {"t": {0: 2}}
    assert marks.scan_from(5.0) == {"t": {0: 2}}  # older ones were forgotten: the oldest kept is the answer
    assert marks.scan_from(31.0) == {"t": {0: 3}}
    marks.seed({"t": {0: 0}})  # before any snapshot of this process qualifies, the floor answers
    assert marks.scan_from(29.0) == {"t": {0: 0}}
    marks.close()


def test_sampler_takes_plain_selects_without_parameters_within_budget() -> None:
    sampler = Sampler(SamplerConfig(dsn="", interval_s=10, budget_pct=10, statement_timeout_ms=500), "c")
    assert sampler.config.budget_ms == 1000
    assert sampler._unsuitable("SELECT count(*) FROM t", 1.0, 1000) is None
    assert sampler._unsuitable("SELECT * FROM t WHERE id = $1", 1.0, 1000) == "has_parameters"
    assert sampler._unsuitable("UPDATE t SET a = 1", 1.0, 1000) == "not_select"
    assert sampler._unsuitable("SELECT * FROM t FOR UPDATE", 1.0, 1000) == "not_select"
    assert sampler._unsuitable("SELECT count(*) FROM t", 600.0, 1000) == "slower_than_timeout"
    assert sampler._unsuitable("SELECT count(*) FROM t", 300.0, 200) == "over_budget"
    with pytest.raises(ValueError):
        SamplerConfig(dsn="", budget_pct=0)


def test_streams_per_priority_keep_one_key_in_one_stream() -> None:
    record = OutRecord("plans", b"critical:q1", b"{}")
    assert stream_for(record, "plans.dlq") == "critical"
    assert stream_for(replace(record, topic="plans.dlq", key=None), "plans.dlq") == DLQ_STREAM
    assert capture_id("a", 1, 2, 3, b"entry") == "a/1:2@3#2b219d70"
    assert capture_id("a", 1, 2, 3, b"other") != capture_id("a", 1, 2, 3, b"entry")


def test_the_deployed_example_configuration_loads() -> None:
    from planpipe.settings import REPO_ROOT

    config = load_file(REPO_ROOT / "deploy" / "agent" / "agent.example.toml")
    assert config.name == "orders" and config.sample and config.redis_ttl_s == 86400


def test_redis_settings_local_external_and_masked() -> None:
    assert load_settings({}).redis_url == ""
    local = load_settings({"PLANPIPE_REDIS": "1", "PLANPIPE_REDIS_PORT": "16400"})
    assert (local.redis_url, local.redis_external) == ("redis://127.0.0.1:16400/0", False)
    external = load_settings({"PLANPIPE_REDIS_URL": "redis://:S3cret@cache:6379/2"})
    assert external.redis_external and "S3cret" not in repr(external)


def test_the_command_refuses_what_it_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from planpipe.cli import main

    assert main(["agent"]) == 2
    assert "nothing to capture" in capsys.readouterr().err
    assert main(["agent", "--sample"]) == 2
    assert "--sample needs --dsn" in capsys.readouterr().err
    bad = tmp_path / "agent.toml"
    bad.write_text("http_port = true\n")
    assert main(["agent", "--config", str(bad)]) == 2
    assert "http_port must be int" in capsys.readouterr().err
