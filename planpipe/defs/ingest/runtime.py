"""What a long-lived ingest run needs around `IngestEngine.run`: a graceful stop and a progress watchdog.

Graceful stop: Dagster stops a run by interrupting its processes (termination from
the UI → SIGINT via the code server; SIGTERM from a process manager; Ctrl-C). Left
alone, the interrupt raises inside whatever the engine is doing. Inside
`GracefulStop` both signals instead ask the engine to stop between batches: the
batch in flight commits (or is abandoned whole, which the engine's crash safety
covers), the consumer leaves the group, and the step returns.

Watchdog: every few seconds, the lag of the partitions this run holds and the
time of its last committed batch go through `sla.ingest_progress`; a run with lag
and no commit for 60 s says so in its log and as an observation of
`plan_observations` (the lag sensor replaces it, see sensors.py).
"""

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Self

from planpipe.ingest.lag import LagUnavailable, group_assignments, group_lag
from planpipe.ingest.sla import STALL_AFTER_S, Progress, ingest_progress
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.defs.ingest")

# A standing run keeps consuming when caught up (until it retires at PLANPIPE_INGEST_MAX_SECONDS),
# so a record never waits for a run to start; runs launched for backlog end once caught up and idle.
STANDING_TAG = "planpipe/standing"

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ingest_client_id(run_id: str) -> str:
    """The Kafka client.id of a run's consumer: how the sensor finds a run's partitions."""
    return f"dagster-{run_id[:8]}"


class GracefulStop:
    """SIGINT/SIGTERM call `stop` (idempotent) instead of raising, for the duration of the block.

    A loop blocked inside one call (e.g. a batch waiting on a PostgreSQL lock) never reaches the
    check between batches: `force_after_s` after the first signal, the next signal — sent by a
    timer if none comes — raises KeyboardInterrupt, abandoning the batch (nothing of it commits).
    """

    def __init__(self, stop: Callable[[], None], *, force_after_s: float = 6.0) -> None:
        self._stop = stop
        self._force_after_s = force_after_s
        self._previous: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        self._forced = threading.Event()
        self._exited = False
        self.signal: int | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signo: int, _frame: FrameType | None) -> None:
        if self._forced.is_set():
            raise KeyboardInterrupt
        if self.signal is None:
            logger.warning("ingest run: %s received, stopping after the batch in flight",
                           signal.Signals(signo).name)  # fmt: skip
            self._timer = threading.Timer(self._force_after_s, self._force)
            self._timer.daemon = True
            self._timer.start()
        self.signal = signo
        self._stop()

    def _force(self) -> None:
        if self._exited:
            return
        logger.warning("ingest run: still busy %.0fs after the stop request, abandoning the batch in flight",
                       self._force_after_s)  # fmt: skip
        self._forced.set()
        os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for signo in _STOP_SIGNALS:
                self._previous[signo] = signal.signal(signo, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._exited = True
        if self._timer is not None:
            self._timer.cancel()
        for signo, handler in self._previous.items():
            signal.signal(signo, handler)
        self._previous.clear()


class _BackgroundCheck:
    """A daemon thread running `_loop` for the duration of a `with` block; `_done` ends it."""

    def __init__(self, name: str, join_timeout_s: float) -> None:
        self._join_timeout_s = join_timeout_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._thread.join(timeout=self._join_timeout_s)


class CancelWatch(_BackgroundCheck):
    """Stops the engine once the run is asked to stop (CANCELING) even if no signal reaches this
    process: a termination that arrives while the step is still starting is taken by Dagster
    before `GracefulStop` exists, and the run would otherwise consume until its time limit
    (seen as a demo stop that had to escalate to SIGKILL). One status read per second."""

    def __init__(self, canceling: Callable[[], bool], stop: Callable[[], None], *, interval_s: float = 1.0) -> None:
        super().__init__("planpipe-ingest-cancel-watch", join_timeout_s=5)
        self._canceling = canceling
        self._stop = stop
        self._interval_s = interval_s
        self.requested = False

    def _loop(self) -> None:
        while True:
            try:
                if self._canceling():
                    self.requested = True
                    logger.warning("ingest run: the run is canceling, stopping after the batch in flight")
                    self._stop()
                    return
            except Exception as error:  # the watch never takes the run down
                logger.info("cancel watch: could not read the run's status (%s)", error)
            if self._done.wait(self._interval_s):
                return


def watchdog_interval_s(stall_after_s: float) -> float:
    """How often a run's watchdog checks its progress: a few checks per stall limit."""
    return min(10.0, max(1.0, stall_after_s / 4))


def replace_after_s(stall_after_s: float) -> float:
    """How long without progress before the lag sensor replaces a run: past the stall limit by two
    of the run's own checks, so the run has reported itself stalled (its observation, the
    `ingest_progress` verdict in its log) before it is terminated, not only in the sensor's log."""
    return stall_after_s + 2 * watchdog_interval_s(stall_after_s)


class ProgressWatchdog(_BackgroundCheck):
    """Checks a run's progress in a thread; `report` is called when the verdict changes."""

    def __init__(
        self,
        settings: Settings,
        client_id: str,
        report: Callable[[Progress], None],
        *,
        interval_s: float = 10.0,
        stall_after_s: float = STALL_AFTER_S,
    ) -> None:
        super().__init__("planpipe-ingest-watchdog", join_timeout_s=10)
        self.settings = settings
        self.client_id = client_id
        self.report = report
        self.interval_s = interval_s
        self.stall_after_s = stall_after_s
        self.started_at = time.time()
        self.last_commit_at: float | None = None
        self.last_caught_up_at: float | None = None
        self.last: Progress | None = None
        self.stalled_checks = 0
        self.max_idle_s = 0.0

    def committed(self) -> None:
        self.last_commit_at = time.time()

    def check(self) -> Progress:
        lags = group_lag(self.settings, self.settings.consumer_group, self.settings.topic, timeout_s=5.0)
        try:
            held = group_assignments(self.settings, self.settings.consumer_group, self.settings.topic).get(
                self.client_id
            )
        except LagUnavailable:
            held = None  # no answer: judge by the whole group's lag
        lag = sum(p.lag for p in lags if held is None or p.partition in held)
        now = time.time()
        if lag == 0:
            self.last_caught_up_at = now
        expected_since = max(self.started_at, self.last_caught_up_at or 0.0)
        return ingest_progress(
            lag, now=now, last_commit_at=self.last_commit_at, expected_since=expected_since,
            stall_after_s=self.stall_after_s,
        )  # fmt: skip

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                verdict = self.check()
            except Exception as error:  # the watchdog never takes the run down
                logger.info("progress watchdog: could not measure (%s)", error)
                continue
            changed = self.last is None or verdict.stalled != self.last.stalled
            self.last = verdict
            self.max_idle_s = max(self.max_idle_s, verdict.idle_s if verdict.lag else 0.0)
            if verdict.stalled:
                self.stalled_checks += 1
            if changed or (verdict.stalled and self.stalled_checks % 3 == 1):
                try:
                    self.report(verdict)
                except Exception as error:
                    logger.info("progress watchdog: could not report (%s)", error)
