"""Stop what `planpipe dev` / `planpipe demo` started: runs first, then every process of the tree.

Dagster processes run in their own session (a terminal's Ctrl-C reaches planpipe
only), so planpipe decides the order: ask in-flight runs to stop (they finish
their batch and end CANCELED), signal the Dagster leader, wait for the whole tree
— including processes that were re-parented when their parent exited — and
escalate to SIGTERM, then SIGKILL, within a fixed budget.
"""

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import psutil

from planpipe.settings import Settings

if TYPE_CHECKING:
    import dagster as dg

logger = logging.getLogger("planpipe.demo")

# A run still STARTING has no execution to interrupt yet (a termination then makes its worker exit
# without an event, and the code server records a failure): it is canceled outright.
_NOT_STARTED = ("QUEUED", "NOT_STARTED", "STARTING")
_RUNNING = ("STARTED",)


@dataclass
class StopReport:
    seconds: float = 0.0
    runs_asked_to_stop: list[str] = field(default_factory=list)
    runs_canceled_before_start: list[str] = field(default_factory=list)
    runs_marked_canceled_after_kill: list[str] = field(default_factory=list)
    processes: int = 0
    escalated_to_sigterm: int = 0
    escalated_to_sigkill: int = 0
    # What did not stop on the first signal: "pid command line" of each, to tell which part hung.
    not_stopped_by_first_signal: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def open_instance(settings: Settings) -> "dg.DagsterInstance":
    import dagster as dg

    os.environ["PLANPIPE_DAGSTER_PG_DSN"] = settings.dagster_pg_dsn
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


@contextlib.contextmanager
def interrupt_on_termination() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt inside the block (SIGINT too when it was
    ignored at start-up, as for a background job of a non-interactive shell)."""

    def _raise(_signo: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {signo: signal.signal(signo, _raise) for signo in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signo, handler in previous.items():
            signal.signal(signo, handler)


def children_get_default_signals() -> None:
    """Started as a background job of a non-interactive shell (`cmd &`, a CI runner), a process
    inherits SIGINT ignored (SIGTERM too, under some runners), and so would everything it starts:
    a stop's first signal then reaches none of them and every stop escalates to SIGKILL. Python
    handlers become the default action in a child after exec, ignored signals stay ignored."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """While cleaning up, further Ctrl-C/SIGTERM do not cut the clean-up short (it is bounded)."""
    previous = {signo: signal.signal(signo, signal.SIG_IGN) for signo in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signo, handler in previous.items():
            signal.signal(signo, handler)


def _in_flight(instance: "dg.DagsterInstance") -> list[Any]:
    import dagster as dg

    statuses = [dg.DagsterRunStatus(name) for name in (*_NOT_STARTED, *_RUNNING, "CANCELING")]
    return list(instance.get_runs(dg.RunsFilter(statuses=statuses)))


def ask_runs_to_stop(instance: "dg.DagsterInstance", report: StopReport) -> list[Any]:
    """Runs not started yet are canceled; running ones are terminated the way the UI does it
    (CANCELING, then an interrupt the ingest asset turns into a stop between batches)."""
    pending = []
    for run in _in_flight(instance):
        status = run.status.value
        if status in _NOT_STARTED:
            instance.report_run_canceled(run, message="planpipe is stopping: run canceled before it started")
            report.runs_canceled_before_start.append(run.run_id)
            continue
        pending.append(run)
        if status in _RUNNING and run.run_id not in report.runs_asked_to_stop:
            report.runs_asked_to_stop.append(run.run_id)
            try:
                if not instance.run_launcher.terminate(run.run_id):
                    instance.report_run_canceling(run, message="planpipe is stopping")
            except Exception as error:  # code server already gone: the signals reach the run
                logger.info("could not terminate run %s through its code server: %s", run.run_id, error)
                instance.report_run_canceling(run, message="planpipe is stopping")
    return pending


def _tree(pid: int) -> list[psutil.Process]:
    try:
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {' '.join(process.cmdline())[:200]}"
    except psutil.Error:
        return str(process.pid)


def _alive(processes: dict[int, psutil.Process]) -> list[psutil.Process]:
    alive = []
    for process in processes.values():
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            continue
    return alive


def stop(
    process: subprocess.Popen[bytes],
    *,
    code_server: subprocess.Popen[bytes] | None = None,
    instance: "dg.DagsterInstance | None" = None,
    first_signal: int = signal.SIGINT,
    budget_s: float = 13.0,
    term_s: float = 2.5,
) -> StopReport:
    """Stop the runs of `instance` and the process tree of `process` (the leader of its own
    process group: started with start_new_session=True), all within `budget_s`.

    Runs are asked to stop first (CANCELING, so an interrupted run ends CANCELED), then the
    whole group gets `first_signal` (what a terminal's Ctrl-C does to a foreground job).
    `code_server`, the process that runs the runs, gets it too, but not its group: a signal to
    the group reaches the runs' step processes, which would end FAILURE; the runs finish on the
    stop request while the server shuts down (it takes ~2 s)."""
    started = time.monotonic()
    deadline = started + budget_s
    report = StopReport()
    leaders = [process] if code_server is None else [process, code_server]
    known = {p.pid: p for leader in leaders for p in _tree(leader.pid)}
    if instance is not None:
        try:
            ask_runs_to_stop(instance, report)
        except Exception as error:
            logger.warning("could not reach the Dagster instance to stop runs: %s", error)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, first_signal)
    if code_server is not None:  # its own process only: the server shuts down, the runs finish
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(code_server.pid, first_signal)
    # Wait for the tree to exit; keep collecting descendants (a parent that exits re-parents its
    # children out of the tree) and keep stopping runs the daemon launched meanwhile.
    escalate_at = deadline - term_s
    server_group_signaled = code_server is None
    while time.monotonic() < escalate_at:
        for child in (c for leader in leaders for c in _tree(leader.pid)):
            known.setdefault(child.pid, child)
        runs_left = True
        if instance is not None:
            with contextlib.suppress(Exception):
                runs_left = bool(ask_runs_to_stop(instance, report))
        if not server_group_signaled and not runs_left and code_server is not None:
            # No run left to fail: the code server's whole group (its gRPC server process and
            # whatever that started) gets the first signal too, not only the server itself.
            server_group_signaled = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(code_server.pid, first_signal)
        for leader in leaders:
            leader.poll()
        if not _alive(known):
            break
        time.sleep(0.2)
    report.processes = len(known)
    left = _alive(known)
    if left:
        report.escalated_to_sigterm = len(left)
        report.not_stopped_by_first_signal = [_describe(p) for p in left]
        for leader in leaders:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(leader.pid, signal.SIGTERM)
        for child in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        _, left = psutil.wait_procs(left, timeout=max(0.5, deadline - time.monotonic()))
        left = _alive({p.pid: p for p in left})
    if left:
        report.escalated_to_sigkill = len(left)
        for child in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(left, timeout=2)
    for leader in leaders:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=1)
    if instance is not None:
        with contextlib.suppress(Exception):
            # Whatever is still unfinished lost its processes with the stop: it was canceled.
            for run in _in_flight(instance):
                instance.report_run_canceled(run, message="planpipe stopped: the run's processes were stopped")
                report.runs_marked_canceled_after_kill.append(run.run_id)
    report.seconds = round(time.monotonic() - started, 2)
    return report
