"""The code location loads: its jobs and sensors are there (no services needed)."""

import pytest

from planpipe.defs.definitions import defs

pytestmark = pytest.mark.unit


def test_definitions_load() -> None:
    repo = defs.get_repository_def()
    assert {"ingest_job", "sla_check_job"} <= {job.name for job in repo.get_all_jobs()}
    assert repo.get_sensor_def("kafka_lag_sensor") is not None
