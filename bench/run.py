"""Benchmark: builds realistic Prefect workloads, runs the exporter, writes a table of figures.

    .venv/bin/python -m bench.run [--out bench/results.md]

Per scenario: API requests and response bytes per poll, poll duration, /metrics latency (plain
and gzip) and size, series count, and the exporter's resident memory. Figures are measured on
this machine and written down; no test asserts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, past, wait_for

POLL_INTERVAL = 5.0
SCRAPES = 200


@dataclass(frozen=True)
class Scenario:
    name: str
    pools: int
    queues_per_pool: int
    due_runs: int
    interval: float = POLL_INTERVAL


SCENARIOS = (
    Scenario("10 due runs, 1 pool x 3 queues", 1, 3, 10),
    Scenario("1,000 due runs, 1 pool x 3 queues", 1, 3, 1_000),
    # 200 busy queues take several seconds a poll on SQLite: poll every 30 s, as by default.
    Scenario("2,000 due runs, 20 pools x 10 queues", 20, 10, 2_000, interval=30.0),
)


def seed(admin: PrefectAdmin, scenario: Scenario, tag: str) -> None:
    queues = scenario.pools * scenario.queues_per_pool
    per_queue, extra = divmod(scenario.due_runs, queues)
    index = 0
    for p in range(scenario.pools):
        pool = f"{tag}-pool-{p}"
        admin.create_pool(pool, concurrency_limit=10)
        for q in range(scenario.queues_per_pool):
            queue = "default" if q == 0 else f"queue-{q}"
            if q:
                admin.create_queue(pool, queue)
            deployment = admin.create_deployment(f"{pool}-{queue}", pool, queue)
            count = per_queue + (1 if index < extra else 0)
            index += 1
            if count:
                admin.create_runs(deployment, count, scheduled=past(120))


def polls(log: Path) -> list[dict[str, float]]:
    lines = log.read_text().splitlines()
    return [json.loads(line) for line in lines if '"poll_succeeded"' in line]


def counter_sum(text: str, name: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
    )


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(
        line.split(":", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":" in line
    )
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def latency(url: str, headers: dict[str, str]) -> tuple[float, float, int]:
    samples = []
    size = 0
    with httpx.Client() as client:
        for _ in range(SCRAPES):
            started = time.perf_counter()
            response = client.get(url, headers=headers)
            samples.append((time.perf_counter() - started) * 1000)
            size = (
                len(response.content)
                if "gzip" not in headers.get("Accept-Encoding", "")
                else int(response.headers.get("Content-Length", 0))
            )
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.95)], size


def fmt_latency(figures: tuple[float, float, int]) -> str:
    p50, p95, size = figures
    return f"{p50:.2f} / {p95:.2f} ms ({size / 1024:.0f} KiB)"


def measure(server: PrefectServer, scenario: Scenario, index: int, workdir: Path) -> dict[str, str]:
    admin = PrefectAdmin(server.api_url)
    seed(admin, scenario, f"s{index}")
    admin.close()
    log = workdir / f"exporter-{index}.log"
    exporter = ExporterProcess(
        server.api_url,
        f"--poll.interval={scenario.interval}s",
        "--prefect.requests-per-minute=100000",
        "--poll.concurrency=4",
        log_path=log,
    )
    exporter.start()
    try:
        wait_for(lambda: len(polls(log)) >= 2, 10 * scenario.interval, "two polls")
        first = exporter.scrape_text()
        n0 = len(polls(log))
        wait_for(lambda: len(polls(log)) >= n0 + 3, 10 * scenario.interval, "three more polls")
        last = exporter.scrape_text()
        done = polls(log)[n0:]
        n = len(done)
        requests = statistics.median(p["requests"] for p in done)
        core = statistics.median(p.get("core_requests") or 0 for p in done)
        bytes_per_poll = counter_sum(
            last, "prefect_exporter_api_response_bytes_total"
        ) - counter_sum(first, "prefect_exporter_api_response_bytes_total")
        polls_between = counter_sum(last, "prefect_exporter_polls_total") - counter_sum(
            first, "prefect_exporter_polls_total"
        )
        duration = statistics.median(p["duration_seconds"] for p in done)
        url = f"{exporter.url}/metrics"
        plain = latency(url, {"Accept-Encoding": "identity"})
        zipped = latency(url, {"Accept-Encoding": "gzip"})
        series = sum(1 for line in last.splitlines() if line and not line.startswith("#"))
        assert exporter.process is not None
        rss, peak = rss_kib(exporter.process.pid)
        backlog = counter_sum(last, "prefect_work_queue_backlog_runs")
    finally:
        exporter.stop()
    return {
        "scenario": scenario.name,
        "backlog served": f"{backlog:.0f}",
        "requests/poll": f"{requests:.0f}",
        "core requests/poll": f"{core:.0f}",
        "KiB read/poll": f"{bytes_per_poll / max(polls_between, 1) / 1024:.1f}",
        f"poll duration (median of {n})": f"{duration * 1000:.0f} ms",
        "series": str(series),
        "/metrics p50/p95 plain": fmt_latency(plain),
        "/metrics p50/p95 gzip": fmt_latency(zipped),
        "RSS / peak": f"{rss / 1024:.0f} / {peak / 1024:.0f} MiB",
    }


def table(rows: list[dict[str, str]]) -> str:
    header = list(rows[0])
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row.get(h, "") for h in header) + " |" for row in rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.md")
    parser.add_argument("--only", type=int, nargs="*", help="run only these scenario numbers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = []
        for index, scenario in enumerate(SCENARIOS):
            if args.only and index + 1 not in args.only:
                continue
            # A fresh server per scenario, so each row polls exactly its own workload.
            server = PrefectServer(workdir / f"home-{index}")
            server.start()
            try:
                row = measure(server, scenario, index, workdir)
            finally:
                server.stop()
            print(json.dumps(row))
            rows.append(row)
    # Column titles differ by poll count; normalise to the first row's keys for one table.
    keys = list(rows[0])
    rows = [dict(zip(keys, row.values(), strict=True)) for row in rows]
    text = (
        "# Benchmark results\n\n"
        f"Measured {time.strftime('%Y-%m-%d')} by `python -m bench.run` on this project's "
        "2-core machine: a real Prefect server (SQLite) with the workload of each row, "
        f"the exporter polling every {POLL_INTERVAL:g} s (30 s for the widest), "
        f"{SCRAPES} sequential scrapes per format, a fresh server per row. Core requests are "
        "those for pools, queues, workers and runs; the rest read concurrency limits and pages "
        "of new events.\n\n" + table(rows) + "\n"
    )
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
