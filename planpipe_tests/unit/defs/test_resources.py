"""The code location's resources: settings read from the environment once per resource instance."""

import pytest

from planpipe.defs.resources import PlanpipeResource

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
