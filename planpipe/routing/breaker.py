"""The producer's circuit breaker: closed, open for a cool-down, half-open for one drain.

Takes its clock as a parameter, so a test moves time instead of waiting out a cool-down.
"""

import enum
import time
from collections.abc import Callable
from typing import Final

DEFAULT_COOLDOWN_S: Final = 30.0
DEFAULT_FAILURE_THRESHOLD: Final = 3


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


STATE_GAUGE: Final = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    """The router breaker: `threshold` consecutive failures open it; it turns
    half-open once `cooldown_s` elapsed; a failure while half-open re-opens it
    (fresh cool-down); only the owner closes it (after a successful drain).

    Not thread-safe: `PlanProducer` calls it under its own lock.
    """

    def __init__(
        self,
        threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"threshold must be >= 1, got {threshold}")
        if cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0, got {cooldown_s}")
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self.times_opened = 0
        self.last_failure: str | None = None

    @property
    def state(self) -> BreakerState:
        # Lazy transition: nobody has to tick a timer for the cool-down to end.
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown_s:
            self._state = BreakerState.HALF_OPEN
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def cooldown_remaining_s(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.cooldown_s - (self._clock() - self._opened_at))

    def record_failure(self, what: str) -> bool:
        """Count one failure; True when this call opened the breaker."""
        self.last_failure = what
        state = self.state
        if state is BreakerState.OPEN:
            return False  # the running cool-down is not extended by the failures it expects
        self._consecutive += 1
        if state is BreakerState.HALF_OPEN or self._consecutive >= self.threshold:
            self._open()
            return True
        return False

    def record_success(self) -> None:
        if self._state is BreakerState.CLOSED:
            self._consecutive = 0

    def close(self) -> None:
        self._state = BreakerState.CLOSED
        self._consecutive = 0

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self.times_opened += 1
