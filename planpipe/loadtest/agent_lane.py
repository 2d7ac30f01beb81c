"""The loadtest's agent lane: synthetic auto_explain entries tailed by an in-process `planpipe agent`,
so the capture side's last resort is exercised too. When the broker goes down, the agent's spool
passes its (small) row limit and the agent writes to the Redis queue; once Kafka is back its drainer
moves the entries over, in order, without duplicates. Each entry's query text carries its id, which
the Parquet dataset keeps, so the lane is verified like the main one."""

import json
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from planpipe.agent.config import AgentConfig
from planpipe.agent.runner import Agent
from planpipe.settings import Settings

CLUSTER_ID: Final = "loadtest-agent"


def lane_id(run_id: str, number: int) -> str:
    return f"lt-{run_id}-a{number:09d}"


def id_pattern(run_id: str) -> re.Pattern[str]:
    return re.compile(rf"'(lt-{re.escape(run_id)}-a\d{{9}})'")


def jsonlog_entry(run_id: str, number: int, ts: float) -> bytes:
    """One auto_explain plan entry in PostgreSQL's jsonlog format."""
    moment = datetime.fromtimestamp(ts, UTC)
    plan = {
        "Query Text": f"SELECT * FROM orders WHERE note = '{lane_id(run_id, number)}'",
        "Plan": {"Node Type": "Seq Scan", "Relation Name": "orders", "Alias": "orders", "Actual Rows": 1.0,
                 "Actual Loops": 1},
    }  # fmt: skip
    entry = {
        "timestamp": moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d} UTC",
        "user": "postgres", "dbname": "planpipe", "pid": 4242, "error_severity": "LOG",
        "message": f"duration: {1.0 + number % 7:.3f} ms  plan:\n{json.dumps(plan, indent=2)}",
        "backend_type": "client backend", "query_id": 7000 + number % 20,
    }  # fmt: skip
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


@dataclass
class LaneReport:
    written: int = 0
    redis_engaged: bool = False
    drained: bool = False
    error: str | None = None


class AgentLane:
    def __init__(self, settings: Settings, run_id: str, root: Path, *, spool_max_rows: int, cooldown_s: float) -> None:
        if not settings.redis_url:
            raise ValueError(
                "the agent lane needs Redis: PLANPIPE_REDIS=1 (planpipe up starts it) or PLANPIPE_REDIS_URL"
            )
        self.run_id = run_id
        self.topic = settings.topic
        self.log = root / "agent" / "postgresql.json"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        config = AgentConfig(
            log=self.log, state_dir=root / "agent" / "state", http_port=-1, poll_interval_s=0.2, batch_size=50,
            cooldown_s=cooldown_s, spool_max_rows=spool_max_rows, mode_refresh_s=1.0, report_interval_s=5.0,
        )  # fmt: skip
        self.agent = Agent(config, settings, name=f"loadtest-{run_id}", cluster_id=CLUSTER_ID)
        self.report = LaneReport()
        self._thread = threading.Thread(target=self._run, name="loadtest-agent", daemon=True)

    def _run(self) -> None:
        try:
            self.agent.run()
        except Exception as error:  # reported in the summary
            self.report.error = f"{type(error).__name__}: {error}"

    def start(self) -> None:
        self._thread.start()

    def write_until(self, count: int) -> None:
        """Append entries up to `count` in all; notes whether the agent is writing to Redis."""
        if count > self.report.written:
            now = time.time()
            with self.log.open("ab") as handle:
                for number in range(self.report.written, count):
                    handle.write(jsonlog_entry(self.run_id, number, now))
            self.report.written = count
        self.report.redis_engaged |= bool(self.agent.health().get("redis_pending"))

    def drain(self, timeout_s: float) -> None:
        """Wait until every entry is captured (committed with the agent's cursor), Redis and the agent's
        spool are empty (all of it in Kafka), then stop the agent."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._thread.is_alive():
            health = self.agent.health()
            self.report.redis_engaged |= bool(health.get("redis_pending"))
            counts = health.get("counts")
            captured = counts.get(self.topic, {}).get("captured", 0) if isinstance(counts, dict) else 0
            if captured >= self.report.written and not health.get("redis_pending") and health.get("spool_depth") == 0:
                self.report.drained = True
                break
            time.sleep(0.25)
        self.agent.stop.set()
        self._thread.join(60)
