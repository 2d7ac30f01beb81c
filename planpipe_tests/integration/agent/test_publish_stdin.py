"""`planpipe publish --file -`: envelopes streamed from stdin reach Kafka as they arrive."""

import subprocess
import sys
import time

import msgspec
from confluent_kafka import KafkaException

from planpipe.settings import REPO_ROOT, Settings
from planpipe_tests.integration.agent.conftest import environment
from planpipe_tests.integration.routing.kafka_read import end_offsets, read_all


def _envelope(i: int) -> bytes:
    return msgspec.json.encode(
        {
            "query_hash": f"stdin-q{i}",
            "execution_timestamp": 1_790_000_000.0 + i,
            "cluster_id": "stdin",
            "plan_text": '[{"Plan": {"Node Type": "Result"}}]',
            "actual_rows": 1,
            "total_time_ms": 0.5,
        }
    )


def _on_topic(settings: Settings, topic: str) -> int:
    try:
        return sum(end_offsets(settings, topic).values())
    except KafkaException:  # a topic created a moment ago may not have its leaders yet
        return 0


def test_publish_from_stdin_streams_and_dead_letters_bad_lines(settings: Settings) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "planpipe.cli", "publish", "--file", "-", "--flush-timeout", "20"],
        env=environment(settings),
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin is not None
    process.stdin.write(b"\n".join(_envelope(i) for i in range(3)) + b"\n")
    process.stdin.flush()
    deadline = time.monotonic() + 60
    while _on_topic(settings, settings.topic) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    if _on_topic(settings, settings.topic) != 3:
        process.kill()
        _, stderr = process.communicate(timeout=30)
        raise AssertionError(f"lines were not published while stdin stayed open: {stderr.decode()[-3000:]}")
    process.stdin.write(b'{"not": "an envelope"}\n' + _envelope(3) + b"\n")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr.decode()
    assert "planpipe publish: -" in stdout.decode()
    assert len(read_all(settings, settings.topic)) == 4
    dead = read_all(settings, settings.dlq_topic)
    assert len(dead) == 1 and dead[0].headers.get("planpipe-source-line") == "4"
