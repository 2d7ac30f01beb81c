"""Browser-test fixtures: the real Dagster instance, a dagster-webserver on it, and headless Chromium.

Chromium is Debian's (/usr/bin/chromium, see scripts/install-chromium.sh): Playwright's own
browser downloads are not available here. A missing browser fails the tests loudly instead
of skipping them.
"""

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, sync_playwright

from planpipe.demo.cli import dagster_environment
from planpipe.settings import REPO_ROOT, Settings

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Without these Chromium phones home at start-up and the closed network refuses its connections.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
WEBSERVER_START_TIMEOUT_S = 90.0
WEBSERVER_STOP_TIMEOUT_S = 20.0
# The "Join the Dagster community" dialog covers the page on 127.0.0.1; dismissed in the browser
# only (the UI's own localStorage key), so the instance's home is not touched.
# Wide enough for the global lineage to be drawn with detailed asset nodes (zoom ≥ 0.6).
VIEWPORT = {"width": 2400, "height": 1300}
DISMISS_COMMUNITY_NUX = "window.localStorage.setItem('communityNux', JSON.stringify('1'));"


@dataclass(frozen=True)
class Webserver:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_until_serving(server: Webserver, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(
                f"dagster-webserver exited with {server.process.returncode} before serving; "
                f"log {server.log}:\n{_log_tail(server.log)}"
            )
        try:
            with urllib.request.urlopen(f"{server.url}/server_info", timeout=5) as response:
                if response.status == 200:
                    return
                last_error = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            last_error = str(error)
        time.sleep(0.5)
    pytest.fail(
        f"dagster-webserver did not answer {server.url}/server_info within {timeout_s:.0f} s ({last_error}); "
        f"log {server.log}:\n{_log_tail(server.log)}"
    )


def _signal_all(pgid: int, members: list[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
    for member in members:  # also any child that left the group
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(sig)


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the webserver's process group (webserver + its code server); SIGKILL what outlives the timeout."""
    try:
        leader = psutil.Process(process.pid)
        members = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        members = []
    _signal_all(process.pid, members, signal.SIGTERM)
    _, alive = psutil.wait_procs(members, timeout=WEBSERVER_STOP_TIMEOUT_S)
    if alive:
        _signal_all(process.pid, alive, signal.SIGKILL)
        _, alive = psutil.wait_procs(alive, timeout=WEBSERVER_STOP_TIMEOUT_S)
    process.wait(WEBSERVER_STOP_TIMEOUT_S)
    assert not alive, f"dagster-webserver processes left behind: {[p.pid for p in alive]}"


@pytest.fixture(scope="session")
def chromium_executable() -> Path:
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's chromium headless. "
            f"Run scripts/install-chromium.sh (as root or with sudo; {REPO_ROOT / 'scripts' / 'install-chromium.sh'}) "
            "and rerun.",
            pytrace=False,
        )
    return CHROMIUM


@pytest.fixture(scope="session")
def dagster_webserver(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Webserver]:
    """`dagster-webserver` on the test stack's instance, in its own process group; killed at teardown."""
    port = _free_port()
    log = tmp_path_factory.mktemp("dagster-webserver") / "webserver.log"
    executable = REPO_ROOT / ".venv" / "bin" / "dagster-webserver"
    command = [str(executable), "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command,
            env=dagster_environment(stack_settings),
            cwd=REPO_ROOT,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = Webserver(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        _wait_until_serving(server, WEBSERVER_START_TIMEOUT_S)
        yield server
    finally:
        _stop_process_group(process)


@pytest.fixture(scope="session")
def playwright_session() -> Iterator[Playwright]:
    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="session")
def browser(chromium_executable: Path, playwright_session: Playwright) -> Iterator[Browser]:
    # Playwright gives every launch a fresh temporary --user-data-dir (it rejects one in args).
    browser = playwright_session.chromium.launch(executable_path=str(chromium_executable), args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context: BrowserContext = browser.new_context(viewport={"width": VIEWPORT["width"], "height": VIEWPORT["height"]})
    context.set_default_timeout(30_000)
    context.add_init_script(DISMISS_COMMUNITY_NUX)
    yield context.new_page()
    context.close()


@pytest.fixture
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dagster-ui-screenshots")
