"""HTTP endpoints: /metrics, /healthz and a landing page, served from threads."""

from __future__ import annotations

import html
import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.registry import Collector

from exporter import __version__
from exporter.exposition import EMPTY, Exposition, compose
from exporter.store import PollStatus, Store


@dataclass(frozen=True)
class Health:
    """Liveness of the poll loop itself; Prefect being down does not make the exporter unhealthy."""

    healthy: bool
    body: dict[str, Any]


class App:
    """The routes, with their collaborators injected; the handler class only adapts HTTP."""

    def __init__(
        self,
        store: Store[Exposition],
        own: Collector,
        telemetry_path: str,
        health_window: float | None,
        api_url: str,
        monotonic: Callable[[], float],
        started_at: float,
    ) -> None:
        self.store = store
        self.own = own
        self.telemetry_path = telemetry_path
        self.health_window = health_window
        self.api_url = api_url
        self.monotonic = monotonic
        self.started_at = started_at

    def health(self) -> Health:
        status: PollStatus = self.store.status()
        now = self.monotonic()
        turned = status.loop_turned_at if status.loop_turned_at is not None else self.started_at
        age = now - turned
        # Without polling (sidecar only) there is no loop to watch.
        healthy = self.health_window is None or age <= self.health_window
        return Health(
            healthy,
            {
                "status": "ok" if healthy else "poll loop stalled",
                "seconds_since_poll_loop_turned": round(age, 3),
                "prefect_up": status.up,
            },
        )

    def index(self) -> bytes:
        status = self.store.status()
        error = html.escape(status.last_error or "none")
        path = html.escape(self.telemetry_path)
        return (
            "<!doctype html><html><head><title>prefect-exporter</title></head><body>"
            f"<h1>prefect-exporter {html.escape(__version__)}</h1>"
            f"<p>Prefect API: {html.escape(self.api_url)}<br>"
            f"Last poll: {'succeeded' if status.up else 'failed or not yet done'}<br>"
            f"Last error: {error}</p>"
            f'<ul><li><a href="{path}">{path}</a></li>'
            '<li><a href="/healthz">/healthz</a></li></ul></body></html>'
        ).encode()


def _handler(app: App) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"prefect-exporter/{__version__}"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == app.telemetry_path:
                published = app.store.current()
                cached = published.rendered if published is not None else EMPTY
                response = compose(
                    cached,
                    app.own,
                    self.headers.get("Accept"),
                    self.headers.get("Accept-Encoding"),
                )
                extra = {"Content-Encoding": "gzip"} if response.gzip else {}
                self._send(200, response.content_type, response.body, extra)
            elif path == "/healthz":
                health = app.health()
                body = json.dumps(health.body).encode()
                self._send(200 if health.healthy else 503, "application/json", body)
            elif path == "/":
                self._send(200, "text/html; charset=utf-8", app.index())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(
            self, code: int, content_type: str, body: bytes, extra: dict[str, str] | None = None
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes are frequent and uninteresting; the poll log line is the one to read.
            pass

    return Handler


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class MetricsServer:
    """A threading HTTP server that runs in the background until `stop()`."""

    def __init__(self, host: str, port: int, app: App) -> None:
        server_class = _IPv6Server if ":" in host else ThreadingHTTPServer
        self._server = server_class((host, port), _handler(app))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
