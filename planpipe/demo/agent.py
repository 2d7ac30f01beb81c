"""The demo's capture path: auto_explain on the demo database, and a real `planpipe agent` tailing its log.

`planpipe dev` / `planpipe demo` run the workload as plain queries; PostgreSQL logs each plan
(auto_explain, switched on for the demo database only) and a supervised `planpipe agent`
child process publishes them — the same path as an agent beside a production database, with
no file in between. The supervisor restarts an agent that exits on its own (its recovery makes
that safe: nothing is published twice) and stops it with SIGTERM when the demo ends.
"""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psycopg

from planpipe.agent.state import AgentState
from planpipe.capture.logparse import LogFormat
from planpipe.settings import Settings

logger = logging.getLogger("planpipe.demo")

# Per-database settings (ALTER DATABASE … SET): every session of the demo database logs its plans,
# nothing else on the server does. session_preload_libraries loads auto_explain where the server
# does not preload it.
AUTO_EXPLAIN: Final = {
    "session_preload_libraries": "auto_explain",
    "auto_explain.log_min_duration": "0",
    "auto_explain.log_analyze": "on",
    "auto_explain.log_buffers": "on",
    "auto_explain.log_format": "json",
}
_HEALTH_LINE: Final = re.compile(rb"/health on (http://127\.0\.0\.1:\d+)")
_RESTART_DELAY_S: Final = 5.0


def enable_auto_explain(conn: psycopg.Connection[tuple[object, ...]], database: str) -> None:
    for name, value in AUTO_EXPLAIN.items():
        conn.execute(f'ALTER DATABASE "{database}" SET {name} = {value}')


@dataclass(frozen=True)
class ServerLog:
    directory: Path
    format: LogFormat


def server_log(dsn: str) -> ServerLog:
    """Where the server writes its log files, and in which format the agent should read them."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            """SELECT current_setting('logging_collector'), current_setting('data_directory'),
                      current_setting('log_directory'), current_setting('log_destination')"""
        ).fetchone()
    assert row is not None
    collector, data_directory, log_directory, destinations = (str(value) for value in row)
    if collector != "on":
        raise RuntimeError("the demo's PostgreSQL runs without logging_collector: no log for the agent to tail")
    directory = Path(data_directory) / log_directory  # an absolute log_directory wins the join
    if not directory.is_dir():
        raise RuntimeError(f"the server's log directory {directory} is not readable here: the agent must run beside it")
    wanted = [d.strip() for d in destinations.split(",")]
    fmt = next((f for f in (LogFormat.JSONLOG, LogFormat.CSVLOG, LogFormat.STDERR) if f.value in wanted), None)
    if fmt is None:
        raise RuntimeError(f"log_destination {destinations!r} writes no file the agent reads")
    return ServerLog(directory, fmt)


@dataclass
class AgentCounts:
    captured: int = 0
    dropped: int = 0
    by_topic: dict[str, int] = field(default_factory=dict)


def _totals(state_dir: Path) -> dict[str, tuple[int, int]]:
    if not (state_dir / "state.sqlite3").exists():
        return {}
    state = AgentState(state_dir / "state.sqlite3")
    try:
        return state.totals()
    finally:
        state.close()


class DemoAgent:
    """A `planpipe agent` child process for the demo cluster, restarted if it exits on its own."""

    def __init__(self, settings: Settings, *, cluster_id: str, log: ServerLog, output: Path) -> None:
        self.settings = settings
        self.cluster_id = cluster_id
        self.log = log
        self.output = output
        self.state_dir = settings.home / "agent" / cluster_id
        self.restarts = 0
        self.exit_codes: list[int] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._health_url: str | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self._baseline = _totals(self.state_dir)  # the counts of earlier demos: this one reports its own

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "planpipe.cli", "agent", "--log", str(self.log.directory),
            "--format", self.log.format.value, "--cluster-id", self.cluster_id,
            "--state-dir", str(self.state_dir), "--http-port", "0", "--poll-interval", "0.5",
        ]  # fmt: skip

    def start(self) -> None:
        self._spawn()
        self._watch = threading.Thread(target=self._supervise, name="planpipe-demo-agent", daemon=True)
        self._watch.start()

    def _spawn(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with self.output.open("ab") as handle:
            handle.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(self.command())}\n".encode())
            self._log_offset = handle.tell()
            self._health_url = None
            self._process = subprocess.Popen(
                self.command(), stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches dev/demo, which stops the agent in order
            )  # fmt: skip
        logger.info("demo: planpipe agent started (pid %d, log %s)", self._process.pid, self.output)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            assert process is not None
            code = process.poll()
            if code is None:
                self._stopping.wait(1.0)
                continue
            if self._stopping.is_set():
                return
            self.exit_codes.append(code)
            logger.warning("demo: planpipe agent exited with %d (log %s); restarting it", code, self.output)
            if self._stopping.wait(_RESTART_DELAY_S):
                return
            self.restarts += 1
            self._spawn()

    def health(self) -> dict[str, object] | None:
        """The agent's /health, or None while it starts or does not answer."""
        if self._health_url is None:
            try:
                with self.output.open("rb") as handle:
                    handle.seek(self._log_offset)
                    found = _HEALTH_LINE.search(handle.read())
            except OSError:
                return None
            if found is None:
                return None
            self._health_url = found.group(1).decode() + "/health"
        try:
            with urllib.request.urlopen(self._health_url, timeout=5) as reply:
                return dict(json.load(reply))
        except (OSError, ValueError) as error:
            if hasattr(error, "read"):  # HTTP 503 while recovering: the body is still the report
                try:
                    return dict(json.loads(error.read()))
                except ValueError:
                    return None
            return None

    def wait_caught_up(self, timeout_s: float) -> bool:
        """Until the agent has read its log file to the end and nothing waits in its spool."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            report = self.health()
            position = str(report.get("log_position") or "") if report else ""
            if report and report.get("status") == "ok" and "@" in position:
                path, offset = position.rsplit("@", 1)
                try:
                    at_end = int(offset) >= os.stat(path).st_size
                except OSError:
                    at_end = False
                if at_end and not report.get("spool_depth"):
                    return True
            time.sleep(1.0)
        logger.warning("demo: the agent had not caught up with the log after %.0f s", timeout_s)
        return False

    def request_stop(self) -> None:
        """SIGTERM: the agent finishes its batch, flushes and reports its counts (`stop` waits for it)."""
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """`request_stop`, then wait; SIGKILL after `timeout_s`."""
        self.request_stop()
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("demo: planpipe agent did not stop within %.0f s; killing it", timeout_s)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._watch is not None:
            self._watch.join(timeout=2.0)
        return process.returncode

    def counts(self) -> AgentCounts:
        """What the agent captured in this demo (its own durable counts, minus those of earlier demos)."""
        counts = AgentCounts()
        for topic, (captured, dropped) in _totals(self.state_dir).items():
            before = self._baseline.get(topic, (0, 0))
            counts.by_topic[topic] = captured - before[0]
            counts.captured += captured - before[0]
            counts.dropped += dropped - before[1]
        return counts

    def as_dict(self, exit_code: int | None) -> dict[str, object]:
        counts = self.counts()
        return {
            "cluster_id": self.cluster_id,
            "log_directory": str(self.log.directory),
            "log_format": self.log.format.value,
            "captured": counts.captured,
            "dropped": counts.dropped,
            "captured_by_topic": counts.by_topic,
            "restarts": self.restarts,
            "unexpected_exits": self.exit_codes,
            "exit_code": exit_code,
            "output": str(self.output),
        }


def start_demo_agent(settings: Settings, cluster_id: str, output: Path) -> DemoAgent:
    """A supervised agent tailing the log of the server that holds the demo database."""
    agent = DemoAgent(settings, cluster_id=cluster_id, log=server_log(settings.pg_dsn), output=output)
    agent.start()
    return agent
