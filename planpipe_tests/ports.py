"""Ports for test stacks: free ones below 32768, remembered in the stack's home.

Linux hands out client source ports from 32768–60999; a server port in that range can
be taken by any outgoing connection (even a connection to itself), so a stack that
stopped a moment ago may not start again. Tests therefore pick free ports below it,
and write them to `$PLANPIPE_HOME/test-ports.json` so that a kept stack
(PLANPIPE_TEST_KEEP_STACK=1) is found on the same ports by the next session.
"""

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from planpipe.stack.errors import port_in_use

LOW: Final = 20000
HIGH: Final = 32767  # inclusive; 32768 starts the ephemeral range
RECORD: Final = "test-ports.json"
VARIABLES: Final = ("PLANPIPE_KAFKA_PORT", "PLANPIPE_KAFKA_CONTROLLER_PORT", "PLANPIPE_PG_PORT")


def free_port_block(size: int, *, low: int = LOW, high: int = HIGH, attempts: int = 500) -> int:
    """First port of `size` consecutive free ports in [low, high]."""
    rng = random.SystemRandom()
    for _ in range(attempts):
        start = rng.randint(low, high - size + 1)
        if not any(port_in_use(port) for port in range(start, start + size)):
            return start
    raise RuntimeError(f"no {size} consecutive free ports in {low}-{high} after {attempts} attempts")


def stack_ports(home: Path, environ: Mapping[str, str], *, stack_running: bool = False) -> dict[str, str]:
    """The port variables for the test stack in `home`.

    Variables set in `environ` win. Otherwise the ports recorded in `home` are reused when the
    stack there runs (`stack_running`) or when they are still free; else new free ports are
    picked below 32768 and recorded.
    """
    given = {name: environ[name].strip() for name in VARIABLES if environ.get(name, "").strip()}
    if "PLANPIPE_KAFKA_PORT" in given:
        given.setdefault("PLANPIPE_KAFKA_CONTROLLER_PORT", str(int(given["PLANPIPE_KAFKA_PORT"]) + 1))
    if len(given) == len(VARIABLES):
        return given
    return {**_recorded_or_new(home, stack_running), **given}


def _recorded_or_new(home: Path, stack_running: bool) -> dict[str, str]:
    record = home / RECORD
    try:
        recorded = {k: str(int(v)) for k, v in json.loads(record.read_text()).items() if k in VARIABLES}
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        recorded = {}
    if len(recorded) == len(VARIABLES) and (stack_running or not any(port_in_use(int(p)) for p in recorded.values())):
        return recorded
    kafka = free_port_block(2)
    pg = free_port_block(1)
    while pg in (kafka, kafka + 1):
        pg = free_port_block(1)
    chosen = {"PLANPIPE_KAFKA_PORT": str(kafka), "PLANPIPE_KAFKA_CONTROLLER_PORT": str(kafka + 1),
              "PLANPIPE_PG_PORT": str(pg)}  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(chosen, indent=2) + "\n")
    return chosen
