"""Synthetic PostgreSQL log entries in the three formats, shaped like PostgreSQL 18 writes them."""

import csv
import io
import json
from datetime import UTC, datetime

from planpipe.capture.logparse import LogFormat

TS = 1_795_323_102.601  # 2026-11-22 04:51:42.601 UTC


def pg_time(epoch: float) -> str:
    dt = datetime.fromtimestamp(epoch, UTC)
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + f"{dt.microsecond // 1000:03d} UTC"


def plan_json(query_text: str, rows: float = 1.0, loops: int = 1, **extra: object) -> str:
    """auto_explain's JSON the way it prints it: two-space indent, rows with two decimals."""
    plan = {
        "Query Text": query_text,
        "Plan": {"Node Type": "Seq Scan", "Relation Name": "t", "Alias": "t", "Actual Rows": "@ROWS@",
                 "Actual Loops": loops},
        **extra,
    }  # fmt: skip
    return json.dumps(plan, indent=2).replace('"@ROWS@"', f"{rows:.2f}")


def plan_message(query_text: str, duration_ms: float = 1.5, **kwargs: object) -> str:
    return f"duration: {duration_ms:.3f} ms  plan:\n{plan_json(query_text, **kwargs)}"  # type: ignore[arg-type]


def jsonlog(message: str, *, ts: float = TS, query_id: int = 0, pid: int = 4242) -> bytes:
    entry = {"timestamp": pg_time(ts), "user": "postgres", "dbname": "planpipe", "pid": pid, "error_severity": "LOG",
             "message": message, "backend_type": "client backend", "query_id": query_id}  # fmt: skip
    return json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def csvlog(message: str, *, ts: float = TS, query_id: int = 0, pid: int = 4242) -> bytes:
    row = [pg_time(ts), "postgres", "planpipe", str(pid), "127.0.0.1:5000", "6b0274de.1cba", "3", "SELECT",
           "2026-11-22 04:51:00 UTC", "3/7", "0", "LOG", "00000", message, "", "", "", "", "", "", "", "",
           "psql", "client backend", "", str(query_id)]  # fmt: skip
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(row)
    return out.getvalue().encode()


def stderr(message: str, *, ts: float = TS, pid: int = 4242) -> bytes:
    first, *rest = message.split("\n")
    lines = [f"{pg_time(ts)} [{pid}] LOG:  {first}", *(f"\t{line}" for line in rest)]
    return ("\n".join(lines) + "\n").encode()


def entry(fmt: LogFormat, message: str, *, ts: float = TS, query_id: int = 0) -> bytes:
    if fmt is LogFormat.JSONLOG:
        return jsonlog(message, ts=ts, query_id=query_id)
    if fmt is LogFormat.CSVLOG:
        return csvlog(message, ts=ts, query_id=query_id)
    return stderr(message, ts=ts)


def plan_entry(fmt: LogFormat, i: int, *, ts: float = TS) -> bytes:
    """The i-th distinct plan entry: its query text carries the marker `q{i}`."""
    return entry(fmt, plan_message(f"SELECT * FROM t WHERE note = 'q{i}'"), ts=ts + i, query_id=1000 + i)


def noise_entry(fmt: LogFormat, i: int) -> bytes:
    """A non-plan entry, multi-line so framing is exercised."""
    return entry(fmt, f'checkpoint starting: time {i}\nDETAIL "quoted", and\n\tindented', ts=TS + i)
