"""A stand-in for Prefect Cloud's workspace API in front of a Prefect server (tests only).

Prefect Cloud serves the same REST API as a self-hosted server, with these differences, which
the fake reproduces (sources: Prefect's docs, "REST API overview" for the URL and the header,
"API rate limits" for 429 and Retry-After; prefect-client's `determine_server_type` for the
URL prefix):

- the API lives below `https://api.prefect.cloud/api/accounts/<account>/workspaces/<workspace>`;
  any other path is 404;
- every request needs `Authorization: Bearer <API key>`; a missing or wrong key is 401;
- throttling is 429 with `Retry-After` (seconds), counted per account;
- routes of a self-hosted server's own administration are not offered (404): `/admin/...`
  (the server's version, settings, database) and `/csrf-token` (Cloud has no CSRF tokens).
  Prefect's own client does not ask Cloud for its version (`raise_for_api_version_mismatch`
  returns at once for Cloud), so the exporter must not depend on it.

`CloudRules` decides; `CloudGate` applies them to an in-process `httpx.MockTransport` handler
and `CloudProxy` to a real server over HTTP. WebSockets (the `events/out` stream) are refused
by the proxy, so the exporter pages `/events/filter`, as it does whenever the stream is down.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

ACCOUNT = "6f1b2c3d-0000-4000-8000-00000000a11c"
WORKSPACE = "0e9d8c7b-0000-4000-8000-0000000005ee"
PREFIX = f"/api/accounts/{ACCOUNT}/workspaces/{WORKSPACE}"
API_KEY = "pnu_fakeCloudKey0123456789abcdefghijklmnop"
# Route prefixes (below the workspace) of a self-hosted server that Cloud does not offer.
NOT_OFFERED = ("/admin/", "/csrf-token")


@dataclass(frozen=True)
class Answer:
    """Cloud's own answer to a request it does not forward."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class CloudRules:
    """What Cloud does with one request: its own answer, or the self-hosted path to forward to.

    `throttle` is asked once per authorised request for a Retry-After in seconds (None: not
    throttled). Every decision is recorded in `log` as (method, path, status or 0 if forwarded).
    """

    api_key: str = API_KEY
    throttle: Callable[[str, str], float | None] = lambda method, path: None
    log: list[tuple[str, str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def decide(self, method: str, path: str, authorization: str | None) -> Answer | str:
        """Cloud's answer, or the path below a self-hosted server's root to forward to."""
        answer = self._decide(method, path, authorization)
        with self._lock:
            self.log.append((method, path, answer.status if isinstance(answer, Answer) else 0))
        return answer

    def _decide(self, method: str, path: str, authorization: str | None) -> Answer | str:
        route, _, query = path.partition("?")
        if not route.startswith(PREFIX + "/"):
            return Answer(404, {}, b'{"detail":"Not Found"}')
        if authorization != f"Bearer {self.api_key}":
            return Answer(401, {}, b'{"detail":"Invalid authentication credentials"}')
        rest = route.removeprefix(PREFIX)
        if rest.startswith(NOT_OFFERED):
            return Answer(404, {}, b'{"detail":"Not Found"}')
        retry_after = self.throttle(method, rest)
        if retry_after is not None:
            return Answer(
                429, {"Retry-After": f"{retry_after:g}"}, b'{"detail":"Rate limit exceeded"}'
            )
        return "/api" + rest + (f"?{query}" if query else "")

    def statuses(self, status: int) -> list[tuple[str, str]]:
        """(method, path) of the requests Cloud answered itself with `status`."""
        with self._lock:
            return [(m, p) for m, p, s in self.log if s == status]


class CloudGate:
    """An httpx.MockTransport handler: Cloud's rules in front of `inner` (a self-hosted fake)."""

    def __init__(self, rules: CloudRules, inner: Callable[[httpx.Request], httpx.Response]) -> None:
        self.rules = rules
        self.inner = inner

    def __call__(self, request: httpx.Request) -> httpx.Response:
        target = request.url.raw_path.decode()
        answer = self.rules.decide(request.method, target, request.headers.get("Authorization"))
        if isinstance(answer, Answer):
            return httpx.Response(answer.status, headers=answer.headers, content=answer.body)
        forwarded = httpx.Request(
            request.method,
            request.url.copy_with(raw_path=answer.encode()),
            headers=request.headers,
            content=request.content,
        )
        return self.inner(forwarded)


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length"}
_HOP_BY_HOP |= {"content-encoding", "host", "authorization"}


class CloudProxy:
    """Cloud's rules over HTTP in front of a real Prefect server at `upstream` (its root URL)."""

    def __init__(self, upstream: str, rules: CloudRules) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules = rules
        self._client = httpx.Client(timeout=30)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def api_url(self) -> str:
        """The workspace URL to give the exporter, as Cloud's would be."""
        return f"http://127.0.0.1:{self._server.server_address[1]}{PREFIX}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if self.headers.get("Upgrade", "").lower() == "websocket":
                    self._reply(Answer(404, {}, b""))
                    return
                answer = proxy.rules.decide(
                    self.command, self.path, self.headers.get("Authorization")
                )
                if isinstance(answer, Answer):
                    self._reply(answer)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                try:
                    upstream = proxy._client.request(
                        self.command, proxy.upstream + answer, headers=headers, content=body
                    )
                except httpx.HTTPError:
                    self._reply(Answer(502, {}, b""))
                    return
                passed = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP}
                self._reply(Answer(upstream.status_code, passed, upstream.content))

            def _reply(self, answer: Answer) -> None:
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.body)))
                if "content-type" not in {k.lower() for k in answer.headers}:
                    self.send_header("Content-Type", "application/json")
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(answer.body)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler
