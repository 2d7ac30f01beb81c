"""Turn `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` text into a normalized plan tree.

Two executions of the same statement have "the same plan" when their normalized
trees are equal (`fingerprint.py` hashes this tree). The tree keeps what the planner
chose — node types, relations, indexes, join types, strategies, keys and
conditions with constants replaced — and drops what varies between runs of one
plan: costs, estimates, actual times/rows/loops, buffers, I/O timings, workers
launched, sort method and space, hash batches.

Decoding goes straight into `PlanNode`, a msgspec Struct that declares only the
structural fields, so msgspec skips every other key in C without building a
dict; stdlib `json` plus a dict walk is several times slower (measured per core when
this was chosen: ~106,000 plans/s fingerprinted this way, ~16,000/s from a `json` dict).
Every declared field costs a little on each unknown key msgspec skips, so the
struct holds what tells plans apart and nothing more.
"""

import re
from collections.abc import Iterator
from functools import lru_cache
from typing import Final, Generic, TypeAlias, TypeVar

import msgspec
from msgspec import field
from msgspec.structs import force_setattr

from planpipe.errors import PlanpipeError

__all__ = [
    "PLACEHOLDER",
    "Explain",
    "ExplainDecoder",
    "GroupingSet",
    "PlanNode",
    "PlanParseError",
    "decode_top_node",
    "iter_nodes",
    "load_normalized",
    "node_label",
    "normalize_expression",
    "normalize_plan",
    "plan_summary",
    "scan_target",
    "summarize",
]

PLACEHOLDER: Final = "?"


class PlanParseError(PlanpipeError, ValueError):
    """The text is not a parseable EXPLAIN JSON plan (DLQ reason `plan_unparseable`)."""


# --- constants in expressions -------------------------------------------------
#
# PostgreSQL deparses constants (ruleutils.c get_const_expr) as: positive int4
# bare (`42`), negative int4 quoted with a cast (`'-5'::integer`), numeric bare
# when it looks like a float (`3.5`) else quoted with a cast (`'-12'::numeric`,
# `'3'::numeric`), everything else quoted with a cast (`'abc'::text`,
# `'{1,2}'::integer[]`, `'42'::bigint`). One regex pass tokenizes the string so
# quoted identifiers and literals are never looked into.
#
# Every alternative starts with a literal character (digits spelled out one by
# one, lookbehinds after the first character): `re` then skips to candidate
# characters in C instead of trying each position, 4-6x faster on conditions.
_NUMBER_TAIL: Final = r"(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.])"
_TOKEN: Final = re.compile(
    "|".join(
        [
            # Kept: quoted identifiers (digits and quotes there are names), generated
            # subplan names (stable for one statement), type modifiers (part of the type).
            r'"(?:[^"]|"")*"',
            r"SubPlan \d+",
            r"InitPlan \d+",
            r"::(?:numeric|decimal|character varying|character|bit varying|bit|time(?:stamp)?|interval)"
            r"\(\d+(?:,\d+)?\)",
            # Replaced: string literals (a cast to integer/numeric is looked at), params, numbers.
            r"'(?:[^']|'')*'(?P<numcast>::(?:integer|numeric)(?![\w(\[]))?",
            r"E'(?:[^']|'')*'",
            r"\$\d+",
            r"-(?<![\w$]-)\d+" + _NUMBER_TAIL,  # a minus sign after a word is an operator
            *(rf"{digit}(?<![\w$]{digit})\d*" + _NUMBER_TAIL for digit in "0123456789"),  # not in `t1`
        ]
    )
)
_KEPT_FIRST_CHARS: Final = frozenset('"SI:')
_NUMERIC_LITERAL: Final = re.compile(r"'-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?'")
# `IN ($1, $2, $3)` deparses as `ANY (ARRAY[$1, $2, $3])`: the list length is a constant too.
_PLACEHOLDER_ARRAY: Final = re.compile(r"ARRAY\[\?(?:, \?)*\]")
_MAY_HOLD_CONSTANT: Final = re.compile(r"[0-9'$]").search


def _replace_token(match: re.Match[str]) -> str:
    token = match.group()
    if token[0] in _KEPT_FIRST_CHARS:
        return token
    cast = match.group("numcast")
    # A quoted number cast to integer/numeric is the same constant as a bare one
    # (`'-12'::numeric` vs `3.5`); any other quoted literal keeps its cast.
    if cast is not None and not _NUMERIC_LITERAL.fullmatch(token[: -len(cast)]):
        return PLACEHOLDER + cast
    return PLACEHOLDER


@lru_cache(maxsize=16384)
def normalize_expression(expr: str) -> str:
    """Replace constants and `$n` parameters in a deparsed expression by `?`.

    Cached: a fleet repeats the same conditions, so most calls are dictionary hits.
    """
    if not _MAY_HOLD_CONSTANT(expr):
        return expr
    out = _TOKEN.sub(_replace_token, expr)
    if "ARRAY[" in out:
        out = _PLACEHOLDER_ARRAY.sub("ARRAY[?]", out)
    return out


def _keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(normalize_expression(k) for k in keys)


# --- the normalized tree ------------------------------------------------------

_StrKeys = tuple[str, ...] | None


class GroupingSet(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One entry of "Grouping Sets" (ROLLUP/CUBE/GROUPING SETS aggregates)."""

    sort_key: _StrKeys = field(default=None, name="Sort Key")
    group_keys: tuple[tuple[str, ...], ...] | None = field(default=None, name="Group Keys")
    hash_keys: tuple[tuple[str, ...], ...] | None = field(default=None, name="Hash Keys")

    def __post_init__(self) -> None:
        if self.sort_key is not None:
            force_setattr(self, "sort_key", _keys(self.sort_key))
        if self.group_keys is not None:
            force_setattr(self, "group_keys", tuple(_keys(k) for k in self.group_keys))
        if self.hash_keys is not None:
            force_setattr(self, "hash_keys", tuple(_keys(k) for k in self.hash_keys))


class PlanNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One plan node with only its structural fields, constants replaced.

    Encoded field names are EXPLAIN's own, and field order is fixed by this
    declaration, so `msgspec.json.encode(node)` is a canonical form. Changing a
    field here changes fingerprints: bump `FINGERPRINT_VERSION` with it.
    """

    node_type: str = field(name="Node Type")
    strategy: str | None = field(default=None, name="Strategy")
    partial_mode: str | None = field(default=None, name="Partial Mode")
    operation: str | None = field(default=None, name="Operation")
    parent_relationship: str | None = field(default=None, name="Parent Relationship")
    subplan_name: str | None = field(default=None, name="Subplan Name")
    parallel_aware: bool = field(default=False, name="Parallel Aware")
    scan_direction: str | None = field(default=None, name="Scan Direction")
    index_name: str | None = field(default=None, name="Index Name")
    relation_name: str | None = field(default=None, name="Relation Name")
    function_name: str | None = field(default=None, name="Function Name")
    cte_name: str | None = field(default=None, name="CTE Name")
    schema: str | None = field(default=None, name="Schema")
    alias: str | None = field(default=None, name="Alias")
    join_type: str | None = field(default=None, name="Join Type")
    sort_key: _StrKeys = field(default=None, name="Sort Key")
    presorted_key: _StrKeys = field(default=None, name="Presorted Key")
    group_key: _StrKeys = field(default=None, name="Group Key")
    grouping_sets: tuple[GroupingSet, ...] | None = field(default=None, name="Grouping Sets")
    cache_key: str | None = field(default=None, name="Cache Key")
    tid_cond: str | None = field(default=None, name="TID Cond")
    index_cond: str | None = field(default=None, name="Index Cond")
    order_by: str | None = field(default=None, name="Order By")
    recheck_cond: str | None = field(default=None, name="Recheck Cond")
    merge_cond: str | None = field(default=None, name="Merge Cond")
    hash_cond: str | None = field(default=None, name="Hash Cond")
    join_filter: str | None = field(default=None, name="Join Filter")
    one_time_filter: str | None = field(default=None, name="One-Time Filter")
    filter: str | None = field(default=None, name="Filter")
    plans: tuple["PlanNode", ...] = field(default=(), name="Plans")

    def __post_init__(self) -> None:
        # msgspec calls this once per decoded node: the single place constants go.
        # Explicit checks rather than a getattr loop: this runs ~10 times per plan.
        if self.index_cond is not None:
            force_setattr(self, "index_cond", normalize_expression(self.index_cond))
        if self.recheck_cond is not None:
            force_setattr(self, "recheck_cond", normalize_expression(self.recheck_cond))
        if self.tid_cond is not None:
            force_setattr(self, "tid_cond", normalize_expression(self.tid_cond))
        if self.filter is not None:
            force_setattr(self, "filter", normalize_expression(self.filter))
        if self.join_filter is not None:
            force_setattr(self, "join_filter", normalize_expression(self.join_filter))
        if self.hash_cond is not None:
            force_setattr(self, "hash_cond", normalize_expression(self.hash_cond))
        if self.merge_cond is not None:
            force_setattr(self, "merge_cond", normalize_expression(self.merge_cond))
        if self.one_time_filter is not None:
            force_setattr(self, "one_time_filter", normalize_expression(self.one_time_filter))
        if self.order_by is not None:
            force_setattr(self, "order_by", normalize_expression(self.order_by))
        if self.cache_key is not None:
            force_setattr(self, "cache_key", normalize_expression(self.cache_key))
        if self.sort_key is not None:
            force_setattr(self, "sort_key", _keys(self.sort_key))
        if self.presorted_key is not None:
            force_setattr(self, "presorted_key", _keys(self.presorted_key))
        if self.group_key is not None:
            force_setattr(self, "group_key", _keys(self.group_key))
        if self.schema is not None and self.schema.startswith("pg_temp_"):
            # A session's temp schema number changes from one connection to the next.
            force_setattr(self, "schema", "pg_temp")


NodeT = TypeVar("NodeT", bound=PlanNode)


class Explain(msgspec.Struct, Generic[NodeT], gc=False):
    """One EXPLAIN result, or an auto_explain log entry ("Query Text" + "Plan"), read as far as its
    top node of type `NodeT` (`PlanNode`, or a subclass reading more of the top node)."""

    plan: NodeT = field(name="Plan")


# EXPLAIN prints a one-element array; auto_explain and some tools print the object.
ExplainDecoder: TypeAlias = msgspec.json.Decoder[list[Explain[NodeT]] | Explain[NodeT]]
_DECODER: Final[ExplainDecoder[PlanNode]] = msgspec.json.Decoder(list[Explain[PlanNode]] | Explain[PlanNode])
_NODE_DECODER: Final = msgspec.json.Decoder(PlanNode)


def decode_top_node(decoder: ExplainDecoder[NodeT], plan_text: str | bytes) -> NodeT:
    """The top node of EXPLAIN JSON text, decoded by `decoder`; raises `PlanParseError`."""
    try:
        decoded = decoder.decode(plan_text)
    except msgspec.ValidationError as exc:
        raise PlanParseError(f"not an EXPLAIN JSON plan: {exc}") from None
    except msgspec.DecodeError as exc:
        raise PlanParseError(f"plan text is not valid JSON: {exc}") from None
    except RecursionError:
        raise PlanParseError("plan is nested too deeply to decode") from None
    except UnicodeError as exc:  # lone surrogates in a str cannot be UTF-8 encoded
        raise PlanParseError(f"plan text is not valid UTF-8: {exc}") from None
    if isinstance(decoded, Explain):
        return decoded.plan
    if len(decoded) != 1:
        raise PlanParseError(f"EXPLAIN output must hold exactly one plan, found {len(decoded)}")
    return decoded[0].plan


def normalize_plan(plan_text: str | bytes) -> PlanNode:
    """Decode EXPLAIN JSON text into its normalized plan tree.

    Raises `PlanParseError` for anything that is not an EXPLAIN JSON plan.
    """
    return decode_top_node(_DECODER, plan_text)


def load_normalized(normalized: str | bytes) -> PlanNode:
    """Decode a normalized tree as stored in the plan catalog (`normalized_json` output)."""
    try:
        return _NODE_DECODER.decode(normalized)
    except (msgspec.DecodeError, RecursionError, UnicodeError) as exc:
        raise PlanParseError(f"not a normalized plan: {exc}") from None


def iter_nodes(root: PlanNode) -> Iterator[tuple[str, PlanNode]]:
    """Nodes in pre-order with their dotted path ("0", "0.1", "0.1.0", ...).

    Iterative, so the deepest plan msgspec can decode never hits the recursion limit.
    """
    stack: list[tuple[str, PlanNode]] = [("0", root)]
    while stack:
        path, node = stack.pop()
        yield path, node
        for index in range(len(node.plans) - 1, -1, -1):
            stack.append((f"{path}.{index}", node.plans[index]))


# --- human labels ---------------------------------------------------------------

_JOINS: Final = frozenset({"Nested Loop", "Hash Join", "Merge Join"})
_AGGREGATE_NAMES: Final = {"Hashed": "HashAggregate", "Sorted": "GroupAggregate", "Mixed": "MixedAggregate"}
_SETOP_NAMES: Final = {"Hashed": "HashSetOp", "Sorted": "SetOp"}
_SUMMARY_SCANS: Final = 8


def scan_target(node: PlanNode) -> str | None:
    """What a node reads, as text EXPLAIN names it after "on" (None for inner nodes)."""
    if node.relation_name is not None:
        return f"{node.schema}.{node.relation_name}" if node.schema else node.relation_name
    if node.cte_name is not None:
        return node.cte_name
    if node.function_name is not None:
        return node.function_name
    if node.node_type == "Bitmap Index Scan":
        return node.index_name
    return node.alias


def node_label(node: PlanNode) -> str:
    """One node as text EXPLAIN prints it, e.g. "Index Scan using t_pkey on t a"."""
    kind = node.node_type
    if kind in _JOINS and node.join_type not in (None, "Inner"):
        name = f"Nested Loop {node.join_type} Join" if kind == "Nested Loop" else f"{kind[:-5]} {node.join_type} Join"
    elif kind == "Aggregate":
        name = _AGGREGATE_NAMES.get(node.strategy or "", "Aggregate")
        if node.partial_mode in ("Partial", "Finalize"):
            name = f"{node.partial_mode} {name}"
    elif kind == "SetOp":
        name = _SETOP_NAMES.get(node.strategy or "", "SetOp")
    elif kind == "ModifyTable" and node.operation:
        name = node.operation
    else:
        name = kind
    if node.parallel_aware:
        name = f"Parallel {name}"
    if node.scan_direction == "Backward":
        name = f"{name} Backward"
    if node.index_name is not None and kind != "Bitmap Index Scan":
        name = f"{name} using {node.index_name}"
    target = scan_target(node)
    if target is not None:
        name = f"{name} on {target}"
        if node.alias is not None and node.alias not in (target, node.relation_name):
            name = f"{name} {node.alias}"
    return name


def summarize(root: PlanNode) -> str:
    """One line: the chain of single-child nodes from the root, then the scans below.

    e.g. "Hash Join → Seq Scan on pgbench_accounts a, Seq Scan on pgbench_history h".
    """
    head: list[str] = []
    node = root
    while True:
        head.append(node_label(node))
        if len(node.plans) != 1 or scan_target(node) is not None:
            break
        node = node.plans[0]
    scans = [
        node_label(n)
        for _, n in iter_nodes(node)
        if n is not node and scan_target(n) is not None and n.node_type != "Bitmap Index Scan"
    ]
    if len(scans) > _SUMMARY_SCANS:  # an Append over hundreds of partitions stays one line
        scans[_SUMMARY_SCANS:] = [f"… {len(scans) - _SUMMARY_SCANS} more"]
    line = " → ".join(head)
    return f"{line} → {', '.join(scans)}" if scans else line


def plan_summary(plan_text: str | bytes) -> str:
    """`summarize` of the plan in `plan_text`; raises `PlanParseError` like `normalize_plan`."""
    return summarize(normalize_plan(plan_text))
