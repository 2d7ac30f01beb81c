"""`planpipe dev` in operation: Ctrl-C stops everything cleanly, and a stuck ingest run is replaced.

Both tests start the real `planpipe dev --no-traffic` (webserver, daemon, code server, run
workers) against the test stack with their own topics and consumer groups, and keep a
steady stream of envelopes flowing so an ingest run is always busy.
"""

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import psutil
import psycopg
import pytest

from planpipe.settings import Settings
from planpipe_tests.conftest import isolated_settings
from planpipe_tests.integration.workload import capture_plans, create_workload, make_envelopes, publish, settings_env

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Traffic:
    """Publishes a batch of envelopes every `interval_s` until stopped."""

    def __init__(self, settings: Settings, per_tick: int = 150, interval_s: float = 0.5) -> None:
        create_workload(settings.pg_dsn)
        self.plans = capture_plans(settings.pg_dsn)
        self.settings, self.per_tick, self.interval_s = settings, per_tick, interval_s
        self.stop = threading.Event()
        self.published = 0
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        seed = 0
        while not self.stop.wait(self.interval_s):
            seed += 1
            publish(self.settings, make_envelopes(self.plans, self.per_tick, "devstop", seed=seed))
            self.published += self.per_tick

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.fixture
def dev_settings(stack_settings: Settings, tmp_path: Path) -> Settings:
    return isolated_settings(stack_settings, tmp_path, label="dev-")


@pytest.fixture
def start_dev(dev_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(**extra_env: str) -> subprocess.Popen[bytes]:
        env = settings_env(dev_settings)
        env.update(PLANPIPE_INGEST_MAX_SECONDS="900", PLANPIPE_MAX_INGEST_RUNS="1", **extra_env)
        log = (tmp_path / "dev.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "planpipe.cli", "dev", "--no-traffic", "--port", str(_free_port())],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:  # a failed test must not leave Dagster running
        if process.poll() is None:
            leader = psutil.Process(process.pid)
            tree = [leader, *leader.children(recursive=True)]
            for child in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            psutil.wait_procs(tree, timeout=10)
            process.wait(10)


def _ingest_runs(instance: dg.DagsterInstance, since: float) -> list[dg.DagsterRun]:
    from datetime import UTC, datetime

    runs = instance.get_runs(dg.RunsFilter(job_name="ingest_job", created_after=datetime.fromtimestamp(since, UTC)))
    return list(runs)


def _batches_of(instance: dg.DagsterInstance, run_id: str) -> int:
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    return sum(1 for r in records if r.event_log_entry.asset_materialization is not None)


def _wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, log: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def test_ctrl_c_stops_dev_leaving_nothing_and_the_run_canceled(
    dev_settings: Settings,
    dagster_instance: dg.DagsterInstance,
    start_dev: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    since = time.time()
    with Traffic(dev_settings):
        dev = start_dev()

        def busy_run() -> dg.DagsterRun | None:
            for run in _ingest_runs(dagster_instance, since):
                if run.status == dg.DagsterRunStatus.STARTED and _batches_of(dagster_instance, run.run_id) >= 2:
                    return run
            return None

        run = _wait_for(busy_run, 240, "an ingest run committing batches", tmp_path / "dev.log")
        tree = [psutil.Process(dev.pid), *psutil.Process(dev.pid).children(recursive=True)]
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "dagster_webserver" in names and "dagster._daemon" in names and "code-server" in names

        started = time.monotonic()
        dev.send_signal(signal.SIGINT)
        dev.wait(timeout=30)
        elapsed = time.monotonic() - started

    # The stop is bounded by construction (supervise.stop: 13 s budget, then SIGTERM, then SIGKILL);
    # the 15 s figure of the README is measured on a quiet machine, not timed here: on a loaded
    # 2-core box the same stop took 17.7 s. A hang would still fail, at the wait above.
    assert elapsed < 30, f"planpipe dev took {elapsed:.1f}s to stop"
    assert dev.returncode == 0
    _, alive = psutil.wait_procs(tree, timeout=1)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], [p.cmdline() for p in alive]
    # nothing else of ours either: no Dagster process pointing at this test's consumer group
    leftovers = [p for p in psutil.process_iter(["environ"]) if (p.info.get("environ") or {}).get(
        "PLANPIPE_CONSUMER_GROUP") == dev_settings.consumer_group]  # fmt: skip
    assert not leftovers, [p.cmdline() for p in leftovers]

    final = dagster_instance.get_run_by_id(run.run_id)
    assert final is not None
    assert final.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.CANCELED), final.status
    statuses = {r.run_id: r.status for r in _ingest_runs(dagster_instance, since)}
    assert dg.DagsterRunStatus.FAILURE not in statuses.values(), statuses
    # What the run committed is whole: every batch in PostgreSQL has its offsets stored.
    with psycopg.connect(dev_settings.pg_dsn) as conn:
        committed = conn.execute(
            "SELECT coalesce(sum(consumed), 0) FROM planpipe.ingest_batches WHERE consumer_group = %s",
            (dev_settings.consumer_group,),
        ).fetchone()
    assert committed is not None and int(committed[0]) > 0


def test_a_stuck_ingest_run_is_replaced_and_the_progress_check_fails(
    dev_settings: Settings,
    dagster_instance: dg.DagsterInstance,
    start_dev: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    since = time.time()
    log = tmp_path / "dev.log"
    with Traffic(dev_settings, per_tick=50, interval_s=1.0):
        dev = start_dev(PLANPIPE_INGEST_STALL_AFTER_S="20")
        first = _wait_for(
            lambda: next((r for r in _ingest_runs(dagster_instance, since)
                          if r.status == dg.DagsterRunStatus.STARTED
                          and _batches_of(dagster_instance, r.run_id) >= 1), None),
            240, "an ingest run committing batches", log,
        )  # fmt: skip
        # Hold the table every batch commit writes: the run keeps consuming but commits nothing.
        with psycopg.connect(dev_settings.pg_dsn) as blocker:
            blocker.execute("LOCK TABLE planpipe.ingest_batches IN ACCESS EXCLUSIVE MODE")

            def replacement() -> dg.DagsterRun | None:
                for run in _ingest_runs(dagster_instance, since):
                    if run.tags.get("planpipe/replaces") == first.run_id:
                        return run
                return None

            new = _wait_for(replacement, 150, "the lag sensor to replace the stuck run", log)
            old = dagster_instance.get_run_by_id(first.run_id)
            assert old is not None and old.status in (dg.DagsterRunStatus.CANCELING, dg.DagsterRunStatus.CANCELED)
            # The run said so itself: an observation with the watchdog's verdict.
            observations = dagster_instance.get_records_for_run(
                first.run_id, of_type=dg.DagsterEventType.ASSET_OBSERVATION
            ).records
            verdicts = [
                o.event_log_entry.asset_observation.metadata["ingest_progress"].value
                for o in observations
                if o.event_log_entry.asset_observation is not None
                and "ingest_progress" in o.event_log_entry.asset_observation.metadata
            ]
            assert "stalled" in verdicts, verdicts
            blocker.rollback()  # release the lock

        # The old run ends CANCELED (never FAILURE); the replacement commits batches.
        _wait_for(lambda: (r := dagster_instance.get_run_by_id(first.run_id)) and r.is_finished, 60,
                  "the stuck run to finish", log)  # fmt: skip
        assert dagster_instance.get_run_by_id(first.run_id).status == dg.DagsterRunStatus.CANCELED  # type: ignore[union-attr]
        _wait_for(lambda: _batches_of(dagster_instance, new.run_id) >= 1, 120, "the replacement to commit", log)
        dev.send_signal(signal.SIGINT)
        dev.wait(timeout=30)
    statuses = {r.run_id: r.status for r in _ingest_runs(dagster_instance, since)}
    assert dg.DagsterRunStatus.FAILURE not in statuses.values(), statuses
