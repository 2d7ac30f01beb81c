"""One writer per spool file: an exclusive lock beside it, held for the producer's lifetime."""

import fcntl
import os
from pathlib import Path
from typing import IO

from planpipe.errors import OperatorError


class SpoolInUse(OperatorError, RuntimeError):
    """Another process (or producer) owns this spool file."""


def lock_spool(path: Path) -> IO[bytes]:
    """One writer per spool file: two drains would send the same rows twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.with_name(path.name + ".lock"), "ab")  # noqa: SIM115 - held for the producer's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SpoolInUse(f"spool {path} is in use by another planpipe producer (pid file lock held)") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle
