"""The repeat filter: first line through, identical ones counted, a different one through."""

import logging

import pytest

from planpipe.log_repeats import RepeatFilter

pytestmark = pytest.mark.unit


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("planpipe.kafka.client", logging.ERROR, __file__, 1, message, None, None)


def test_repeats_are_held_back_and_counted_when_the_window_ends() -> None:
    repeat = RepeatFilter(every_s=60)
    refused = "FAIL [thrd:127.0.0.1:19092/bootstrap]: Connect failed: Connection refused (after {}ms in state CONNECT)"
    assert repeat.filter(_record(refused.format(0)))
    assert not repeat.filter(_record(refused.format(3)))
    assert not repeat.filter(_record(refused.format(1)))
    assert repeat.filter(_record("a different failure"))
    repeat.every_s = 0  # the window has passed
    again = _record(refused.format(7))
    assert repeat.filter(again)
    assert "(2 similar in the last" in again.getMessage()
