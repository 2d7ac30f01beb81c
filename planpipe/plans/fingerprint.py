"""Stable plan fingerprints: a digest of the canonical JSON of the normalized tree.

`fingerprint == blake2b(normalized_json, digest_size=16, person=FINGERPRINT_PERSON)`,
so anyone holding a plan-catalog row can recompute and check its key. Python's
`hash()` is salted per process and is never used.
"""

import hashlib
from typing import Final

import msgspec

from planpipe.plans.normalize import PlanNode, PlanParseError, normalize_plan, summarize
from planpipe.plans.work import NO_WORK, PlanWork, read_work

__all__ = [
    "FINGERPRINT_PERSON",
    "FINGERPRINT_VERSION",
    "PlanIdentity",
    "PlanNode",
    "PlanParseError",
    "canonical_json",
    "fingerprint",
    "fingerprint_and_work",
    "fingerprint_node",
    "identify_plan",
    "normalized_json",
]

# Bump both when PlanNode's fields or the normalization rules change: old and new
# fingerprints of one plan must never be compared as if they were the same scheme.
FINGERPRINT_VERSION: Final = 1
FINGERPRINT_PERSON: Final = b"planpipe-plan-v1"  # blake2b personalization, <= 16 bytes

_ENCODER: Final = msgspec.json.Encoder()
# Copying a keyed template is twice as fast as parsing digest_size/person each call.
_HASH_TEMPLATE: Final = hashlib.blake2b(digest_size=16, person=FINGERPRINT_PERSON)


class PlanIdentity(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the plan catalog stores about a plan, from a single decode."""

    fingerprint: str
    normalized_json: str
    root: PlanNode

    @property
    def summary(self) -> str:
        # Computed on demand: the catalog needs it only for a fingerprint it has not seen.
        return summarize(self.root)


def canonical_json(node: PlanNode) -> bytes:
    """Compact JSON, fields in declaration order, defaults omitted: one encoding per tree."""
    try:
        return _ENCODER.encode(node)
    except RecursionError:
        raise PlanParseError("plan is nested too deeply to encode") from None


def _digest(canonical: bytes) -> str:
    digest = _HASH_TEMPLATE.copy()
    digest.update(canonical)
    return digest.hexdigest()


def fingerprint_node(node: PlanNode) -> str:
    """32 hex digits identifying the normalized tree `node`."""
    return _digest(canonical_json(node))


def fingerprint(plan_text: str | bytes) -> str:
    """Fingerprint of the plan in EXPLAIN JSON text; raises `PlanParseError`."""
    return _digest(canonical_json(normalize_plan(plan_text)))


def fingerprint_and_work(plan_text: str | bytes) -> tuple[str, PlanWork]:
    """`(fingerprint(plan_text), plan_work(plan_text))` from one decode (the ingest path).

    Raises `PlanParseError` when `fingerprint` would. Work fields of odd types fail the
    combined decode but not the fingerprint's: the plan is then kept with its work unknown.
    """
    try:
        top = read_work(plan_text)
    except PlanParseError:
        return fingerprint(plan_text), NO_WORK
    work = top.take_work()  # clears the work fields: `top` now encodes as its PlanNode
    return _digest(canonical_json(top)), work


def normalized_json(plan_text: str | bytes) -> str:
    """Canonical JSON of the normalized tree, as stored in `plan_catalog.normalized_plan`."""
    return canonical_json(normalize_plan(plan_text)).decode()


def identify_plan(plan_text: str | bytes) -> PlanIdentity:
    """Fingerprint, normalized JSON and tree of one plan from a single decode (the ingest path)."""
    root = normalize_plan(plan_text)
    canonical = canonical_json(root)
    return PlanIdentity(fingerprint=_digest(canonical), normalized_json=canonical.decode(), root=root)
