"""Kafka header names planpipe writes and reads, and the helpers that normalise headers.

Written by the router and the ingest engine on dead letters (`planpipe.dlq`), by the
publisher on routed records, by the DLQ replay on republished records; read back by the
replay job and the tests. Every name in one place, so no two sides spell one differently.
"""

from collections.abc import Sequence
from typing import Final

# Dead letters (`planpipe.dlq.DeadLetter`).
H_REASON: Final = "planpipe-reason"
H_FIELD: Final = "planpipe-field"
H_DETAIL: Final = "planpipe-detail"
H_STAGE: Final = "planpipe-stage"
H_SOURCE_TOPIC: Final = "planpipe-source-topic"
H_SOURCE_PARTITION: Final = "planpipe-source-partition"
H_SOURCE_OFFSET: Final = "planpipe-source-offset"
H_SOURCE_FILE: Final = "planpipe-source-file"
H_REJECTED_AT: Final = "planpipe-rejected-at"
H_TRACE_ID: Final = "trace-id"
H_CORRECTION_RULE: Final = "planpipe-correction-rule"
# A reject too large for the DLQ travels truncated; these say so and identify the original.
H_TRUNCATED: Final = "planpipe-truncated"
H_ORIGINAL_SIZE: Final = "planpipe-original-size"
H_ORIGINAL_SHA256: Final = "planpipe-original-sha256"

# Routed records (`routing.publish`).
H_ROUTE: Final = "planpipe-route"
# dlq.DeadLetter has a source-file field but no line; the line rides beside it.
H_SOURCE_LINE: Final = "planpipe-source-line"

# Records the DLQ replay republished (the source ones reuse the dead-letter names).
H_DLQ_TOPIC: Final = "planpipe-dlq-topic"
H_DLQ_PARTITION: Final = "planpipe-dlq-partition"
H_DLQ_OFFSET: Final = "planpipe-dlq-offset"
H_REPLAY_REASON: Final = "planpipe-replay-reason"
H_REPLAYED_AT: Final = "planpipe-replayed-at"

# planpipe's own headers start with this; a record passed on drops the old ones.
OWN_PREFIX: Final = "planpipe-"

Headers = list[tuple[str, bytes]]
# What confluent-kafka hands back or accepts: a list of pairs or a dict, str or bytes values.
HeaderValue = str | bytes | None
AnyHeaders = list[tuple[str, HeaderValue]] | dict[str, HeaderValue] | None


def as_header_list(headers: AnyHeaders) -> Headers:
    if not headers:
        return []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [(name, value.encode() if isinstance(value, str) else (value or b"")) for name, value in pairs]


def header_map(headers: AnyHeaders | Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """Last value wins; values decoded leniently (headers are diagnostics, not data)."""
    pairs = as_header_list(headers if isinstance(headers, dict) else list(headers or ()))
    return {name: value.decode(errors="replace") for name, value in pairs}
