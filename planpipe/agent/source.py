"""The auto_explain log as the agent reads it: the existing reader, plus a capture id per envelope.

The reader's own cursor file is only scratch here: the agent's state database
holds the cursor (committed in the same transaction as the batch it ends), and
writes it back to the scratch file before the reader starts, so a restart
resumes exactly where the last durable batch ended.
"""

from pathlib import Path

import msgspec

from planpipe.agent.ledger import capture_id
from planpipe.capture.logparse import LogFormat
from planpipe.capture.reader import AutoExplainReader, save_state
from planpipe.capture.reader import CursorState as CursorState
from planpipe.contract import Envelope


class _IdentifyingReader(AutoExplainReader):
    """Remembers, for each envelope it yields, the log entry it came from."""

    def __init__(self, *args: object, agent: str, **kwargs: object) -> None:
        self._agent = agent
        self.capture_ids: list[str] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _envelope(self, raw: bytes, path: Path, offset: int) -> Envelope | None:
        envelope = super()._envelope(raw, path, offset)
        if envelope is not None:
            current = self._file
            assert current is not None
            self.capture_ids.append(capture_id(self._agent, current.dev, current.inode, offset, raw))
        return envelope


class LogSource:
    def __init__(
        self,
        log: Path,
        *,
        agent: str,
        cluster_id: str,
        scratch_state: Path,
        saved_cursor: bytes | None,
        fmt: LogFormat | None = None,
        all_files: bool = False,
        log_timezone: str = "UTC",
        settle_s: float = 1.0,
    ) -> None:
        self._scratch = scratch_state
        if saved_cursor is None:
            scratch_state.unlink(missing_ok=True)
        else:
            save_state(scratch_state, msgspec.json.decode(saved_cursor, type=CursorState))
        self.reader = _IdentifyingReader(
            log,
            agent=agent,
            cluster_id=cluster_id,
            fmt=fmt,
            state_path=scratch_state,
            all_files=all_files,
            log_timezone=log_timezone,
            settle_s=settle_s,
        )

    def poll(self, max_envelopes: int) -> list[tuple[Envelope, str]]:
        self.reader.capture_ids.clear()
        envelopes = self.reader.poll(max_envelopes=max_envelopes)
        ids = self.reader.capture_ids
        assert len(ids) == len(envelopes), "one capture id per envelope"
        return list(zip(envelopes, ids, strict=True))

    def cursor(self) -> bytes | None:
        """The reader's position as the state database stores it; None when it has not moved."""
        if not self.reader.dirty:
            return None
        self.reader.commit()
        return self._scratch.read_bytes()

    def close(self) -> None:
        self.reader.close()
