"""Benchmark: the worker-log tailer on a large file: lines per second and peak memory.

    .venv/bin/python -m bench.tailer [--size-mb 1024] [--out bench/results-tailer.md]

Writes a log of Prefect console lines (client retries, httpx responses, ordinary worker lines,
tracebacks) of the given size, then reads it with the real tailer from the start, in-process,
and reports lines/s, MB/s and the peak resident memory before and after.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry

from exporter.statefile import StateFile
from exporter.worklog import Position, PositionStore, WorkerLog, WorkerLogMetrics, WorkerLogTailer

LINES = [
    b"12:03:48.856 | INFO    | httpx - HTTP Request: POST http://127.0.0.1:4200/api/work_pools/"
    b'p/get_scheduled_flow_runs "HTTP/1.1 429 Too Many Requests"\n',
    b"12:03:48.862 | DEBUG   | prefect.client - Received response with retryable status code "
    b"429. Another attempt will be made in 1.19s. This is attempt 1/6.\n",
    b"12:03:49.100 | INFO    | httpx - HTTP Request: POST http://127.0.0.1:4200/api/work_pools/"
    b'p/get_scheduled_flow_runs "HTTP/1.1 200 OK"\n',
    b"12:03:49.200 | INFO    | prefect.flow_runs.worker - Worker 'w' submitting flow run "
    b"'6cbc5610-334b-4c7a-bcb0-66967dda7bc2'\n",
    b"Traceback (most recent call last):\n",
]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results-tailer.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "worker.log"
        block = b"".join(LINES) * 2000
        target = args.size_mb * 1024 * 1024
        written = 0
        with path.open("wb") as f:
            while written < target:
                f.write(block)
                written += len(block)
        lines_in_file = written // len(block) * len(LINES) * 2000
        registry = CollectorRegistry()
        log = structlog.get_logger()
        state = PositionStore(StateFile(Path(tmp) / "positions.json", "worker_log", log))
        # Start at the top of the file, as after a restart with a saved position at 0.
        state.save({str(path): Position(path.stat().st_ino, 0)})
        tailer = WorkerLogTailer([WorkerLog("w", path)], WorkerLogMetrics(registry), state, log)
        before = peak_rss_mib()
        started = time.perf_counter()
        total = 0
        while total < lines_in_file:
            total += tailer.tick()
        elapsed = time.perf_counter() - started
        tailer.close()
        after = peak_rss_mib()
        responses = registry.get_sample_value(
            "prefect_worker_api_responses_total", {"worker": "w", "code": "429"}
        )
    text = (
        "# Worker-log tailer on a large file\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} by `python -m bench.tailer` on this project's "
        "2-core machine, reading a freshly written file from its start in one process.\n\n"
        "| file | lines | time | lines/s | MB/s | peak RSS before / after |\n"
        "|---|---|---|---|---|---|\n"
        f"| {written / 2**20:.0f} MiB | {total:,} | {elapsed:.1f} s | {total / elapsed:,.0f} | "
        f"{written / 2**20 / elapsed:.1f} | {before:.0f} / {after:.0f} MiB |\n\n"
        f"429 responses counted: {responses:,.0f} (expected {lines_in_file // len(LINES):,}).\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
