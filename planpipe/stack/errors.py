"""Small helpers shared by the local service scripts."""

import os
from pathlib import Path


class StackError(RuntimeError):
    """A local service could not be prepared or started; the message says what to do."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][:1] != "Z"
    except (FileNotFoundError, IndexError):
        return True


def tail(source: Path | str, lines: int = 30) -> str:
    if isinstance(source, Path):
        try:
            source = source.read_text(errors="replace")
        except FileNotFoundError:
            return f"({source} does not exist)"
    return "\n".join(source.splitlines()[-lines:])
