"""The code location's resources: settings read from the environment once per resource instance."""

import pytest

from planpipe.defs.resources import KafkaResource, PlanpipeResource
from planpipe.ingest.lag import LagUnavailable

pytestmark = pytest.mark.unit


def test_settings_read_the_environment_once_per_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLANPIPE_TOPIC", "plans-a")
    resource = PlanpipeResource(consumer_group="group-from-config")
    first = resource.settings()
    monkeypatch.setenv("PLANPIPE_TOPIC", "plans-b")
    assert resource.settings() == first  # still plans-a: not read again
    assert (first.topic, first.consumer_group) == ("plans-a", "group-from-config")
    # A new instance (Dagster builds one per run or sensor tick) sees the new environment.
    assert PlanpipeResource().settings().topic == "plans-b"


def test_kafka_resource_asks_its_own_bootstrap(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on either port: the client dials the resource's bootstrap, not the settings'
    # one, and no answer in time is LagUnavailable (a sensor tick skips), never a hang.
    monkeypatch.setenv("PLANPIPE_KAFKA_BOOTSTRAP", "127.0.0.1:19")
    resource = KafkaResource(bootstrap_servers="127.0.0.1:9", lag_timeout_s=2.0)
    settings = PlanpipeResource().settings()
    assert settings.kafka_bootstrap == "127.0.0.1:19"
    with pytest.raises(LagUnavailable):
        resource.group_lag(settings, "planpipe-test-group", "query-plans")
    dialed = " ".join(record.getMessage() for record in caplog.records)
    assert "127.0.0.1:9/bootstrap" in dialed and "127.0.0.1:19/" not in dialed
