"""auto_explain entries of server logs → envelopes: formats, framing, parsing.

auto_explain (with `auto_explain.log_format = json`) logs one message per plan:
`duration: 12.345 ms  plan:\\n{"Query Text": …, "Plan": {…}}`. The three
destinations frame that message differently:

* jsonlog: one JSON object per line; `message` holds the text, `query_id` the
  statement's query identifier (0 when not computed).
* csvlog: one CSV record per entry; the quoted `message` field (column 14)
  spans several lines; `query_id` is column 26 (PostgreSQL 14+).
* stderr: `<log_line_prefix>LOG:  duration: … ms  plan:` and then the plan, each
  continuation line indented by one tab. The timestamp is taken from the
  prefix (`%m`, `%t` or `%n`); there is no query id.

Envelope fields, the same rules as `explain.py` where they apply:

* `query_hash`: the plan's own "Query Identifier" (present with
  `auto_explain.log_verbose`; exact even for nested statements), else the
  entry's nonzero `query_id` (the top-level statement's), else the
  normalized-text sha256 of "Query Text" (`sqltext.text_hash`).
* `execution_timestamp`: the entry's log timestamp (when the plan was logged,
  i.e. when the statement finished); the reading time if the prefix has none.
* `total_time_ms`: the logged duration. `actual_rows`: top node "Actual Rows" ×
  "Actual Loops" (0 without `auto_explain.log_analyze`).
* `plan_text`: `[` + the logged plan JSON, verbatim + `]` — the same one-element
  array shape `EXPLAIN (FORMAT JSON)` prints, with auto_explain's extra "Query
  Text" key inside.

Following files (rotation, the persisted cursor) is `planpipe.capture.reader`.
"""

import csv
import enum
import io
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from typing import Any, Final

import msgspec

from planpipe import tracing
from planpipe.capture.explain import query_identifier, top_plan_rows
from planpipe.capture.sqltext import classify, strip_explain, text_hash
from planpipe.contract import Envelope
from planpipe.errors import PlanpipeError


class LogFormat(enum.StrEnum):
    JSONLOG = "jsonlog"
    CSVLOG = "csvlog"
    STDERR = "stderr"


# PostgreSQL names csvlog/jsonlog files by replacing a `.log` suffix (or appending).
SUFFIXES: Final = {LogFormat.JSONLOG: ".json", LogFormat.CSVLOG: ".csv", LogFormat.STDERR: ".log"}

_CSV_MESSAGE: Final = 13  # 0-based csvlog columns
_CSV_QUERY_ID: Final = 25

# ---------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------

_TIMESTAMP = re.compile(
    r"(?P<ts>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:\.\d+)?)"
    r"(?:\s?(?P<tz>[+-]\d{2}(?::?\d{2})?|[A-Za-z][A-Za-z0-9_/+-]*))?"
)
_EPOCH = re.compile(r"(?<![\d.])(?P<epoch>\d{9,11}\.\d{3})(?![\d.])")  # %n
UTC_NAMES: Final = frozenset({"UTC", "GMT", "Z", "UCT", "ZULU"})


def _zone(name: str | None, fallback: tzinfo) -> tzinfo:
    if not name:
        return fallback
    if name.upper() in UTC_NAMES:
        return UTC
    if name[0] in "+-":
        digits = name[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
        offset = timedelta(hours=hours, minutes=minutes)
        return timezone(-offset if name[0] == "-" else offset)
    # An abbreviation such as CEST or PDT does not name one offset; log_timezone decides.
    return fallback


def parse_log_timestamp(text: str, fallback_tz: tzinfo = UTC) -> float | None:
    """Epoch seconds from a log timestamp (`%m`/`%t` with zone, or `%n`); None if there is none."""
    if (m := _TIMESTAMP.search(text)) is not None:
        naive = datetime.fromisoformat(m.group("ts").replace(" ", "T"))
        return naive.replace(tzinfo=_zone(m.group("tz"), fallback_tz)).timestamp()
    if (m := _EPOCH.search(text)) is not None:
        return float(m.group("epoch"))
    return None


# ---------------------------------------------------------------------------
# Framing: which byte ranges of a chunk are complete entries
# ---------------------------------------------------------------------------


def _frame_lines(data: bytes) -> list[tuple[int, int]]:
    entries: list[tuple[int, int]] = []
    start = 0
    while (nl := data.find(b"\n", start)) >= 0:
        entries.append((start, nl + 1))
        start = nl + 1
    return entries


def _frame_csv(data: bytes) -> list[tuple[int, int]]:
    # A record ends at a newline outside quotes; `""` toggles twice, so parity suffices.
    entries: list[tuple[int, int]] = []
    start = pos = quotes = 0
    while (nl := data.find(b"\n", pos)) >= 0:
        quotes += data.count(b'"', pos, nl)
        pos = nl + 1
        if quotes % 2 == 0:
            entries.append((start, pos))
            start, quotes = pos, 0
    return entries


def _frame_stderr(data: bytes, final: bool, fallback_tz: tzinfo) -> list[tuple[int, int]]:
    entries: list[tuple[int, int]] = []
    start = pos = 0
    n = len(data)
    while (nl := data.find(b"\n", pos)) >= 0:
        pos = nl + 1
        if pos < n:
            if data[pos] != 0x09:  # a line that is not a tab continuation starts a new entry
                entries.append((start, pos))
                start = pos
            continue
        # The chunk ends on this entry: more continuation lines may still come.
        if final or _stderr_plan_complete(data[start:pos], fallback_tz):
            entries.append((start, pos))
        break
    return entries


def frame(data: bytes, fmt: LogFormat, *, final: bool, fallback_tz: tzinfo = UTC) -> list[tuple[int, int]]:
    """Complete entries in `data` (which starts at an entry boundary), as (start, end) offsets.

    `final` says the file will not grow any more (it was rotated out).
    """
    if fmt is LogFormat.JSONLOG:
        return _frame_lines(data)
    if fmt is LogFormat.CSVLOG:
        return _frame_csv(data)
    return _frame_stderr(data, final, fallback_tz)


# ---------------------------------------------------------------------------
# Entry parsing
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogEntry:
    timestamp: float | None
    message: str
    query_id: int | None = None


class _JsonLogLine(msgspec.Struct):
    message: str = ""
    timestamp: str | None = None
    query_id: int | None = None


_jsonlog_decoder = msgspec.json.Decoder(_JsonLogLine)
_STDERR_PLAN_HEAD = re.compile(r"^(?P<prefix>.*?)[A-Z][A-Z0-9]*:  (?P<msg>duration: \d+(?:\.\d+)? ms  plan:)$")
_PLAN_MESSAGE = re.compile(r"duration: (?P<ms>\d+(?:\.\d+)?) ms  plan:\n(?P<plan>.*)\Z", re.DOTALL)


class MalformedEntry(PlanpipeError, ValueError):
    pass


def parse_jsonlog(raw: bytes, fallback_tz: tzinfo = UTC) -> LogEntry:
    try:
        line = _jsonlog_decoder.decode(raw)
    except msgspec.DecodeError:
        try:  # a server in SQL_ASCII may log bytes that are not UTF-8
            line = _jsonlog_decoder.decode(raw.decode("utf-8", "replace"))
        except msgspec.DecodeError as error:
            raise MalformedEntry(f"jsonlog line is not a JSON object: {error}") from None
    timestamp = parse_log_timestamp(line.timestamp, fallback_tz) if line.timestamp else None
    return LogEntry(timestamp, line.message, line.query_id)


def parse_csvlog(raw: bytes, fallback_tz: tzinfo = UTC) -> LogEntry:
    try:
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8", "replace"), newline="")))
    except csv.Error as error:
        raise MalformedEntry(f"csvlog record does not parse: {error}") from None
    if len(rows) != 1 or len(rows[0]) <= _CSV_MESSAGE:
        raise MalformedEntry("csvlog record has too few columns")
    row = rows[0]
    query_id: int | None = None
    if len(row) > _CSV_QUERY_ID and row[_CSV_QUERY_ID].lstrip("-").isdigit():
        query_id = int(row[_CSV_QUERY_ID])
    return LogEntry(parse_log_timestamp(row[0], fallback_tz), row[_CSV_MESSAGE], query_id)


def parse_stderr(raw: bytes, fallback_tz: tzinfo = UTC) -> LogEntry:
    """Only plan entries are interpreted; anything else comes back with an empty message."""
    lines = raw.decode("utf-8", "replace").rstrip("\n").split("\n")
    head = _STDERR_PLAN_HEAD.match(lines[0])
    if head is None:
        return LogEntry(None, "")
    body = [line[1:] if line.startswith("\t") else line for line in lines[1:]]
    message = "\n".join([head.group("msg"), *body])
    return LogEntry(parse_log_timestamp(head.group("prefix"), fallback_tz), message)


_PARSERS: Final[dict[LogFormat, Callable[[bytes, tzinfo], LogEntry]]] = {
    LogFormat.JSONLOG: parse_jsonlog,
    LogFormat.CSVLOG: parse_csvlog,
    LogFormat.STDERR: parse_stderr,
}


@dataclass(frozen=True, slots=True)
class PlanMessage:
    duration_ms: float
    plan_json: str  # verbatim
    plan: dict[str, Any]


def plan_message(message: str) -> PlanMessage | None:
    """The auto_explain JSON plan in a log message; None if the message is not an auto_explain plan.

    Raises `MalformedEntry` for an auto_explain message whose plan is not JSON
    (another `auto_explain.log_format`) or not a complete JSON object.
    """
    m = _PLAN_MESSAGE.match(message)
    if m is None:
        return None
    plan_json = m.group("plan").strip()
    if not plan_json.startswith("{"):
        raise MalformedEntry("auto_explain plan is not in JSON format (set auto_explain.log_format = json)")
    try:
        plan = msgspec.json.decode(plan_json)
    except msgspec.DecodeError as error:
        raise MalformedEntry(f"auto_explain plan is not valid JSON: {error}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("Plan"), dict):
        raise MalformedEntry("auto_explain JSON has no Plan object")
    return PlanMessage(float(m.group("ms")), plan_json, plan)


def _stderr_plan_complete(raw: bytes, fallback_tz: tzinfo) -> bool:
    try:
        return plan_message(parse_stderr(raw, fallback_tz).message) is not None
    except MalformedEntry:
        return False


def plan_query_hash(plan: dict[str, Any], query_id: int | None) -> str:
    if (identifier := query_identifier(plan)) is not None:
        return identifier
    if query_id:
        return str(query_id)
    query_text = plan.get("Query Text")
    if not isinstance(query_text, str) or not query_text.strip():
        raise MalformedEntry("plan has neither a query identifier nor a Query Text")
    return text_hash(query_text)


def envelope_from_entry(entry: LogEntry, cluster_id: str, *, now: float | None = None) -> Envelope | None:
    """The envelope for an auto_explain entry; None for entries that are not plans."""
    found = plan_message(entry.message)
    if found is None:
        return None
    query_text = found.plan.get("Query Text")
    query_text = query_text if isinstance(query_text, str) else None
    envelope = Envelope(
        query_hash=plan_query_hash(found.plan, entry.query_id),
        execution_timestamp=entry.timestamp if entry.timestamp is not None else (now or time.time()),
        cluster_id=cluster_id,
        plan_text=f"[{found.plan_json}]",
        actual_rows=top_plan_rows(found.plan),
        total_time_ms=found.duration_ms,
        query_type=classify(strip_explain(query_text)).kind.query_type if query_text else None,
        query_text=query_text,
    )
    return tracing.stamp(envelope)  # a sampled share gets a W3C traceparent: the trace starts at capture


def parse_entry(raw: bytes, fmt: LogFormat, cluster_id: str, fallback_tz: tzinfo = UTC) -> Envelope | None:
    return envelope_from_entry(_PARSERS[fmt](raw, fallback_tz), cluster_id)
