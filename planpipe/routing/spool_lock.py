"""One writer per spool file: an exclusive lock beside it, held for the producer's lifetime."""

from pathlib import Path
from typing import IO

from planpipe.errors import OperatorError
from planpipe.process_lock import hold_exclusive_lock


class SpoolInUse(OperatorError, RuntimeError):
    """Another process (or producer) owns this spool file."""


def lock_spool(path: Path) -> IO[bytes]:
    """One writer per spool file: two drains would send the same rows twice."""
    return hold_exclusive_lock(
        path.with_name(path.name + ".lock"),
        lambda: SpoolInUse(f"spool {path} is in use by another planpipe producer (pid file lock held)"),
    )
