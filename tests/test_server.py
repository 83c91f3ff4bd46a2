"""Tests for the HTTP routes and connection handling, served by the real server on a free port."""

from __future__ import annotations

import gzip
import http.client
import select
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from typing import Any

import httpx
import pytest
import structlog.testing
from prometheus_client import CollectorRegistry

from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.exposition import Exposition, render
from exporter.records import KNOWN_STATE_NAMES
from exporter.server import MAX_HEAD_BYTES, App, MetricsServer, _Handler, head_end
from exporter.snapshot import PoolState, QueueState, Snapshot
from exporter.store import Store

# Generous bound on every wait for the server to act: waits end as soon as the condition holds.
DEADLINE = 10.0


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_app(store: Store[Exposition], clock: Clock) -> App:
    own = CollectorRegistry()
    own.register(ExporterCollector(store.status))
    return App(
        store,
        own,
        "/metrics",
        health_window=60,
        api_url="http://prefect:4200/api",
        monotonic=clock,
        started_at=clock.now,
        own_max_age=0.0,  # the fake clock stands still: render the own series every time
    )


def make_store(clock: Clock) -> Store[Exposition]:
    return Store(lambda s: render(SnapshotCollector(s)), 90, monotonic=clock)


@contextmanager
def serving(app: App, **limits: Any) -> Iterator[MetricsServer]:
    server = MetricsServer("127.0.0.1", 0, app, **limits)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def setup() -> Iterator[tuple[str, Store[Exposition], Clock]]:
    clock = Clock()
    store = make_store(clock)
    with serving(make_app(store, clock)) as server:
        yield f"http://127.0.0.1:{server.port}", store, clock


class TestRoutes:
    """/metrics, /healthz, / and unknown paths."""

    def test_metrics_before_the_first_poll_has_only_exporter_series(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """prefect_up 0 is served at once; no Prefect series are invented."""
        url, _, _ = setup
        body = httpx.get(f"{url}/metrics").text
        assert "prefect_up 0.0" in body
        assert "prefect_work_pool" not in body

    def test_metrics_after_a_poll_gzip_when_asked(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """A published snapshot is served; gzip is used when accepted."""
        url, store, clock = setup
        store.publish(
            Snapshot(clock.now, (PoolState("p", "process", "READY", None, 1),), (), ()), 0.1
        )
        raw = httpx.get(f"{url}/metrics", headers={"Accept-Encoding": "gzip"})
        assert raw.headers["Content-Encoding"] == "gzip"
        assert 'prefect_work_pool_online_workers{work_pool="p"} 1.0' in raw.text
        assert "prefect_up 1.0" in raw.text
        plain = httpx.get(f"{url}/metrics", headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in plain.headers
        # httpx has already decoded the gzip body: the same lines as the plain one (the plain
        # body puts the exporter's own series first, the gzipped one last).
        assert sorted(raw.text.splitlines()) == sorted(plain.text.splitlines())

    def test_healthz_reports_the_loop_not_prefect(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """A failing Prefect still leaves /healthz at 200; a stalled loop gives 503."""
        url, store, clock = setup
        store.record_failure("connection refused", 1.0)
        answer = httpx.get(f"{url}/healthz")
        assert answer.status_code == 200
        assert answer.json()["prefect_up"] is False
        clock.now += 61
        assert httpx.get(f"{url}/healthz").status_code == 503

    def test_landing_page_links_metrics_and_health(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """The landing page is HTML with links."""
        url, _, _ = setup
        page = httpx.get(url + "/")
        assert page.status_code == 200
        assert 'href="/metrics"' in page.text
        assert 'href="/healthz"' in page.text

    def test_unknown_path_is_404(self, setup: tuple[str, Store[Exposition], Clock]) -> None:
        """Anything else is not found."""
        url, _, _ = setup
        assert httpx.get(f"{url}/nope").status_code == 404


def snapshot_of(queues: int, now: float) -> Snapshot:
    """One pool with `queues` queues: enough series for a body of many TCP segments."""
    return Snapshot(
        now,
        (PoolState("pool", "process", "READY", 10, 1),),
        tuple(
            QueueState(
                "pool",
                f"queue-{n}",
                "READY",
                1,
                None,
                now,
                tuple((str(name), n) for name in KNOWN_STATE_NAMES),
                n,
                now - 60,
                None,
            )
            for n in range(queues)
        ),
        (),
    )


def connect(server: MetricsServer, stack: ExitStack) -> socket.socket:
    """A client socket to the server, closed with `stack`; reads time out after DEADLINE."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE)
    return stack.enter_context(closing(sock))


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection; TimeoutError if it never does."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass  # closed with our request bytes unread: what it sent before is still read above
    return b"".join(chunks)


def plain_app() -> App:
    clock = Clock()
    return make_app(make_store(clock), clock)


class TestConcurrentScrapers:
    """Many scrapers at once are all answered; waiting connections never tie up the threads."""

    def test_fifty_concurrent_clients_all_get_the_full_body(self) -> None:
        """50 clients connecting at the same moment all get 200 and the whole body."""
        clock = Clock()
        store = make_store(clock)
        store.publish(snapshot_of(50, clock.now), 0.1)
        results: list[tuple[int, bytes] | BaseException] = []
        lock = threading.Lock()
        with serving(make_app(store, clock)) as server:
            # Plain, as the clients below ask (httpx would ask for gzip).
            expected = httpx.get(
                f"http://127.0.0.1:{server.port}/metrics", headers={"Accept-Encoding": "identity"}
            ).content
            start = threading.Barrier(50)

            def scrape() -> None:
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
                try:
                    start.wait(timeout=DEADLINE)
                    conn.request("GET", "/metrics")
                    response = conn.getresponse()
                    result: tuple[int, bytes] | BaseException = (response.status, response.read())
                except Exception as exc:  # recorded and asserted on below
                    result = exc
                finally:
                    conn.close()
                with lock:
                    results.append(result)

            threads = [threading.Thread(target=scrape) for _ in range(50)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=2 * DEADLINE)
        assert len(expected) > 50_000
        assert [r for r in results if not isinstance(r, tuple)] == []
        assert results == [(200, expected)] * 50

    def test_idle_and_half_sent_connections_leave_the_server_free(self) -> None:
        """20 silent connections and a half-sent request do not delay a scrape."""
        with ExitStack() as stack:
            server = stack.enter_context(serving(plain_app()))
            for _ in range(20):
                connect(server, stack)
            connect(server, stack).sendall(b"GET /metrics HTTP/1.1\r\nHost: slow\r\n")
            answer = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=DEADLINE)
            assert answer.status_code == 200
            assert "prefect_up" in answer.text


# The review's slow reader: one send of pipelined scrapes (16 KiB), then nothing read at all.
PIPELINED = 600
PIPELINED_SCRAPES = b"GET /metrics HTTP/1.1\r\n\r\n" * PIPELINED


def big_app() -> App:
    """An app whose /metrics body is over 50 KB, so a client that does not read falls behind."""
    clock = Clock()
    store = make_store(clock)
    store.publish(snapshot_of(50, clock.now), 0.1)
    return make_app(store, clock)


def slow_reader(server: MetricsServer, stack: ExitStack) -> socket.socket:
    """A connection that pipelines PIPELINED scrapes in one send and never reads the answers."""
    sock = connect(server, stack)
    sock.sendall(PIPELINED_SCRAPES)
    return sock


class TestSlowReaders:
    """Clients that do not read their answers cost buffers, never the others' service."""

    def test_clients_that_pipeline_and_never_read_do_not_delay_a_scrape(self) -> None:
        """With 10 connections each owed 600 answers and reading none, scrapes still complete."""
        with ExitStack() as stack:
            # A write timeout beyond the test's deadline: only the design can keep others served.
            server = stack.enter_context(serving(big_app(), write_timeout=3 * DEADLINE))
            for _ in range(10):
                slow_reader(server, stack)
            url = f"http://127.0.0.1:{server.port}"
            for _ in range(3):
                scrape = httpx.get(f"{url}/metrics", timeout=DEADLINE)
                health = httpx.get(f"{url}/healthz", timeout=DEADLINE)
                assert (scrape.status_code, health.status_code) == (200, 200)
                assert "prefect_work_queue_status" in scrape.text

    def test_a_client_that_never_reads_is_dropped_after_the_write_timeout(self) -> None:
        """At a cap of one connection, a reader that stalls holds the slot only for the timeout."""
        with ExitStack() as stack:
            server = stack.enter_context(serving(big_app(), write_timeout=0.5, max_connections=1))
            stalled = slow_reader(server, stack)
            url = f"http://127.0.0.1:{server.port}/healthz"
            answered = None
            deadline = time.monotonic() + DEADLINE
            while answered is None and time.monotonic() < deadline:
                try:
                    answered = httpx.get(url, timeout=DEADLINE).status_code
                except httpx.TransportError:
                    # Refused while the stalled client holds the only slot: try again shortly.
                    select.select([], [], [], 0.05)
            assert answered == 200
            received = read_until_closed(stalled)
            assert 0 < received.count(b"HTTP/1.1 200 OK\r\n") < PIPELINED

    def test_stop_drops_responses_a_client_is_not_reading(self) -> None:
        """stop() returns promptly with a stalled response and closes that connection too."""
        server = MetricsServer("127.0.0.1", 0, big_app(), write_timeout=3 * DEADLINE)
        server.start()
        with ExitStack() as stack:
            stack.callback(server.stop)
            stalled = slow_reader(server, stack)
            # Once the first answer is here, the server has begun writing the stalled ones.
            readable, _, _ = select.select([stalled], [], [], DEADLINE)
            assert readable
            stopping = threading.Thread(target=server.stop)
            stopping.start()
            stopping.join(timeout=DEADLINE)
            assert not stopping.is_alive()
            assert read_until_closed(stalled).startswith(b"HTTP/1.1 200 OK\r\n")


class TestIdleTimeout:
    """A connection must complete a request within the idle timeout, or it is closed."""

    def test_a_connection_that_sends_nothing_is_closed(self) -> None:
        """A client that connects and stays silent is disconnected after the timeout."""
        with ExitStack() as stack:
            server = stack.enter_context(serving(plain_app(), idle_timeout=0.5))
            assert read_until_closed(connect(server, stack)) == b""

    def test_a_kept_alive_connection_is_closed_when_idle(self) -> None:
        """After a response, a connection left unused is disconnected after the timeout."""
        with serving(plain_app(), idle_timeout=0.5) as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
            with closing(conn):
                conn.request("GET", "/healthz")
                assert conn.getresponse().read()
                assert conn.sock is not None
                assert read_until_closed(conn.sock) == b""

    def test_trickling_a_head_does_not_extend_the_deadline(self) -> None:
        """A slowloris client sending one header byte at a time is still disconnected."""
        with ExitStack() as stack:
            server = stack.enter_context(serving(plain_app(), idle_timeout=0.5))
            sock = connect(server, stack)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nX-Slow: ")
            closed = False
            deadline = time.monotonic() + DEADLINE
            while not closed and time.monotonic() < deadline:
                try:
                    sock.sendall(b"a")
                except OSError:
                    closed = True  # the server has closed it: writing fails
                    break
                readable, _, _ = select.select([sock], [], [], 0.05)
                closed = bool(readable) and read_until_closed(sock) == b""
            assert closed


class TestKeepAlive:
    """HTTP/1.1 connections stay open for more requests, as Prometheus expects."""

    def test_consecutive_requests_reuse_one_connection(self) -> None:
        """Two scrapes travel over the same socket, and the server does not announce a close."""
        with serving(plain_app()) as server:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DEADLINE)
            with closing(conn):
                conn.request("GET", "/metrics")
                first = conn.getresponse()
                first.read()
                sock = conn.sock
                conn.request("GET", "/metrics")
                second = conn.getresponse()
                assert b"prefect_up" in second.read()
                assert (first.version, first.will_close, second.status) == (11, False, 200)
                assert conn.sock is sock

    def test_pipelined_requests_are_all_answered(self) -> None:
        """Three requests sent in one write get three responses, the last one closing."""
        request = b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n"
        last = b"GET /nope HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        with ExitStack() as stack:
            sock = connect(stack.enter_context(serving(plain_app())), stack)
            sock.sendall(request * 2 + last)
            assert read_until_closed(sock).count(b"HTTP/1.1 404 Not Found\r\n") == 3

    def test_an_http_1_0_request_is_answered_then_closed(self) -> None:
        """HTTP/1.0 without keep-alive gets its answer and the connection ends."""
        with ExitStack() as stack:
            sock = connect(stack.enter_context(serving(plain_app())), stack)
            sock.sendall(b"GET /nope HTTP/1.0\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 404")


def head_of(size: int) -> bytes:
    """A /healthz request head of exactly `size` bytes, padded with header lines of 200 bytes."""
    start, end = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n", b"\r\n"
    lines: list[bytes] = []
    remaining = size - len(start) - len(end)
    while remaining:
        length = remaining if remaining <= 300 else 200
        lines.append(b"X-Pad-%03d: " % len(lines) + b"a" * (length - 13) + b"\r\n")
        remaining -= length
    head = start + b"".join(lines) + end
    assert len(head) == size
    return head


class TestBadInput:
    """Bad requests get a clear status code; none of them stops the server."""

    def test_an_oversized_head_gets_431_and_a_close(self) -> None:
        """Headers beyond the cap are refused before they are buffered whole."""
        with ExitStack() as stack:
            server = stack.enter_context(serving(plain_app(), max_head_bytes=1024))
            sock = connect(server, stack)
            sock.sendall(b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 431 ")
            assert httpx.get(f"http://127.0.0.1:{server.port}/").status_code == 200

    @pytest.mark.parametrize(
        ("size", "status"),
        [(MAX_HEAD_BYTES, b"HTTP/1.1 200 "), (MAX_HEAD_BYTES + 1, b"HTTP/1.1 431 ")],
    )
    def test_the_head_cap_counts_every_line(self, size: int, status: bytes) -> None:
        """A head of many short lines is served up to 16 KiB in all and refused one byte over."""
        with ExitStack() as stack:
            sock = connect(stack.enter_context(serving(plain_app())), stack)
            sock.sendall(head_of(size))
            assert read_until_closed(sock).startswith(status)

    def test_a_malformed_request_line_gets_400(self) -> None:
        """A request line that is not `METHOD PATH VERSION` is a 400."""
        with ExitStack() as stack:
            sock = connect(stack.enter_context(serving(plain_app())), stack)
            sock.sendall(b"NONSENSE\r\n\r\n")
            assert read_until_closed(sock).startswith(b"HTTP/1.1 400 ")

    def test_a_request_with_a_body_closes_the_connection(self) -> None:
        """An unread body must not be taken for the next request: the answer closes."""
        with ExitStack() as stack:
            sock = connect(stack.enter_context(serving(plain_app())), stack)
            sock.sendall(b"GET /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            reply = read_until_closed(sock)
            assert reply.count(b"HTTP/1.1 ") == 1
            assert b"\r\nConnection: close\r\n" in reply

    def test_a_failing_route_gets_500_and_a_logged_traceback(self) -> None:
        """A bug in a route answers 500, is logged with its traceback, and others are served."""

        class BrokenIndex(App):
            def index(self) -> bytes:
                raise RuntimeError("boom")

        clock = Clock()
        store = make_store(clock)
        app = BrokenIndex(store, CollectorRegistry(), "/metrics", 60, "x", clock, clock.now)
        with structlog.testing.capture_logs() as logs, serving(app) as server:
            url = f"http://127.0.0.1:{server.port}"
            assert httpx.get(url + "/").status_code == 500
            assert httpx.get(url + "/healthz").status_code == 200
        failed = [entry for entry in logs if entry["event"] == "http_request_failed"]
        assert [(e["path"], e["exc_info"]) for e in failed] == [("/", True)]


class TestConnectionLimits:
    """The listen backlog absorbs bursts; open connections and threads are bounded."""

    def test_the_listen_backlog_queues_at_least_128_handshakes(self) -> None:
        """Before anything is accepted, the kernel completes 128 connections (socketserver: 6)."""
        server = MetricsServer("127.0.0.1", 0, plain_app())
        assert server.backlog >= 128
        with ExitStack() as stack, closing(selectors.DefaultSelector()) as selector:
            stack.callback(server.stop)
            for _ in range(128):
                sock = stack.enter_context(closing(socket.socket()))
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", server.port))
                selector.register(sock, selectors.EVENT_WRITE)
            connected = 0
            deadline = time.monotonic() + DEADLINE
            while connected < 128 and time.monotonic() < deadline:
                for key, _ in selector.select(0.1):
                    done = selector.unregister(key.fileobj).fileobj
                    assert isinstance(done, socket.socket)
                    assert done.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    connected += 1
            assert connected == 128

    def test_at_the_cap_the_longest_idle_connection_makes_room(self) -> None:
        """With 3 connections allowed and 3 idle, a scrape still succeeds; the oldest is closed."""
        with ExitStack() as stack:
            server = stack.enter_context(serving(plain_app(), max_connections=3))
            oldest = connect(server, stack)
            connect(server, stack)
            connect(server, stack)
            answer = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=DEADLINE)
            assert answer.status_code == 200
            assert read_until_closed(oldest) == b""

    def test_limits_must_be_positive(self) -> None:
        """Every limit that is not positive is named in one error."""
        with pytest.raises(ValueError, match="idle_timeout") as error:
            MetricsServer("127.0.0.1", 0, plain_app(), max_connections=0, idle_timeout=-1)
        assert str(error.value) == (
            "idle_timeout must be positive, got -1; max_connections must be positive, got 0"
        )


class TestSegments:
    """Responses leave in few writes, each pushed at once."""

    def test_accepted_connections_have_nagle_off(self) -> None:
        """TCP_NODELAY on every connection: with Nagle's algorithm on, the last short segment
        of a large answer waited for the client's delayed acknowledgement (40 ms)."""
        server = MetricsServer("127.0.0.1", 0, plain_app())
        server.start()
        with ExitStack() as stack:
            stack.callback(server.stop)
            sock = connect(server, stack)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            writers = list(server._tasks.values())
            assert len(writers) == 1
            accepted = writers[0].get_extra_info("socket")
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

    def test_a_small_answer_is_one_write_and_metrics_two(self) -> None:
        """Head and body of a small answer go together; a /metrics answer is the head with the
        own series, then the cached exposition as it was rendered (the same object)."""
        clock = Clock()
        store = make_store(clock)
        store.publish(snapshot_of(3, clock.now), 0.1)
        app = make_app(store, clock)
        small = _Handler(app, b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n", ("t", 1)).respond()
        assert len(small) == 1
        assert small[0].endswith(b"not found\n")
        big = _Handler(app, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", ("t", 1)).respond()
        published = store.current()
        assert published is not None
        assert len(big) == 2
        assert big[1] is published.rendered.text.plain
        assert b"prefect_up 1.0" in big[0]
        head, _, own = big[0].partition(b"\r\n\r\n")
        assert f"Content-Length: {len(own) + len(big[1])}".encode() in head
        gzipped = _Handler(
            app, b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\n\r\n", ("t", 1)
        ).respond()
        assert len(gzipped) == 1  # built per scrape anyway: sent with the head
        head, _, body = gzipped[0].partition(b"\r\n\r\n")
        assert f"Content-Length: {len(body)}".encode() in head
        assert b"prefect_up 1.0" in gzip.decompress(body)


class TestStop:
    """stop() returns promptly whatever the clients are doing, and closes their connections."""

    def test_stop_returns_with_idle_kept_alive_and_half_sent_connections(self) -> None:
        """Silent, kept-alive and half-sent connections neither delay stop() nor survive it."""
        server = MetricsServer("127.0.0.1", 0, plain_app())
        server.start()
        with ExitStack() as stack:
            stack.callback(server.stop)
            clients = [connect(server, stack) for _ in range(10)]
            half = connect(server, stack)
            half.sendall(b"GET /metrics HTTP/1.1\r\n")
            kept = connect(server, stack)
            kept.sendall(b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
            assert kept.recv(65536).startswith(b"HTTP/1.1 404")
            stopping = threading.Thread(target=server.stop)
            stopping.start()
            stopping.join(timeout=DEADLINE)
            assert not stopping.is_alive()
            for sock in [*clients, half, kept]:
                assert read_until_closed(sock) == b""

    def test_stop_without_start_releases_the_port(self) -> None:
        """A server that never started stops, twice if asked, and refuses connections after."""
        server = MetricsServer("127.0.0.1", 0, plain_app())
        port = server.port
        server.stop()
        server.stop()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=DEADLINE).close()


class TestHeadEnd:
    """Finding the end of a request head in received bytes."""

    @pytest.mark.parametrize(
        ("received", "end"),
        [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 27),
            (b"GET / HTTP/1.1\nHost: a\n\n", 24),
            (b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n", 18),
            (b"GET / HTTP/1.1\r\nHost: a\r\n", None),
            (b"", None),
        ],
    )
    def test_the_first_blank_line_ends_the_head(self, received: bytes, end: int | None) -> None:
        """CRLF or bare LF lines; a pipelined second request is left for later."""
        assert head_end(received) == end

    def test_the_server_answers_heads_with_bare_lf_lines(self) -> None:
        """Requests typed by hand (bare LF line ends) are answered like CRLF ones."""
        with ExitStack() as stack:
            sock = connect(stack.enter_context(serving(plain_app())), stack)
            sock.sendall(
                b"GET /nope HTTP/1.1\nHost: t\n\nGET /nope HTTP/1.1\nConnection: close\n\n"
            )
            assert read_until_closed(sock).count(b"HTTP/1.1 404 Not Found\r\n") == 2
