"""Helpers for the agent tests: an agent as a real subprocess, log writing, reading capture ids back."""

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from planpipe.agent.ledger import H_CAPTURE_ID
from planpipe.capture.logparse import LogFormat
from planpipe.settings import REPO_ROOT, Settings
from planpipe.stack import redis as redis_stack
from planpipe_tests.integration.routing.kafka_read import read_all
from planpipe_tests.unit.capture.logfmt import TS, jsonlog, plan_entry, plan_message

_PORT = re.compile(r"/health on http://127\.0\.0\.1:(\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_plans(log: Path, indexes: range, *, keys: int | None = None) -> None:
    """Plan entries `q{i}`; with `keys`, entry i has query id 1000 + i % keys (repeated Kafka keys)."""
    with log.open("ab") as handle:
        for i in indexes:
            if keys is None:
                handle.write(plan_entry(LogFormat.JSONLOG, i))
            else:
                message = plan_message(f"SELECT * FROM t WHERE note = 'q{i}'")
                handle.write(jsonlog(message, ts=TS + i, query_id=1000 + i % keys))


def capture_ids(settings: Settings, topic: str | None = None) -> collections.Counter[str]:
    return collections.Counter(r.headers.get(H_CAPTURE_ID, "") for r in read_all(settings, topic or settings.topic))


def environment(settings: Settings, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PLANPIPE_HOME": str(settings.home),
        "PLANPIPE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "PLANPIPE_PG_DSN": settings.pg_dsn,
        "PLANPIPE_TOPIC": settings.topic,
        "PLANPIPE_DLQ_TOPIC": settings.dlq_topic,
        "PLANPIPE_SPOOL_PATH": str(settings.spool_path),  # the test's own (an agent keeps its own in its state)
        "PLANPIPE_REDIS_URL": settings.redis_url,
        "PLANPIPE_LOG_LEVEL": "WARNING",
    }
    if not settings.redis_url:
        env.pop("PLANPIPE_REDIS_URL")
    env.pop("PLANPIPE_FAULT_KILL_AT", None)
    env.update(extra)
    return env


@dataclass
class AgentProcess:
    """`planpipe agent` in a subprocess on one log, one state directory, one HTTP port."""

    settings: Settings
    log: Path
    state_dir: Path
    name: str
    args: list[str] = field(default_factory=list)
    port: int = 0  # learnt from the agent's stderr: it binds a free port itself (no race for one)
    process: subprocess.Popen[bytes] | None = None
    _stderr_offset: int = 0

    def start(self, **env: str) -> "AgentProcess":
        command = [sys.executable, "-m", "planpipe.cli", "agent", "--log", str(self.log), "--cluster-id", "test",
                   "--name", self.name, "--state-dir", str(self.state_dir), "--http-port", "0",
                   "--poll-interval", "0.05", "--inflight-settle", "1", *self.args]  # fmt: skip
        self.port = 0
        self._stderr_offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        with self.stderr_path.open("ab") as stderr:  # a file, not a pipe: a chatty agent never blocks on it
            self.process = subprocess.Popen(
                command, env=environment(self.settings, **env), cwd=REPO_ROOT, stderr=stderr
            )
        return self

    def _learn_port(self) -> bool:
        if not self.port and self.stderr_path.exists():
            with self.stderr_path.open("rb") as handle:
                handle.seek(self._stderr_offset)
                found = _PORT.search(handle.read().decode(errors="replace"))
            self.port = int(found.group(1)) if found else 0
        return bool(self.port)

    @property
    def stderr_path(self) -> Path:
        return self.state_dir.parent / f"{self.name}.stderr"

    def health(self) -> dict[str, Any] | None:
        """The agent's /health (also when it answers 503); None while it cannot be asked."""
        if not self._learn_port():
            return None
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as response:
                body = response.read()
        except urllib.error.HTTPError as error:
            body = error.read()
        except OSError:
            return None
        try:
            found: dict[str, Any] = json.loads(body)
        except ValueError:
            return None
        return found

    def wait_until(self, predicate: Any, timeout_s: float = 60.0, what: str = "") -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited with {self.process.returncode} waiting for {what}: {self.errors()}")
            last = self.health()
            if last is not None and predicate(last):
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last health: {last}; {self.errors()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout_s)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait_exit()

    def errors(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""


def captured(health: dict[str, Any], topic: str) -> int:
    counts: dict[str, dict[str, int]] = health.get("counts") or {}
    return counts.get(topic, {}).get("captured", 0)


@pytest.fixture
def agent_factory(settings: Settings, tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProcess] = []

    def make(name: str = "agent", log: Path | None = None, args: list[str] | None = None, **kw: Any) -> AgentProcess:
        agent = AgentProcess(
            kw.pop("settings", settings), log or tmp_path / "postgresql.json", tmp_path / "state", name, args or []
        )
        started.append(agent)
        return agent

    yield make
    for agent in started:
        if agent.process is not None and agent.process.poll() is None:
            agent.process.kill()
            agent.process.wait(30)


@pytest.fixture(scope="session")
def redis_server(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A real redis-server of the tests' own (installed by scripts/install-redis.sh when missing)."""
    if not shutil.which("redis-server"):
        subprocess.run([str(redis_stack.INSTALL_SCRIPT)], check=True, stdin=subprocess.DEVNULL, timeout=600)
    port = int(os.environ.get("PLANPIPE_REDIS_PORT") or free_port())
    settings = replace(
        stack_settings,
        home=tmp_path_factory.mktemp("redis-home"),
        redis_port=port,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_external=False,
    )
    redis_stack.start(settings)
    try:
        yield settings
    finally:
        redis_stack.stop(settings)
