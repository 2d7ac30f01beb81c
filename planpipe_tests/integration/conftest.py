"""Fixtures shared by integration tests of several domains."""

from collections.abc import Iterator
from dataclasses import replace

import pytest

from planpipe.settings import Settings
from planpipe.stack import kafka
from planpipe_tests.ports import free_port_block


@pytest.fixture(scope="module")
def private_broker(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A broker of the module's own: its tests stop and restart it (the session's broker stays up)."""
    if stack_settings.kafka_external:
        pytest.skip("needs a local broker it may stop (PLANPIPE_KAFKA_BOOTSTRAP points elsewhere)")
    # Below the ephemeral range: a restarted broker must get its port back (planpipe_tests/ports.py).
    port = free_port_block(2)
    settings = replace(
        stack_settings,
        home=tmp_path_factory.mktemp("private-kafka"),
        kafka_port=port,
        kafka_controller_port=port + 1,
        kafka_bootstrap=f"127.0.0.1:{port}",
    )
    try:
        kafka.start(settings)
        yield settings
    finally:
        kafka.stop(settings)
