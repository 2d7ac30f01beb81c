"""Kafka message keys: `{priority}:{query_hash}`, built by the router, parsed by ingest."""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from planpipe.contract import PRIORITIES, Priority

_PRIORITY_BY_NAME: Final[Mapping[str, Priority]] = MappingProxyType({p: p for p in PRIORITIES})


def message_key(priority: Priority, query_hash: str) -> bytes:
    """Kafka key `{priority}:{query_hash}`; one query always lands on one partition per priority."""
    return f"{priority}:{query_hash}".encode()


def parse_message_key(key: bytes) -> tuple[Priority, str]:
    """Inverse of `message_key`. Raises ValueError for anything it could not have produced."""
    try:
        text = bytes(key).decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"message key is not UTF-8: {key!r}") from error
    # Priority names contain no ':', so the first ':' is the separator even when
    # the query hash itself contains colons.
    name, sep, query_hash = text.partition(":")
    priority = _PRIORITY_BY_NAME.get(name)
    if not sep or priority is None or not query_hash:
        raise ValueError(f"not a '{{priority}}:{{query_hash}}' message key: {key!r}")
    return priority, query_hash
