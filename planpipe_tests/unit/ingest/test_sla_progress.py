"""The progress watchdog's decision: lag > 0 and no committed batch for 60 s means stuck."""

import pytest

from planpipe.ingest.sla import STALL_AFTER_S, ingest_progress

NOW = 1_800_000_000.0


def test_the_threshold_is_the_runbooks_minute() -> None:
    assert STALL_AFTER_S == 60.0


def test_no_lag_is_never_stalled_however_long_since_the_last_commit() -> None:
    verdict = ingest_progress(0, now=NOW, last_commit_at=NOW - 3600, expected_since=NOW - 3600)
    assert not verdict.stalled
    assert verdict.lag == 0
    assert "caught up" in verdict.detail


def test_lag_and_no_commit_for_more_than_a_minute_is_stalled() -> None:
    verdict = ingest_progress(42, now=NOW, last_commit_at=NOW - 61, expected_since=NOW - 600)
    assert verdict.stalled
    assert verdict.idle_s == pytest.approx(61)
    assert verdict.detail.startswith("STALLED: lag 42")


def test_a_recent_commit_means_progress() -> None:
    verdict = ingest_progress(10_000, now=NOW, last_commit_at=NOW - 5, expected_since=NOW - 600)
    assert not verdict.stalled
    assert verdict.idle_s == pytest.approx(5)


def test_exactly_the_limit_is_not_yet_stalled() -> None:
    assert not ingest_progress(1, now=NOW, last_commit_at=NOW - 60, expected_since=NOW - 600).stalled
    assert ingest_progress(1, now=NOW, last_commit_at=NOW - 60.5, expected_since=NOW - 600).stalled


def test_idle_time_counts_from_when_progress_was_expected() -> None:
    # The pipeline was idle for an hour (lag 0); records arrived 20 s ago: not stuck yet.
    fresh = ingest_progress(300, now=NOW, last_commit_at=NOW - 3600, expected_since=NOW - 20)
    assert not fresh.stalled
    assert fresh.idle_s == pytest.approx(20)
    # ... and 70 s later with still no commit, it is.
    later = ingest_progress(300, now=NOW + 70, last_commit_at=NOW - 3600, expected_since=NOW - 20)
    assert later.stalled


def test_a_run_that_never_committed_counts_from_its_start() -> None:
    assert not ingest_progress(5, now=NOW, last_commit_at=None, expected_since=NOW - 30).stalled
    stuck = ingest_progress(5, now=NOW, last_commit_at=None, expected_since=NOW - 90)
    assert stuck.stalled
    assert "no batch committed yet" in stuck.detail


def test_metadata_carries_the_evidence() -> None:
    metadata = ingest_progress(7, now=NOW, last_commit_at=NOW - 75, expected_since=NOW - 600).as_metadata()
    assert metadata["stalled"] is True
    assert metadata["lag"] == 7
    assert metadata["idle_seconds"] == 75.0
    assert metadata["stall_after_seconds"] == 60.0


def test_a_custom_limit() -> None:
    assert ingest_progress(1, now=NOW, last_commit_at=NOW - 11, expected_since=NOW - 99, stall_after_s=10).stalled
