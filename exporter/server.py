"""HTTP endpoints: /metrics, /healthz and a landing page, served by asyncio in its own thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import html
import io
import json
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog
from prometheus_client.registry import Collector
from structlog.typing import FilteringBoundLogger

from exporter import __version__
from exporter.exposition import EMPTY, OWN_SERIES_MAX_AGE, Exposition, OwnSeries, compose
from exporter.store import PollStatus, Store
from exporter.webconfig import (
    MAX_PENDING_AUTH_CHECKS,
    PLAIN,
    ActiveWebConfig,
    WebConfigLoader,
)


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
        own_max_age: float = OWN_SERIES_MAX_AGE,
    ) -> None:
        self.store = store
        # Rendered at most once per `own_max_age` seconds (see exposition.OWN_SERIES_MAX_AGE).
        self.own = OwnSeries(own, own_max_age, monotonic)
        self.telemetry_path = telemetry_path
        self.health_window = health_window
        self.api_url = api_url
        self.monotonic = monotonic
        self.started_at = started_at

    def health(self) -> Health:
        """Healthy while the poll loop turns, or waits on purpose (interval, back-off).

        Unhealthy only when the loop has neither turned nor been due to turn for longer than
        `health_window` seconds: a Retry-After of ten minutes is a planned wait, not a stall,
        and restarting the exporter then would only hit the throttled API again at once.
        """
        status: PollStatus = self.store.status()
        now = self.monotonic()
        turned = status.loop_turned_at if status.loop_turned_at is not None else self.started_at
        due = max(turned, status.loop_waits_until or turned)
        # Without polling (sidecar only) there is no loop to watch.
        healthy = self.health_window is None or now - due <= self.health_window
        body: dict[str, Any] = {
            "status": "ok" if healthy else "poll loop stalled",
            "seconds_since_poll_loop_turned": round(now - turned, 3),
            "prefect_up": status.up,
        }
        if status.loop_waits_until is not None and status.loop_waits_until > now:
            body["seconds_until_next_poll"] = round(status.loop_waits_until - now, 3)
        return Health(healthy, body)

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


# Finished handshakes the kernel queues until the event loop accepts them. socketserver's default
# of 5 overflowed under 50 concurrent scrapers: the kernel dropped their SYNs and they waited for
# retransmits (1 s, 3 s, 7 s). Linux silently caps it at net.core.somaxconn (4096 since 5.4).
LISTEN_BACKLOG = 1024

# Seconds a connection may stay open without completing a request head, counted from accept and
# from each response on a kept-alive connection. Above the usual 15 s scrape interval, so
# Prometheus reuses one connection scrape after scrape; short enough that abandoned connections
# and slowloris clients trickling a head byte by byte are closed. A waiting connection holds a
# descriptor and a small buffer, never a thread.
IDLE_TIMEOUT = 20.0

# Seconds a response may wait for a client that does not read it before the connection is
# dropped. Meanwhile the connection holds its unsent bytes (at most one response beyond the
# transport's 64 KiB high-water mark), never a thread, so other clients are served as usual.
WRITE_TIMEOUT = 10.0

# Open connections, waiting or in service. At the cap the longest-waiting idle connection is
# closed to admit a new one (or else the one waiting longest for a bcrypt check), so a flood of
# idle connections or of password guesses cannot lock scrapers out; when every connection is in
# the middle of a response, the new one is closed unanswered instead.
MAX_CONNECTIONS = 256

# Bytes of request head (request line and headers) accepted. Prometheus and browsers send well
# under 2 KiB; the cap, also the limit of each connection's asyncio reader, bounds what a client
# can make the server hold: the reader stops reading past twice the cap (plus one read of at
# most 256 KiB).
MAX_HEAD_BYTES = 16384

# How long `stop()` waits for the server's thread: SIGTERM must exit within 5 s.
_STOP_WAIT = 1.5


def plain_response(
    status: str, text: str, headers: tuple[tuple[str, str], ...] = (), version: str = "HTTP/1.1"
) -> bytes:
    """A complete `Connection: close` response with a text body: for answers given without the
    request handler (431, 500, 429, 400), with the web config's `headers` like every other.
    """
    body = text.encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers)
    return (
        f"{version} {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


_HEAD_TOO_LARGE = ("431 Request Header Fields Too Large", "request line and headers too large\n")
_INTERNAL_ERROR = ("500 Internal Server Error", "internal error, see the log\n")
_AUTH_BUSY = (
    "429 Too Many Requests",
    "too many password checks waiting; credentials that passed before are answered at once\n",
)
# Go's net/http answers plain HTTP on a TLS port so; exporter-toolkit servers therefore do too.
_HTTP_TO_HTTPS = ("400 Bad Request", "Client sent an HTTP request to an HTTPS server.\n")
# The first byte of a TLS record carrying a handshake message (RFC 8446, 5.1): a ClientHello.
_TLS_HANDSHAKE_RECORD = 0x16


def head_end(buffer: bytes | bytearray) -> int | None:
    """The index just past the blank line that ends the first request head in `buffer`.

    None while the head is incomplete. Lines may end in CRLF or a bare LF, as `http.server`
    accepts both.
    """
    ends = [
        found + length
        for found, length in ((buffer.find(b"\n\r\n"), 3), (buffer.find(b"\n\n"), 2))
        if found >= 0
    ]
    return min(ends) if ends else None


def authorization_header(head: bytes) -> str | None:
    """The value of the first `Authorization` header line of a request head, None without one."""
    for line in head.split(b"\n")[1:]:
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"authorization":
            return value.strip().decode("latin-1")
    return None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def request_path(head: bytes) -> str:
    """The path of a request head's target, without the query ("" when there is none); taken
    as `http.server` takes it (the second word of the request line), so it routes the same.
    """
    words = head.split(b"\n", 1)[0].split()
    return words[1].decode("latin-1").split("?", 1)[0] if len(words) >= 2 else ""


# Probes need no credentials: /healthz says only whether the poll loop turns. See README,
# "Securing /metrics". Their requests are answered before any credentials are checked.
UNAUTHENTICATED_PATHS = frozenset({"/healthz"})


class _Handler(BaseHTTPRequestHandler):
    """Answers one complete request head; the server, not the handler, owns the connection.

    The head comes in as bytes and the response goes out as at most two byte strings (see
    `respond`), so the handler never waits on a client and the connection's task writes the
    whole response at once. `authorized` is the verdict on the request's credentials (None: no
    authentication configured); `headers` of the web config go on every response.
    """

    server_version = f"prefect-exporter/{__version__}"
    # HTTP/1.1 keeps connections alive: Prometheus reuses one connection for every scrape.
    protocol_version = "HTTP/1.1"
    # A malformed request line then gets a status line and headers, not a bare HTTP/0.9 page.
    default_request_version = "HTTP/1.0"

    def __init__(
        self,
        app: App,
        head: bytes,
        client_address: Any,
        authorized: bool | None = None,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        # Deliberately not BaseRequestHandler.__init__, which would read and answer a socket.
        self.app = app
        self.authorized = authorized
        self.extra_headers = extra_headers
        self.client_address = client_address
        self.rfile = io.BytesIO(head)
        self._out = io.BytesIO()
        self.wfile = self._out
        # The cached part of a /metrics body, kept apart from the rest so that it is not copied.
        self._body: tuple[bytes, ...] = ()
        self.close_connection = True

    def respond(self) -> list[bytes]:
        """Run the request through the routes; returns the response as at most two writes: the
        head with the body, or, for a plain /metrics body, the head with the own series and then
        the cached exposition, apart so that it is not copied (`[b""]` for an empty request
        line: nothing to send).

        One write fewer matters while a poll holds the GIL: each write gives it up and waits up
        to the switch interval to get it back.
        """
        self.handle_one_request()
        return [self._out.getvalue(), *self._body]

    def do_GET(self) -> None:
        app = self.app
        path = self.path.split("?", 1)[0]
        if self.authorized is False and path not in UNAUTHENTICATED_PATHS:
            self._send(
                401,
                "text/plain; charset=utf-8",
                b"unauthorized\n",
                {"WWW-Authenticate": 'Basic realm="prefect-exporter", charset="UTF-8"'},
            )
        elif path == app.telemetry_path:
            published = app.store.current()
            cached = published.rendered if published is not None else EMPTY
            response = compose(
                cached,
                app.own,
                self.headers.get("Accept"),
                self.headers.get("Accept-Encoding"),
            )
            extra = {"Content-Encoding": "gzip"} if response.gzip else {}
            self._send(200, response.content_type, response.parts, extra)
        elif path == "/healthz":
            health = app.health()
            body = json.dumps(health.body).encode()
            self._send(200 if health.healthy else 503, "application/json", body)
        elif path == "/":
            self._send(200, "text/html; charset=utf-8", app.index())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(
        self,
        code: int,
        content_type: str,
        body: bytes | tuple[bytes, ...],
        extra: dict[str, str] | None = None,
    ) -> None:
        """Write the status line and headers, and the body: `bytes`, or the parts of a /metrics
        body; of two or more, the last (the cached exposition) is kept apart for `respond`."""
        parts = (body,) if isinstance(body, bytes) else body
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(sum(map(len, parts))))
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            # The body is never read, so its bytes would be taken for the next request.
            self.send_header("Connection", "close")
        self.end_headers()
        if len(parts) == 1:
            self.wfile.write(parts[0])  # small: one write with the head
            return
        for part in parts[:-1]:
            self.wfile.write(part)
        self._body = parts[-1:]

    def end_headers(self) -> None:
        # Every response, errors that http.server writes itself included, gets the headers.
        for key, value in self.extra_headers:
            self.send_header(key, value)
        super().end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes are frequent and uninteresting; the poll log line is the one to read.
        pass


class MetricsServer:
    """Serves `App` over HTTP/1.1 with asyncio streams, on an event loop in a thread of its own.

    The loop is not the poller's, so a poll's parsing never delays a scrape. Each connection is a
    task that reads request heads and writes responses; routing and rendering (the exporter's
    own series beside the cached bytes) are quick and run on the loop. So idle, slowly sending
    and slowly reading clients cost a task and their buffers, never a thread, and none of them
    delays another.

    Limits (all keyword arguments, defaults are the module constants): `backlog` finished
    handshakes queued by the kernel; `idle_timeout` seconds for a connection to complete a request
    head, from accept or from its previous response, before it is closed; `write_timeout` seconds
    a response may wait for a client that does not read it before the connection is dropped;
    `max_connections` open at once, beyond which the longest-idle one is closed (or else the one
    waiting longest for a bcrypt check), or the new one when none is either; `max_head_bytes` of
    request head, beyond which the answer is 431; `max_pending_auth` bcrypt checks waiting or
    running, beyond which a request whose credentials are not remembered gets 429 at once. The
    listening socket is bound in the constructor, which raises `OSError` when the address is
    unavailable and `ValueError` for a limit that is not positive.

    `web` (the `--web.config.file` loader, None for plain HTTP without authentication) is asked
    for its current configuration at every connection (TLS handshake, within the idle timeout)
    and every request (credentials, headers), so a rotated certificate or a changed password is
    used without a restart. Whether TLS is on is decided once, here; a first byte that is not a
    TLS handshake record gets Go's `400 Client sent an HTTP request to an HTTPS server`. bcrypt
    checks that the loader's cache cannot answer run on one thread of their own, one at a time,
    at most `max_pending_auth` queued: a client guessing passwords delays new credentials by at
    most that many checks and never delays remembered ones or /healthz.
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: App,
        *,
        backlog: int = LISTEN_BACKLOG,
        idle_timeout: float = IDLE_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        max_head_bytes: int = MAX_HEAD_BYTES,
        max_pending_auth: int = MAX_PENDING_AUTH_CHECKS,
        log: FilteringBoundLogger | None = None,
        web: WebConfigLoader | None = None,
    ) -> None:
        limits = {
            "backlog": backlog,
            "idle_timeout": idle_timeout,
            "write_timeout": write_timeout,
            "max_connections": max_connections,
            "max_head_bytes": max_head_bytes,
            "max_pending_auth": max_pending_auth,
        }
        bad = [
            f"{name} must be positive, got {value}" for name, value in limits.items() if value <= 0
        ]
        if bad:
            raise ValueError("; ".join(bad))
        self._app = app
        self._backlog = backlog
        self._idle_timeout = idle_timeout
        self._write_timeout = write_timeout
        self._max_connections = max_connections
        self._max_head_bytes = max_head_bytes
        self._max_pending_auth = max_pending_auth
        self._log: FilteringBoundLogger = log if log is not None else structlog.get_logger()
        self._web = web
        self._tls = web is not None and web.current().ssl_context is not None
        self._bcrypt = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bcrypt")
        self._sock = self._listen(host, port, backlog)
        self._port = int(self._sock.getsockname()[1])
        # Shared between the caller's thread and the server's.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._stop_requested = asyncio.Event()
        # The loop's own state. Every open connection's task, with its writer to close it by.
        self._tasks: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        # Tasks waiting for a request head, longest-waiting first (a dict keeps insertion order).
        self._idle: dict[asyncio.Task[None], None] = {}
        # Tasks waiting for a bcrypt check, longest-waiting first: evicted after the idle ones.
        self._checking: dict[asyncio.Task[None], None] = {}
        self._closing = False
        self._refusing = False

    @staticmethod
    def _listen(host: str, port: int, backlog: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # The protocol named, not left 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only
        # on sockets whose `proto` is IPPROTO_TCP, and accepted sockets inherit it. With Nagle
        # on, a response's last short segment waited for the client's delayed acknowledgement:
        # 40 ms for one /metrics answer in ten to fifty at 1,000 queues.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            # A restarted exporter must not wait for the old socket's TIME_WAIT to pass.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            # Listening now, not at start(): connections made before start() wait in the backlog.
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
        return sock

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when 0 was asked for)."""
        return self._port

    @property
    def pending_auth_checks(self) -> int:
        """Requests waiting for their bcrypt check, the one being checked included."""
        return len(self._checking)

    @property
    def backlog(self) -> int:
        """The listen backlog asked of the kernel (which caps it at net.core.somaxconn)."""
        return self._backlog

    def start(self) -> None:
        """Start serving on the server's own thread; returns at once.

        Raises `RuntimeError` when called a second time or after `stop()`.
        """
        with self._lock:
            if self._loop is not None or self._stopped:
                raise RuntimeError("a MetricsServer starts once, and not after stop()")
            self._loop = loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._run, args=(loop,), name="metrics-server", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """Stop serving and close every connection, idle or in service; returns within 1.5 s.

        Responses not yet sent are dropped. Safe to call twice, and without `start()`.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            self._sock.close()
            self._bcrypt.shutdown(wait=False, cancel_futures=True)
            return
        with contextlib.suppress(RuntimeError):  # the loop has ended already: nothing to stop
            loop.call_soon_threadsafe(self._stop_requested.set)
        thread.join(timeout=_STOP_WAIT)
        if thread.is_alive():
            self._log.warning("http_server_stop_timed_out", waited_seconds=_STOP_WAIT)

    # --- the server's thread --------------------------------------------------------------

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            # The runner cancels whatever is left at the end and closes the loop.
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(self._serve())
        except Exception:  # the thread would end in silence: say why, once
            self._log.exception("http_server_error")
        finally:
            self._sock.close()
            self._bcrypt.shutdown(wait=False, cancel_futures=True)

    async def _serve(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._loop_error)
        server = await asyncio.start_server(
            self._accept, sock=self._sock, backlog=self._backlog, limit=self._max_head_bytes
        )
        try:
            await self._stop_requested.wait()
        finally:
            self._closing = True
            server.close()
            # Python 3.11's server leaves its connections open: cancelling a task closes its own.
            while self._tasks:
                pending = list(self._tasks)
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        if len(self._tasks) >= self._max_connections:
            # A connection waiting on bcrypt holds a guess or a first scrape; dropping it costs
            # that request, while keeping it would let guessers fill the server.
            evictable = self._idle or self._checking
            if not evictable:
                if not self._refusing:  # once per spell at the cap, not once per connection
                    self._log.warning("http_connections_refused", limit=self._max_connections)
                self._refusing = True
                writer.transport.abort()
                return
            oldest = next(iter(evictable))
            del evictable[oldest]
            oldest.cancel()
        self._refusing = False
        if self._tls:
            # The ClientHello must stay in the socket until the handshake starts: bytes read
            # into the plain stream meanwhile would be lost to it.
            transport = writer.transport
            if isinstance(transport, asyncio.ReadTransport):
                transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._converse(reader, writer))
        self._tasks[task] = writer
        self._idle[task] = None  # idle from accept: the idle timeout counts from here too
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        writer = self._tasks.pop(task)
        self._idle.pop(task, None)
        self._checking.pop(task, None)
        # However the task ended (answered, failed, cancelled before it ran), the socket closes.
        writer.transport.abort()
        if not task.cancelled() and (error := task.exception()) is not None:
            # A bug must not stop the server: log it, lose only this connection.
            self._log.error("http_server_error", exc_info=error)

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer one connection's requests in order until it closes, fails or times out."""
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        # The TCP transport: under TLS, start_tls puts an SSL transport in front of it, whose own
        # buffer count leaves out the encrypted bytes still waiting here.
        raw = writer.transport

        def unsent() -> int:
            """Bytes of responses not yet taken by the kernel, TLS layer and TCP transport."""
            outer = writer.transport.get_write_buffer_size()
            return outer + (raw.get_write_buffer_size() if raw is not writer.transport else 0)

        try:
            if self._tls:
                assert self._web is not None
                context = self._web.current().ssl_context
                assert context is not None  # the loader refuses to turn TLS off
                # The handshake counts as the first request head: same deadline, same eviction.
                async with asyncio.timeout(self._idle_timeout):
                    first = await self._peek(writer)
                    if first == b"":
                        return  # closed before saying anything
                    if first[0] != _TLS_HANDSHAKE_RECORD:
                        await self._refuse_plain_http(reader, writer)
                        return
                    await writer.start_tls(context, ssl_handshake_timeout=self._idle_timeout)
            keep = True
            while keep:
                self._idle[task] = None
                try:
                    # One deadline for the whole head: trickling bytes buys a client no time.
                    async with asyncio.timeout(self._idle_timeout):
                        head = await self._read_head(reader)
                finally:
                    self._idle.pop(task, None)
                if head == b"":
                    return  # the client closed its side
                if head is None:
                    response, keep = [self._plain(*_HEAD_TOO_LARGE)], False
                else:
                    response, keep = await self._respond(head, peer)
                if not any(response):
                    return  # nothing to say to an empty request line: http.server just closes
                for part in response:
                    # Not joined, and as a view: while the client keeps up, the kernel takes a
                    # whole part at once and the large cached part is never copied by us.
                    writer.write(memoryview(part))
                if unsent():
                    # The kernel took only part of it: wait for the client to read, not forever.
                    async with asyncio.timeout(self._write_timeout):
                        await writer.drain()
                if keep:
                    # One request per turn of the loop: a client that pipelines hundreds of them
                    # takes turns with the other connections.
                    await asyncio.sleep(0)
            writer.close()
            if unsent():
                # close() sends the rest first; `_forget` would drop it, so wait, with a limit.
                async with asyncio.timeout(self._write_timeout):
                    await writer.wait_closed()
        except (TimeoutError, OSError):
            pass  # silent too long, not reading, or gone: expected; `_forget` drops the socket

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request head; b"" when the client closes first, None when over the cap."""
        head = bytearray()
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return b""  # closed between requests or mid-head: nobody to answer
            except asyncio.LimitOverrunError:
                return None  # one line longer than the cap, which is also the reader's limit
            head += line
            if len(head) > self._max_head_bytes:
                return None
            # Only the line just read can complete the head: look at it and the break before it.
            if head_end(head[-len(line) - 1 :]) is not None:
                return bytes(head)

    def _plain(self, status: str, text: str, version: str = "HTTP/1.1") -> bytes:
        """`plain_response` with the headers of the web config in force."""
        try:
            headers = self._web.current().config.headers if self._web is not None else ()
        except Exception:  # a bug in the loader must not stop the error answer itself
            self._log.exception("http_request_failed", path=None)
            headers = ()
        return plain_response(status, text, headers, version)

    async def _peek(self, writer: asyncio.StreamWriter) -> bytes:
        """The first byte the client sent, left in the socket for the TLS handshake; b"" when
        the client closed first. Waits for it without a deadline: the caller sets one.
        """
        # A duplicate descriptor of the same socket: the transport's own may not be watched by
        # anyone else, and reading with MSG_PEEK takes nothing from the stream.
        fd = os.dup(writer.get_extra_info("socket").fileno())
        loop = asyncio.get_running_loop()
        with socket.socket(fileno=fd) as peek:
            peek.setblocking(False)
            while True:
                try:
                    return peek.recv(1, socket.MSG_PEEK)
                except BlockingIOError:
                    pass
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _resolve, readable)
                try:
                    await readable
                finally:
                    loop.remove_reader(fd)

    async def _refuse_plain_http(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer a plain HTTP request on the TLS port with Go's 400, then close.

        The request is read and dropped for up to a second after the answer: closing a socket
        with unread bytes sends a reset, which can destroy the answer before the client reads it.
        """
        writer.write(self._plain(*_HTTP_TO_HTTPS, version="HTTP/1.0"))
        if writer.can_write_eof():
            writer.write_eof()
        transport = writer.transport
        if isinstance(transport, asyncio.ReadTransport):
            transport.resume_reading()
        with contextlib.suppress(TimeoutError, OSError):
            async with asyncio.timeout(1.0):
                while await reader.read(65536):
                    pass

    async def _respond(self, head: bytes, peer: Any) -> tuple[list[bytes], bool]:
        """The response to one request head (parts to send in order), and whether the
        connection stays open after it."""
        handler = None
        try:
            active = self._web.current() if self._web is not None else PLAIN
            authorized: bool | None = None
            if request_path(head) not in UNAUTHENTICATED_PATHS:
                authorized = await self._authorized(active, head)
                if authorized is None and active.auth is not None:
                    return [plain_response(*_AUTH_BUSY, active.config.headers)], False
            handler = _Handler(self._app, head, peer, authorized, active.config.headers)
            response = handler.respond()
        except Exception:  # a bug in a route: answer 500, log it, keep serving others
            self._log.exception("http_request_failed", path=getattr(handler, "path", None))
            return [self._plain(*_INTERNAL_ERROR)], False
        return response, not handler.close_connection

    async def _authorized(self, active: ActiveWebConfig, head: bytes) -> bool | None:
        """The verdict on the request's credentials; None when no authentication is configured,
        or when it is and `max_pending_auth` checks are already waiting (then counted).
        """
        if active.auth is None:
            return None
        header = authorization_header(head)
        verdict = active.auth.cached(header)
        if verdict is not None:
            return verdict  # remembered, missing or malformed: no queue
        if len(self._checking) >= self._max_pending_auth:
            if self._web is not None:
                self._web.count_refused_auth_check()
            return None
        task = asyncio.current_task()
        assert task is not None
        self._checking[task] = None
        try:
            loop = asyncio.get_running_loop()
            # Cancelled (evicted, stopped) while queued, the check is taken off the queue too.
            return await loop.run_in_executor(self._bcrypt, active.auth.verify, header)
        finally:
            self._checking.pop(task, None)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # asyncio's own reports (accept out of descriptors, a failing callback) go to our log.
        self._log.error(
            "http_server_error", message=context.get("message"), exc_info=context.get("exception")
        )
