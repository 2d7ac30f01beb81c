"""Dead-letter records: the original bytes untouched, the reason and the source in headers.

Used at both boundaries that can reject: the router (capture side) and the
ingest engine (consumer side). The replay job reads the same headers back.
"""

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from planpipe.contract import Reason

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

Headers = list[tuple[str, bytes]]
# What confluent-kafka hands back or accepts: a list of pairs or a dict, str or bytes values.
HeaderValue = str | bytes | None
AnyHeaders = list[tuple[str, HeaderValue]] | dict[str, HeaderValue] | None


def as_header_list(headers: AnyHeaders) -> Headers:
    if not headers:
        return []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [(name, value.encode() if isinstance(value, str) else (value or b"")) for name, value in pairs]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    value: bytes
    key: bytes | None
    reason: Reason
    field: str | None
    detail: str
    stage: str  # "router" or "ingest"
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    source_file: str | None = None
    original_headers: Sequence[tuple[str, bytes]] = ()  # normalized with as_header_list

    def headers(self) -> Headers:
        headers: Headers = [(name, value) for name, value in self.original_headers if not name.startswith("planpipe-")]
        headers += [
            (H_REASON, self.reason.value.encode()),
            (H_DETAIL, self.detail[:1024].encode(errors="replace")),
            (H_STAGE, self.stage.encode()),
            (H_REJECTED_AT, f"{time.time():.6f}".encode()),
        ]
        if self.field:
            headers.append((H_FIELD, self.field.encode()))
        if self.source_topic is not None:
            headers.append((H_SOURCE_TOPIC, self.source_topic.encode()))
        if self.source_partition is not None:
            headers.append((H_SOURCE_PARTITION, str(self.source_partition).encode()))
        if self.source_offset is not None:
            headers.append((H_SOURCE_OFFSET, str(self.source_offset).encode()))
        if self.source_file is not None:
            headers.append((H_SOURCE_FILE, self.source_file.encode()))
        return headers


def fit_value(value: bytes, limit: int) -> tuple[bytes, Headers]:
    """`value` unchanged when it fits `limit` bytes; else its first `limit` bytes and headers
    saying it was truncated, with the original size and sha256 (what was lost is identified)."""
    if len(value) <= limit:
        return value, []
    return value[:limit], [
        (H_TRUNCATED, b"1"),
        (H_ORIGINAL_SIZE, str(len(value)).encode()),
        (H_ORIGINAL_SHA256, hashlib.sha256(value).hexdigest().encode()),
    ]


def header_map(headers: AnyHeaders | Sequence[tuple[str, bytes]]) -> dict[str, str]:
    """Last value wins; values decoded leniently (headers are diagnostics, not data)."""
    pairs = as_header_list(headers if isinstance(headers, dict) else list(headers or ()))
    return {name: value.decode(errors="replace") for name, value in pairs}
