"""Real plans for the benchmark: a small generated schema, varied queries, live EXPLAIN ANALYZE.

The schema is TPC-H-like (regions → nations → customers/suppliers, parts,
partsupp, orders, lineitem) and small enough that a whole capture takes a few
seconds. Query *shapes* come from templates crossed with options (projection,
optional predicates, ordering); each shape is a distinct statement for
PostgreSQL's query identifier, the value capture agents use as `query_hash`.
Each shape is then executed with several sets of constants, so one query hash
usually has one plan and sometimes two or three (a selective constant picks an
index, an unselective one a sequential scan), as in a real fleet.

Plans are captured the way `planpipe.capture.explain` does: the server's JSON
text verbatim (pretty-printed), `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` in a
read-only transaction, the identifier from an extra `EXPLAIN (VERBOSE)`.
"""

import itertools
import math
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import msgspec.structs
import psycopg
from psycopg.types.string import TextBinaryLoader, TextLoader

from planpipe.contract import Envelope, encode_envelope

SCHEMA: Final = "planpipe_bench"
# Bump when the generated data changes: an existing schema of another version is rebuilt.
SCHEMA_VERSION: Final = 1

_DDL: Final = f"""
CREATE SCHEMA {SCHEMA};
CREATE TABLE {SCHEMA}.schema_version (version int NOT NULL);
CREATE TABLE {SCHEMA}.regions (rid int PRIMARY KEY, name text NOT NULL);
CREATE TABLE {SCHEMA}.nations (nid int PRIMARY KEY, rid int NOT NULL REFERENCES {SCHEMA}.regions, name text NOT NULL);
CREATE TABLE {SCHEMA}.customers (
    cid int PRIMARY KEY, nid int NOT NULL REFERENCES {SCHEMA}.nations, name text NOT NULL,
    segment text NOT NULL, balance numeric(12,2) NOT NULL);
CREATE TABLE {SCHEMA}.suppliers (
    sid int PRIMARY KEY, nid int NOT NULL REFERENCES {SCHEMA}.nations, name text NOT NULL,
    balance numeric(12,2) NOT NULL);
CREATE TABLE {SCHEMA}.parts (
    pid int PRIMARY KEY, brand text NOT NULL, ptype text NOT NULL, size int NOT NULL,
    price numeric(12,2) NOT NULL);
CREATE TABLE {SCHEMA}.partsupp (
    pid int NOT NULL REFERENCES {SCHEMA}.parts, sid int NOT NULL REFERENCES {SCHEMA}.suppliers,
    qty int NOT NULL, cost numeric(12,2) NOT NULL, PRIMARY KEY (pid, sid));
CREATE TABLE {SCHEMA}.orders (
    oid int PRIMARY KEY, cid int NOT NULL REFERENCES {SCHEMA}.customers, status char(1) NOT NULL,
    total numeric(12,2) NOT NULL, odate date NOT NULL, opriority text NOT NULL);
CREATE TABLE {SCHEMA}.lineitem (
    oid int NOT NULL REFERENCES {SCHEMA}.orders, lno int NOT NULL, pid int NOT NULL, sid int NOT NULL,
    qty int NOT NULL, price numeric(12,2) NOT NULL, discount numeric(4,2) NOT NULL, shipdate date NOT NULL,
    PRIMARY KEY (oid, lno));
INSERT INTO {SCHEMA}.regions SELECT g, (ARRAY['AFRICA','AMERICA','ASIA','EUROPE','MIDDLE EAST'])[g]
    FROM generate_series(1, 5) g;
INSERT INTO {SCHEMA}.nations SELECT g, 1 + g % 5, 'NATION' || g FROM generate_series(1, 25) g;
INSERT INTO {SCHEMA}.customers SELECT g, 1 + (g * 7) % 25, 'Customer#' || g,
    (ARRAY['AUTOMOBILE','BUILDING','FURNITURE','HOUSEHOLD','MACHINERY'])[1 + g % 5],
    ((g * 7919) % 10000) / 1.7 - 999 FROM generate_series(1, 3000) g;
INSERT INTO {SCHEMA}.suppliers SELECT g, 1 + (g * 3) % 25, 'Supplier#' || g, ((g * 104729) % 10000) / 1.3
    FROM generate_series(1, 200) g;
INSERT INTO {SCHEMA}.parts SELECT g, 'Brand#' || (1 + g % 25),
    (ARRAY['STEEL','BRASS','COPPER','TIN','NICKEL'])[1 + g % 5], 1 + g % 50, 900 + (g % 1000) / 10.0
    FROM generate_series(1, 2000) g;
INSERT INTO {SCHEMA}.partsupp SELECT p, 1 + (p * 13 + k * 50) % 200, (p * k) % 9999, 1 + (p * k % 1000) / 10.0
    FROM generate_series(1, 2000) p, generate_series(1, 4) k;
INSERT INTO {SCHEMA}.orders SELECT g, 1 + (g * 37) % 3000, (ARRAY['F','O','P'])[1 + g % 3],
    ((g * 7919) % 50000) / 3.0, date '2023-01-01' + (g * 13) % 730,
    (ARRAY['1-URGENT','2-HIGH','3-MEDIUM','4-NOT SPECIFIED','5-LOW'])[1 + g % 5]
    FROM generate_series(1, 15000) g;
INSERT INTO {SCHEMA}.lineitem SELECT o, l, 1 + (o * 31 + l * 7) % 2000,
    1 + (((o * 31 + l * 7) % 2000) * 13 + l * 50) % 200, 1 + (o + l) % 50, 100 + (o * l) % 9000,
    ((o + l) % 10) / 100.0, date '2023-01-01' + (o * 13 + l * 3) % 760
    FROM generate_series(1, 15000) o, generate_series(1, 3) l;
CREATE INDEX ON {SCHEMA}.customers (nid);
CREATE INDEX ON {SCHEMA}.suppliers (nid);
CREATE INDEX ON {SCHEMA}.parts (brand);
CREATE INDEX ON {SCHEMA}.orders (cid);
CREATE INDEX ON {SCHEMA}.orders (odate);
CREATE INDEX ON {SCHEMA}.lineitem (pid);
CREATE INDEX ON {SCHEMA}.lineitem (shipdate);
ANALYZE {SCHEMA}.regions, {SCHEMA}.nations, {SCHEMA}.customers, {SCHEMA}.suppliers, {SCHEMA}.parts,
        {SCHEMA}.partsupp, {SCHEMA}.orders, {SCHEMA}.lineitem;
INSERT INTO {SCHEMA}.schema_version VALUES ({SCHEMA_VERSION});
"""


def ensure_schema(dsn: str) -> bool:
    """Create (or rebuild, when its version differs) the workload schema. Returns whether it was built."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            row = conn.execute(f"SELECT version FROM {SCHEMA}.schema_version").fetchone()
        except psycopg.errors.UndefinedTable:
            row = None
        if row is not None and row[0] == SCHEMA_VERSION:
            return False
        with conn.transaction():
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            for statement in _DDL.split(";\n"):
                if statement.strip():
                    conn.execute(statement)
        return True


# --- query shapes ----------------------------------------------------------------------------

S = SCHEMA
Constants = Callable[[random.Random], dict[str, object]]


def _date(rng: random.Random, lo: int = 0, hi: int = 700) -> str:
    day = rng.randint(lo, hi)
    return f"{2023 + day // 365}-{1 + (day % 365) // 31:02d}-{1 + (day % 365) % 28:02d}"


@dataclass(frozen=True)
class Template:
    """SQL with `{proj}`, `{extra}`, `{tail}` option slots and `{name}` constants."""

    name: str
    sql: str
    projections: tuple[str, ...]
    extras: tuple[str, ...]
    tails: tuple[str, ...]
    constants: Constants

    def shapes(self) -> Iterator[str]:
        for proj, extra, tail in itertools.product(self.projections, ("", *self.extras), self.tails):
            yield self.sql.replace("{proj}", proj).replace("{extra}", extra).replace("{tail}", tail)


_REGIONS: Final = ("AFRICA", "AMERICA", "ASIA", "EUROPE", "MIDDLE EAST")
_SEGMENTS: Final = ("AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY")


def _common(rng: random.Random) -> dict[str, object]:
    return {
        "cid": rng.randint(1, 3000),
        "nid": rng.randint(1, 25),
        "pid": rng.randint(1, 2000),
        "size": rng.randint(1, 50),
        "qty": rng.choice((5, 20, 45)),
        "limit": rng.choice((10, 20, 50, 100)),
        "bal": rng.choice((-500, 0, 2000, 5000)),
        "brand": f"Brand#{rng.randint(1, 25)}",
        "region": rng.choice(_REGIONS),
        "segment": rng.choice(_SEGMENTS),
        "status": rng.choice("FOP"),
        "d1": _date(rng, 0, 360),
        "d2": _date(rng, 370, 720),
        # Unselective or selective: the same query gets different plans.
        "span": rng.choice((3, 30, 400)),
        "oid_lo": rng.randint(1, 14000),
    }


TEMPLATES: Final[tuple[Template, ...]] = (
    Template(
        "point",
        f"SELECT {{proj}} FROM {S}.customers c WHERE c.cid = {{cid}}{{extra}}{{tail}}",
        ("*", "c.name, c.balance", "c.cid, c.segment", "count(*)"),
        (" AND c.balance > {bal}", " AND c.segment = '{segment}'"),
        ("",),
        _common,
    ),
    Template(
        "range",
        f"SELECT {{proj}} FROM {S}.orders o "
        f"WHERE o.odate BETWEEN date '{{d1}}' AND date '{{d1}}' + {{span}}{{extra}}{{tail}}",
        ("count(*)", "sum(o.total), avg(o.total)", "o.status, count(*)"),
        (" AND o.status = '{status}'", " AND o.total > {bal}"),
        ("", " GROUP BY 1 ORDER BY 1"),
        _common,
    ),
    Template(
        "join2",
        f"SELECT {{proj}} FROM {S}.customers c JOIN {S}.orders o ON o.cid = c.cid "
        f"WHERE c.nid = {{nid}}{{extra}}{{tail}}",
        ("c.name, o.oid, o.total", "c.cid, o.odate", "o.*"),
        (" AND o.status = '{status}'", " AND o.odate > date '{d1}'", " AND c.segment = '{segment}'"),
        (" ORDER BY o.total DESC LIMIT {limit}", ""),
        _common,
    ),
    Template(
        "join3_group",
        f"SELECT n.name, {{proj}} FROM {S}.nations n JOIN {S}.customers c ON c.nid = n.nid "
        f"JOIN {S}.orders o ON o.cid = c.cid WHERE o.odate >= date '{{d1}}'{{extra}} GROUP BY n.name{{tail}}",
        ("count(*)", "sum(o.total)", "sum(o.total), count(DISTINCT c.cid)"),
        (" AND o.status = '{status}'", " AND c.balance > {bal}"),
        (" ORDER BY 2 DESC", " ORDER BY 1"),
        _common,
    ),
    Template(
        "local_supplier_volume",  # TPC-H Q5
        f"SELECT n.name, {{proj}} FROM {S}.customers c JOIN {S}.orders o ON o.cid = c.cid "
        f"JOIN {S}.lineitem l ON l.oid = o.oid JOIN {S}.suppliers s ON s.sid = l.sid "
        f"JOIN {S}.nations n ON n.nid = s.nid JOIN {S}.regions r ON r.rid = n.rid "
        f"WHERE r.name = '{{region}}' AND o.odate >= date '{{d1}}' AND o.odate < date '{{d1}}' + {{span}}{{extra}} "
        f"GROUP BY n.name{{tail}}",
        ("sum(l.price * (1 - l.discount)) AS revenue", "count(*) AS lines, sum(l.qty)"),
        (" AND c.nid = s.nid", " AND c.segment = '{segment}'"),
        (" ORDER BY 2 DESC", ""),
        _common,
    ),
    Template(
        "shipping_priority",  # TPC-H Q3
        f"SELECT l.oid, {{proj}}, o.odate FROM {S}.customers c JOIN {S}.orders o ON o.cid = c.cid "
        f"JOIN {S}.lineitem l ON l.oid = o.oid WHERE c.segment = '{{segment}}' AND o.odate < date '{{d2}}' "
        f"AND l.shipdate > date '{{d1}}'{{extra}} GROUP BY l.oid, o.odate ORDER BY 2 DESC, o.odate{{tail}}",
        ("sum(l.price * (1 - l.discount)) AS revenue", "sum(l.qty) AS q"),
        (" AND o.status = '{status}'", " AND l.qty > {qty}"),
        (" LIMIT {limit}", ""),
        _common,
    ),
    Template(
        "exists",
        f"SELECT {{proj}} FROM {S}.orders o WHERE EXISTS (SELECT 1 FROM {S}.lineitem l WHERE l.oid = o.oid "
        f"AND l.qty > {{qty}}{{extra}}) AND o.odate < date '{{d1}}' + {{span}}{{tail}}",
        ("o.oid, o.total", "count(*)", "o.opriority, o.status"),
        (" AND l.shipdate > date '{d1}'", " AND l.discount > 0.05"),
        ("", " ORDER BY 1 LIMIT {limit}"),
        _common,
    ),
    Template(
        "in_subquery",
        f"SELECT {{proj}} FROM {S}.parts p WHERE p.size = {{size}} AND p.pid IN (SELECT ps.pid FROM {S}.partsupp ps "
        f"JOIN {S}.suppliers s ON s.sid = ps.sid WHERE s.nid = {{nid}}{{extra}}){{tail}}",
        ("p.pid, p.brand", "count(*)", "p.ptype, min(p.price)"),
        (" AND ps.qty > 100", " AND s.balance > {bal}"),
        ("", " ORDER BY 1"),
        _common,
    ),
    Template(
        "cte_window",
        f"WITH t AS (SELECT o.cid, sum(o.total) AS tot FROM {S}.orders o WHERE o.odate >= date '{{d1}}'{{extra}} "
        f"GROUP BY o.cid) SELECT c.name, t.tot, {{proj}} FROM t JOIN {S}.customers c ON c.cid = t.cid "
        f"ORDER BY t.tot DESC{{tail}}",
        ("rank() OVER (PARTITION BY c.nid ORDER BY t.tot DESC)", "sum(t.tot) OVER (PARTITION BY c.segment)"),
        (" AND o.status = '{status}'", " AND o.total > {bal}"),
        (" LIMIT {limit}", ""),
        _common,
    ),
    Template(
        "lateral_topn",
        f"SELECT c.cid, {{proj}} FROM {S}.customers c CROSS JOIN LATERAL (SELECT o.oid, o.total FROM {S}.orders o "
        f"WHERE o.cid = c.cid{{extra}} ORDER BY o.total DESC LIMIT 3) x WHERE c.nid = {{nid}}{{tail}}",
        ("x.oid, x.total", "sum(x.total)"),
        (" AND o.status = '{status}'", " AND o.odate > date '{d1}'"),
        ("", " GROUP BY c.cid"),
        _common,
    ),
    Template(
        "union",
        f"SELECT 'orders' AS src, {{proj}} FROM {S}.orders o WHERE o.status = '{{status}}'{{extra}} "
        f"UNION ALL SELECT 'lines', {{proj}} FROM {S}.lineitem o WHERE o.shipdate > date '{{d1}}'{{tail}}",
        ("count(*)", "count(*), max(o.oid)"),
        (" AND o.odate > date '{d1}'", " AND o.total > {bal}"),
        ("", " AND o.qty > {qty}"),
        _common,
    ),
    Template(
        "having",
        f"SELECT l.pid, {{proj}} FROM {S}.lineitem l JOIN {S}.parts p ON p.pid = l.pid WHERE p.brand = '{{brand}}'"
        f"{{extra}} GROUP BY l.pid HAVING sum(l.qty) > {{qty}}{{tail}}",
        ("sum(l.qty)", "sum(l.qty), avg(l.price)", "count(*)"),
        (" AND l.shipdate > date '{d1}'", " AND p.size < {size}"),
        (" ORDER BY 2 DESC", ""),
        _common,
    ),
    Template(
        "anti_join",
        f"SELECT {{proj}} FROM {S}.customers c WHERE NOT EXISTS (SELECT 1 FROM {S}.orders o WHERE o.cid = c.cid "
        f"AND o.odate > date '{{d2}}'{{extra}}) AND c.balance > {{bal}}{{tail}}",
        ("c.cid", "count(*)", "c.segment, count(*)"),
        (" AND o.status = '{status}'",),
        ("", " GROUP BY 1"),
        _common,
    ),
    Template(
        "product_profit",  # TPC-H Q9
        f"SELECT n.name, extract(year FROM o.odate) AS y, {{proj}} FROM {S}.parts p "
        f"JOIN {S}.lineitem l ON l.pid = p.pid JOIN {S}.partsupp ps ON ps.pid = l.pid AND ps.sid = l.sid "
        f"JOIN {S}.suppliers s ON s.sid = l.sid JOIN {S}.nations n ON n.nid = s.nid "
        f"JOIN {S}.orders o ON o.oid = l.oid WHERE p.brand = '{{brand}}'{{extra}} GROUP BY 1, 2{{tail}}",
        ("sum(l.price * (1 - l.discount) - ps.cost * l.qty) AS profit", "count(*)"),
        (" AND o.status = '{status}'", " AND p.size > {size}"),
        (" ORDER BY 1, 2 DESC", ""),
        _common,
    ),
    Template(
        "oid_range_join",
        f"SELECT {{proj}} FROM {S}.orders o JOIN {S}.lineitem l ON l.oid = o.oid "
        f"WHERE o.oid BETWEEN {{oid_lo}} AND {{oid_lo}} + {{span}}{{extra}}{{tail}}",
        ("o.oid, l.lno, l.price", "count(*), sum(l.price)", "l.pid, l.qty"),
        (" AND l.qty > {qty}", " AND o.status = '{status}'"),
        ("", " ORDER BY 1 DESC LIMIT {limit}"),
        _common,
    ),
)


def shapes(seed: int = 11) -> Iterator[tuple[str, str]]:
    """(template name, SQL with constants as `{…}`) for every shape, round-robin over the templates.

    Some option combinations are not valid SQL (an aggregate beside an ungrouped
    column, say); the capture skips them.
    """
    rng = random.Random(seed)
    pools = []
    for template in TEMPLATES:
        pool = [(template.name, sql) for sql in template.shapes()]
        rng.shuffle(pool)
        pools.append(pool)
    for round_ in range(max(len(pool) for pool in pools)):
        for pool in pools:
            if round_ < len(pool):
                yield pool[round_]


# --- capture ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedPlan:
    query_hash: str
    template: str
    query_text: str
    plan_text: str
    actual_rows: int
    execution_ms: float


def _connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    conn = psycopg.connect(dsn, autocommit=True, application_name="planpipe-bench-capture")
    # The server's JSON text verbatim (pretty-printed), like the capture agent.
    conn.adapters.register_loader("json", TextLoader)
    conn.adapters.register_loader("json", TextBinaryLoader)
    return conn


def _explain(conn: psycopg.Connection[Any], options: str, sql: str) -> str:
    row = conn.execute(f"EXPLAIN ({options}) {sql}", prepare=False, binary=True).fetchone()
    assert row is not None and isinstance(row[0], str)
    return row[0]


def capture(
    dsn: str, query_hashes: int = 120, variants: int = 3, seed: int = 11, *, compact: bool = True
) -> list[CapturedPlan]:
    """Capture `query_hashes` shapes, each with `variants` constant sets, under EXPLAIN ANALYZE.

    `compact`: plan text re-serialized without whitespace (key order kept), as the
    runbook's producer does (`orjson.dumps(plan_payload)`); else the server's
    pretty-printed text verbatim, as `planpipe capture` publishes it (about twice
    the size).
    """
    rng = random.Random(seed)
    plans: list[CapturedPlan] = []
    seen: set[str] = set()
    with _connect(dsn) as conn:
        conn.execute("SET compute_query_id = on")
        for template_name, shape in shapes(seed):
            if len(seen) >= query_hashes:
                break
            try:
                captured = [
                    _capture_one(conn, template_name, shape.format(**_common(rng)), compact) for _ in range(variants)
                ]
            except psycopg.errors.Error:
                continue  # not valid SQL for this option combination
            if captured[0].query_hash in seen:
                continue
            seen.add(captured[0].query_hash)
            plans += captured
    return plans


def _capture_one(conn: psycopg.Connection[Any], template_name: str, sql: str, compact: bool) -> CapturedPlan:
    conn.execute("BEGIN READ ONLY")
    try:
        verbose = msgspec.json.decode(_explain(conn, "VERBOSE, FORMAT JSON", sql))
        plan_text = _explain(conn, "ANALYZE, BUFFERS, FORMAT JSON", sql)
    finally:
        conn.execute("ROLLBACK")
    decoded = msgspec.json.decode(plan_text)
    if compact:
        plan_text = msgspec.json.encode(decoded).decode()
    entry = decoded[0]
    top = entry["Plan"]
    return CapturedPlan(
        query_hash=str(verbose[0]["Query Identifier"]),
        template=template_name,
        query_text=sql,
        plan_text=plan_text,
        actual_rows=max(0, round(float(top["Actual Rows"]) * float(top.get("Actual Loops", 1)))),
        execution_ms=float(entry["Execution Time"]),
    )


# --- envelopes -------------------------------------------------------------------------------


class EnvelopeFactory:
    """Envelopes built from the captured plans, drawn so that their mean size is `target_bytes`.

    Each plan's weight is `exp(λ · size)` (exponential tilting of a uniform draw):
    λ = 0 when the plain mean is already the target, positive to favour the big
    join plans, negative to favour the small ones. The target is clamped to the
    sizes that were captured.
    """

    def __init__(
        self,
        plans: list[CapturedPlan],
        target_bytes: float,
        clusters: list[str],
        seed: int = 5,
        *,
        jitter_plan_times: bool = True,
    ) -> None:
        if not plans:
            raise ValueError("no captured plans")
        self.plans = plans
        self.clusters = clusters
        self.jitter_plan_times = jitter_plan_times
        self._rng = random.Random(seed)
        self.sizes = [len(self._encode(p, clusters[0], 1.0, 0, "0" * 16, 1.0)) for p in plans]
        self.lam = _tilt(self.sizes, target_bytes)
        weights = _weights(self.sizes, self.lam)
        total = sum(weights)
        self.expected_mean_bytes = sum(w * s for w, s in zip(weights, self.sizes, strict=True)) / total
        self._cum = list(itertools.accumulate(weights))
        self._base_ts = 0.0

    @staticmethod
    def _encode(
        plan: CapturedPlan, cluster: str, executed_at: float, rows: int, trace: str, published_at: float
    ) -> bytes:
        return encode_envelope(_envelope(plan, cluster, executed_at, rows, plan.execution_ms, trace, published_at))

    def draw(self) -> CapturedPlan:
        return self._rng.choices(self.plans, cum_weights=self._cum)[0]

    def make(self, i: int, executed_at: float, published_at: float, trace_prefix: str = "t") -> tuple[bytes, bytes]:
        """(key, value) of envelope number `i`: a drawn plan, jittered timing, a trace id."""
        plan = self.draw()
        jitter = self._rng.lognormvariate(0.0, 0.25)
        envelope = _envelope(
            plan,
            self.clusters[i % len(self.clusters)],
            executed_at,
            plan.actual_rows,
            round(plan.execution_ms * jitter, 3),
            f"{trace_prefix}-{i:09d}",
            published_at,
        )
        if self.jitter_plan_times:
            # Every execution reports its own timings: no two plan texts are byte-identical
            # (as in a real fleet), which keeps Kafka's zstd ratio and any caching honest.
            envelope = msgspec.structs.replace(
                envelope, plan_text=_TIMES.sub(lambda m: _scaled(m, jitter), plan.plan_text)
            )
        return f"standard:{plan.query_hash}".encode(), encode_envelope(envelope)


_TIMES: Final = re.compile(r'("(?:Actual Startup Time|Actual Total Time|Planning Time|Execution Time)": ?)([0-9.]+)')


def _scaled(match: re.Match[str], factor: float) -> str:
    return f"{match.group(1)}{float(match.group(2)) * factor:.3f}"


def _envelope(
    plan: CapturedPlan, cluster: str, executed_at: float, rows: int, ms: float, trace: str, published_at: float
) -> Envelope:
    return Envelope(
        query_hash=plan.query_hash,
        execution_timestamp=executed_at,
        cluster_id=cluster,
        plan_text=plan.plan_text,
        actual_rows=rows,
        total_time_ms=ms,
        query_type="SELECT",
        query_text=plan.query_text,
        trace_id=trace,
        published_at=published_at,
    )


def _tilt(sizes: list[int], target: float) -> float:
    """λ such that the exp(λ·size)-weighted mean of `sizes` is `target` (bisection; clamped)."""

    def mean(lam: float) -> float:
        weights = _weights(sizes, lam)
        return sum(w * s for w, s in zip(weights, sizes, strict=True)) / sum(weights)

    lo, hi = -0.01, 0.01
    if target <= mean(lo):
        return lo
    if target >= mean(hi):
        return hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if mean(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _weights(sizes: list[int], lam: float) -> list[float]:
    peak = max(lam * s for s in sizes)
    return [math.exp(lam * s - peak) for s in sizes]
