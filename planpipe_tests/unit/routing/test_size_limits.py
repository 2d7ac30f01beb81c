"""The one size limit: every Kafka size option derived from PLANPIPE_MAX_PLAN_BYTES in one place."""

import hashlib
from pathlib import Path

import msgspec
import pytest
from confluent_kafka import Consumer, Producer

from planpipe.contract import EnvelopeDecoder, Reason
from planpipe.dlq import H_ORIGINAL_SHA256, H_ORIGINAL_SIZE, H_TRUNCATED, fit_value, header_map
from planpipe.kafka_config import (
    FETCH_MAX_BYTES,
    FETCH_PARTITION_BYTES,
    LIBRDKAFKA_MAX_MESSAGE_BYTES,
    SizeLimits,
    consumer_config,
    producer_config,
    size_limits,
)
from planpipe.routing import metrics
from planpipe.routing.router import Rejection, Router, RoutingDecision
from planpipe.settings import Settings, load_settings
from planpipe.stack.kafka import KafkaPaths, _write_properties, topic_configs
from planpipe_tests.unit.routing.helpers import BASE, raw_envelope

MIB = 1024 * 1024


def settings_with(tmp_path: Path, **env: str) -> Settings:
    # Port 1: nothing answers, so constructing a client never talks to a broker.
    return load_settings({"PLANPIPE_HOME": str(tmp_path), "PLANPIPE_KAFKA_BOOTSTRAP": "127.0.0.1:1", **env})


def test_default_limit_is_derived_with_headroom() -> None:
    limits = SizeLimits.for_plan_bytes(8 * MIB)
    # Envelope: the plan escaped (at most 2 bytes per byte) plus 1 MiB for the other fields.
    assert limits.max_envelope_bytes == 17 * MIB
    # Record: + 64 KiB for key and headers; batch: + 64 KiB framing and compression.
    assert limits.max_record_bytes == 17 * MIB + 64 * 1024
    assert limits.max_batch_bytes == 17 * MIB + 128 * 1024
    # Fetches stay small (memory): a larger first batch comes whole, in a response this large.
    assert limits.fetch_max_bytes == FETCH_MAX_BYTES < limits.max_batch_bytes
    assert limits.receive_message_max_bytes >= limits.fetch_max_bytes + limits.max_batch_bytes + 512
    assert limits.socket_request_max_bytes >= limits.max_batch_bytes + MIB


@pytest.mark.parametrize("plan_bytes", [1024, 8 * MIB, 64 * MIB, 400 * MIB])
def test_every_size_holds_the_one_below_it(plan_bytes: int) -> None:
    limits = SizeLimits.for_plan_bytes(plan_bytes)
    assert plan_bytes < limits.max_envelope_bytes < limits.max_record_bytes < limits.max_batch_bytes
    assert limits.fetch_max_bytes + limits.max_batch_bytes + 512 <= limits.receive_message_max_bytes
    assert limits.max_batch_bytes < limits.socket_request_max_bytes
    assert limits.max_batch_bytes <= LIBRDKAFKA_MAX_MESSAGE_BYTES


@pytest.mark.parametrize("plan_bytes", [0, 1023, 500 * MIB])
def test_limits_kafka_cannot_carry_are_refused(plan_bytes: int) -> None:
    with pytest.raises(ValueError, match="PLANPIPE_MAX_PLAN_BYTES must be within"):
        SizeLimits.for_plan_bytes(plan_bytes)


def test_a_plan_at_the_limit_fits_the_envelope_limit_even_when_every_byte_is_escaped() -> None:
    plan_bytes = 64 * 1024
    limits = SizeLimits.for_plan_bytes(plan_bytes)
    for worst in ('"', "\\", "\n"):  # each takes two bytes in a JSON string
        plan = "[" + worst * (plan_bytes - 2) + "]"  # exactly at the plan limit
        raw = msgspec.json.encode({**BASE, "plan_text": plan, "query_text": "SELECT 1" * 10_000})
        assert len(raw) > 2 * plan_bytes - 4
        assert len(raw) <= limits.max_envelope_bytes
        router = Router(decoder=EnvelopeDecoder(plan_bytes), max_envelope_bytes=limits.max_envelope_bytes)
        assert isinstance(router.route_raw(raw), RoutingDecision)


def test_every_client_config_carries_the_limit(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, PLANPIPE_MAX_PLAN_BYTES=str(2 * MIB))
    limits = size_limits(settings)
    assert limits == SizeLimits.for_plan_bytes(2 * MIB)
    producer = producer_config(settings, **{"client.id": "dlq"})
    assert producer["message.max.bytes"] == limits.max_record_bytes
    consumer = consumer_config(settings, "g")
    assert consumer["max.partition.fetch.bytes"] == FETCH_PARTITION_BYTES
    assert consumer["fetch.max.bytes"] == limits.fetch_max_bytes
    assert consumer["receive.message.max.bytes"] == limits.receive_message_max_bytes
    assert consumer["message.max.bytes"] <= consumer["fetch.max.bytes"]  # librdkafka refuses it otherwise
    # librdkafka accepts the derived values (names and ranges): building the clients validates them.
    Producer(producer).flush(0)
    Consumer(consumer).close()


def test_topics_and_broker_carry_the_limit(tmp_path: Path) -> None:
    settings = settings_with(tmp_path)
    limits = size_limits(settings)
    configs = topic_configs(settings)
    assert configs[settings.topic]["max.message.bytes"] == str(limits.max_batch_bytes)
    assert configs[settings.dlq_topic]["max.message.bytes"] == str(limits.max_batch_bytes)

    paths = KafkaPaths(tmp_path / "kafka")
    paths.root.mkdir()
    _write_properties(settings, paths)
    written = dict(line.split("=", 1) for line in paths.properties.read_text().splitlines())
    assert written["message.max.bytes"] == str(limits.max_batch_bytes)
    assert written["replica.fetch.max.bytes"] == str(limits.max_batch_bytes)
    assert int(written["socket.request.max.bytes"]) >= limits.max_batch_bytes


def test_passthrough_may_raise_a_size_but_not_lower_it(tmp_path: Path) -> None:
    limits = SizeLimits.for_plan_bytes(8 * MIB)
    raised = settings_with(tmp_path, PLANPIPE_PRODUCER__MESSAGE_MAX_BYTES=str(limits.max_record_bytes * 2))
    assert producer_config(raised)["message.max.bytes"] == str(limits.max_record_bytes * 2)

    lowered = settings_with(tmp_path, PLANPIPE_PRODUCER__MESSAGE_MAX_BYTES="1000000")
    with pytest.raises(ValueError, match="PLANPIPE_PRODUCER__MESSAGE_MAX_BYTES=1000000 is below"):
        producer_config(lowered)
    lowered = settings_with(tmp_path, PLANPIPE_CONSUMER__RECEIVE_MESSAGE_MAX_BYTES=str(limits.max_batch_bytes))
    with pytest.raises(ValueError, match="PLANPIPE_CONSUMER__RECEIVE_MESSAGE_MAX_BYTES=17956864 is below"):
        consumer_config(lowered, "g")
    # The fetch sizes are no limit (the broker returns a larger first batch whole): any value goes.
    small = settings_with(tmp_path, PLANPIPE_CONSUMER__MAX_PARTITION_FETCH_BYTES="65536")
    assert consumer_config(small, "g")["max.partition.fetch.bytes"] == "65536"


def test_router_rejects_an_envelope_over_the_limit_before_decoding() -> None:
    plan_bytes = 512 * 1024
    limits = SizeLimits.for_plan_bytes(plan_bytes)
    router = Router(decoder=EnvelopeDecoder(plan_bytes), max_envelope_bytes=limits.max_envelope_bytes)

    at_limit = raw_envelope(plan_text="x" * plan_bytes)
    assert isinstance(router.route_raw(at_limit), RoutingDecision)

    over_plan = raw_envelope(plan_text="x" * (plan_bytes + 1))
    rejected = router.route_raw(over_plan)
    assert isinstance(rejected, Rejection)
    assert (rejected.reason, rejected.field) == (Reason.PLAN_TOO_LARGE, "plan_text")

    # \u escapes of ordinary characters: the plan is within its limit once decoded,
    # but the envelope is larger than Kafka is set up to carry.
    escaped = raw_envelope().replace(b'"plan_text":"', b'"plan_text":"' + b"\\u0041" * (plan_bytes - 100))
    assert len(escaped) > limits.max_envelope_bytes
    rejected = router.route_raw(escaped)
    assert isinstance(rejected, Rejection)
    assert (rejected.reason, rejected.field) == (Reason.PLAN_TOO_LARGE, None)
    assert f"envelope is {len(escaped)} bytes > limit {limits.max_envelope_bytes}" in rejected.detail
    assert rejected.raw == escaped  # original bytes kept for the DLQ


def test_fit_value_truncates_and_identifies_the_original() -> None:
    value = bytes(range(256)) * 10
    assert fit_value(value, len(value)) == (value, [])
    cut, headers = fit_value(value, 100)
    assert cut == value[:100]
    meta = header_map(headers)
    assert meta == {
        H_TRUNCATED: "1",
        H_ORIGINAL_SIZE: str(len(value)),
        H_ORIGINAL_SHA256: hashlib.sha256(value).hexdigest(),
    }


def test_undeliverable_counter_exists_at_zero_per_destination() -> None:
    for destination in metrics.DESTINATIONS:
        labels: dict[str, str] = {"destination": destination}
        assert metrics.REGISTRY.get_sample_value("explain_router_undeliverable_total", labels) is not None
