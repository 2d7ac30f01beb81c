"""A real redis-server (Debian's package) for the agent's last-resort queue (runbook fallback 3).

`planpipe up` starts it when `PLANPIPE_REDIS=1`; `PLANPIPE_REDIS_URL` names an
existing server instead (nothing is started). The local server:

* listens on 127.0.0.1 only (`PLANPIPE_REDIS_PORT`), no Unix socket;
* keeps every write in an append-only file fsynced before each reply
  (`appendfsync always`): an entry the agent was told is stored survives a
  restart or a kill -9 of the server;
* is bounded: `maxmemory` (`PLANPIPE_REDIS_MAXMEMORY`) with `noeviction`, so a
  full server refuses writes (the agent then keeps the envelopes elsewhere)
  instead of evicting silently; envelopes expire only by the agent's TTL, which
  counts them.

`scripts/install-redis.sh` installs the package when `redis-server` is missing.
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Final

from planpipe.redact import mask_dsn
from planpipe.settings import REPO_ROOT, Settings
from planpipe.stack.errors import StackError, make_dirs, pid_alive, require_free_ports, tail

INSTALL_SCRIPT: Final = REPO_ROOT / "scripts" / "install-redis.sh"
START_TIMEOUT_S: Final = 20.0


def base_dir(settings: Settings) -> Path:
    return settings.home / "redis"


def pid_file(settings: Settings) -> Path:
    return base_dir(settings) / "redis.pid"


def log_file(settings: Settings) -> Path:
    return base_dir(settings) / "redis.log"


def server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else "")
    if not found:
        raise StackError(
            f"redis-server is not installed; run {INSTALL_SCRIPT} (Debian's redis-server package, needs root)"
        )
    return found


def config_text(settings: Settings) -> str:
    directory = base_dir(settings)
    return "\n".join(
        [
            "# planpipe local stack: the agent's last-resort queue",
            "bind 127.0.0.1",
            "protected-mode yes",
            f"port {settings.redis_port}",
            "daemonize yes",
            f"pidfile {pid_file(settings)}",
            f"logfile {log_file(settings)}",
            f"dir {directory}",
            "appendonly yes",
            "appendfsync always",
            'save ""',
            f"maxmemory {settings.redis_maxmemory}",
            "maxmemory-policy noeviction",
            "",
        ]
    )


def _pid(settings: Settings) -> int | None:
    try:
        return int(pid_file(settings).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_running(settings: Settings) -> bool:
    pid = _pid(settings)
    return pid is not None and pid_alive(pid)


def answers(url: str, timeout_s: float = 2.0) -> bool:
    import redis  # here, not at the top: every `planpipe.stack` import would pay for the client

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def start(settings: Settings) -> bool:
    """Start the local server unless disabled, external or running; returns whether this call started it."""
    if not settings.redis_url or settings.redis_external or is_running(settings):
        return False
    binary = server_binary()
    require_free_ports("Redis", {"PLANPIPE_REDIS_PORT": settings.redis_port})
    make_dirs(base_dir(settings))
    conf = base_dir(settings) / "redis.conf"
    conf.write_text(config_text(settings))
    result = subprocess.run(
        [binary, str(conf)], capture_output=True, text=True, check=False, timeout=30, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if result.returncode == 0 and answers(settings.redis_url, 0.5):
            return True
        time.sleep(0.1)
    raise StackError(
        f"Redis did not start on 127.0.0.1:{settings.redis_port} (log: {log_file(settings)})",
        f"{tail(result.stdout + result.stderr)}\n{tail(log_file(settings))}",
    )


def stop(settings: Settings, *, kill: bool = False) -> bool:
    """SIGTERM (Redis fsyncs the append-only file and exits) or, with `kill`, SIGKILL."""
    if settings.redis_external:
        return False
    pid = _pid(settings)
    if pid is None or not pid_alive(pid):
        return False
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + 30
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise StackError(f"Redis (pid {pid}) did not stop within 30 s")
        time.sleep(0.05)
    if kill:
        pid_file(settings).unlink(missing_ok=True)
    return True


def status(settings: Settings) -> dict[str, object]:
    if not settings.redis_url:
        return {"enabled": False}
    return {
        "enabled": True,
        "url": mask_dsn(settings.redis_url),
        "external": settings.redis_external,
        "answering": answers(settings.redis_url),
        "log": None if settings.redis_external else str(log_file(settings)),
    }
