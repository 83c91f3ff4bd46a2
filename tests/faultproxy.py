"""A fault-injecting reverse proxy in front of a real Prefect server (tests only).

It forwards every request unchanged, except those its rule picks, which it answers itself
(429 with Retry-After, say). Every request is recorded with who sent it and what it got, so
tests can compare the proxy's own count with what the exporter and the worker's log report.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import httpx

from tests.tcprelay import pump

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "content-encoding",
    "host",
}


@dataclass(frozen=True)
class Record:
    received: float  # monotonic seconds
    answered: float
    method: str
    path: str
    client: str  # "exporter", "worker" or "other", from the User-Agent
    status: int
    injected: bool


@dataclass(frozen=True)
class Fault:
    """The proxy's own answer: status, headers and body, after an optional delay (seconds)."""

    status: int
    headers: dict[str, str]
    body: bytes = b'{"detail":"injected"}'
    delay: float = 0.0


Rule = Callable[[str, str, str], Fault | None]  # (client, method, path) -> fault or None
# Called after a forwarded request was answered: (client, method, path, status).
After = Callable[[str, str, str, int], None]


class Once:
    """One fault for the first request of `client` whose path contains `path`, then none."""

    def __init__(self, client: str, path: str, fault: Fault, times: int = 1) -> None:
        self.client, self.path, self.fault, self.left = client, path, fault, times
        self._lock = threading.Lock()

    def __call__(self, client: str, method: str, path: str) -> Fault | None:
        if client != self.client or self.path not in path:
            return None
        with self._lock:
            if self.left <= 0:
                return None
            self.left -= 1
            return self.fault


def client_of(user_agent: str) -> str:
    if user_agent.startswith("prefect-exporter/"):
        return "exporter"
    if user_agent.startswith("prefect/"):
        return "worker"
    return "other"


class EveryNth:
    """Answer every n-th request of one client with a fault, at most `limit` times."""

    def __init__(self, client: str, n: int, fault: Fault, limit: int) -> None:
        self.client, self.n, self.fault, self.limit = client, n, fault, limit
        self.seen = 0
        self.sent = 0
        self._lock = threading.Lock()

    def __call__(self, client: str, method: str, path: str) -> Fault | None:
        if client != self.client:
            return None
        with self._lock:
            self.seen += 1
            if self.sent < self.limit and self.seen % self.n == 0:
                self.sent += 1
                return self.fault
        return None


class FaultProxy:
    """The proxy: `rule` picks the requests it answers itself; `after` sees the others' status.

    WebSocket upgrades are refused (404) unless `websockets`: then the connection is relayed to
    the upstream byte for byte, and counted in `tunnels`, not in `records` (not an API request).
    """

    def __init__(
        self, upstream: str, rule: Rule, after: After | None = None, websockets: bool = False
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.rule = rule
        self.after = after
        self.websockets = websockets
        self.tunnels = 0
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=30)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def injected(self, client: str, status: int = 429) -> list[Record]:
        with self._lock:
            return [
                r for r in self.records if r.client == client and r.injected and r.status == status
            ]

    def requests_of(self, client: str) -> list[Record]:
        with self._lock:
            return [r for r in self.records if r.client == client]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                received = time.monotonic()
                client = client_of(self.headers.get("User-Agent", ""))
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    if proxy.websockets:
                        self._tunnel()
                        return
                    # No WebSockets here: Prefect's worker then heartbeats over REST.
                    self._reply(404, {}, b"", received, client, injected=False)
                    return
                fault = proxy.rule(client, self.command, self.path)
                if fault is not None:
                    if fault.delay:
                        time.sleep(fault.delay)
                    self._reply(
                        fault.status, fault.headers, fault.body, received, client, injected=True
                    )
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                try:
                    upstream = proxy._client.request(
                        self.command, proxy.upstream + self.path, headers=headers, content=body
                    )
                except httpx.HTTPError:
                    self._reply(502, {}, b"", received, client, injected=False)
                    return
                passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
                self._reply(
                    upstream.status_code, passed, upstream.content, received, client, injected=False
                )
                if proxy.after is not None:
                    proxy.after(client, self.command, self.path, upstream.status_code)

            def _tunnel(self) -> None:
                """Relay this upgrade and the frames after it both ways until either side closes."""
                target = urlsplit(proxy.upstream)
                head = [f"{self.command} {target.path}{self.path} HTTP/1.1"]
                head += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() != "host"]
                head.append(f"Host: {target.netloc}")
                self.close_connection = True
                with proxy._lock:
                    proxy.tunnels += 1
                try:
                    upstream = socket.create_connection(
                        (target.hostname or "127.0.0.1", target.port or 80), timeout=30
                    )
                except OSError:
                    return
                upstream.settimeout(None)
                with upstream:
                    upstream.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                    back = threading.Thread(
                        target=pump, args=(upstream, self.connection), daemon=True
                    )
                    back.start()
                    pump(self.connection, upstream)
                    back.join(timeout=5)

            def _reply(
                self,
                status: int,
                headers: dict[str, str],
                body: bytes,
                received: float,
                client: str,
                injected: bool,
            ) -> None:
                # The client may give up reading (an oversized body, a poll's time-out) or hang
                # up before the answer: counted all the same, without a traceback.
                with contextlib.suppress(OSError):
                    self.send_response(status)
                    for key, value in headers.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    if "content-type" not in {k.lower() for k in headers}:
                        self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(body)
                with proxy._lock:
                    proxy.records.append(
                        Record(
                            received,
                            time.monotonic(),
                            self.command,
                            self.path,
                            client,
                            status,
                            injected,
                        )
                    )

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
