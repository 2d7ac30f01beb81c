"""The test stack's ports: free, below the ephemeral range, remembered for a kept stack."""

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from planpipe.stack.errors import port_in_use
from planpipe_tests.ports import RECORD, VARIABLES, free_port_block, stack_ports


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


def test_a_listening_port_is_in_use_and_a_closed_one_is_not(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    assert port_in_use(port)
    listener.close()
    assert not port_in_use(port)


def test_picked_ports_are_free_and_below_the_ephemeral_range(tmp_path: Path) -> None:
    ports = stack_ports(tmp_path, {})
    assert set(ports) == set(VARIABLES)
    numbers = [int(ports[name]) for name in VARIABLES]
    assert all(20000 <= n < 32768 for n in numbers)
    assert int(ports["PLANPIPE_KAFKA_CONTROLLER_PORT"]) == int(ports["PLANPIPE_KAFKA_PORT"]) + 1
    assert len(set(numbers)) == 3
    assert not any(port_in_use(n) for n in numbers)
    assert json.loads((tmp_path / RECORD).read_text()) == ports


def test_recorded_ports_are_reused_while_free_or_while_the_stack_runs(tmp_path: Path) -> None:
    first = stack_ports(tmp_path, {})
    assert stack_ports(tmp_path, {}) == first
    kafka = int(first["PLANPIPE_KAFKA_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", kafka))
        sock.listen()
        # the kept stack itself holds its ports: found again
        assert stack_ports(tmp_path, {}, stack_running=True) == first
        # someone else holds one: new ports, recorded for next time
        moved = stack_ports(tmp_path, {})
        assert moved["PLANPIPE_KAFKA_PORT"] != first["PLANPIPE_KAFKA_PORT"]
        assert json.loads((tmp_path / RECORD).read_text()) == moved


def test_environment_wins(tmp_path: Path) -> None:
    env = {"PLANPIPE_KAFKA_PORT": "23092", "PLANPIPE_PG_PORT": "23432"}
    expected = {"PLANPIPE_KAFKA_PORT": "23092", "PLANPIPE_KAFKA_CONTROLLER_PORT": "23093", "PLANPIPE_PG_PORT": "23432"}
    assert stack_ports(tmp_path, env) == expected
    assert not (tmp_path / RECORD).exists()
    partial = stack_ports(tmp_path, {"PLANPIPE_PG_PORT": "23432"})
    assert partial["PLANPIPE_PG_PORT"] == "23432"
    assert int(partial["PLANPIPE_KAFKA_PORT"]) < 32768


def test_free_port_block_is_consecutive() -> None:
    start = free_port_block(2, low=20000, high=32767)
    assert not port_in_use(start) and not port_in_use(start + 1)
    assert 20000 <= start < start + 1 <= 32767
