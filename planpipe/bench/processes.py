"""The ingest benchmark's consumer subprocesses and the CPU accounting of each phase."""

import contextlib
import json
import resource
import subprocess
import sys
import threading
import time
from queue import Empty, Queue
from typing import Any

from planpipe.settings import Settings


class CpuMeter:
    """CPU seconds spent, between two snapshots, by each actor on this machine.

    consumer: the reaped consumer subprocess(es) (RUSAGE_CHILDREN, so read it
    after the worker exited); publisher: this process; broker: the local Kafka
    JVM; postgresql: the postmaster with its backends (exited ones are counted
    through the postmaster's own children usage); other: everything else the
    machine ran meanwhile (other users' jobs), from /proc/stat.
    """

    def __init__(self, settings: Settings) -> None:
        import psutil

        from planpipe.stack import kafka, postgres

        self._psutil = psutil
        self._broker = self._process(None if settings.kafka_external else kafka.read_pid(settings))
        pg_pid: int | None = None
        if not settings.pg_external:
            with contextlib.suppress(OSError, ValueError, IndexError):
                pg_pid = int((postgres.data_dir(settings) / "postmaster.pid").read_text().split()[0])
        self._postgres = self._process(pg_pid)

    def _process(self, pid: int | None) -> Any:
        if pid is None:
            return None
        try:
            return self._psutil.Process(pid)
        except self._psutil.Error:
            return None

    @staticmethod
    def _times(process: Any, with_children: bool) -> float:
        if process is None:
            return 0.0
        try:
            t = process.cpu_times()
            total = float(t.user + t.system + t.children_user + t.children_system)
            if with_children:
                for child in process.children():
                    with contextlib.suppress(Exception):
                        c = child.cpu_times()
                        total += float(c.user + c.system)
            return total
        except Exception:
            return 0.0

    def snapshot(self) -> dict[str, float]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        machine = self._psutil.cpu_times()
        # guest time is already inside user/nice; idle and iowait are not busy.
        busy = sum(float(getattr(machine, f, 0.0)) for f in ("user", "nice", "system", "irq", "softirq", "steal"))
        return {
            "wall": time.monotonic(),
            "consumer": kids.ru_utime + kids.ru_stime,
            "publisher": own.ru_utime + own.ru_stime,
            "broker": self._times(self._broker, with_children=False),
            "postgresql": self._times(self._postgres, with_children=True),
            "machine": busy,
        }

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        d = {k: round(after[k] - before[k], 2) for k in before}
        ours = d["consumer"] + d["publisher"] + d["broker"] + d["postgresql"]
        d["other"] = round(max(0.0, d["machine"] - ours), 2)
        return d


def worker_spec(variant: str, settings: Settings, group: str, messages: int, max_seconds: float, **extra: Any) -> str:
    engine_settings: dict[str, object] = {
        "topic": settings.topic,
        "dlq_topic": settings.dlq_topic,
        "consumer_group": group,
        "data_dir": str(settings.data_dir),
        "batch_max_messages": settings.batch_max_messages,
        "batch_max_wait_s": settings.batch_max_wait_s,
    }
    spec = {
        "variant": variant,
        "bootstrap": settings.kafka_bootstrap,
        "topic": settings.topic,
        "dlq_topic": settings.dlq_topic,
        "group": group,
        "pg_dsn": settings.pg_dsn,
        "messages": messages,
        "max_seconds": max_seconds,
        # IngestEngine variants: the isolated settings they run with.
        "settings": engine_settings,
        **extra,
    }
    return json.dumps(spec)


class Worker:
    """One consumer subprocess; its stdout JSON lines arrive on a queue."""

    def __init__(self, spec: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "planpipe.bench.consumers", spec],
            stdout=subprocess.PIPE,
            text=True,
        )
        self.events: Queue[dict[str, Any] | None] = Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.strip()
            if line.startswith("{"):
                self.events.put(json.loads(line))
        self.events.put(None)

    def wait_for(self, event: str, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                item = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except Empty:
                if time.monotonic() >= deadline:
                    self.kill()
                    raise TimeoutError(f"consumer did not report {event!r} within {timeout_s:.0f}s") from None
                continue
            if item is None:
                code = self.process.wait()
                raise RuntimeError(f"consumer exited (status {code}) before reporting {event!r}")
            if item.get("event") == event:
                return item

    def finish(self, timeout_s: float) -> dict[str, Any]:
        result = self.wait_for("result", timeout_s)
        self.process.wait(timeout=30)
        return result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_worker(spec: str, timeout_s: float) -> dict[str, Any]:
    worker = Worker(spec)
    try:
        return worker.finish(timeout_s)
    finally:
        worker.kill()
