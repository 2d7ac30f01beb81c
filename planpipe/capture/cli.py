"""`planpipe capture explain|autoexplain`: produce envelopes as JSONL for the publish stage."""

import argparse
import contextlib
import os
import signal
import stat
import sys
import textwrap
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import psycopg

from planpipe.capture.explain import (
    DEFAULT_DML_MODE,
    DEFAULT_STATEMENT_TIMEOUT_MS,
    DML_MODES,
    capture_workload,
    connect,
    print_progress,
    server_cluster_id,
)
from planpipe.capture.logparse import LogFormat
from planpipe.capture.reader import AutoExplainReader, cluster_id_near, print_messages
from planpipe.capture.safety import DEFAULT_DENY, ENV_ALLOW, ENV_DENY, FunctionPolicy, SuperuserRefused
from planpipe.contract import Envelope, encode_envelope
from planpipe.errors import PlanpipeError
from planpipe.settings import Settings


class JsonlWriter:
    """One envelope per line; `flush()` makes a batch durable before the caller records progress."""

    def __init__(self, stream: BinaryIO, *, sync: bool) -> None:
        self._stream = stream
        self._sync = sync

    def write(self, envelopes: Iterable[Envelope]) -> None:
        self._stream.write(b"".join(encode_envelope(e) + b"\n" for e in envelopes))

    def flush(self) -> None:
        self._stream.flush()
        if self._sync:
            os.fsync(self._stream.fileno())


class OutputClosed(PlanpipeError):
    """The reader of stdout went away (`| head`): stop capturing, there is no one to hand plans to."""


@contextlib.contextmanager
def _open_output(target: str, *, append: bool) -> Iterator[JsonlWriter]:
    if target == "-":
        try:
            yield JsonlWriter(sys.stdout.buffer, sync=False)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            # Point stdout at devnull so the interpreter's final flush does not raise again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise OutputClosed from None
        return
    with open(target, "ab" if append else "wb") as stream:
        # fsync makes a regular file durable; a device or pipe (/dev/null, a FIFO) cannot be synced.
        yield JsonlWriter(stream, sync=stat.S_ISREG(os.fstat(stream.fileno()).st_mode))


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    dsn = args.dsn or settings.pg_dsn
    workload = sys.stdin.read() if args.workload == "-" else Path(args.workload).read_text(encoding="utf-8")
    try:
        with _open_output(args.output, append=False) as out:

            def emit(envelope: Envelope) -> None:
                out.write([envelope])
                out.flush()

            report = capture_workload(
                dsn,
                workload,
                repeat=args.repeat,
                cluster_id=args.cluster_id,
                statement_timeout_ms=args.statement_timeout,
                allow_superuser=args.allow_superuser,
                policy=FunctionPolicy.build(deny=args.deny_function, allow=args.allow_function),
                dml=args.dml,
                on_envelope=emit,
                on_progress=None if args.quiet else print_progress,
            )
    except SuperuserRefused as error:
        print(f"planpipe capture explain: {error}", file=sys.stderr)
        return 2
    except psycopg.OperationalError as error:
        print(f"planpipe capture explain: cannot connect: {error}", file=sys.stderr)
        return 2
    except OutputClosed:
        print("planpipe capture explain: output closed, workload stopped", file=sys.stderr)
        return 1
    print(report.summary(), file=sys.stderr)
    return 1 if report.failed else 0


def _autoexplain_cluster_id(args: argparse.Namespace) -> str | None:
    if args.cluster_id:
        return str(args.cluster_id)
    if args.dsn:
        with connect(args.dsn) as conn:
            return server_cluster_id(conn)
    return cluster_id_near(Path(args.log))


def _autoexplain(args: argparse.Namespace, settings: Settings) -> int:
    cluster_id = _autoexplain_cluster_id(args)
    if cluster_id is None:
        print(
            "planpipe capture autoexplain: cannot tell the cluster: pass --cluster-id, or --dsn to read "
            "the server's system_identifier",
            file=sys.stderr,
        )
        return 2
    stop = threading.Event()
    # SIGINT/SIGTERM end --follow after the current batch is written and committed.
    signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in signals}
    try:
        with (
            AutoExplainReader(
                args.log,
                cluster_id=cluster_id,
                fmt=None if args.format == "auto" else LogFormat(args.format),
                state_path=args.state,
                all_files=args.all_files,
                log_timezone=args.log_timezone,
            ) as reader,
            _open_output(args.output, append=True) as out,
        ):

            def sink(batch: list[Envelope]) -> None:
                out.write(batch)
                out.flush()  # durable before the cursor moves past these entries
                print_messages(reader)

            if args.follow:
                reader.follow(sink, stop=stop, poll_interval=args.poll_interval)
            else:
                while batch := reader.poll(max_envelopes=500):
                    sink(batch)
                    reader.commit()
                reader.commit()
            print_messages(reader)
            print(reader.summary(), file=sys.stderr)
    except OutputClosed:
        # The batch in flight was not committed: a restart with --state emits it again.
        print("planpipe capture autoexplain: output closed", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def add_parsers(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    capture = sub.add_parser("capture", help="capture EXPLAIN ANALYZE plans as envelopes (JSONL)")
    stages = capture.add_subparsers(dest="capture_command", required=True)

    p = stages.add_parser(
        "explain",
        help="run a workload's SELECTs under EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON); DML is planned, DDL never runs",
        description=EXPLAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dsn", help="target PostgreSQL (default: PLANPIPE_PG_DSN / the local stack)")
    p.add_argument("--workload", required=True, metavar="FILE.sql", help="SQL statements separated by ';' (- = stdin)")
    p.add_argument("--repeat", type=_positive, default=1, metavar="N", help="run the whole workload N times")
    p.add_argument("--cluster-id", metavar="ID", help="default: the server's system_identifier")
    p.add_argument("--statement-timeout", type=_non_negative, default=DEFAULT_STATEMENT_TIMEOUT_MS, metavar="MS",
                   help=f"per statement, 0 = none (default {DEFAULT_STATEMENT_TIMEOUT_MS})")  # fmt: skip
    p.add_argument("--output", default="-", metavar="FILE.jsonl|-", help="envelopes, one per line (default stdout)")
    p.add_argument("--quiet", action="store_true", help="no per-statement progress on stderr")
    p.add_argument("--allow-superuser", action="store_true",
                   help="capture even when connected as a superuser (refused by default)")  # fmt: skip
    p.add_argument("--dml", choices=DML_MODES, default=os.environ.get("PLANPIPE_CAPTURE_DML", DEFAULT_DML_MODE),
                   help="INSERT/UPDATE/DELETE/MERGE: plan = EXPLAIN without ANALYZE (default), analyze = execute "
                        "and roll back, skip (env PLANPIPE_CAPTURE_DML)")  # fmt: skip
    p.add_argument("--deny-function", action="append", default=[], metavar="GLOB",
                   help=f"refuse statements calling matching functions, on top of the defaults (env {ENV_DENY}, "
                        "comma-separated); 'name*' or 'schema.name'")  # fmt: skip
    p.add_argument("--allow-function", action="append", default=[], metavar="GLOB",
                   help=f"allow matching functions even when denied or not checkable (env {ENV_ALLOW})")  # fmt: skip
    p.set_defaults(handler=_explain)

    p = stages.add_parser("autoexplain", help="read auto_explain JSON plans from server logs (jsonlog, csvlog, stderr)")
    p.add_argument("--log", required=True, metavar="FILE|DIR",
                   help="a log file (followed by path across rename/truncate) or the log directory "
                        "(follows PostgreSQL's own rotation)")  # fmt: skip
    p.add_argument("--follow", action="store_true", help="keep reading as the log grows and rotates (until SIGTERM)")
    p.add_argument("--state", metavar="FILE", help="cursor file: resume exactly after the last emitted batch")
    p.add_argument("--cluster-id", metavar="ID",
                   help="default: system_identifier via --dsn, or from the data directory around --log")  # fmt: skip
    p.add_argument("--dsn", help="read the cluster id from this server")
    p.add_argument("--output", default="-", metavar="FILE.jsonl|-", help="appended to (default stdout)")
    p.add_argument("--format", choices=["auto", *(f.value for f in LogFormat)], default="auto")
    p.add_argument("--all-files", action="store_true",
                   help="directory without saved state: read every log file, not only the newest")  # fmt: skip
    p.add_argument("--log-timezone", default="UTC",
                   help="zone for timestamps with an ambiguous zone abbreviation (log_timezone)")  # fmt: skip
    p.add_argument("--poll-interval", type=float, default=0.5, metavar="S")
    p.set_defaults(handler=_autoexplain)


EXPLAIN_DESCRIPTION = f"""\
Run each statement of a workload under EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) and write envelopes.

Privileges: connect as a role that is NOT a superuser (refused unless --allow-superuser), e.g.
  CREATE ROLE planpipe_capture LOGIN PASSWORD '...';
  GRANT pg_read_all_data TO planpipe_capture;   -- SELECT on every table
  GRANT pg_read_all_stats TO planpipe_capture;  -- only if the workload reads pg_stat_statements
Such a role cannot signal other roles' sessions or create replication slots.

Statements are parsed with PostgreSQL's parser. SELECTs run in a READ ONLY transaction that is
rolled back; DML is planned only (--dml); DDL and utility statements are skipped. A statement
calling a function with effects outside the transaction, in its text, a view it reads, a
row-level-security policy or a SQL function it calls, is refused and listed as skipped with
the reason. Denied by default:
{textwrap.fill(", ".join(DEFAULT_DENY), width=96, initial_indent="  ", subsequent_indent="  ")}
A non-built-in function not written in SQL (PL/pgSQL, C, ...) cannot be checked: refused
unless --allow-function names it.
"""


def _positive(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def _non_negative(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value
