"""The work an execution did, read from its captured plan: evidence that machine load cannot fake.

Time alone cannot tell a query that got worse from a machine that got busier. The
blocks a plan touched and the rows it produced barely move with CPU contention, so
detection compares them next to time: more time for the same work is the
environment; more work on the same plan is the data (growth, bloat, a cold cache
shows as reads instead of hits but the same total).

The top node of `EXPLAIN (ANALYZE, BUFFERS)` carries the totals of its subtree:
shared hit + read blocks, temp read + written blocks, and its actual rows and
loops. Plans captured without BUFFERS (or without ANALYZE) give None for what
they lack; nothing is guessed.
"""

from typing import Final

import msgspec
from msgspec import field

from planpipe.plans.normalize import PlanParseError

__all__ = ["NO_WORK", "WORK_COLUMNS", "PlanWork", "plan_work"]


class _TopNode(msgspec.Struct, gc=False):
    # Only these keys are declared: msgspec skips the rest (the whole subtree included) in C.
    shared_hit: int | None = field(name="Shared Hit Blocks", default=None)
    shared_read: int | None = field(name="Shared Read Blocks", default=None)
    temp_read: int | None = field(name="Temp Read Blocks", default=None)
    temp_written: int | None = field(name="Temp Written Blocks", default=None)
    rows: float | None = field(name="Actual Rows", default=None)  # PostgreSQL 18 prints 1.00
    loops: int | None = field(name="Actual Loops", default=None)


class _Explain(msgspec.Struct, gc=False):
    plan: _TopNode = field(name="Plan")


_DECODER: Final[msgspec.json.Decoder[list[_Explain] | _Explain]] = msgspec.json.Decoder(list[_Explain] | _Explain)


class PlanWork(msgspec.Struct, frozen=True, gc=False):
    """Totals of the top plan node; None where the plan did not report them."""

    shared_blocks: int | None  # shared hit + read
    temp_blocks: int | None  # temp read + written
    top_rows: float | None  # actual rows per loop of the top node
    top_loops: int | None

    def columns(self) -> dict[str, int | float | None]:
        return {name: getattr(self, name) for name in WORK_COLUMNS}


# Column names in the observations dataset, in this order.
WORK_COLUMNS: Final = ("shared_blocks", "temp_blocks", "top_rows", "top_loops")
# What the ingest records when a plan's work fields cannot be read (odd types): the
# observation is kept, its work is unknown.
NO_WORK: Final = PlanWork(None, None, None, None)


def _sum(a: int | None, b: int | None) -> int | None:
    if a is None and b is None:
        return None
    return (a or 0) + (b or 0)


def plan_work(plan_text: str | bytes) -> PlanWork:
    """The work totals of an EXPLAIN JSON plan (an EXPLAIN array or an auto_explain object).

    Raises `PlanParseError` for text that is not an EXPLAIN JSON plan.
    """
    try:
        decoded = _DECODER.decode(plan_text)
    except msgspec.ValidationError as exc:
        raise PlanParseError(f"not an EXPLAIN JSON plan: {exc}") from None
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        raise PlanParseError(f"plan text is not valid JSON: {exc}") from None
    if isinstance(decoded, list):
        if len(decoded) != 1:
            raise PlanParseError(f"EXPLAIN output must hold exactly one plan, found {len(decoded)}")
        decoded = decoded[0]
    top = decoded.plan
    return PlanWork(
        shared_blocks=_sum(top.shared_hit, top.shared_read),
        temp_blocks=_sum(top.temp_read, top.temp_written),
        top_rows=top.rows,
        top_loops=top.loops,
    )
