"""Generates prefect-exporter's Grafana dashboards; the JSON beside this script is its output.

    python grafana/generate.py      # rewrite grafana/*.json

Edit this file, not the JSON: a test regenerates the dashboards and fails on any difference, parses
every query with promtool, and runs every query against a real Prometheus scraping the exporter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TAG = "prefect-exporter"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
JOB = 'job=~"$job"'
POOL = f'{JOB}, work_pool=~"$work_pool"'
QUEUE = f'{POOL}, work_queue=~"$work_queue"'


def variables(with_queue: bool) -> list[dict[str, Any]]:
    """datasource, then job, work_pool and work_queue, each narrowing the next."""

    def query(name: str, expr: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": name.replace("_", " "),
            "type": "query",
            "datasource": DATASOURCE,
            "query": {"query": expr, "refId": name},
            "definition": expr,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"text": "All", "value": "$__all"},
            "sort": 1,
        }

    found = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
        query("job", "label_values(prefect_up, job)"),
        query("work_pool", f"label_values(prefect_work_pool_info{{{JOB}}}, work_pool)"),
    ]
    if with_queue:
        found.append(
            query(
                "work_queue",
                f"label_values(prefect_work_queue_backlog_runs{{{POOL}}}, work_queue)",
            )
        )
    return found


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.x = self.y = 0
        self.row_height = 0
        self.panels: list[dict[str, Any]] = []

    def add(self, panel: dict[str, Any], width: int, height: int) -> None:
        if self.x + width > 24:
            self.x, self.y = 0, self.y + self.row_height
            self.row_height = 0
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.panels.append(panel)
        self.x += width
        self.row_height = max(self.row_height, height)

    def row(self, title: str) -> None:
        self.x, self.y = 0, self.y + self.row_height
        self.row_height = 1
        self.add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.x, self.y, self.row_height = 0, self.y + 1, 0


def panel(
    kind: str,
    title: str,
    description: str,
    unit: str,
    targets: list[tuple[str, str]],
    **options: Any,
) -> dict[str, Any]:
    """A panel with its queries as (expr, legend) pairs."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": {"unit": unit, **options.pop("defaults", {})}, "overrides": []},
        "options": options or {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": DATASOURCE,
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(
    uid: str, title: str, description: str, layout: Layout, with_queue: bool
) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": [TAG],
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "",
        "templating": {"list": variables(with_queue)},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": [TAG], "asDropdown": True, "title": "Prefect"}],
        "panels": layout.panels,
    }


def overview() -> dict[str, Any]:
    """Are my runs flowing? One screen: backlog, oldest wait, workers, limits, 429s, health."""
    ly = Layout()
    stat = {"graphMode": "area", "colorMode": "value", "reduceOptions": {"calcs": ["lastNotNull"]}}
    ly.add(
        panel(
            "stat",
            "Runs waiting (backlog)",
            "Due runs not yet claimed, all selected queues (Q1).",
            "short",
            [
                (
                    f"sum(max by (job, work_pool, work_queue) "
                    f"(prefect_work_queue_backlog_runs{{{POOL}}}))",
                    "backlog",
                )
            ],
            **stat,
        ),
        6,
        4,
    )
    ly.add(
        panel(
            "stat",
            "Oldest wait",
            "How long the oldest due run has waited (Q1).",
            "s",
            [
                (
                    f"max(time() - prefect_work_queue_oldest_due_run_timestamp_seconds{{{POOL}}})",
                    "oldest",
                )
            ],
            **stat,
        ),
        6,
        4,
    )
    ly.add(
        panel(
            "stat",
            "Online workers",
            "Workers with a recent heartbeat (Q5).",
            "short",
            [
                (
                    f"sum(max by (job, work_pool) (prefect_work_pool_online_workers{{{POOL}}}))",
                    "online",
                )
            ],
            **stat,
        ),
        6,
        4,
    )
    ly.add(
        panel(
            "stat",
            "Prefect API reachable",
            "1 while the exporter's polls succeed (Q8).",
            "bool_yes_no",
            [(f"min(prefect_up{{{JOB}}})", "up")],
            **stat,
        ),
        6,
        4,
    )
    ly.row("Flow")
    ly.add(
        panel(
            "timeseries",
            "Backlog by queue",
            "Due, unclaimed runs per queue (Q1).",
            "short",
            [
                (
                    f"max by (work_pool, work_queue) (prefect_work_queue_backlog_runs{{{POOL}}})",
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Oldest due run's wait",
            "Age of the oldest due run per queue; "
            "the BacklogStuck alert pages above 15 minutes (Q1).",
            "s",
            [
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_due_run_timestamp_seconds{{{POOL}}})",
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Runs by state",
            "Non-terminal runs by state name (Q1-Q4).",
            "short",
            [
                (
                    f"sum by (state) (max by (work_pool, work_queue, state) "
                    f"(prefect_work_queue_flow_runs{{{POOL}}})) > 0",
                    "{{state}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Throughput",
            "Runs entering terminal states per second (Q6).",
            "ops",
            [
                (
                    f"sum by (state) (rate(prefect_flow_run_state_transitions_total"
                    f'{{{POOL}, state=~"Completed|Failed|Crashed|Cancelled"}}'
                    f"[$__rate_interval]))",
                    "{{state}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.row("Capacity and limits")
    ly.add(
        panel(
            "timeseries",
            "Pool saturation",
            "In-flight runs over the pool's concurrency "
            "limit; 100% with a backlog means the limit holds runs back (Q3).",
            "percentunit",
            [
                (
                    f"max by (work_pool) (prefect_work_pool_in_flight_runs"
                    f"{{{POOL}}}) / on (work_pool) max by (work_pool) "
                    f"(prefect_work_pool_concurrency_limit{{{POOL}}} > 0)",
                    "{{work_pool}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Concurrency limit saturation",
            "Taken slots over slots of "
            "global, tag and deployment limits; leaked slots in red (Q4).",
            "percentunit",
            [
                (
                    f"max by (limit) (prefect_concurrency_limit_active_slots{{{JOB}}}) / "
                    f"on (limit) max by (limit) (prefect_concurrency_limit_slots{{{JOB}}} > 0)",
                    "{{limit}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.row("Rate limits and the exporter")
    ly.add(
        panel(
            "timeseries",
            "429s: workers and exporter",
            "Throttled responses per second: "
            "workers (from their logs, sidecar mode) and the exporter (Q7).",
            "reqps",
            [
                (
                    f"sum by (worker) (rate(prefect_worker_api_responses_total"
                    f'{{{JOB}, code="429"}}[$__rate_interval]))',
                    "worker {{worker}}",
                ),
                (
                    # `or vector(0)`: no 429 series at all is a healthy zero, not "no data".
                    f'sum(rate(prefect_exporter_api_requests_total{{{JOB}, code="429"}}'
                    f"[$__rate_interval])) or vector(0)",
                    "exporter",
                ),
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Exporter health",
            "Poll duration and seconds since the last successful poll (Q8).",
            "s",
            [
                (f"max(prefect_exporter_poll_duration_seconds{{{JOB}}})", "poll duration"),
                (
                    f"time() - max(prefect_exporter_last_success_timestamp_seconds{{{JOB}}})",
                    "since last success",
                ),
            ],
        ),
        12,
        8,
    )
    return dashboard(
        "prefect-overview",
        "Prefect / Overview",
        "Are my runs flowing? Backlog, oldest wait, workers, limits, 429s.",
        ly,
        with_queue=False,
    )


def queues() -> dict[str, Any]:
    """Drill-down per pool and queue: why runs wait, and where the latency sits."""
    ly = Layout()
    ly.add(
        panel(
            "timeseries",
            "Backlog",
            "Due, unclaimed runs (Q1).",
            "short",
            [
                (
                    f"max by (work_pool, work_queue) (prefect_work_queue_backlog_runs{{{QUEUE}}})",
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
        ),
        8,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Waiting since",
            "Age of the oldest due run, the oldest "
            "Pending run and the oldest AwaitingConcurrencySlot run (Q1, Q2, Q4).",
            "s",
            [
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_due_run_timestamp_seconds{{{QUEUE}}})",
                    "due {{work_queue}}",
                ),
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_pending_run_timestamp_seconds{{{QUEUE}}})",
                    "pending {{work_queue}}",
                ),
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_awaiting_slot_run_timestamp_seconds{{{QUEUE}}})",
                    "awaiting slot {{work_queue}}",
                ),
            ],
        ),
        8,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "In flight vs limit",
            "Pending + Running runs against the queue's limit (Q3).",
            "short",
            [
                (
                    f"max by (work_pool, work_queue) "
                    f"(prefect_work_queue_in_flight_runs{{{QUEUE}}})",
                    "in flight {{work_queue}}",
                ),
                (
                    f"max by (work_pool, work_queue) "
                    f"(prefect_work_queue_concurrency_limit{{{QUEUE}}})",
                    "limit {{work_queue}}",
                ),
            ],
        ),
        8,
        8,
    )
    ly.row("Latency (Q6)")
    ly.add(
        panel(
            "timeseries",
            "Pickup delay p50 / p90",
            "Scheduled time to Pending: claiming, including waits behind limits.",
            "s",
            [
                (
                    f"histogram_quantile({q}, sum by (le, work_pool) "
                    f"(rate(prefect_flow_run_pickup_delay_seconds_bucket{{{POOL}}}"
                    f"[$__rate_interval])))",
                    f"p{int(q * 100)} {{{{work_pool}}}}",
                )
                for q in (0.5, 0.9)
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Start delay p50 / p90",
            "Pending to Running: infrastructure start-up.",
            "s",
            [
                (
                    f"histogram_quantile({q}, sum by (le, work_pool) "
                    f"(rate(prefect_flow_run_start_delay_seconds_bucket{{{POOL}}}"
                    f"[$__rate_interval])))",
                    f"p{int(q * 100)} {{{{work_pool}}}}",
                )
                for q in (0.5, 0.9)
            ],
        ),
        12,
        8,
    )
    ly.row("Workers and polling (Q5)")
    ly.add(
        panel(
            "timeseries",
            "Seconds since last heartbeat",
            "Per worker; offline beyond three heartbeat intervals.",
            "s",
            [
                (
                    f"max by (work_pool, worker) (time() - "
                    f"prefect_worker_last_heartbeat_timestamp_seconds{{{POOL}}})",
                    "{{work_pool}}/{{worker}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Seconds since last poll",
            "Per queue; absent means never polled: workers pinned to other queues.",
            "s",
            [
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_last_polled_timestamp_seconds{{{QUEUE}}})",
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "table",
            "Concurrency limits",
            "Slots, taken and leaked, per limit (Q4).",
            "short",
            [
                (f"max by (limit, kind) (prefect_concurrency_limit_slots{{{JOB}}})", "slots"),
                (
                    f"max by (limit, kind) (prefect_concurrency_limit_active_slots{{{JOB}}})",
                    "taken",
                ),
                (
                    f"max by (limit, kind) (prefect_concurrency_limit_leaked_slots{{{JOB}}})",
                    "leaked",
                ),
            ],
        ),
        24,
        8,
    )
    return dashboard(
        "prefect-queues",
        "Prefect / Pools and queues",
        "Why runs wait in a pool or queue, and where the latency sits.",
        ly,
        with_queue=True,
    )


DASHBOARDS = {"prefect-overview.json": overview, "prefect-queues.json": queues}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))


if __name__ == "__main__":
    main()
