"""Dead-letter records: the original bytes untouched, the reason and the source in headers.

Used at both boundaries that can reject: the router (capture side) and the
ingest engine (consumer side). The replay job reads the same headers back.
"""

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from planpipe.contract import Reason

# Header names and helpers are shared vocabulary; re-exported for the modules that write dead letters.
from planpipe.messaging.headers import H_DETAIL as H_DETAIL
from planpipe.messaging.headers import H_FIELD as H_FIELD
from planpipe.messaging.headers import H_ORIGINAL_SHA256 as H_ORIGINAL_SHA256
from planpipe.messaging.headers import H_ORIGINAL_SIZE as H_ORIGINAL_SIZE
from planpipe.messaging.headers import H_REASON as H_REASON
from planpipe.messaging.headers import H_REJECTED_AT as H_REJECTED_AT
from planpipe.messaging.headers import H_SOURCE_FILE as H_SOURCE_FILE
from planpipe.messaging.headers import H_SOURCE_OFFSET as H_SOURCE_OFFSET
from planpipe.messaging.headers import H_SOURCE_PARTITION as H_SOURCE_PARTITION
from planpipe.messaging.headers import H_SOURCE_TOPIC as H_SOURCE_TOPIC
from planpipe.messaging.headers import H_STAGE as H_STAGE
from planpipe.messaging.headers import H_TRACE_ID as H_TRACE_ID
from planpipe.messaging.headers import H_TRUNCATED as H_TRUNCATED
from planpipe.messaging.headers import OWN_PREFIX, Headers
from planpipe.messaging.headers import AnyHeaders as AnyHeaders
from planpipe.messaging.headers import as_header_list as as_header_list
from planpipe.messaging.headers import header_map as header_map


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
        headers: Headers = [(name, value) for name, value in self.original_headers if not name.startswith(OWN_PREFIX)]
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
