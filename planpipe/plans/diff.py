"""Node-level differences between a baseline plan and a new plan.

Nodes are aligned with a constrained tree edit distance (Zhang 1996): the
cheapest set of relabels, insertions and deletions that turns the baseline tree
into the new one while keeping parent/child and sibling order. Relabel costs are
tuned so that a node is only ever "changed" into a node reading the same table
(Index Scan on t → Seq Scan on t) or into another inner node (Nested Loop → Hash
Join); everything else is an insertion or deletion. A scan removed in one place
and added in another (a different join order) is then reported as moved.

Plans are small (tens of nodes), so the O(n·m) alignment is cheap; very large or
very deep plans fall back to a positional comparison that cannot recurse deeply.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

import msgspec

from planpipe.plans.fingerprint import fingerprint_node
from planpipe.plans.normalize import PlanNode, iter_nodes, node_label, normalize_plan, scan_target, summarize

__all__ = ["ChangeKind", "NodeChange", "PlanDiff", "diff_nodes", "diff_plans"]

ChangeKind = Literal["added", "removed", "changed"]

# Above these sizes the exact alignment is skipped (n·m table, recursion depth).
_MAX_PAIRS: Final = 40_000
_MAX_DEPTH: Final = 64

_INSERT: Final = 1.0
_DELETE: Final = 1.0
_SAME_KIND: Final = 0.5  # same node type on the same object: a key or condition changed
_OTHER_METHOD: Final = 1.0  # another access or join method for the same thing
_NEVER: Final = 2.5  # dearer than delete + insert, so never chosen
_JOINS: Final = frozenset({"Nested Loop", "Hash Join", "Merge Join"})
_KIND_ORDER: Final = {"removed": 0, "changed": 1, "added": 2}  # at one path: what went, then what came
_FIELD_NAMES: Final = dict(zip(PlanNode.__struct_fields__, PlanNode.__struct_encode_fields__, strict=True))


class NodeChange(msgspec.Struct, frozen=True, kw_only=True):
    """One node added, removed or changed between the baseline and the new plan."""

    kind: ChangeKind
    # Dotted position ("0" is the root, "0.1" its second child) in the new plan;
    # in the baseline plan for removed nodes.
    path: str
    before: str | None  # baseline node as text EXPLAIN names it; None when added
    after: str | None  # new node; None when removed
    description: str
    baseline_path: str | None = None  # where a changed node was in the baseline
    details: tuple[str, ...] = ()  # field-level differences of a changed node
    # The same positions as people read them: "Aggregate › Gather › Seq Scan on orders".
    label_path: str = ""
    baseline_label_path: str | None = None


class PlanDiff(msgspec.Struct, kw_only=True):
    """All node changes from the baseline plan to the new one; empty when they are the same plan."""

    baseline_fingerprint: str
    new_fingerprint: str
    baseline_summary: str
    new_summary: str
    changes: list[NodeChange]

    @property
    def identical(self) -> bool:
        return not self.changes

    def to_markdown(self) -> str:
        """A markdown list for Dagster metadata and the CLI."""
        if not self.changes:
            return f"No plan changes (fingerprint {_code(self.baseline_fingerprint)})."
        count = len(self.changes)
        lines = [
            f"**{count} node change{'s' if count != 1 else ''}**",
            "",
            f"- baseline {_code(self.baseline_fingerprint[:12])}: {_code(self.baseline_summary)}",
            f"- new {_code(self.new_fingerprint[:12])}: {_code(self.new_summary)}",
            "",
        ]
        for change in self.changes:
            if change.kind == "added":
                text = f"{_code(change.after or '')} added"
            elif change.kind == "removed":
                text = f"{_code(change.before or '')} removed"
            elif change.before == change.after:
                text = _code(change.after or "")
            else:
                text = f"{_code(change.before or '')} → {_code(change.after or '')}"
            where = change.label_path or change.path
            if change.baseline_label_path is not None and change.baseline_path != change.path:
                where = f"{change.baseline_label_path} → {where}"
            where = _code(where)
            lines.append(f"- **{change.kind}** at {where}: {text}")
            lines.extend(f"  - {_code(detail)}" for detail in change.details)
        return "\n".join(lines)


def _code(text: str) -> str:
    # Conditions may hold backticks; a longer fence keeps the span intact.
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


@dataclass
class _Tree:
    nodes: list[PlanNode] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    children: list[list[int]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    own: list[PlanNode] = field(default_factory=list)  # node without its children
    targets: list[tuple[str | None, str | None]] = field(default_factory=list)
    depth: int = 0


def _flatten(root: PlanNode) -> _Tree:
    tree = _Tree()
    index_of: dict[str, int] = {}
    for path, node in iter_nodes(root):
        index = len(tree.nodes)
        index_of[path] = index
        parent = index_of[path.rpartition(".")[0]] if "." in path else -1
        tree.nodes.append(node)
        tree.paths.append(path)
        tree.parents.append(parent)
        tree.children.append([])
        tree.sizes.append(1)
        tree.own.append(msgspec.structs.replace(node, plans=()))
        target = scan_target(node)
        tree.targets.append((target, node.alias) if target is not None else (None, None))
        tree.depth = max(tree.depth, path.count("."))
        if parent >= 0:
            tree.children[parent].append(index)
    # Pre-order puts every descendant after its node: one backward pass sums sizes.
    for index in range(len(tree.nodes) - 1, 0, -1):
        tree.sizes[tree.parents[index]] += tree.sizes[index]
    return tree


def _relabel_cost(a: _Tree, i: int, b: _Tree, j: int) -> float:
    if a.own[i] == b.own[j]:
        return 0.0
    if a.targets[i] != b.targets[j]:
        return _NEVER
    x, y = a.nodes[i], b.nodes[j]
    if x.node_type == y.node_type:
        return _SAME_KIND
    if a.targets[i][0] is not None or (x.node_type in _JOINS) == (y.node_type in _JOINS):
        return _OTHER_METHOD
    return _NEVER


# Alignment choices, kept for backtracking.
_TreeChoice = tuple[str, int]  # ("same"|"map", -1) or ("insert"|"delete", child index)
_AlignOp = tuple[str, int, int]  # ("map"|"delete"|"insert", baseline index, new index)
_ForestChoice = list[_AlignOp] | tuple[str, int]  # an alignment, or ("insert"|"delete", child)


class _Aligner:
    """Constrained tree edit distance with backtracking, memoized on node pairs."""

    def __init__(self, a: _Tree, b: _Tree) -> None:
        self.a, self.b = a, b
        self.tree_memo: dict[tuple[int, int], tuple[float, _TreeChoice]] = {}
        self.forest_memo: dict[tuple[int, int], tuple[float, _ForestChoice]] = {}
        self.mapped: list[tuple[int, int]] = []
        self.deleted: list[int] = []
        self.inserted: list[int] = []

    def tree(self, i: int, j: int) -> float:
        memo = self.tree_memo.get((i, j))
        if memo is not None:
            return memo[0]
        a, b = self.a, self.b
        if a.nodes[i] == b.nodes[j]:
            result: tuple[float, _TreeChoice] = (0.0, ("same", -1))
        else:
            result = (self.forest(i, j) + _relabel_cost(a, i, b, j), ("map", -1))
            for k in b.children[j]:  # j is new; i lives on inside one of its children
                cost = (b.sizes[j] - b.sizes[k]) * _INSERT + self.tree(i, k)
                if cost < result[0]:
                    result = (cost, ("insert", k))
            for k in a.children[i]:  # i is gone; one of its children maps to j
                cost = (a.sizes[i] - a.sizes[k]) * _DELETE + self.tree(k, j)
                if cost < result[0]:
                    result = (cost, ("delete", k))
        self.tree_memo[(i, j)] = result
        return result[0]

    def forest(self, i: int, j: int) -> float:
        memo = self.forest_memo.get((i, j))
        if memo is not None:
            return memo[0]
        a, b = self.a, self.b
        ci, cj = a.children[i], b.children[j]
        best_cost, alignment = self._align(ci, cj)
        best_choice: _ForestChoice = alignment
        for k in cj:  # a new inner node adopts all of i's children
            cost = (b.sizes[j] - b.sizes[k]) * _INSERT + self.forest(i, k)
            if cost < best_cost:
                best_cost, best_choice = cost, ("insert", k)
        for k in ci:  # a removed inner node hands its children to j
            cost = (a.sizes[i] - a.sizes[k]) * _DELETE + self.forest(k, j)
            if cost < best_cost:
                best_cost, best_choice = cost, ("delete", k)
        self.forest_memo[(i, j)] = (best_cost, best_choice)
        return best_cost

    def _align(self, ci: list[int], cj: list[int]) -> tuple[float, list[_AlignOp]]:
        # Sequence edit distance over the two child lists, whole subtrees as units.
        a, b = self.a, self.b
        rows, cols = len(ci) + 1, len(cj) + 1
        table = [[0.0] * cols for _ in range(rows)]
        for r in range(1, rows):
            table[r][0] = table[r - 1][0] + a.sizes[ci[r - 1]] * _DELETE
        for c in range(1, cols):
            table[0][c] = table[0][c - 1] + b.sizes[cj[c - 1]] * _INSERT
        for r in range(1, rows):
            for c in range(1, cols):
                table[r][c] = min(
                    table[r - 1][c - 1] + self.tree(ci[r - 1], cj[c - 1]),
                    table[r - 1][c] + a.sizes[ci[r - 1]] * _DELETE,
                    table[r][c - 1] + b.sizes[cj[c - 1]] * _INSERT,
                )
        ops: list[_AlignOp] = []
        r, c = rows - 1, cols - 1
        while r > 0 or c > 0:
            if r > 0 and c > 0 and table[r][c] == table[r - 1][c - 1] + self.tree(ci[r - 1], cj[c - 1]):
                ops.append(("map", ci[r - 1], cj[c - 1]))
                r, c = r - 1, c - 1
            elif r > 0 and table[r][c] == table[r - 1][c] + a.sizes[ci[r - 1]] * _DELETE:
                ops.append(("delete", ci[r - 1], -1))
                r -= 1
            else:
                ops.append(("insert", -1, cj[c - 1]))
                c -= 1
        ops.reverse()
        return table[rows - 1][cols - 1], ops

    # --- backtracking -------------------------------------------------------

    def emit_tree(self, i: int, j: int) -> None:
        self.tree(i, j)
        kind, k = self.tree_memo[(i, j)][1]
        a, b = self.a, self.b
        if kind == "same":
            # Equal subtrees have equal shapes: pre-order positions correspond.
            self.mapped.extend(zip(range(i, i + a.sizes[i]), range(j, j + b.sizes[j]), strict=True))
        elif kind == "map":
            self.mapped.append((i, j))
            self.emit_forest(i, j)
        elif kind == "insert":
            self._insert_except(j, j, k)
            self.emit_tree(i, k)
        else:
            self._delete_except(i, i, k)
            self.emit_tree(k, j)

    def emit_forest(self, i: int, j: int) -> None:
        self.forest(i, j)
        choice = self.forest_memo[(i, j)][1]
        if isinstance(choice, list):
            for op, x, y in choice:
                if op == "map":
                    self.emit_tree(x, y)
                elif op == "delete":
                    self.deleted.extend(range(x, x + self.a.sizes[x]))
                else:
                    self.inserted.extend(range(y, y + self.b.sizes[y]))
            return
        # i and j are mapped by the caller; the new (or removed) node is their child k.
        kind, k = choice
        if kind == "insert":
            self._insert_except(k, j, k)
            self.emit_forest(i, k)
        else:
            self._delete_except(k, i, k)
            self.emit_forest(k, j)

    def _insert_except(self, node: int, parent: int, keep: int) -> None:
        # `node` and every subtree under `parent` but `keep` are new.
        self.inserted.append(node)
        for child in self.b.children[parent]:
            if child != keep:
                self.inserted.extend(range(child, child + self.b.sizes[child]))

    def _delete_except(self, node: int, parent: int, keep: int) -> None:
        self.deleted.append(node)
        for child in self.a.children[parent]:
            if child != keep:
                self.deleted.extend(range(child, child + self.a.sizes[child]))


def _align_by_position(a: _Tree, b: _Tree) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    # For plans too large or deep for the exact alignment: children paired by index.
    mapped: list[tuple[int, int]] = []
    deleted: list[int] = []
    inserted: list[int] = []
    stack = [(0, 0)]
    while stack:
        i, j = stack.pop()
        if _relabel_cost(a, i, b, j) >= _NEVER:  # as in the exact alignment: never a "change"
            deleted.extend(range(i, i + a.sizes[i]))
            inserted.extend(range(j, j + b.sizes[j]))
            continue
        mapped.append((i, j))
        ci, cj = a.children[i], b.children[j]
        stack.extend(zip(ci, cj, strict=False))
        for x in ci[len(cj) :]:
            deleted.extend(range(x, x + a.sizes[x]))
        for y in cj[len(ci) :]:
            inserted.extend(range(y, y + b.sizes[y]))
    return mapped, deleted, inserted


def _details(before: PlanNode, after: PlanNode) -> tuple[str, ...]:
    out: list[str] = []
    for name in PlanNode.__struct_fields__:
        if name in ("node_type", "plans"):
            continue
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            out.append(f"{_FIELD_NAMES[name]}: {_show(old)} → {_show(new)}")
    return tuple(out)


def _show(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, tuple):
        return ", ".join(_show(v) for v in value) or "()"
    if isinstance(value, msgspec.Struct):
        return msgspec.json.encode(value).decode()
    return str(value)


def _path_key(path: str) -> tuple[int, ...]:
    return tuple(int(part) for part in path.split("."))


def _label_path(tree: _Tree, index: int) -> str:
    """The node's labels from the root down to it."""
    labels = []
    while index >= 0:
        labels.append(node_label(tree.nodes[index]))
        index = tree.parents[index]
    return " › ".join(reversed(labels))


def _placement(tree: _Tree, index: int) -> str:
    parent = tree.parents[index]
    return f"under {node_label(tree.nodes[parent])}" if parent >= 0 else "as the root"


def _changes(
    a: _Tree, b: _Tree, mapped: Iterable[tuple[int, int]], deleted: list[int], inserted: list[int]
) -> list[NodeChange]:
    changes: list[NodeChange] = []
    for i, j in mapped:
        if a.own[i] == b.own[j]:
            continue
        before, after = node_label(a.nodes[i]), node_label(b.nodes[j])
        details = _details(a.own[i], b.own[j])
        description = f"{before} → {after}" if before != after else f"{after}: {'; '.join(details)}"
        changes.append(
            NodeChange(
                kind="changed",
                path=b.paths[j],
                baseline_path=a.paths[i],
                label_path=_label_path(b, j),
                baseline_label_path=_label_path(a, i),
                before=before,
                after=after,
                description=description,
                details=details,
            )
        )
    # A scan deleted in one place and inserted in another reads the same table in
    # another position (join order) or with another method: report it as one change.
    added = sorted(set(inserted))
    for i in sorted(set(deleted)):
        target = a.targets[i]
        match = next((j for j in added if target[0] is not None and b.targets[j] == target), None)
        if match is None:
            label = node_label(a.nodes[i])
            changes.append(
                NodeChange(
                    kind="removed",
                    path=a.paths[i],
                    label_path=_label_path(a, i),
                    before=label,
                    after=None,
                    description=f"removed {label} {_placement(a, i).replace('under', 'from under')}",
                )
            )
            continue
        added.remove(match)
        before, after = node_label(a.nodes[i]), node_label(b.nodes[match])
        details = _details(a.own[i], b.own[match])
        moved = f" (moved {a.paths[i]} → {b.paths[match]})"
        description = f"{before} → {after}{moved}" if before != after else f"{after}{moved}"
        changes.append(
            NodeChange(
                kind="changed",
                path=b.paths[match],
                baseline_path=a.paths[i],
                label_path=_label_path(b, match),
                baseline_label_path=_label_path(a, i),
                before=before,
                after=after,
                description=description,
                details=details,
            )
        )
    for j in added:
        label = node_label(b.nodes[j])
        changes.append(
            NodeChange(
                kind="added",
                path=b.paths[j],
                label_path=_label_path(b, j),
                before=None,
                after=label,
                description=f"added {label} {_placement(b, j)}",
            )
        )
    changes.sort(key=lambda change: (_path_key(change.path), _KIND_ORDER[change.kind]))
    return changes


def diff_nodes(baseline: PlanNode, new: PlanNode) -> PlanDiff:
    """Compare two normalized trees (e.g. one decoded from the plan catalog)."""
    baseline_fp, new_fp = fingerprint_node(baseline), fingerprint_node(new)
    changes: list[NodeChange] = []
    if baseline_fp != new_fp:
        a, b = _flatten(baseline), _flatten(new)
        if len(a.nodes) * len(b.nodes) <= _MAX_PAIRS and a.depth + b.depth <= _MAX_DEPTH:
            aligner = _Aligner(a, b)
            aligner.emit_tree(0, 0)
            mapped, deleted, inserted = aligner.mapped, aligner.deleted, aligner.inserted
        else:
            mapped, deleted, inserted = _align_by_position(a, b)
        changes = _changes(a, b, mapped, deleted, inserted)
    return PlanDiff(
        baseline_fingerprint=baseline_fp,
        new_fingerprint=new_fp,
        baseline_summary=summarize(baseline),
        new_summary=summarize(new),
        changes=changes,
    )


def diff_plans(baseline_text: str | bytes, new_text: str | bytes) -> PlanDiff:
    """Compare two EXPLAIN JSON plans; raises `PlanParseError` if either is unparseable."""
    return diff_nodes(normalize_plan(baseline_text), normalize_plan(new_text))
