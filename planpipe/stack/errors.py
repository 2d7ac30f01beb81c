"""Small helpers shared by the local service scripts."""

import errno
import os
import socket
from pathlib import Path

from planpipe.errors import OperatorError


class StackError(OperatorError, RuntimeError):
    """A local service could not be prepared or started (one line; `details` after it)."""


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


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could not bind host:port now (the servers set SO_REUSEADDR, so do we)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def require_free_ports(service: str, ports: dict[str, int], host: str = "127.0.0.1") -> None:
    """Raise a one-line StackError naming the first of `ports` ({variable: port}) that is taken."""
    for variable, port in ports.items():
        if port_in_use(port, host):
            raise StackError(
                f"{service} cannot start: {host}:{port} is already in use by another process "
                f"(choose a free port with {variable}=…)"
            )


def make_dirs(path: Path) -> list[Path]:
    """`mkdir -p path`; returns the directories this call created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))
