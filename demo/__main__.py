"""`python -m demo`: a self-contained local stack showing what the exporter answers.

Starts a Prefect server (SQLite, state under .demo/), two work pools with queues, a process
worker that runs flows from one queue and ignores another, a burst of runs, and the exporter;
prints where /metrics is and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import io
import signal
import socket
import sys
import time
from datetime import UTC, datetime, timedelta
from types import FrameType

from demo.stack import ROOT, ExporterProcess, PrefectAdmin, PrefectServer, Worker, free_port, past


def port_or_free(preferred: int) -> int:
    with socket.socket() as sock:
        # As servers do, so that a port left in TIME_WAIT by a previous demo counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            return free_port()
    return preferred


def seed(admin: PrefectAdmin) -> None:
    """Two pools: one flowing, one stuck in ways the metrics and alerts point at."""
    admin.create_pool("demo-pool", concurrency_limit=4)
    admin.create_queue("demo-pool", "critical", priority=1, concurrency_limit=2)
    admin.create_queue("demo-pool", "nobody-polls-this")
    flowing = admin.create_deployment("quick-runs", "demo-pool", "critical")
    stuck = admin.create_deployment("forgotten-runs", "demo-pool", "nobody-polls-this")
    admin.create_runs(flowing, 20, parameters={"seconds": 3})
    admin.create_runs(flowing, 5, scheduled=datetime.now(UTC) + timedelta(minutes=10))
    admin.create_runs(stuck, 30, scheduled=past(600))
    admin.create_pool("paused-pool", paused=True)
    paused = admin.create_deployment("paused-runs", "paused-pool", "default")
    admin.create_runs(paused, 3, scheduled=past(120))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument(
        "--exit-after-ready",
        action="store_true",
        help="stop everything once /metrics shows the demo (for tests)",
    )
    args = parser.parse_args()
    # Piped to a file or `tee`, Python would hold these lines in a block buffer until exit:
    # the URL of /metrics must show as soon as it is known.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)

    home = ROOT / ".demo"
    home.mkdir(exist_ok=True)
    server = PrefectServer(home / f"prefect-{int(time.time())}", port=port_or_free(4200))
    worker = Worker(server, "demo-pool", "demo-worker", queues=["critical"], heartbeat_seconds=10)
    exporter = ExporterProcess(
        server.api_url,
        "--poll.interval=5s",
        "--log.format=json",
        log_path=home / "exporter.log",
        port=port_or_free(9716),
    )
    print(f"demo: starting a Prefect server on {server.api_url} (state in {server.home})")
    try:
        server.start()
        admin = PrefectAdmin(server.api_url)
        seed(admin)
        admin.close()
        worker.start()
        exporter.start()
        print(f"demo: worker 'demo-worker' polls demo-pool/critical; log {worker.log_path}")
        print(f"demo: exporter log {exporter.log_path}")
        print(f"\n  metrics:  {exporter.url}/metrics\n  health:   {exporter.url}/healthz\n")
        print(f"  try: curl -s {exporter.url}/metrics | grep -E 'backlog|online|oldest_due'\n")
        if args.exit_after_ready:
            return 0
        print("demo: running; press Ctrl-C to stop")

        def interrupted(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupted)
        # Also SIGINT: started in the background by a non-interactive shell, Python inherits
        # SIGINT ignored and Ctrl-C (or a test's SIGINT) would leave the stack running.
        signal.signal(signal.SIGINT, interrupted)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        print("demo: stopping")
        exporter.stop()
        worker.stop()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
