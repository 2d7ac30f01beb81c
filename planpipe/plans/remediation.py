"""What an engineer can do about a regression, derived from the two plans.

* the indexes the baseline plan used and the new plan does not (with their definition
  when the capture agent recorded it: `planpipe.indexes` next to the plan, see
  `planpipe.capture.explain`);
* statistics to refresh: relations whose row estimates missed by 10× or more;
* a `pg_hint_plan` hint forcing the baseline plan's scan methods, join methods and join
  order (PostgreSQL's way to "force the last good plan", as Query Store and
  apg_plan_mgmt do). The hint is parsed back and checked against the baseline plan;
  it is offered as validated only when every directive matches it.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from planpipe.plans.normalize import PlanNode, PlanParseError, normalize_plan

__all__ = ["Hint", "Remediation", "hint_for", "parse_hint", "remediation_for", "validate_hint"]

_SCANS: Final = {
    "Seq Scan": "SeqScan",
    "Index Scan": "IndexScan",
    "Index Only Scan": "IndexOnlyScan",
    "Bitmap Heap Scan": "BitmapScan",
    "Tid Scan": "TidScan",
}
_JOINS: Final = {"Nested Loop": "NestLoop", "Hash Join": "HashJoin", "Merge Join": "MergeJoin"}
_ESTIMATE_MISS: Final = 10.0


@dataclass(frozen=True)
class Hint:
    text: str
    validated: bool
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Remediation:
    missing_indexes: tuple[dict[str, str | None], ...] = ()
    statistics: tuple[dict[str, str], ...] = ()
    hint: Hint | None = None
    notes: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {
            "missing_indexes": list(self.missing_indexes),
            "statistics": list(self.statistics),
            "hint": None
            if self.hint is None
            else {"text": self.hint.text, "validated": self.hint.validated, "problems": list(self.hint.problems)},
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        out = []
        for index in self.missing_indexes:
            definition = index.get("definition") or "definition not captured"
            out.append(f"index `{index['name']}` used by the baseline plan is not used any more: {definition}")
        out += [f"refresh statistics: `{s['sql']}` ({s['reason']})" for s in self.statistics]
        if self.hint is not None:
            state = "validated against the baseline plan" if self.hint.validated else "NOT validated"
            out.append(f"force the baseline plan with pg_hint_plan ({state}): `{self.hint.text}`")
        out += list(self.notes)
        return out


# --- pg_hint_plan -------------------------------------------------------------------


def _name(node: PlanNode) -> str | None:
    return node.alias or node.relation_name


def _directives(node: PlanNode) -> tuple[list[tuple[str, tuple[str, ...]]], Any]:
    """Scan and join directives under `node`, and its join tree (an alias, or a pair of trees)."""
    directives: list[tuple[str, tuple[str, ...]]] = []
    kind = node.node_type
    if kind in _SCANS and _name(node) is not None:
        alias = _name(node)
        assert alias is not None
        index = [] if kind in ("Seq Scan", "Tid Scan") else [_index_of(node)]
        directives.append((_SCANS[kind], (alias, *[i for i in index if i])))
        return directives, alias
    trees = []
    for child in node.plans:
        if child.parent_relationship in ("SubPlan", "InitPlan"):
            continue
        sub, tree = _directives(child)
        directives += sub
        if tree is not None:
            trees.append(tree)
    if kind in _JOINS and len(trees) == 2:
        tree = (trees[0], trees[1])
        directives.append((_JOINS[kind], tuple(sorted(_leaves(tree)))))
        return directives, tree
    if len(trees) == 1:
        return directives, trees[0]
    return directives, None  # several inputs (Append, ...) or none: no join order to force


def _index_of(node: PlanNode) -> str | None:
    if node.index_name is not None:
        return node.index_name
    for child in node.plans:  # Bitmap Heap Scan → its Bitmap Index Scan(s)
        if child.index_name is not None:
            return child.index_name
    return None


def _leaves(tree: Any) -> list[str]:
    return [tree] if isinstance(tree, str) else [*_leaves(tree[0]), *_leaves(tree[1])]


def _leading(tree: Any) -> str:
    return tree if isinstance(tree, str) else f"({_leading(tree[0])} {_leading(tree[1])})"


def hint_for(baseline: PlanNode) -> str:
    """The pg_hint_plan comment forcing the baseline plan's scans, joins and join order."""
    directives, tree = _directives(baseline)
    parts = [f"{method}({' '.join(args)})" for method, args in directives]
    if tree is not None and not isinstance(tree, str):
        parts.append(f"Leading({_leading(tree)})")
    return "/*+ " + " ".join(parts) + " */" if parts else ""


_METHOD: Final = re.compile(r"\s*(\w+)\(")


def _split_directives(body: str) -> list[tuple[str, str]]:
    """`Name(args)` directives, args with balanced parentheses (Leading nests them)."""
    out, position = [], 0
    while body[position:].strip():
        match = _METHOD.match(body, position)
        if match is None:
            raise ValueError(f"unexpected text in hint: {body[position:].strip()[:40]!r}")
        depth, cursor = 1, match.end()
        while depth:
            if cursor >= len(body):
                raise ValueError("unbalanced parentheses in hint")
            depth += {"(": 1, ")": -1}.get(body[cursor], 0)
            cursor += 1
        out.append((match.group(1), body[match.end() : cursor - 1]))
        position = cursor
    return out


def parse_hint(text: str) -> tuple[list[tuple[str, tuple[str, ...]]], Any]:
    """The directives of a hint comment and its Leading join tree (None without one)."""
    body = text.strip()
    if not (body.startswith("/*+") and body.endswith("*/")):
        raise ValueError("a pg_hint_plan hint is a /*+ ... */ comment")
    body = body[3:-2]
    directives: list[tuple[str, tuple[str, ...]]] = []
    leading: Any = None
    for method, args in _split_directives(body):
        if method == "Leading":
            leading = _parse_tree(args.strip())
        else:
            directives.append((method, tuple(args.split())))
    return directives, leading


def _parse_tree(text: str) -> Any:
    tokens = re.findall(r"\(|\)|[^\s()]+", text)
    position = 0

    def read() -> Any:
        nonlocal position
        token = tokens[position]
        position += 1
        if token != "(":
            return token
        left, right = read(), read()
        if tokens[position] != ")":
            raise ValueError("Leading pairs hold exactly two sides")
        position += 1
        return (left, right)

    tree = read()
    if position != len(tokens):
        raise ValueError("trailing text in Leading")
    return tree


def validate_hint(text: str, baseline: PlanNode) -> tuple[str, ...]:
    """Problems found parsing the hint back against the baseline plan (none: it forces it)."""
    try:
        directives, leading = parse_hint(text)
    except (ValueError, IndexError) as error:
        return (f"unparseable hint: {error}",)
    expected, tree = _directives(baseline)
    problems = []
    for directive in directives:
        method, args = directive
        if method in _JOINS.values():
            if (method, tuple(sorted(args))) not in expected:
                problems.append(f"{method}({' '.join(args)}) is no join of the baseline plan")
        elif directive not in expected:
            problems.append(f"{method}({' '.join(args)}) is no scan of the baseline plan")
    missing = set(expected) - {(m, tuple(sorted(a)) if m in _JOINS.values() else a) for m, a in directives}
    problems += [f"baseline {m}({' '.join(a)}) is not forced" for m, a in sorted(missing)]
    if tree is not None and not isinstance(tree, str) and leading != tree:
        problems.append("Leading does not give the baseline plan's join order")
    aliases = [a for m, args in expected if m in _SCANS.values() for a in args[:1]]
    if len(aliases) != len(set(aliases)):
        problems.append("an alias appears twice in the plan (self-join or subquery): hints cannot tell them apart")
    return tuple(problems)


# --- the whole remediation ------------------------------------------------------------


def _indexes(node: PlanNode) -> dict[str, str]:
    """index name → the relation it serves."""
    found: dict[str, str] = {}
    stack: list[tuple[PlanNode, str | None]] = [(node, None)]
    while stack:
        current, parent_rel = stack.pop()
        relation = current.relation_name or parent_rel
        if current.index_name is not None:
            found[current.index_name] = relation or "?"
        stack += [(child, relation) for child in current.plans]
    return found


def _estimate_misses(plan_text: str) -> list[dict[str, str]]:
    """Scans whose row estimate missed the actual rows by ≥ 10× (per loop)."""
    try:
        doc = json.loads(plan_text)
    except ValueError:
        return []
    root = doc[0] if isinstance(doc, list) and doc else doc
    stack = [root.get("Plan", {})] if isinstance(root, dict) else []
    out: dict[str, dict[str, str]] = {}
    while stack:
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        stack += node.get("Plans", [])
        relation, estimate, actual = node.get("Relation Name"), node.get("Plan Rows"), node.get("Actual Rows")
        if relation is None or not isinstance(estimate, int | float) or not isinstance(actual, int | float):
            continue
        miss = max(estimate, 1) / max(actual, 1)
        if miss >= _ESTIMATE_MISS or 1 / miss >= _ESTIMATE_MISS:
            name = f"{node['Schema']}.{relation}" if node.get("Schema") else str(relation)
            out[name] = {
                "table": name,
                "sql": f"ANALYZE {name}",
                "reason": f"estimated {estimate:g} rows, {actual:g} actual",
            }
    return list(out.values())


def remediation_for(
    kind: str, baseline_text: str | None, new_text: str | None, definitions: Mapping[str, str] | None = None
) -> Remediation:
    """What to do about a finding of `kind`, from its baseline and new plan texts."""
    if kind in ("plan_flip_improvement", "cluster_slowdown") or baseline_text is None:
        return Remediation()
    try:
        baseline = normalize_plan(baseline_text)
        new = normalize_plan(new_text) if new_text is not None else baseline
    except PlanParseError as error:
        return Remediation(notes=(f"no remediation: {error}",))
    known = dict(definitions or {})
    known |= captured_index_definitions(baseline_text)
    if new_text is not None:
        known |= captured_index_definitions(new_text)
    if kind == "same_plan_slower":
        stats = tuple(_estimate_misses(new_text or baseline_text))
        notes = ("same plan doing more work: check data growth, bloat (VACUUM) and statistics",)
        return Remediation(statistics=stats, notes=notes)
    before, after = _indexes(baseline), _indexes(new)
    missing = tuple(
        {"name": name, "table": table, "definition": known.get(name)}
        for name, table in sorted(before.items())
        if name not in after
    )
    text = hint_for(baseline)
    problems = validate_hint(text, baseline) if text else ()
    hint = Hint(text, validated=not problems, problems=problems) if text else None
    return Remediation(missing_indexes=missing, statistics=tuple(_estimate_misses(new_text or "")), hint=hint)


def captured_index_definitions(plan_text: str) -> dict[str, str]:
    """Index definitions the capture agent put next to the plan (`"planpipe": {"indexes": {...}}`)."""
    try:
        doc = json.loads(plan_text)
    except ValueError:
        return {}
    root = doc[0] if isinstance(doc, list) and doc else doc
    extra = root.get("planpipe") if isinstance(root, dict) else None
    indexes = extra.get("indexes") if isinstance(extra, dict) else None
    if not isinstance(indexes, dict):
        return {}
    return {str(k): str(v) for k, v in indexes.items()}
