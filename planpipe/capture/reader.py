"""Following auto_explain log files: rotation, restarts and the persisted cursor.

Entries are framed and parsed by `planpipe.capture.logparse`.

Reading rules:

* Only complete entries are consumed. jsonlog and csvlog entries end with a
  newline (outside quotes, for csv); a stderr entry ends where the next line
  that is not a tab continuation begins — at the end of a growing file a plan
  entry counts as complete once its JSON parses, anything else waits.
* The cursor is (path, device, inode, byte offset just past the last consumed
  entry, hash of the file's first bytes). `commit()` writes it atomically to the
  state file, so a restart resumes exactly there: the file is found again by
  inode (also after a rename), and a recycled inode or a truncated file is
  noticed through the head hash or the size.
* Rotation: `--log` may name a file (followed by path: rename + recreate or
  copytruncate, as logrotate does) or PostgreSQL's log directory (files of the
  format, oldest first by mtime then name: PostgreSQL's own `log_filename`
  rotation). When a successor exists and the current file has been quiet for
  `settle_s`, the current file is read to its end and the successor is
  started at offset 0. A rotated-out file's trailing fragment with no newline
  can never be completed and is counted as `partial_discarded`.
* Copytruncate loses whatever was written between the last read and the
  truncation; no reader can avoid that.
"""

import hashlib
import os
import re
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, tzinfo
from pathlib import Path
from typing import Final
from zoneinfo import ZoneInfo

import msgspec

from planpipe.capture.logparse import (
    SUFFIXES,
    UTC_NAMES,
    LogFormat,
    MalformedEntry,
    frame,
    parse_entry,
)
from planpipe.contract import Envelope

_HEAD_BYTES: Final = 256  # a file's first bytes identify it across restarts
STATE_VERSION: Final = 1


def detect_format(path: Path) -> LogFormat:
    for fmt, suffix in SUFFIXES.items():
        if fmt is not LogFormat.STDERR and path.name.endswith(suffix):
            return fmt
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:
        return LogFormat.STDERR
    if head.startswith(b"{"):
        return LogFormat.JSONLOG
    if re.match(rb"\d{4}-\d{2}-\d{2} [\d:.]+(?: [^,]*)?,", head):
        return LogFormat.CSVLOG
    return LogFormat.STDERR


def read_system_identifier(data_dir: Path) -> str | None:
    """`system_identifier` from `global/pg_control` (its first field), as pg_controldata prints it."""
    try:
        with (data_dir / "global" / "pg_control").open("rb") as f:
            raw = f.read(8)
    except OSError:
        return None
    return str(struct.unpack("=Q", raw)[0]) if len(raw) == 8 else None


def cluster_id_near(log: Path) -> str | None:
    """The system identifier of the data directory holding `log` (log_directory is often inside it)."""
    for parent in list(log.resolve().parents)[:4]:
        if (parent / "PG_VERSION").exists() and (found := read_system_identifier(parent)):
            return found
    return None


class CursorState(msgspec.Struct, frozen=True):
    """What the state file holds: where the last fully consumed entry ended."""

    path: str
    dev: int
    inode: int
    offset: int
    head_len: int
    head_sha256: str
    format: str
    saved_at: float
    version: int = STATE_VERSION


def load_state(path: Path) -> CursorState | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    return msgspec.json.decode(raw, type=CursorState)


def save_state(path: Path, state: CursorState) -> None:
    """Write-then-rename, with fsyncs: a crash leaves the old state or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(msgspec.json.encode(state))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class _OpenLog:
    path: Path
    fd: int
    dev: int
    inode: int
    offset: int
    head: bytes  # the file's first bytes once read: they identify the file across restarts

    @property
    def key(self) -> tuple[int, int]:
        return self.dev, self.inode


def _open_log(path: Path, offset: int = 0) -> _OpenLog:
    fd = os.open(path, os.O_RDONLY)
    st = os.fstat(fd)
    return _OpenLog(path, fd, st.st_dev, st.st_ino, offset, os.pread(fd, _HEAD_BYTES, 0))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class AutoExplainReader:
    """Reads auto_explain plans from a log file or a log directory, remembering its place.

    `poll()` returns the envelopes of the entries completed since the last call;
    `commit()` persists the cursor (call it after the envelopes are safely
    handed on); `follow()` loops over both.
    """

    def __init__(
        self,
        log: Path | str,
        *,
        cluster_id: str,
        fmt: LogFormat | None = None,
        state_path: Path | str | None = None,
        all_files: bool = False,
        log_timezone: str = "UTC",
        settle_s: float = 1.0,
        read_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.log = Path(log).absolute()  # not resolve(): a symlinked log path is followed by name
        self.directory = self.log.is_dir()
        self.cluster_id = cluster_id
        self.state_path = Path(state_path) if state_path is not None else None
        self.settle_s = settle_s
        self.stats: Counter[str] = Counter()
        self.messages: list[str] = []  # notable events (rotation, truncation, resume) for the operator
        self._fallback_tz: tzinfo = UTC if log_timezone.upper() in UTC_NAMES else ZoneInfo(log_timezone)
        self._read_bytes = read_bytes
        self._file: _OpenLog | None = None
        self._committed: tuple[tuple[int, int], int] | None = None
        if fmt is None:
            fmt = self._guess_directory_format() if self.directory else detect_format(self.log)
        self.format = fmt
        state = load_state(self.state_path) if self.state_path is not None else None
        self._start(state, all_files)

    # -- locating files ---------------------------------------------------

    def _guess_directory_format(self) -> LogFormat:
        for fmt in (LogFormat.JSONLOG, LogFormat.CSVLOG, LogFormat.STDERR):
            if any(self.log.glob(f"*{SUFFIXES[fmt]}")):
                return fmt
        return LogFormat.JSONLOG

    def _candidates(self) -> list[tuple[int, str, Path, os.stat_result]]:
        """Directory mode: the format's files, oldest first by (mtime, name)."""
        found = []
        for path in self.log.glob(f"*{SUFFIXES[self.format]}"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            if path.is_file():
                found.append((st.st_mtime_ns, path.name, path, st))
        found.sort(key=lambda item: (item[0], item[1]))
        return found

    def _find_inode(self, dev: int, inode: int) -> Path | None:
        where = self.log if self.directory else self.log.parent
        try:
            children = list(where.iterdir())
        except OSError:
            return None
        for child in children:
            try:
                st = child.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, inode) and child.is_file():
                return child
        return None

    def _note(self, message: str) -> None:
        self.messages.append(message)

    def _start(self, state: CursorState | None, all_files: bool) -> None:
        if state is not None and (path := self._find_inode(state.dev, state.inode)) is not None:
            opened = _open_log(path, state.offset)
            if _sha(opened.head[: state.head_len]) == state.head_sha256 and len(opened.head) >= state.head_len:
                self._file = opened
                self._committed = (opened.key, opened.offset)
                self._note(f"resuming {path} at byte {state.offset}")
                return
            os.close(opened.fd)
            self._note(f"{path} reuses the inode of the saved file but its content differs: not resuming there")
        if state is not None:
            self.stats["state_file_gone"] += 1
            self._note(f"saved file {state.path} (inode {state.inode}) is gone; entries after byte "
                       f"{state.offset} of it were lost")  # fmt: skip
        if not self.directory:
            if self.log.exists():
                self._file = _open_log(self.log)
            return
        candidates = self._candidates()
        if state is not None:  # files touched since that save may hold unread entries
            newer = [c for c in candidates if c[0] / 1e9 >= state.saved_at]
            candidates = newer or candidates[-1:]
        elif not all_files:
            candidates = candidates[-1:]
        if candidates:
            self._file = _open_log(candidates[0][2])

    def _successor(self) -> Path | None:
        """The file that follows the current one, once it exists."""
        current = self._file
        assert current is not None
        if not self.directory:
            try:
                st = self.log.stat()
            except FileNotFoundError:
                return None  # renamed away, the new file is not there yet
            return self.log if (st.st_dev, st.st_ino) != current.key else None
        try:
            mine = os.fstat(current.fd).st_mtime_ns
        except OSError:
            return None
        for mtime_ns, name, path, st in self._candidates():
            if (st.st_dev, st.st_ino) == current.key:
                continue
            if (mtime_ns, name) > (mine, current.path.name):
                return path
        return None

    def _settled(self) -> bool:
        assert self._file is not None
        quiet_for = time.time() - os.fstat(self._file.fd).st_mtime
        return quiet_for >= self.settle_s

    # -- reading ----------------------------------------------------------

    def _check_identity(self) -> None:
        """Truncated (copytruncate) or rewritten in place: start the file over."""
        current = self._file
        assert current is not None
        size = os.fstat(current.fd).st_size
        rewritten = False
        if current.offset > 0 and current.head:
            now_head = os.pread(current.fd, len(current.head), 0)
            rewritten = now_head != current.head and len(now_head) == len(current.head)
        if size < current.offset or rewritten:
            self.stats["truncated"] += 1
            self._note(f"{current.path} was truncated or rewritten; reading it again from the start")
            current.offset = 0
            current.head = os.pread(current.fd, _HEAD_BYTES, 0)
        elif len(current.head) < _HEAD_BYTES and size > len(current.head):
            current.head = os.pread(current.fd, _HEAD_BYTES, 0)

    def _read(self, out: list[Envelope], limit: int | None, final: bool) -> bool:
        """Consume complete entries; True when `limit` envelopes are reached before the end."""
        current = self._file
        assert current is not None
        read_bytes = self._read_bytes
        while True:
            size = os.fstat(current.fd).st_size
            if current.offset >= size:
                return False
            data = os.pread(current.fd, min(size - current.offset, read_bytes), current.offset)
            at_end = current.offset + len(data) >= size
            entries = frame(data, self.format, final=final and at_end, fallback_tz=self._fallback_tz)
            if not entries:
                if at_end:
                    return False
                read_bytes *= 2  # one entry is larger than the window
                continue
            base = current.offset
            for start, end in entries:
                self.stats["entries"] += 1
                envelope = self._envelope(data[start:end], current.path, base + start)
                current.offset = base + end
                if envelope is not None:
                    out.append(envelope)
                    if limit is not None and len(out) >= limit:
                        return True

    def _envelope(self, raw: bytes, path: Path, offset: int) -> Envelope | None:
        try:
            envelope = parse_entry(raw, self.format, self.cluster_id, self._fallback_tz)
        except (MalformedEntry, ValueError) as error:
            self.stats["malformed"] += 1
            self._note(f"{path}@{offset}: skipped: {error}")
            return None
        if envelope is None:
            self.stats["not_a_plan"] += 1
        else:
            self.stats["plans"] += 1
        return envelope

    def _retire_and_switch(self, successor: Path) -> None:
        current = self._file
        assert current is not None
        leftover = os.fstat(current.fd).st_size - current.offset
        if leftover > 0:
            self.stats["partial_discarded"] += 1
            self._note(f"{current.path}: {leftover} trailing bytes never completed an entry")
        os.close(current.fd)
        self.stats["rotations"] += 1
        self._note(f"rotated: {current.path} finished, continuing with {successor}")
        self._file = _open_log(successor)

    def poll(self, max_envelopes: int | None = None) -> list[Envelope]:
        out: list[Envelope] = []
        while True:
            if self._file is None:
                self._start(None, all_files=True)
                if self._file is None:
                    return out
            self._check_identity()
            if self._read(out, max_envelopes, final=False):
                return out
            successor = self._successor()
            if successor is None or not self._settled():
                return out
            if self._read(out, max_envelopes, final=True):
                return out
            self._retire_and_switch(successor)

    # -- the cursor -------------------------------------------------------

    @property
    def position(self) -> tuple[Path, int] | None:
        return None if self._file is None else (self._file.path, self._file.offset)

    @property
    def dirty(self) -> bool:
        current = self._file
        return current is not None and self._committed != (current.key, current.offset)

    def commit(self) -> None:
        current = self._file
        if self.state_path is None or current is None or not self.dirty:
            return
        head = current.head[: current.offset]
        save_state(
            self.state_path,
            CursorState(
                path=str(current.path), dev=current.dev, inode=current.inode, offset=current.offset,
                head_len=len(head), head_sha256=_sha(head), format=self.format.value, saved_at=time.time(),
            ),
        )  # fmt: skip
        self._committed = (current.key, current.offset)

    def follow(
        self,
        sink: Callable[[list[Envelope]], None],
        *,
        stop: threading.Event | None = None,
        poll_interval: float = 0.5,
        batch_size: int = 500,
    ) -> None:
        """Poll until `stop` is set; each batch goes to `sink`, then the cursor is committed."""
        stop = stop or threading.Event()
        while not stop.is_set():
            batch = self.poll(max_envelopes=batch_size)
            if batch:
                sink(batch)
            self.commit()
            if len(batch) < batch_size:
                stop.wait(poll_interval)

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file.fd)
            self._file = None

    def __enter__(self) -> "AutoExplainReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def summary(self) -> str:
        counts = ", ".join(f"{key} {self.stats[key]}" for key in sorted(self.stats)) or "nothing read"
        return f"capture autoexplain ({self.format.value}): {counts}"


def print_messages(reader: AutoExplainReader) -> None:
    for message in reader.messages:
        print(f"autoexplain: {message}", file=sys.stderr, flush=True)
    reader.messages.clear()
