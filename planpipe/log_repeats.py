"""A logging filter that lets a repeating message through once a minute, with a count of the rest.

librdkafka reports every failed reconnect (several per second per broker thread
while a broker is down); an operator needs the first line and how often it
recurred, not a wall of identical lines.
"""

import logging
import re
import time
from typing import Final

# Parts of a librdkafka line that change between otherwise identical reports.
_VOLATILE: Final = re.compile(r"\(after \d+ms in state \w+\)|\d+ms|#\d+|\[\d+\]")


class RepeatFilter(logging.Filter):
    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._last: dict[tuple[str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _VOLATILE.sub("_", record.getMessage()))
        now = time.monotonic()
        seen = self._last.get(key)
        if seen is not None and now - seen[0] < self.every_s:
            self._last[key] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} ({seen[1]} similar in the last {now - seen[0]:.0f} s)"
        self._last[key] = (now, 0)
        if len(self._last) > 10_000:  # unbounded distinct messages must not grow memory
            self._last.clear()
        return True
