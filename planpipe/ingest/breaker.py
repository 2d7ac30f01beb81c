"""The runbook's degradation rules for the consumer side (pure, clock injectable).

* `LatencyBreaker`: p95 publish→commit above 1,200 ms for 60 s opens the breaker;
  while open, `low` priority is dropped (and counted) and `critical` and
  `regression_candidate` are kept. It closes after the first batch back under
  the threshold.
* `LockWaitThrottle`: baseline-store lock wait above 800 ms throttles ingestion;
  it resumes at full speed only once lock wait is below 400 ms (hysteresis).
"""

import time
from collections.abc import Callable
from typing import Final

P95_THRESHOLD_MS: Final = 1200.0
P95_WINDOW_S: Final = 60.0
LOCK_WAIT_BREACH_MS: Final = 800.0
LOCK_WAIT_RESUME_MS: Final = 400.0


class LatencyBreaker:
    def __init__(
        self,
        threshold_ms: float = P95_THRESHOLD_MS,
        window_s: float = P95_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold_ms = threshold_ms
        self.window_s = window_s
        self._clock = clock
        self._breach_since: float | None = None
        self.is_open = False
        self.opened_count = 0

    def record(self, p95_ms: float) -> None:
        now = self._clock()
        if p95_ms <= self.threshold_ms:
            self._breach_since = None
            self.is_open = False
            return
        if self._breach_since is None:
            self._breach_since = now
        if not self.is_open and now - self._breach_since >= self.window_s:
            self.is_open = True
            self.opened_count += 1


class LockWaitThrottle:
    def __init__(
        self,
        breach_ms: float = LOCK_WAIT_BREACH_MS,
        resume_ms: float = LOCK_WAIT_RESUME_MS,
        base_delay_s: float = 0.25,
        max_delay_s: float = 5.0,
    ) -> None:
        self.breach_ms = breach_ms
        self.resume_ms = resume_ms
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self.throttling = False
        self._delay = 0.0

    def record(self, lock_wait_ms: float) -> None:
        if lock_wait_ms > self.breach_ms:
            self.throttling = True
            self._delay = min(self.max_delay_s, max(self.base_delay_s, self._delay * 2))
        elif self.throttling and lock_wait_ms < self.resume_ms:
            self.throttling = False
            self._delay = 0.0

    def delay_s(self) -> float:
        """Pause before the next batch; 0 when not throttling."""
        return self._delay if self.throttling else 0.0
