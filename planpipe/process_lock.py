"""An exclusive lock file held for a process's lifetime, with the holder's pid in it.

The spool (one writer per spool file) and the agent (one agent per state directory) use it."""

import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def hold_exclusive_lock(lock_path: Path, busy: Callable[[], Exception]) -> IO[bytes]:
    """Take the lock without waiting, or raise `busy()`. The handle must stay open while it is held."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "ab")  # noqa: SIM115 - held for the owner's lifetime
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise busy() from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle
