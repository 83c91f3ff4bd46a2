"""Benchmark: API requests per poll with 10 concurrency limits, and with 200 events in one poll.

.venv/bin/python -m bench.limits_events [--out bench/results-limits-events.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from bench.run import polls
from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, past, wait_for

INTERVAL = 5.0


def steady_requests(log: Path, after: int, count: int = 3) -> float:
    wait_for(lambda: len(polls(log)) >= after + count, 20 * INTERVAL, f"{count} polls")
    return statistics.median(p["requests"] for p in polls(log)[after : after + count])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results-limits-events.md"
    )
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = PrefectServer(Path(tmp) / "home")
        server.start()
        admin = PrefectAdmin(server.api_url)
        admin.create_pool("bench", concurrency_limit=20)
        for name in ("a", "b"):
            admin.create_queue("bench", name)
        log = Path(tmp) / "exporter.log"
        exporter = ExporterProcess(
            server.api_url,
            f"--poll.interval={INTERVAL}s",
            "--events.settle=2s",
            "--prefect.requests-per-minute=100000",
            log_path=log,
        )
        exporter.start()
        try:
            base = steady_requests(log, len(polls(log)) + 1)
            rows.append(("1 pool, 3 idle queues, no limits, no events", f"{base:.0f}"))

            for i in range(4):
                admin.create_tag_limit(f"tag-{i}", 5)
            for i in range(3):
                admin.create_global_limit(f"global-{i}", 5)
            for i in range(3):
                admin.create_deployment(f"limited-{i}", "bench", "default", concurrency_limit=2)
            with_limits = steady_requests(log, len(polls(log)) + 1)
            rows.append(
                (
                    "same + 10 limits (4 tag, 3 global, 3 deployment), no slots taken",
                    f"{with_limits:.0f}",
                )
            )

            deployment = admin.create_deployment("burst", "bench", "a")
            before = len(polls(log))
            admin.create_runs(deployment, 200, scheduled=past(0))
            wait_for(
                lambda: sum(p.get("events_read", 0) for p in polls(log)[before:]) >= 200,
                60,
                "200 events read",
            )
            burst = [p for p in polls(log)[before:] if p.get("events_read", 0)]
            heaviest = max(burst, key=lambda p: p["events_read"])
            rows.append(
                (
                    f"same + {heaviest['events_read']} new events in one poll "
                    "(200 runs created at once)",
                    f"{heaviest['requests']}",
                )
            )
        finally:
            exporter.stop()
            admin.close()
            server.stop()
    text = (
        "# Requests per poll: limits and events\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} by `python -m bench.limits_events`: a real Prefect "
        "server (SQLite), the exporter polling every 5 s; the figure is the exporter's own count "
        "of requests in one poll (median of three steady polls; the heaviest poll for events).\n\n"
        "| workload | API requests per poll |\n|---|---|\n"
        + "\n".join(f"| {w} | {r} |" for w, r in rows)
        + "\n"
    )
    args.out.write_text(text)
    print(json.dumps(rows))
    print(text)


if __name__ == "__main__":
    main()
