"""HTTP endpoints: /metrics, /healthz and a landing page, served by a bounded pool of threads."""

from __future__ import annotations

import contextlib
import errno
import html
import io
import json
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog
from prometheus_client.registry import Collector
from structlog.typing import FilteringBoundLogger

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


# Finished handshakes the kernel queues until the reactor accepts them. socketserver's default of
# 5 overflowed under 50 concurrent scrapers: the kernel dropped their SYNs and they waited for
# retransmits (1 s, 3 s, 7 s). Linux silently caps it at net.core.somaxconn (4096 since 5.4).
LISTEN_BACKLOG = 1024

# Seconds a connection may stay open without completing a request head, counted from accept and
# from each response on a kept-alive connection. Above the usual 15 s scrape interval, so
# Prometheus reuses one connection scrape after scrape; short enough that abandoned connections
# and slowloris clients trickling a head byte by byte are closed. A waiting connection holds a
# descriptor and a small buffer, never a thread.
IDLE_TIMEOUT = 20.0

# Seconds a response may block on a client that does not read it before the connection is
# dropped; the worker thread is tied up meanwhile.
WRITE_TIMEOUT = 10.0

# Handler threads. Rendering is serialized by the GIL, so more threads add no throughput (and
# lengthen the wait for the GIL); enough that a few clients slow to read their response, each
# holding a thread up to WRITE_TIMEOUT, leave the others served.
WORKERS = 8

# Open connections, waiting or in service. At the cap the longest-waiting idle connection is
# closed to admit a new one, so a flood of idle connections cannot lock scrapers out.
MAX_CONNECTIONS = 256

# Bytes of request head (request line and headers) accepted. Prometheus and browsers send well
# under 2 KiB; the cap bounds what a waiting connection can make the server hold.
MAX_HEAD_BYTES = 16384

# How long `stop()` waits for the reactor and for the workers: SIGTERM must exit within 5 s.
_STOP_WAIT = 1.5


def _plain_response(status: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


_HEAD_TOO_LARGE = _plain_response(
    "431 Request Header Fields Too Large", "request line and headers too large\n"
)
_INTERNAL_ERROR = _plain_response("500 Internal Server Error", "internal error, see the log\n")


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


class _Handler(BaseHTTPRequestHandler):
    """Answers one complete request head; the server, not the handler, owns the socket.

    The head comes in as bytes and the response goes out as bytes, so the handler never blocks
    on a client and a worker thread sends the whole response in one write.
    """

    server_version = f"prefect-exporter/{__version__}"
    # HTTP/1.1 keeps connections alive: Prometheus reuses one connection for every scrape.
    protocol_version = "HTTP/1.1"
    # A malformed request line then gets a status line and headers, not a bare HTTP/0.9 page.
    default_request_version = "HTTP/1.0"

    def __init__(self, app: App, head: bytes, client_address: Any) -> None:
        # Deliberately not BaseRequestHandler.__init__, which would read and answer the socket.
        self.app = app
        self.client_address = client_address
        self.rfile = io.BytesIO(head)
        self._out = io.BytesIO()
        self.wfile = self._out
        self.close_connection = True

    def respond(self) -> bytes:
        """Run the request through the routes; returns the full response, status line first."""
        self.handle_one_request()
        return self._out.getvalue()

    def do_GET(self) -> None:
        app = self.app
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
        if self.headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in self.headers:
            # The body is never read, so its bytes would be taken for the next request.
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes are frequent and uninteresting; the poll log line is the one to read.
        pass


class _Connection:
    """A client socket and the bytes received from it that no response has consumed yet."""

    __slots__ = ("address", "buffer", "deadline", "sock")

    def __init__(self, sock: socket.socket, address: Any) -> None:
        self.sock = sock
        self.address = address
        self.buffer = bytearray()
        self.deadline = 0.0  # monotonic seconds; meaningful while the connection waits


class MetricsServer:
    """Serves `App` over HTTP/1.1 from a reactor thread and a fixed pool of worker threads.

    The reactor accepts connections and reads request heads without blocking; only a complete
    head goes to a worker, which answers it and hands a kept-alive connection back. So idle and
    slow clients cost a descriptor, never a thread, and threads are bounded by `workers`.

    Limits (all keyword arguments, defaults are the module constants): `backlog` finished
    handshakes queued by the kernel; `idle_timeout` seconds for a connection to complete a request
    head, from accept or from its previous response, before it is closed; `write_timeout` seconds
    a response may block on a client that does not read; `max_connections` open at once, beyond
    which the longest-idle one is closed, or accepting pauses if none is idle; `max_head_bytes` of
    request head, beyond which the answer is 431. The listening socket is bound in the
    constructor, which raises `OSError` when the address is unavailable and `ValueError` for a
    limit that is not positive.
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
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
        max_head_bytes: int = MAX_HEAD_BYTES,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        limits = {
            "backlog": backlog,
            "idle_timeout": idle_timeout,
            "write_timeout": write_timeout,
            "workers": workers,
            "max_connections": max_connections,
            "max_head_bytes": max_head_bytes,
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
        self._log: FilteringBoundLogger = log if log is not None else structlog.get_logger()
        self._listener = self._listen(host, port, backlog)
        self._port = int(self._listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        # Reactor-only state. `_waiting` is in order of deadline: every deadline is "now +
        # idle_timeout" when the connection is added, and the monotonic clock never goes back.
        self._waiting: dict[_Connection, None] = {}
        self._open = 0
        self._accepting = True
        self._accept_retry_at = 0.0
        # Shared between threads.
        self._jobs: queue.SimpleQueue[_Connection | None] = queue.SimpleQueue()
        self._returned: queue.SimpleQueue[tuple[_Connection, bool]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy: set[_Connection] = set()
        self._closed = False
        self._stopping = threading.Event()
        self._reactor = threading.Thread(target=self._run, name="metrics-server", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, name=f"metrics-worker-{n}", daemon=True)
            for n in range(workers)
        ]

    @staticmethod
    def _listen(host: str, port: int, backlog: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # A restarted exporter must not wait for the old socket's TIME_WAIT to pass.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
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
    def backlog(self) -> int:
        """The listen backlog asked of the kernel (which caps it at net.core.somaxconn)."""
        return self._backlog

    def start(self) -> None:
        """Start the reactor and worker threads; returns at once."""
        for worker in self._workers:
            worker.start()
        self._reactor.start()

    def stop(self) -> None:
        """Stop serving and close every connection, idle or in service; returns within 3 s.

        Connections still waiting for a worker are closed unanswered. Safe to call twice, and
        without `start()`.
        """
        started = self._reactor.ident is not None
        self._stopping.set()
        self._wake()
        if started:
            self._reactor.join(timeout=_STOP_WAIT)
        else:
            self._close_reactor_side()
        for _ in self._workers:
            self._jobs.put(None)
        with self._lock:
            self._closed = True
            # A worker blocked writing to a client that does not read wakes up with an error.
            for conn in self._busy:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_WAIT
        for worker in self._workers:
            if worker.ident is not None:
                worker.join(timeout=max(0.0, deadline - time.monotonic()))
        self._drain_after_stop()

    # --- reactor thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._turn()
                except Exception:  # a bug must not stop the server: log it and keep serving
                    self._log.exception("http_server_error")
        finally:
            self._close_reactor_side()

    def _turn(self) -> None:
        now = time.monotonic()
        timeout = None
        if self._waiting:
            timeout = max(0.0, next(iter(self._waiting)).deadline - now)
        if not self._accepting and self._accept_retry_at > now:
            retry = self._accept_retry_at - now
            timeout = retry if timeout is None else min(timeout, retry)
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(4096)
            elif key.data in self._waiting:  # not closed earlier in this batch (evicted)
                self._receive(key.data)
        self._take_back()
        self._expire()
        if (
            not self._accepting
            and self._open < self._max_connections
            and time.monotonic() >= self._accept_retry_at
        ):
            self._selector.register(self._listener, selectors.EVENT_READ)
            self._accepting = True

    def _accept(self) -> None:
        # A bounded batch, so connections already accepted are served between batches.
        for _ in range(64):
            at_cap = self._open >= self._max_connections
            if at_cap and not self._waiting:
                self._pause_accepting(0.0)  # every connection is in service: none to evict
                return
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue  # the client gave up before it was accepted: nothing to do
                # Out of descriptors (EMFILE) or memory: retrying at once would spin.
                self._log.warning("http_accept_failed", error=exc.strerror or str(exc))
                self._pause_accepting(time.monotonic() + 1.0)
                return
            if at_cap:
                self._close(next(iter(self._waiting)))
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                # Each response is one write; there is nothing to coalesce.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Connection(sock, address)
            self._open += 1
            self._wait(conn, time.monotonic())
            # The request usually arrives with the handshake: read it without another select.
            self._receive(conn)

    def _pause_accepting(self, retry_at: float) -> None:
        # Further connections wait in the kernel's backlog.
        if self._accepting:
            self._selector.unregister(self._listener)
            self._accepting = False
        self._accept_retry_at = retry_at

    def _wait(self, conn: _Connection, now: float) -> None:
        conn.deadline = now + self._idle_timeout
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)
        self._waiting[conn] = None

    def _unwait(self, conn: _Connection) -> None:
        del self._waiting[conn]
        self._selector.unregister(conn.sock)

    def _close(self, conn: _Connection) -> None:
        if conn in self._waiting:
            self._unwait(conn)
        conn.sock.close()
        self._open -= 1

    def _receive(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(self._max_head_bytes + 1 - len(conn.buffer))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset by the client
            self._close(conn)
            return
        if not data:  # the client closed its side
            self._close(conn)
            return
        conn.buffer += data
        # The deadline is left alone: trickling bytes does not buy a slow client more time.
        if head_end(conn.buffer) is not None or len(conn.buffer) > self._max_head_bytes:
            self._unwait(conn)
            self._jobs.put(conn)

    def _take_back(self) -> None:
        now = time.monotonic()
        while True:
            try:
                conn, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            if keep:
                self._wait(conn, now)
            else:
                self._open -= 1  # the worker has closed it

    def _expire(self) -> None:
        now = time.monotonic()
        while self._waiting:
            oldest = next(iter(self._waiting))
            if oldest.deadline > now:
                return
            self._close(oldest)

    def _close_reactor_side(self) -> None:
        for conn in list(self._waiting):
            self._close(conn)
        self._selector.close()
        self._listener.close()

    # --- worker threads -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            conn = self._jobs.get()
            if conn is None:
                return
            self._serve(conn)

    def _serve(self, conn: _Connection) -> None:
        with self._lock:
            self._busy.add(conn)
        keep = False
        try:
            conn.sock.settimeout(self._write_timeout)
            more = self._answer(conn)
            if more:
                conn.sock.setblocking(False)  # back to the reactor, which never blocks
            keep = more
        except OSError:
            pass  # the client went away or stopped reading: expected, drop the connection
        except Exception:  # a bug must not cost the pool a thread: log it, drop the connection
            self._log.exception("http_server_error")
        finally:
            with self._lock:
                self._busy.discard(conn)
            if not keep:
                conn.sock.close()
            self._give_back(conn, keep)

    def _answer(self, conn: _Connection) -> bool:
        """Answer every complete head in the buffer; True to keep the connection for more."""
        while not self._stopping.is_set():
            end = head_end(conn.buffer)
            if end is None and len(conn.buffer) <= self._max_head_bytes:
                return True  # nothing, or part of the next request: wait for it in the reactor
            if end is None or end > self._max_head_bytes:
                conn.sock.sendall(_HEAD_TOO_LARGE)
                return False
            head = bytes(conn.buffer[:end])
            del conn.buffer[:end]
            handler = _Handler(self._app, head, conn.address)
            try:
                response = handler.respond()
            except Exception:  # a bug in a route: answer 500, log it, keep serving others
                self._log.exception("http_request_failed", path=getattr(handler, "path", None))
                conn.sock.sendall(_INTERNAL_ERROR)
                return False
            conn.sock.sendall(response)
            if handler.close_connection:
                return False
        return False

    def _give_back(self, conn: _Connection, keep: bool) -> None:
        with self._lock:
            if self._closed:
                if keep:
                    conn.sock.close()
                return
            self._returned.put((conn, keep))
        self._wake()

    def _wake(self) -> None:
        # A full socket buffer already means a wake-up is pending.
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_after_stop(self) -> None:
        while True:
            try:
                conn = self._jobs.get_nowait()
            except queue.Empty:
                break
            if conn is not None:
                conn.sock.close()
        while True:
            try:
                conn, keep = self._returned.get_nowait()
            except queue.Empty:
                break
            if keep:
                conn.sock.close()
        self._wake_r.close()
        self._wake_w.close()
