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
from msgspec.structs import force_setattr

from planpipe.plans.normalize import Explain, ExplainDecoder, PlanNode, decode_top_node

__all__ = ["NO_WORK", "WORK_COLUMNS", "PlanWork", "WorkedNode", "plan_work", "read_work"]


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
# observation is kept, its work unknown.
NO_WORK: Final = PlanWork(None, None, None, None)


def _sum(a: int | None, b: int | None) -> int | None:
    if a is None and b is None:
        return None
    return (a or 0) + (b or 0)


class WorkedNode(PlanNode, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """The top plan node with its work fields too, so one decode serves the fingerprint and the work.

    The work fields come after PlanNode's and are None once `take_work` has read them: the node
    then encodes exactly as the PlanNode it extends (omit_defaults), i.e. to the same canonical JSON.
    """

    shared_hit: int | None = field(default=None, name="Shared Hit Blocks")
    shared_read: int | None = field(default=None, name="Shared Read Blocks")
    temp_read: int | None = field(default=None, name="Temp Read Blocks")
    temp_written: int | None = field(default=None, name="Temp Written Blocks")
    rows: float | None = field(default=None, name="Actual Rows")  # PostgreSQL 18 prints 1.00
    loops: int | None = field(default=None, name="Actual Loops")

    def take_work(self) -> PlanWork:
        """The work totals; the work fields are cleared (the node is then its plain PlanNode form)."""
        work = PlanWork(
            shared_blocks=_sum(self.shared_hit, self.shared_read),
            temp_blocks=_sum(self.temp_read, self.temp_written),
            top_rows=self.rows,
            top_loops=self.loops,
        )
        for name in _WORK_FIELDS:
            force_setattr(self, name, None)
        return work


_WORK_FIELDS: Final = ("shared_hit", "shared_read", "temp_read", "temp_written", "rows", "loops")
_DECODER: Final[ExplainDecoder[WorkedNode]] = msgspec.json.Decoder(list[Explain[WorkedNode]] | Explain[WorkedNode])


def read_work(plan_text: str | bytes) -> WorkedNode:
    """The top node of an EXPLAIN JSON plan (array or auto_explain object) with its work fields.

    Raises `PlanParseError` for text that is not an EXPLAIN JSON plan, and for work fields of
    odd types (which `fingerprint` alone would accept).
    """
    return decode_top_node(_DECODER, plan_text)


def plan_work(plan_text: str | bytes) -> PlanWork:
    """The work totals of an EXPLAIN JSON plan; raises `PlanParseError` like `read_work`."""
    return read_work(plan_text).take_work()
