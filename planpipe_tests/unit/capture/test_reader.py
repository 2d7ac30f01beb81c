"""The log reader on real files: partial writes, restarts from the state file, rotation, truncation.

The invariant under test everywhere: every plan entry written is emitted exactly
once, in order, and never before its last byte is on disk.
"""

import os
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planpipe.capture.logparse import LogFormat
from planpipe.capture.reader import AutoExplainReader, load_state, save_state
from planpipe.contract import Envelope
from planpipe_tests.unit.capture import logfmt

pytestmark = pytest.mark.unit

FORMATS = list(LogFormat)
fuzz = settings(database=None, max_examples=60, deadline=None)


def markers(envelopes: list[Envelope]) -> list[str]:
    """`q{i}` of each envelope, from its query text."""
    return [str(e.query_text).rsplit("'", 2)[1] for e in envelopes]


def reader(log: Path, state: Path | None = None, **kwargs: object) -> AutoExplainReader:
    return AutoExplainReader(log, cluster_id="c", state_path=state, settle_s=0.0, **kwargs)  # type: ignore[arg-type]


def workload(fmt: LogFormat, count: int, start: int = 0) -> tuple[bytes, list[str]]:
    """Plan entries with noise between them, and the markers expected from them."""
    data = b"".join(logfmt.noise_entry(fmt, i) + logfmt.plan_entry(fmt, i) for i in range(start, start + count))
    return data, [f"q{i}" for i in range(start, start + count)]


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


# -- partial writes and restarts ------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_written_in_small_pieces_are_emitted_once_complete(fmt: LogFormat, tmp_path: Path) -> None:
    log = tmp_path / f"pg{'.json' if fmt is LogFormat.JSONLOG else '.csv' if fmt is LogFormat.CSVLOG else '.log'}"
    log.write_bytes(b"")
    data, expected = workload(fmt, 4)
    ends = []  # byte offset at which each plan entry is complete
    position = 0
    for i in range(4):
        position += len(logfmt.noise_entry(fmt, i)) + len(logfmt.plan_entry(fmt, i))
        ends.append(position)
    seen: list[Envelope] = []
    with reader(log, fmt=fmt) as r:
        for cut in range(0, len(data), 37):
            append(log, data[cut : cut + 37])
            seen += r.poll()
            written = min(cut + 37, len(data))
            assert len(seen) == sum(1 for end in ends if end <= written), cut
    assert markers(seen) == expected


@pytest.mark.parametrize("fmt", FORMATS)
@fuzz
@given(steps=st.lists(st.sampled_from(["write", "poll", "restart", "partial"]), min_size=5, max_size=40),
       data=st.data())  # fmt: skip
def test_restarts_at_any_point_neither_skip_nor_repeat(
    fmt: LogFormat, steps: list[str], data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("restart")
    log, state = tmp / "pg.log", tmp / "state.json"
    log.write_bytes(b"")
    payload, expected = workload(fmt, 6)
    written = 0
    out: list[Envelope] = []
    r = reader(log, state, fmt=fmt)
    for step in steps:
        if step == "write" and written < len(payload):
            size = data.draw(st.integers(1, 400))
            append(log, payload[written : written + size])
            written += size
        elif step == "poll":
            out += r.poll()
            r.commit()  # the sink took the batch: move the cursor
        elif step == "partial":
            out += r.poll(max_envelopes=1)
            r.commit()
        elif step == "restart":
            r.close()
            r = reader(log, state, fmt=fmt)
    append(log, payload[written:])
    out += r.poll()
    r.close()
    assert markers(out) == expected


def test_uncommitted_batches_are_read_again_after_a_restart(tmp_path: Path) -> None:
    log, state = tmp_path / "pg.json", tmp_path / "state.json"
    log.write_bytes(workload(LogFormat.JSONLOG, 3)[0])
    with reader(log, state) as r:
        assert markers(r.poll(max_envelopes=1)) == ["q0"]
        r.commit()
        assert markers(r.poll()) == ["q1", "q2"]  # crash before commit
    with reader(log, state) as r:
        assert markers(r.poll()) == ["q1", "q2"]


def test_state_file_is_written_atomically_and_records_the_cursor(tmp_path: Path) -> None:
    log, state = tmp_path / "pg.json", tmp_path / "sub" / "state.json"
    data, _ = workload(LogFormat.JSONLOG, 2)
    log.write_bytes(data + b'{"timestamp": "2026-')  # a half-written entry at the end
    with reader(log, state) as r:
        assert len(r.poll()) == 2
        r.commit()
    saved = load_state(state)
    assert saved is not None
    st_ = log.stat()
    assert (saved.path, saved.dev, saved.inode, saved.offset) == (str(log), st_.st_dev, st_.st_ino, len(data))
    assert saved.format == "jsonlog"
    assert [p.name for p in state.parent.iterdir()] == ["state.json"]  # no temp files left
    save_state(state, msgspec.structs.replace(saved, offset=5))
    assert load_state(state) == msgspec.structs.replace(saved, offset=5)


# -- rotation ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_rename_and_recreate_rotation(fmt: LogFormat, tmp_path: Path) -> None:
    log = tmp_path / "postgresql.log"
    first, _ = workload(fmt, 2)
    log.write_bytes(first)
    seen: list[Envelope] = []
    with reader(log, fmt=fmt) as r:
        seen += r.poll()
        with log.open("ab") as old_writer:  # the writer still holds the old file open
            log.rename(tmp_path / "postgresql.log.1")
            old_writer.write(workload(fmt, 1, start=2)[0])
        log.write_bytes(workload(fmt, 2, start=3)[0])
        seen += r.poll()
        assert r.stats["rotations"] == 1
    assert markers(seen) == [f"q{i}" for i in range(5)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_copytruncate_rotation(fmt: LogFormat, tmp_path: Path) -> None:
    log = tmp_path / "postgresql.log"
    log.write_bytes(workload(fmt, 3)[0])
    with reader(log, fmt=fmt) as r:
        assert markers(r.poll()) == ["q0", "q1", "q2"]
        with log.open("r+b") as f:
            f.truncate(0)
        append(log, logfmt.plan_entry(fmt, 9))
        assert markers(r.poll()) == ["q9"]
        assert r.stats["truncated"] == 1


def test_file_rewritten_in_place_beyond_the_old_offset_is_noticed(tmp_path: Path) -> None:
    log = tmp_path / "pg.json"
    log.write_bytes(workload(LogFormat.JSONLOG, 2)[0])
    with reader(log) as r:
        assert markers(r.poll()) == ["q0", "q1"]
        with log.open("r+b") as f:  # truncated and regrown past our offset between two polls
            f.write(workload(LogFormat.JSONLOG, 3, start=5)[0])
        assert markers(r.poll()) == ["q5", "q6", "q7"]


def test_restart_after_rotation_finishes_the_renamed_file_first(tmp_path: Path) -> None:
    log, state = tmp_path / "postgresql.json", tmp_path / "state.json"
    log.write_bytes(workload(LogFormat.JSONLOG, 2)[0])
    with reader(log, state) as r:
        assert markers(r.poll()) == ["q0", "q1"]
        r.commit()
    log.rename(tmp_path / "postgresql.json.1")
    append(tmp_path / "postgresql.json.1", logfmt.plan_entry(LogFormat.JSONLOG, 2))
    log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 3))
    with reader(log, state) as r:
        assert markers(r.poll()) == ["q2", "q3"]


def test_recycled_inode_with_other_content_is_not_resumed(tmp_path: Path) -> None:
    log, state = tmp_path / "pg.json", tmp_path / "state.json"
    log.write_bytes(workload(LogFormat.JSONLOG, 2)[0])
    with reader(log, state) as r:
        r.poll()
        r.commit()
    with log.open("r+b") as f:  # same inode, new content at least as long
        f.write(workload(LogFormat.JSONLOG, 3, start=7)[0])
    with reader(log, state) as r:
        assert markers(r.poll()) == ["q7", "q8", "q9"]


def test_a_rotated_out_file_waits_until_it_has_settled(tmp_path: Path) -> None:
    log = tmp_path / "pg.json"
    log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 0))
    with AutoExplainReader(log, cluster_id="c", settle_s=60.0) as r:
        assert markers(r.poll()) == ["q0"]
        log.rename(tmp_path / "pg.json.1")
        log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 1))
        assert r.poll() == []  # the old file was written a moment ago
        r.settle_s = 0.0
        assert markers(r.poll()) == ["q1"]


def test_partial_trailing_fragment_of_a_retired_file_is_counted_not_emitted(tmp_path: Path) -> None:
    log = tmp_path / "pg.json"
    log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 0) + logfmt.plan_entry(LogFormat.JSONLOG, 1)[:50])
    with reader(log) as r:
        assert markers(r.poll()) == ["q0"]
        log.rename(tmp_path / "pg.json.1")
        log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 2))
        assert markers(r.poll()) == ["q2"]
        assert r.stats["partial_discarded"] == 1


# -- directory mode (PostgreSQL's own rotation) -----------------------------------


def _dated(path: Path, data: bytes, mtime: float) -> Path:
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return path


def test_directory_mode_reads_files_in_order_and_follows_new_ones(tmp_path: Path) -> None:
    _dated(tmp_path / "postgresql-a.json", workload(LogFormat.JSONLOG, 2)[0], 1000)
    _dated(tmp_path / "postgresql-b.json", workload(LogFormat.JSONLOG, 2, start=2)[0], 2000)
    _dated(tmp_path / "postgresql-b.log", logfmt.stderr("ignored: other format"), 3000)
    state = tmp_path / "state" / "cursor.json"
    with reader(tmp_path, state, all_files=True) as r:
        assert r.format is LogFormat.JSONLOG
        assert markers(r.poll()) == ["q0", "q1", "q2", "q3"]
        r.commit()
    with reader(tmp_path, state) as r:
        assert r.poll() == []
        (tmp_path / "postgresql-c.json").write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 4))
        assert markers(r.poll()) == ["q4"]


def test_directory_mode_without_state_starts_with_the_newest_file(tmp_path: Path) -> None:
    _dated(tmp_path / "postgresql-a.json", workload(LogFormat.JSONLOG, 2)[0], 1000)
    _dated(tmp_path / "postgresql-b.json", workload(LogFormat.JSONLOG, 1, start=5)[0], 2000)
    with reader(tmp_path) as r:
        assert markers(r.poll()) == ["q5"]


def test_log_that_does_not_exist_yet(tmp_path: Path) -> None:
    log = tmp_path / "later.json"
    with reader(log) as r:
        assert r.poll() == []
        log.write_bytes(logfmt.plan_entry(LogFormat.JSONLOG, 0))
        assert markers(r.poll()) == ["q0"]
