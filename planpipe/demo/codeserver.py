"""One long-lived Dagster code server for `planpipe dev` and `planpipe demo`.

With a `python_module` workspace the daemon starts a code server of its own and replaces
it every 60 s (Dagster's workspace refresh); the replaced one logs "No heartbeat received
in 20 seconds, shutting down" on its way out — a warning a minute in the daemon's log, and
an import of the whole code location each time on a small machine. Serving the location
from one `dagster code-server start` process and pointing the workspace at it
(`grpc_server`) is how Dagster is deployed; the UI's "Reload" still reloads the code.
The repository's `workspace.yaml` (python_module) stays what `dagster dev` users run.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from planpipe.errors import OperatorError
from planpipe.settings import REPO_ROOT, Settings

LOCATION_NAME: Final = "planpipe"
CODE_MODULE: Final = "planpipe.defs"
_HOST: Final = "127.0.0.1"
# Dagster logs this once the location is loaded and the server answers.
_READY_LINE: Final = "Started Dagster code proxy server"


@dataclass(frozen=True)
class CodeServer:
    process: subprocess.Popen[bytes]
    port: int
    workspace: Path  # a workspace file pointing at this server
    log: Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((_HOST, 0))
        return int(probe.getsockname()[1])


def workspace_yaml(port: int) -> str:
    return (
        f"load_from:\n  - grpc_server:\n      host: {_HOST}\n      port: {port}\n      location_name: {LOCATION_NAME}\n"
    )


def start_code_server(settings: Settings, env: dict[str, str], log: Path, ready_timeout_s: float = 180.0) -> CodeServer:
    """Start the code server (its own session, like the rest of Dagster's processes) and wait
    until it serves the location; raises `OperatorError` with its log's tail if it cannot."""
    port = _free_port()
    dagster = Path(sys.executable).with_name("dagster")
    command = [
        str(dagster) if dagster.exists() else "dagster",
        "code-server", "start", "-m", CODE_MODULE, "-h", _HOST, "-p", str(port),
        "--location-name", LOCATION_NAME,
    ]  # fmt: skip
    log.parent.mkdir(parents=True, exist_ok=True)
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as handle:
        process = subprocess.Popen(
            command, env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + ready_timeout_s
    try:
        while _READY_LINE not in _read_from(log, offset):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = _read_from(log, offset)[-2000:]
                raise OperatorError(f"the Dagster code server did not start (log {log}):\n{tail}")
            time.sleep(0.2)
    except BaseException:  # not started, or Ctrl-C meanwhile: nothing is left running
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        raise
    workspace = settings.home / "workspace.yaml"
    workspace.write_text(workspace_yaml(port))
    return CodeServer(process, port, workspace, log)


def _read_from(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            return handle.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
