"""Optional live sampling: EXPLAIN ANALYZE of the top pg_stat_statements statements, on a budget.

Every `interval_s` the sampler takes the statements of the current database
with the most total execution time and captures a few of them through
`ExplainCapturer` — the same safety rules as `planpipe capture explain`: a
non-superuser role, PostgreSQL's parser, the function deny list (views, RLS
policies and SQL functions included), a READ ONLY transaction that is always
rolled back, `statement_timeout`. On top of that it takes only:

* plain SELECTs (no DML even planned, no SELECT … FOR UPDATE);
* statements without parameters: pg_stat_statements stores `$1` where the
  constants were, and EXPLAIN ANALYZE needs real values;
* at most `max_statements` per interval, and only while the load budget lasts:
  the statements' execution time (their mean, before; the measured time,
  after) may use at most `budget_pct` % of the interval.

Samples are not re-taken after a crash: one in flight during a `kill -9` is
simply taken again at a later interval.
"""

import collections
import logging
import re
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from planpipe.capture.explain import ExplainCapturer, Failed, Skipped
from planpipe.capture.safety import SuperuserRefused
from planpipe.capture.sqltext import Statement, StatementKind, classify
from planpipe.contract import Envelope

logger = logging.getLogger("planpipe.agent.sampler")

_PARAMETER: Final = re.compile(r"(?<![\w$])\$\d+")
_TOP_STATEMENTS: Final = """
SELECT query, calls, mean_exec_time
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND calls >= %s AND toplevel
ORDER BY total_exec_time DESC
LIMIT %s
"""


@dataclass(frozen=True)
class SamplerConfig:
    dsn: str
    interval_s: float = 300.0
    max_statements: int = 5
    statement_timeout_ms: int = 5_000
    budget_pct: float = 1.0
    min_calls: int = 5
    allow_superuser: bool = False

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.max_statements < 1 or not 0 < self.budget_pct <= 100:
            raise ValueError("sampler: interval_s > 0, max_statements >= 1 and 0 < budget_pct <= 100 are required")

    @property
    def budget_ms(self) -> float:
        return self.interval_s * 1000 * self.budget_pct / 100


class Sampler:
    def __init__(self, config: SamplerConfig, cluster_id: str) -> None:
        self.config = config
        self.cluster_id = cluster_id
        self.outcomes: collections.Counter[str] = collections.Counter()
        self._capturer: ExplainCapturer | None = None

    def _explainer(self) -> ExplainCapturer:
        if self._capturer is None:
            self._capturer = ExplainCapturer(
                self.config.dsn,
                cluster_id=self.cluster_id,
                statement_timeout_ms=self.config.statement_timeout_ms,
                allow_superuser=self.config.allow_superuser,
                dml="skip",
            )
        return self._capturer

    def top_statements(self) -> list[tuple[str, int, float]]:
        conn: psycopg.Connection[tuple[Any, ...]]
        with psycopg.connect(self.config.dsn, autocommit=True, connect_timeout=10) as conn:
            rows = conn.execute(_TOP_STATEMENTS, (self.config.min_calls, self.config.max_statements * 4)).fetchall()
        return [(str(query), int(calls), float(mean)) for query, calls, mean in rows]

    def sample_once(self) -> list[Envelope]:
        """One interval's samples; problems are counted in `outcomes`, never raised."""
        try:
            candidates = self.top_statements()
        except psycopg.Error as error:
            self.outcomes["unavailable"] += 1
            logger.warning("sampler: cannot read pg_stat_statements: %s", str(error).strip().splitlines()[0])
            return []
        budget = self.config.budget_ms
        out: list[Envelope] = []
        for text, _calls, mean_ms in candidates:
            if len(out) >= self.config.max_statements:
                break
            reason = self._unsuitable(text, mean_ms, budget)
            if reason is not None:
                self.outcomes[reason] += 1
                continue
            try:
                outcome = self._explainer().capture(Statement(text=text, index=0, line=1))
            except (psycopg.Error, SuperuserRefused) as error:  # connection or role: retried next interval
                self.outcomes["failed"] += 1
                logger.warning("sampler: %s", str(error).strip().splitlines()[0])
                self.close()
                break
            if isinstance(outcome, Envelope):
                budget -= outcome.total_time_ms
                out.append(outcome)
                self.outcomes["captured"] += 1
            elif isinstance(outcome, Skipped):
                self.outcomes["refused"] += 1
                logger.info("sampler: skipped %r: %s", text[:80], outcome.reason)
            elif isinstance(outcome, Failed):
                budget -= self.config.statement_timeout_ms if outcome.sqlstate == "57014" else 0
                self.outcomes["failed"] += 1
                logger.info("sampler: failed %r: %s", text[:80], outcome.error)
        return out

    def _unsuitable(self, text: str, mean_ms: float, budget_ms: float) -> str | None:
        if _PARAMETER.search(text):
            return "has_parameters"
        if classify(text).kind is not StatementKind.SELECT:
            return "not_select"
        if mean_ms > self.config.statement_timeout_ms:
            return "slower_than_timeout"
        if mean_ms > budget_ms:
            return "over_budget"
        return None

    def close(self) -> None:
        if self._capturer is not None:
            self._capturer.close()
            self._capturer = None
