"""Recovery on the real broker and Redis: copies already in Kafka are removed from the spool and Redis.

The states a `kill -9` can leave that the subprocess tests cannot aim at:
a spool row Kafka acknowledged but the producer never deleted (librdkafka's
retry or the drain, acked just before the kill), and a Redis entry the drainer
spooled but never deleted.
"""

import threading
from dataclasses import replace
from pathlib import Path

from confluent_kafka import Producer

from planpipe.agent.ledger import H_CAPTURE_ID
from planpipe.agent.recovery import recover
from planpipe.agent.state import AgentState
from planpipe.kafka_config import producer_config
from planpipe.routing.redis_queue import RedisQueue
from planpipe.routing.spool import OutRecord, Spool
from planpipe.settings import Settings


def _record(settings: Settings, n: int) -> OutRecord:
    return OutRecord(settings.topic, f"standard:q{n}".encode(), b"{}", ((H_CAPTURE_ID, f"rec/1:2@{n}".encode()),))


def test_recovery_removes_copies_kafka_already_has_and_resolves_the_batch_in_doubt(
    settings: Settings, redis_server: Settings, tmp_path: Path
) -> None:
    settings = replace(settings, redis_url=redis_server.redis_url)
    in_kafka = [_record(settings, n) for n in (1, 2, 10)]
    producer = Producer(producer_config(settings))
    for record in in_kafka:
        producer.produce(record.topic, record.value, record.key, headers=list(record.headers))
    assert producer.flush(30) == 0

    with Spool(settings.spool_path) as spool:  # 1 and 2 acked but not deleted; 3 genuinely waiting
        spool.append([_record(settings, n) for n in (1, 2, 3)])
    queue = RedisQueue(settings.redis_url, "rec", dlq_topic=settings.dlq_topic)
    queue.push([_record(settings, n) for n in (3, 4)])  # 3 was drained into the spool, 4 still waits
    state = AgentState(tmp_path / "state.sqlite3")
    state.open_intent(["rec/1:2@10", "rec/1:2@4", "rec/1:2@11"], None)  # in Kafka, in Redis, nowhere

    report = recover(settings, "rec", state, redis_queue=queue, stop=threading.Event())

    assert (report.spool_duplicates_removed, report.redis_duplicates_removed) == (2, 1)
    assert (report.found_in_kafka, report.found_in_redis, report.in_doubt) == (1, 1, 3)
    with Spool(settings.spool_path) as spool:
        assert [row.record for row in spool.peek_batch(10)] == [_record(settings, 3)]
    assert [entry.capture_id for entry in queue.scan()] == ["rec/1:2@4"]
    assert state.open_intents() == []
    assert state.skip_ids() == {"rec/1:2@10", "rec/1:2@4"}  # re-reading the log skips them; @11 is sent again
    assert state.totals() == {settings.topic: (2, 0)}
    # A second pass (a crash during recovery) finds nothing more to do.
    again = recover(settings, "rec", state, redis_queue=queue, stop=threading.Event())
    assert (again.spool_duplicates_removed, again.redis_duplicates_removed, again.in_doubt) == (0, 0, 0)
    queue.delete(queue.scan())
    queue.close()
    state.close()
