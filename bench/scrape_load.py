"""Load test for /metrics: many concurrent scrapers against the exporter's HTTP server, on loopback.

    .venv/bin/python -m bench.scrape_load [--clients 50] [--seconds 10] [--pattern burst]
        [--interval 1] [--keep-alive] [--slow-readers 0] [--queues 20] [--url URL]
        [--busy-poller] [--untuned]

Without `--url`, a child process serves a synthetic snapshot (`--queues` queues in one pool)
through `exporter.server.MetricsServer`, so that clients and server do not share a GIL. The
clients are stdlib threads; each request has a 10 s time-out and the run stops after
`--seconds` (at most 120), so the run is bounded in count and time.

Patterns:
  burst   every client scrapes once per `--interval`, all on the same tick: `--clients`
          connections arrive at once, the worst case for that many Prometheus servers.
  closed  every client scrapes again as soon as its answer arrives: measures throughput; the
          latency is then about clients / throughput, whatever the server does.

`--busy-poller` adds, in the serving child, a thread that does a poll's CPU work without pause
(decoding pages of 200 flow runs and parsing them into records, as `prefect_api` does): the
worst case for the GIL the HTTP server shares with the poller. The child tunes the process as
the exporter does (`exporter.cli.tune_for_scrapes`) unless `--untuned`.

`--slow-readers N` first opens N connections that each send 600 pipelined `GET` requests in one
write and never read an answer (the review's slow reader); they stay open for the whole run.

Prints one JSON line: requests answered, errors by exception type, latency percentiles in
milliseconds (connect to last body byte), requests per second and, on Linux, the kernel's
listen-queue overflow count during the run (dropped SYNs: the symptom of a too-small backlog).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MAX_CLIENTS = 500
MAX_SLOW_READERS = 64
PIPELINED = 600
MAX_SECONDS = 120.0
REQUEST_TIMEOUT = 10.0


def flow_run_page(rows: int) -> bytes:
    """A `/flow_runs/filter` answer of `rows` Scheduled runs, shaped as Prefect 3's (trimmed)."""
    run = {
        "id": "0f0e0d0c-0000-4000-8000-000000000001",
        "name": "silly-fox",
        "flow_id": "0f0e0d0c-0000-4000-8000-000000000002",
        "deployment_id": "0f0e0d0c-0000-4000-8000-000000000003",
        "work_queue_id": "0f0e0d0c-0000-4000-8000-000000000004",
        "work_queue_name": "queue-1",
        "work_pool_name": "pool",
        "state_type": "SCHEDULED",
        "state_name": "Scheduled",
        "expected_start_time": "2026-11-29T19:00:00Z",
        "next_scheduled_start_time": "2026-11-29T19:00:00Z",
        "start_time": None,
        "tags": ["auto-scheduled"],
        "labels": {"prefect.flow.id": "0f0e0d0c-0000-4000-8000-000000000002"},
        "empirical_policy": {"retries": 0, "retry_delay": 0, "pause_keys": []},
        "state": {
            "type": "SCHEDULED",
            "name": "Scheduled",
            "timestamp": "2026-11-29T18:00:00Z",
            "state_details": {"scheduled_time": "2026-11-29T19:00:00Z", "deferred": False},
        },
    }
    return json.dumps([run] * rows).encode()


def busy_poller(stop: threading.Event) -> None:
    """A poll's CPU work without pause: decode and parse pages of flow runs until `stop`."""
    from exporter.prefect_parse import parse_run

    answer = flow_run_page(200)
    while not stop.is_set():
        for row in json.loads(answer):
            parse_run(row)


def serve(queues: int, busy: bool = False, tuned: bool = True) -> None:
    """Child process: serve a snapshot of `queues` queues, print the port, stop at stdin EOF."""
    from prometheus_client import CollectorRegistry

    from exporter.cli import tune_for_scrapes
    from exporter.collector import ExporterCollector, SnapshotCollector
    from exporter.exposition import Exposition, render
    from exporter.records import KNOWN_STATE_NAMES
    from exporter.server import App, MetricsServer
    from exporter.snapshot import PoolState, QueueState, Snapshot
    from exporter.store import Store

    now = time.time()
    snapshot = Snapshot(
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
                tuple((str(name), n % 7) for name in KNOWN_STATE_NAMES),
                n % 5,
                now - 60,
                None,
            )
            for n in range(queues)
        ),
        (),
    )
    store: Store[Exposition] = Store(lambda s: render(SnapshotCollector(s)), 3600)
    store.publish(snapshot, 0.1)
    own = CollectorRegistry()
    own.register(ExporterCollector(store.status))
    app = App(store, own, "/metrics", None, "http://bench", time.monotonic, time.monotonic())
    if tuned:
        tune_for_scrapes()
    server = MetricsServer("127.0.0.1", 0, app)
    server.start()
    stop = threading.Event()
    if busy:
        threading.Thread(target=busy_poller, args=(stop,), daemon=True).start()
    print(server.port, flush=True)
    sys.stdin.read()  # the parent closes the pipe, or dies, when the run is over
    stop.set()
    server.stop()


def listen_overflows() -> int | None:
    """The kernel's TcpExt ListenOverflows counter (Linux), or None where it is not readable."""
    try:
        lines = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return None
    ext = [line for line in lines if line and line[0] == "TcpExt:"]
    if len(ext) < 2 or "ListenOverflows" not in ext[0]:
        return None
    return int(ext[1][ext[0].index("ListenOverflows")])


@dataclass
class Results:
    """What the client threads record, under `lock`."""

    latencies_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    body_bytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def scrape(
    conn: http.client.HTTPConnection | None, host: str, port: int, path: str
) -> tuple[http.client.HTTPConnection, int]:
    """One GET; returns the connection (kept open only with keep-alive) and the body size."""
    if conn is None:
        conn = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}")
    return conn, len(body)


def client(
    results: Results,
    url: str,
    pattern: str,
    interval: float,
    keep_alive: bool,
    start: float,
    end: float,
) -> None:
    """One scraper: scrape until `end` (monotonic seconds) in `pattern`, recording each scrape."""
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/metrics"
    conn: http.client.HTTPConnection | None = None
    tick = start
    while True:
        if pattern == "burst":
            if tick >= end:
                break
            time.sleep(max(0.0, tick - time.monotonic()))
            tick += interval
        elif time.monotonic() >= end:
            break
        began = time.monotonic()
        try:
            conn, size = scrape(conn, host, port, path)
        except Exception as exc:  # every failure is a result to count, whatever its kind
            with results.lock:
                name = type(exc).__name__
                results.errors[name] = results.errors.get(name, 0) + 1
            if conn is not None:
                conn.close()
            conn = None
            continue
        elapsed_ms = (time.monotonic() - began) * 1000
        if not keep_alive:
            conn.close()
            conn = None
        with results.lock:
            results.latencies_ms.append(elapsed_ms)
            results.body_bytes = size
    if conn is not None:
        conn.close()


def stall(host: str, port: int, path: str, count: int) -> list[socket.socket]:
    """`count` connections that each pipeline PIPELINED GETs of `path` and never read."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    socks = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT)
        socks.append(sock)
        sock.sendall(request * PIPELINED)
    return socks


def percentile(ordered: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list; 0.0 for an empty one."""
    if not ordered:
        return 0.0
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 1)


def run(
    url: str,
    clients: int,
    seconds: float,
    pattern: str,
    interval: float,
    keep_alive: bool,
    slow_readers: int = 0,
) -> dict[str, object]:
    """Drive `clients` scrapers at `url` for `seconds`; returns the figures printed as JSON."""
    results = Results()
    parts = urlsplit(url)
    stalled = stall(
        parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/metrics", slow_readers
    )
    before = listen_overflows()
    start = time.monotonic() + 0.2  # let every thread reach the first tick
    end = start + seconds
    threads = [
        threading.Thread(
            target=client,
            args=(results, url, pattern, interval, keep_alive, start, end),
            daemon=True,
        )
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + REQUEST_TIMEOUT + 5)
    for sock in stalled:
        sock.close()
    after = listen_overflows()
    ordered = sorted(results.latencies_ms)
    return {
        "clients": clients,
        "pattern": pattern,
        "interval_s": interval if pattern == "burst" else None,
        "keep_alive": keep_alive,
        "slow_readers": slow_readers,
        "seconds": seconds,
        "ok": len(ordered),
        "errors": results.errors,
        "requests_per_second": round(len(ordered) / seconds, 1),
        "p50_ms": percentile(ordered, 0.50),
        "p90_ms": percentile(ordered, 0.90),
        "p99_ms": percentile(ordered, 0.99),
        "max_ms": round(ordered[-1], 1) if ordered else 0.0,
        "body_bytes": results.body_bytes,
        "listen_overflows": after - before if after is not None and before is not None else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pattern", choices=("burst", "closed"), default="burst")
    parser.add_argument("--interval", type=float, default=1.0, help="burst: seconds between ticks")
    parser.add_argument("--keep-alive", action="store_true", help="reuse one connection per client")
    parser.add_argument("--url", help="scrape this instead of starting a server")
    parser.add_argument("--queues", type=int, default=20, help="size of the served snapshot")
    parser.add_argument(
        "--slow-readers", type=int, default=0, help="connections that pipeline and never read"
    )
    parser.add_argument(
        "--busy-poller", action="store_true", help="parse flow-run pages without pause meanwhile"
    )
    parser.add_argument("--untuned", action="store_true", help="skip tune_for_scrapes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.queues, args.busy_poller, not args.untuned)
        return
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    if args.interval <= 0:
        parser.error("--interval must be positive")
    if not 0 <= args.slow_readers <= MAX_SLOW_READERS:
        parser.error(f"--slow-readers must be 0..{MAX_SLOW_READERS}")
    if args.url:
        figures = run(
            args.url,
            args.clients,
            args.seconds,
            args.pattern,
            args.interval,
            args.keep_alive,
            args.slow_readers,
        )
        print(json.dumps(figures))
        return
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.scrape_load",
            "--serve",
            "--queues",
            str(args.queues),
            *(["--busy-poller"] if args.busy_poller else []),
            *(["--untuned"] if args.untuned else []),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        url = f"http://127.0.0.1:{port}/metrics"
        figures = run(
            url,
            args.clients,
            args.seconds,
            args.pattern,
            args.interval,
            args.keep_alive,
            args.slow_readers,
        )
        print(json.dumps(figures))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=10)


if __name__ == "__main__":
    main()
