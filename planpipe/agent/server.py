"""The agent's metrics and health endpoint, on 127.0.0.1 only.

`GET /metrics`: Prometheus text — the router's and producer's metrics and the
agent's own (`planpipe_agent_*`). `GET /health`: JSON; HTTP 200 while the agent
captures (`ok`, or `degraded` when envelopes go to the spool or Redis), 503
while it starts, recovers after a crash or waits for a service it needs.
"""

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Final

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from planpipe.routing import metrics

REGISTRY: Final = metrics.REGISTRY

ENVELOPES: Final = Counter(
    "planpipe_agent_envelopes_total",
    "Envelopes the agent made durable, by where they went (kafka: acknowledged or spooled; redis).",
    ["destination"],
    registry=REGISTRY,
)
SKIPPED_REPUBLISH: Final = Counter(
    "planpipe_agent_recovered_total",
    "In-doubt envelopes found already published after a crash (not published again), by where.",
    ["where"],
    registry=REGISTRY,
)
DUPLICATES_REMOVED: Final = Counter(
    "planpipe_agent_duplicates_removed_total",
    "Copies removed by recovery because the record was already in Kafka (spool) or Kafka/spool (redis).",
    ["where"],
    registry=REGISTRY,
)
REDIS_PENDING: Final = Gauge(
    "planpipe_agent_redis_pending", "Records waiting in the agent's Redis queue.", registry=REGISTRY
)
REDIS_MOVED: Final = Counter(
    "planpipe_agent_redis_moved_total", "Records moved from Redis to Kafka by the drainer.", registry=REGISTRY
)
REDIS_EXPIRED: Final = Counter(
    "planpipe_agent_redis_expired_total",
    "Records dropped from the Redis queue by its TTL (never delivered), by topic.",
    ["topic"],
    registry=REGISTRY,
)
FALLBACK_REDIS: Final = Gauge(
    "planpipe_agent_writes_to_redis", "1 while new envelopes go to the Redis queue, else 0.", registry=REGISTRY
)
LAST_COMMIT: Final = Gauge(
    "planpipe_agent_last_commit_timestamp_seconds",
    "When the agent last committed a batch (cursor moved, envelopes durable).",
    registry=REGISTRY,
)
SAMPLES: Final = Counter(
    "planpipe_agent_samples_total", "Live EXPLAIN ANALYZE sampling, by outcome.", ["outcome"], registry=REGISTRY
)
for _destination in ("kafka", "redis"):
    ENVELOPES.labels(destination=_destination)
for _where in ("kafka", "spool", "redis"):
    SKIPPED_REPUBLISH.labels(where=_where)
for _where in ("spool", "redis"):
    DUPLICATES_REMOVED.labels(where=_where)

HEALTHY: Final = frozenset({"ok", "degraded"})


def serve(port: int, health: Callable[[], Mapping[str, object]]) -> ThreadingHTTPServer:
    """Serve /metrics and /health on 127.0.0.1:`port` (0: any free port) from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/metrics":
                self._reply(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
            elif self.path.split("?", 1)[0] in ("/health", "/healthz"):
                report = dict(health())
                code = 200 if report.get("status") in HEALTHY else 503
                self._reply(code, "application/json", json.dumps(report, default=str, sort_keys=True).encode())
            else:
                self._reply(404, "text/plain", b"not found: /metrics, /health\n")

        def _reply(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="planpipe-agent-http", daemon=True).start()
    return server
