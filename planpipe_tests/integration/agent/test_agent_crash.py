"""`kill -9` of the agent on the real broker and PostgreSQL: every log entry on the topic exactly once.

Deterministic kills at the two steps that matter (records handed over but not
known durable; durable but the cursor not committed) and random kills while
the log grows; then the captured counts the agent reports to PostgreSQL.
"""

import random
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import Producer

from planpipe.agent.ledger import H_CAPTURE_ID
from planpipe.agent.state import AgentState
from planpipe.settings import Settings
from planpipe_tests.integration.agent.conftest import capture_ids, captured, write_plans

TOTAL = 420


def test_kill_9_at_any_moment_loses_nothing_and_publishes_nothing_twice(
    settings: Settings, agent_factory: Any, tmp_path: Path
) -> None:
    log = tmp_path / "postgresql.json"
    write_plans(log, range(0, 200))
    agent = agent_factory("crash", log=log, args=["--batch-size", "40"])

    # Durable in Kafka, cursor not committed: the restart must find the batch, not resend it.
    agent.start(PLANPIPE_FAULT_KILL_AT="agent_before_commit:2")
    assert agent.wait_exit() == -9
    health = agent.start().wait_until(lambda h: h["status"] == "ok", what="recovery")
    assert health["recovery"]["in_doubt"] == 40 and health["recovery"]["found_in_kafka"] == 40, health["recovery"]
    agent.wait_until(lambda h: h["log_position"].endswith(f"@{log.stat().st_size}"), what="the log read")
    agent.kill()

    # Intent written, nothing handed over: the restart must publish the batch (once).
    write_plans(log, range(200, 300))
    agent.start(PLANPIPE_FAULT_KILL_AT="agent_before_handoff:2")
    assert agent.wait_exit() == -9
    health = agent.start().wait_until(lambda h: h["status"] == "ok", what="recovery")
    assert health["recovery"]["in_doubt"] == 40 and health["recovery"]["found_in_kafka"] == 0, health["recovery"]
    agent.kill()

    # Random kills while PostgreSQL keeps logging.
    writer_done = threading.Event()

    def writer() -> None:
        for start in range(300, TOTAL, 5):  # over ~5 s: the kills land while batches are in flight
            write_plans(log, range(start, start + 5))
            time.sleep(0.1)
        writer_done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    rng = random.Random(12)
    recoveries = []
    for _ in range(4):  # a kill at a random moment, or at a random batch's most delicate step
        fault = rng.choice(["", "agent_before_commit", "agent_before_handoff"])
        agent.start(PLANPIPE_FAULT_KILL_AT=f"{fault}:{rng.randint(1, 3)}" if fault else "")
        recoveries.append(agent.wait_until(lambda h: h["status"] == "ok", what="capturing")["recovery"])
        time.sleep(rng.uniform(0.1, 1.2))
        agent.kill()
    thread.join()
    agent.start()
    recoveries.append(agent.wait_until(lambda h: h["status"] == "ok", what="capturing")["recovery"])
    print("recoveries after random kills:", [{k: v for k, v in r.items() if v} for r in recoveries])

    final = agent.wait_until(lambda h: captured(h, settings.topic) >= TOTAL, what=f"{TOTAL} captured")
    assert agent.stop() == 0

    ids = capture_ids(settings)
    assert len(ids) == TOTAL, f"{TOTAL - len(ids)} entries missing from the topic"
    doubled = {cid: n for cid, n in ids.items() if n > 1}
    assert not doubled, f"published twice: {list(doubled)[:5]}"
    assert captured(final, settings.topic) == TOTAL
    with psycopg.connect(settings.pg_dsn) as conn:
        row = conn.execute(
            "SELECT sum(published), sum(dropped) FROM planpipe.capture_counts WHERE agent = %s AND topic = %s",
            ("crash", settings.topic),
        ).fetchone()
    assert row == (TOTAL, 0)


def test_a_request_of_the_killed_agent_appended_late_is_found_not_resent(
    settings: Settings, agent_factory: Any, tmp_path: Path
) -> None:
    """The killed process's last produce request may reach the log after the restart (still in the broker's
    socket or queue, or not yet below the high watermark). Recovery looks only once the dead process's
    last heartbeat is `--inflight-settle` old; the late request is played here by producing its records
    (the in-doubt capture ids of the dead agent's state) while the restarted agent waits."""
    log = tmp_path / "postgresql.json"
    write_plans(log, range(0, 80))
    agent = agent_factory("late", log=log, args=["--batch-size", "40"])
    agent.start(PLANPIPE_FAULT_KILL_AT="agent_before_handoff:2")
    assert agent.wait_exit() == -9
    state = AgentState(agent.state_dir / "state.sqlite3")
    (intent,) = state.open_intents()
    state.close()
    assert len(intent.capture_ids) == 40

    agent.args.extend(["--inflight-settle", "6"])
    agent.start().wait_until(lambda h: "in flight" in h["detail"], what="recovery waiting for requests in flight")
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True})
    for cid in intent.capture_ids:  # what the dead process's request carried, appended only now
        producer.produce(settings.topic, value=b"{}", key=b"late", headers=[(H_CAPTURE_ID, cid.encode())])
    assert producer.flush(30) == 0

    health = agent.wait_until(lambda h: h["status"] == "ok", what="recovery")
    assert health["recovery"]["in_doubt"] == 40 and health["recovery"]["found_in_kafka"] == 40, health["recovery"]
    assert health["recovery"]["settle_waited_s"] > 0
    agent.wait_until(lambda h: captured(h, settings.topic) >= 80, what="80 captured")
    assert agent.stop() == 0
    ids = capture_ids(settings)
    assert len(ids) == 80 and max(ids.values()) == 1, {cid: n for cid, n in ids.items() if n > 1}
