"""The Prometheus registry every planpipe process registers its metrics on, and its endpoint.

A dedicated `CollectorRegistry` rather than prometheus-client's global one: importing a
metrics module twice (tests, Dagster code-location reloads) or alongside other libraries
never raises "Duplicated timeseries", and `/metrics` exposes only planpipe's own series.
"""

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

REGISTRY: Final = CollectorRegistry(auto_describe=True)

HEALTHY: Final = frozenset({"ok", "degraded"})


def start_metrics_server(
    port: int, addr: str = "127.0.0.1", *, health: Callable[[], Mapping[str, object]] | None = None
) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve `REGISTRY` on http://addr:port/metrics from a daemon thread, and with `health`, its report
    as JSON on /health (HTTP 200 while its `status` is ok or degraded, else 503).

    Binds to loopback by default; pass addr="0.0.0.0" to expose it to a scraper.
    Port 0 picks a free port (read it from `server.server_port`). Call
    `server.shutdown()` to stop.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif health is not None and path in ("/health", "/healthz"):
                report = dict(health())
                code = 200 if report.get("status") in HEALTHY else 503
                self._reply(code, "application/json", json.dumps(report, default=str, sort_keys=True).encode())
            else:
                self._reply(404, "text/plain", b"not found: /metrics" + (b", /health\n" if health else b"\n"))

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="planpipe-metrics-http", daemon=True)
    thread.start()
    return server, thread
