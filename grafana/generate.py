"""Generates prefect-exporter's Grafana dashboards; the JSON beside this script is its output.

    python grafana/generate.py      # rewrite grafana/*.json

Edit this file, not the JSON: a test regenerates the dashboards and fails on any difference, checks
the structural rules (units, descriptions, variables, selectors), parses every query with promtool,
and runs every query against a real Prometheus scraping the exporter (tests/test_integration.py).
`grafana/render.py` draws them from real data into docs/images/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TAG = "prefect-exporter"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# `shard` is optional: the Kubernetes shard overlay sets it as a target label. With "All" the
# variable is `.*`, which also matches series without the label, so dashboards work without it.
JOB = 'job=~"$job", shard=~"$shard"'
POOL = f'{JOB}, work_pool=~"$work_pool"'
QUEUE = f'{POOL}, work_queue=~"$work_queue"'
DEPLOYMENT = f'{JOB}, deployment=~"$deployment"'
# The exporter's default `--workers.heartbeat-multiple`: a worker is offline after this many of its
# own heartbeat intervals without one. Not a served series, so dashboards repeat the default.
HEARTBEAT_MULTIPLE = 3
# Prefect marks a queue NOT_READY when no worker polled it for 60 s (prefect.server.models.workers).
QUEUE_NOT_READY_SECONDS = 60
QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"))

# Deployment health series another branch adds. Until docs/metrics.md documents one, queries using
# it are "pending": listed by the tests, not required to return data (name -> labels).
PENDING_METRICS: dict[str, set[str]] = {
    "prefect_deployment_last_success_timestamp_seconds": {"deployment"},
    "prefect_deployment_last_failure_timestamp_seconds": {"deployment", "state"},
    "prefect_deployment_next_scheduled_run_timestamp_seconds": {"deployment"},
    "prefect_deployment_paused": {"deployment"},
    "prefect_deployment_schedule_interval_seconds": {"deployment"},
    "prefect_deployment_last_due_run_timestamp_seconds": {"deployment"},
    "prefect_deployment_flow_runs_finished_total": {"deployment", "state"},
}

# Each query variable: the series its values come from. A variable's query narrows by every
# variable before it on the dashboard, so choosing a job lists only its shards, pools and queues.
VARIABLE_SOURCES = {
    "job": "prefect_up",
    "shard": "prefect_up",
    "work_pool": "prefect_work_pool_info",
    "work_queue": "prefect_work_queue_backlog_runs",
    "deployment": "prefect_deployment_paused",
}


def variables(names: list[str]) -> list[dict[str, Any]]:
    """The datasource variable, then `names` (from VARIABLE_SOURCES), each narrowing the next."""
    found: list[dict[str, Any]] = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
        },
    ]
    for i, name in enumerate(names):
        matchers = ", ".join(f'{before}=~"${before}"' for before in names[:i])
        series = VARIABLE_SOURCES[name] + (f"{{{matchers}}}" if matchers else "")
        expr = f"label_values({series}, {name})"
        found.append(
            {
                "name": name,
                "label": name.replace("_", " "),
                "type": "query",
                "datasource": DATASOURCE,
                "query": {"query": expr, "refId": name},
                "definition": expr,
                "refresh": 2,
                "includeAll": True,
                "multi": True,
                # Also matches series without the label (an unsharded exporter has no `shard`).
                "allValue": ".*",
                "current": {"text": "All", "value": "$__all"},
                "sort": 1,
            }
        )
    return found


def alert_annotations() -> list[dict[str, Any]]:
    """Firing Prefect alerts as annotations. Alerts aggregate by job (alerts/generate.py), so
    `ALERTS` has no shard, pool-only or queue label to narrow by beyond the job."""
    return [
        {
            "name": "Firing alerts",
            "datasource": DATASOURCE,
            "enable": True,
            "hide": False,
            "iconColor": "red",
            "expr": 'ALERTS{job=~"$job", alertname=~"Prefect.*", alertstate="firing"}',
            "step": "30s",
            "titleFormat": "{{alertname}}",
            "textFormat": "{{severity}} {{work_pool}} {{work_queue}}",
            "tagKeys": "severity,work_pool,work_queue",
            "useValueForTime": False,
        }
    ]


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
    target_options: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A panel with its queries as (expr, legend) pairs; `description` asks its question.

    `defaults` in `options` go to fieldConfig (thresholds, mappings), the rest to the panel's
    options; `target_options` to every target (`format: heatmap`, `instant`).
    """
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
                **(target_options or {}),
            }
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def dashboard(
    uid: str, title: str, description: str, layout: Layout, names: list[str]
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
        "templating": {"list": variables(names)},
        "annotations": {"list": alert_annotations()},
        "links": [{"type": "dashboards", "tags": [TAG], "asDropdown": True, "title": "Prefect"}],
        "panels": layout.panels,
    }


STAT = {"graphMode": "area", "colorMode": "value", "reduceOptions": {"calcs": ["lastNotNull"]}}
POOL_VARS = ["job", "shard", "work_pool"]
QUEUE_VARS = [*POOL_VARS, "work_queue"]


def thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    """fieldConfig defaults drawing threshold lines: (from value, colour) steps, first from None."""
    return {
        "thresholds": {
            "mode": "absolute",
            "steps": [{"value": value, "color": color} for value, color in steps],
        },
        "custom": {"thresholdsStyle": {"mode": "line"}},
    }


def on_off(off: str, on: str) -> dict[str, Any]:
    """fieldConfig defaults for a 0/1 state timeline: 0 is `off` (red), 1 is `on` (green)."""
    return {
        "mappings": [
            {
                "type": "value",
                "options": {
                    "0": {"text": off, "color": "red", "index": 0},
                    "1": {"text": on, "color": "green", "index": 1},
                },
            }
        ],
        "color": {"mode": "thresholds"},
        "thresholds": {
            "mode": "absolute",
            "steps": [{"value": None, "color": "red"}, {"value": 1, "color": "green"}],
        },
    }


def percentiles(metric: str, selector: str, by: str) -> list[tuple[str, str]]:
    """p50, p90 and p99 of a histogram over the rate interval, per `by` label."""
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"{name} {{{{{by}}}}}",
        )
        for q, name in QUANTILES
    ]


def heatmap(title: str, description: str, metric: str, selector: str) -> dict[str, Any]:
    """A histogram's buckets over time: observations per rate interval in each bucket."""
    return panel(
        "heatmap",
        title,
        description,
        "short",
        [(f"sum by (le) (increase({metric}_bucket{{{selector}}}[$__rate_interval]))", "{{le}}")],
        target_options={"format": "heatmap"},
        calculate=False,
        yAxis={"unit": "s", "axisPlacement": "left"},
        color={"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64},
        cellGap=1,
        rowsFrame={"layout": "auto"},
        tooltip={"show": True, "yHistogram": True},
        legend={"show": True},
    )


def overview() -> dict[str, Any]:
    """Are my runs flowing? One screen: backlog, oldest wait, workers, limits, 429s, health."""
    ly = Layout()
    ly.add(
        panel(
            "stat",
            "Runs waiting (backlog)",
            "How many due runs are not yet claimed? All selected queues (Q1).",
            "short",
            [
                (
                    f"sum(max by (job, work_pool, work_queue) "
                    f"(prefect_work_queue_backlog_runs{{{POOL}}}))",
                    "backlog",
                )
            ],
            **STAT,
        ),
        6,
        4,
    )
    ly.add(
        panel(
            "stat",
            "Oldest wait",
            "How long has the oldest due run waited? (Q1)",
            "s",
            [
                (
                    f"max(time() - prefect_work_queue_oldest_due_run_timestamp_seconds{{{POOL}}})",
                    "oldest",
                )
            ],
            **STAT,
        ),
        6,
        4,
    )
    ly.add(
        panel(
            "stat",
            "Online workers",
            "How many workers have a recent heartbeat? (Q5)",
            "short",
            [
                (
                    f"sum(max by (job, work_pool) (prefect_work_pool_online_workers{{{POOL}}}))",
                    "online",
                )
            ],
            **STAT,
        ),
        6,
        4,
    )
    ly.add(
        panel(
            "stat",
            "Prefect API reachable",
            "Can the exporter read the Prefect API? 1 while its polls succeed (Q8).",
            "bool_yes_no",
            [(f"min(prefect_up{{{JOB}}})", "up")],
            **STAT,
        ),
        6,
        4,
    )
    ly.row("Flow")
    ly.add(
        panel(
            "timeseries",
            "Backlog by queue",
            "Which queues hold due, unclaimed runs? (Q1)",
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
            "How long has each queue's oldest due run waited? "
            "The BacklogStuck alert pages above 15 minutes (Q1).",
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
            "In which states are the non-terminal runs? (Q1-Q4)",
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
            "How many runs finish per second, and how? Runs entering terminal states (Q6).",
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
            "Does a pool's concurrency limit hold runs back? In-flight runs over the limit; "
            "100% with a backlog means yes (Q3).",
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
            "Which global, tag or deployment limit is full? Taken slots over slots; "
            "the Prefect / Concurrency limits dashboard has leaked slots (Q4).",
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
            "Is anyone rate limited? Throttled responses per second: "
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
            "Can I trust these numbers? Poll duration and seconds since the last successful "
            "poll (Q8).",
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
    ly.add(
        panel(
            "timeseries",
            "Prefect API latency",
            "How fast does the Prefect API answer the exporter? p50, p90 and p99 of response "
            "times over all endpoints (Q8).",
            "s",
            [
                (
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(prefect_exporter_api_request_duration_seconds_bucket{{{JOB}}}"
                    f"[$__rate_interval])))",
                    name,
                )
                for q, name in QUANTILES
            ],
        ),
        24,
        7,
    )
    return dashboard(
        "prefect-overview",
        "Prefect / Overview",
        "Are my runs flowing? Backlog, oldest wait, workers, limits, 429s; firing alerts as "
        "annotations.",
        ly,
        POOL_VARS,
    )


def queues() -> dict[str, Any]:
    """Drill-down per pool and queue: why runs wait, and where the latency sits."""
    ly = Layout()
    ly.add(
        panel(
            "timeseries",
            "Backlog",
            "How many due runs wait unclaimed in each queue? (Q1)",
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
            "Where do runs wait, and how long? Age of the oldest due run, the oldest "
            "Pending run and the oldest AwaitingConcurrencySlot run (Q1, Q2, Q4).",
            "s",
            [
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_due_run_timestamp_seconds{{{QUEUE}}})",
                    "due {{work_pool}}/{{work_queue}}",
                ),
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_pending_run_timestamp_seconds{{{QUEUE}}})",
                    "pending {{work_pool}}/{{work_queue}}",
                ),
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_oldest_awaiting_slot_run_timestamp_seconds{{{QUEUE}}})",
                    "awaiting slot {{work_pool}}/{{work_queue}}",
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
            "Is a queue's limit full? Pending + Running runs against the queue's limit (Q3).",
            "short",
            [
                (
                    f"max by (work_pool, work_queue) "
                    f"(prefect_work_queue_in_flight_runs{{{QUEUE}}})",
                    "in flight {{work_pool}}/{{work_queue}}",
                ),
                (
                    f"max by (work_pool, work_queue) "
                    f"(prefect_work_queue_concurrency_limit{{{QUEUE}}})",
                    "limit {{work_pool}}/{{work_queue}}",
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
            "Pickup delay p50 / p90 / p99",
            "How late are runs claimed? Scheduled time to Pending, including waits behind "
            "pool, queue and deployment limits.",
            "s",
            percentiles("prefect_flow_run_pickup_delay_seconds", POOL, "work_pool"),
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Start delay p50 / p90 / p99",
            "How long does infrastructure take to start a claimed run? Pending to Running.",
            "s",
            percentiles("prefect_flow_run_start_delay_seconds", POOL, "work_pool"),
        ),
        12,
        8,
    )
    ly.add(
        heatmap(
            "Pickup delay heatmap",
            "How are pickup delays spread? Runs claimed per rate interval in each delay bucket "
            "(scheduled time to Pending); bands high up are late runs.",
            "prefect_flow_run_pickup_delay_seconds",
            POOL,
        ),
        12,
        8,
    )
    ly.add(
        heatmap(
            "Start delay heatmap",
            "How are start-up times spread? Runs started per rate interval in each delay bucket "
            "(Pending to Running); a second band means a slow path such as image pulls.",
            "prefect_flow_run_start_delay_seconds",
            POOL,
        ),
        12,
        8,
    )
    ly.row("Workers and polling (Q5)")
    ly.add(
        panel(
            "timeseries",
            "Seconds since last heartbeat",
            f"Are the pool's workers alive? Per worker; offline beyond {HEARTBEAT_MULTIPLE} "
            "heartbeat intervals.",
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
            "Is anyone polling each queue? Absent means never polled: workers pinned to "
            "other queues.",
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
    return dashboard(
        "prefect-queues",
        "Prefect / Pools and queues",
        "Why runs wait in a pool or queue, and where the latency sits.",
        ly,
        QUEUE_VARS,
    )


def workers() -> dict[str, Any]:
    """Are workers alive and polling, and are they throttled? Heartbeats, polls, sidecar 429s."""
    ly = Layout()
    ly.add(
        panel(
            "timeseries",
            "Online workers per pool",
            "How many workers serve each pool? Workers whose last heartbeat is within "
            f"{HEARTBEAT_MULTIPLE} of their intervals (Q5).",
            "short",
            [
                (
                    f"max by (work_pool) (prefect_work_pool_online_workers{{{POOL}}})",
                    "{{work_pool}}",
                )
            ],
            defaults={"min": 0, "decimals": 0},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "state-timeline",
            "Worker online",
            "Which workers were online when? Per worker, from the exporter's own rule: "
            f"online while the last heartbeat is within {HEARTBEAT_MULTIPLE} intervals (Q5).",
            "bool_on_off",
            [
                (
                    f"max by (work_pool, worker) (prefect_worker_online{{{POOL}}})",
                    "{{work_pool}}/{{worker}}",
                )
            ],
            defaults=on_off("offline", "online"),
            showValue="never",
            mergeValues=True,
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Heartbeat age against the offline threshold",
            "How close is each worker to being counted offline? Seconds since its last heartbeat "
            f"over {HEARTBEAT_MULTIPLE} times its heartbeat interval (the exporter's default "
            "--workers.heartbeat-multiple); at 100% it is offline (Q5).",
            "percentunit",
            [
                (
                    f"max by (work_pool, worker) (time() - "
                    f"prefect_worker_last_heartbeat_timestamp_seconds{{{POOL}}}) / on "
                    f"(work_pool, worker) ({HEARTBEAT_MULTIPLE} * max by (work_pool, worker) "
                    f"(prefect_worker_heartbeat_interval_seconds{{{POOL}}}))",
                    "{{work_pool}}/{{worker}}",
                )
            ],
            defaults={"min": 0, **thresholds((None, "green"), (1, "red"))},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Seconds since last heartbeat",
            "When did each worker last heartbeat? Against its own interval: the dashed "
            "series are the offline thresholds (Q5).",
            "s",
            [
                (
                    f"max by (work_pool, worker) (time() - "
                    f"prefect_worker_last_heartbeat_timestamp_seconds{{{POOL}}})",
                    "{{work_pool}}/{{worker}}",
                ),
                (
                    f"{HEARTBEAT_MULTIPLE} * max by (work_pool, worker) "
                    f"(prefect_worker_heartbeat_interval_seconds{{{POOL}}})",
                    "offline after: {{worker}}",
                ),
            ],
        ),
        12,
        8,
    )
    ly.row("Polling (Q5)")
    ly.add(
        panel(
            "timeseries",
            "Seconds since last poll",
            "Is anyone polling each queue? Per queue; Prefect marks a queue NOT_READY after "
            f"{QUEUE_NOT_READY_SECONDS} s. A queue with no line was never polled.",
            "s",
            [
                (
                    f"max by (work_pool, work_queue) (time() - "
                    f"prefect_work_queue_last_polled_timestamp_seconds{{{QUEUE}}})",
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
            defaults={"min": 0, **thresholds((None, "green"), (QUEUE_NOT_READY_SECONDS, "red"))},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "state-timeline",
            "Queue ready",
            "Which queues did Prefect consider polled? READY or NOT_READY per queue (Q5).",
            "short",
            [
                (
                    f"max by (work_pool, work_queue) "
                    f'(prefect_work_queue_status{{{QUEUE}, status="READY"}})',
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
            defaults=on_off("not ready", "ready"),
            showValue="never",
            mergeValues=True,
        ),
        12,
        8,
    )
    ly.row("The worker's own API calls: sidecar mode (Q7)")
    ly.add(
        panel(
            "timeseries",
            "Worker 429s",
            "Is a worker rate limited? 429 responses per second the worker received, "
            "counted from its log by the sidecar (--worker-log).",
            "reqps",
            [
                (
                    f"sum by (worker) (rate(prefect_worker_api_responses_total"
                    f'{{{JOB}, code="429"}}[$__rate_interval]))',
                    "{{worker}}",
                )
            ],
        ),
        8,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Worker retries and give-ups",
            "Does the worker's client retry, and give up? Retries per second by the status "
            "that caused them (`exception`: network errors), and requests it gave up on.",
            "reqps",
            [
                (
                    f"sum by (worker, code) (rate(prefect_worker_api_retries_total{{{JOB}}}"
                    f"[$__rate_interval]))",
                    "retry {{worker}} {{code}}",
                ),
                (
                    f"sum by (worker, code) (rate(prefect_worker_api_failures_total{{{JOB}}}"
                    f"[$__rate_interval]))",
                    "gave up {{worker}} {{code}}",
                ),
            ],
        ),
        8,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Worker responses by status",
            "What does the API answer the worker? Responses per second by HTTP status.",
            "reqps",
            [
                (
                    f"sum by (worker, code) (rate(prefect_worker_api_responses_total{{{JOB}}}"
                    f"[$__rate_interval]))",
                    "{{worker}} {{code}}",
                )
            ],
        ),
        8,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Worker log lines read",
            "Is the sidecar following the worker's log? Lines read per second; a flat zero "
            "with a busy worker means the log is not where --worker-log points (Q8).",
            "short",
            [
                (
                    f"sum by (worker) (rate(prefect_exporter_log_lines_read_total{{{JOB}}}"
                    f"[$__rate_interval]))",
                    "{{worker}}",
                )
            ],
        ),
        12,
        7,
    )
    ly.add(
        panel(
            "state-timeline",
            "Worker log readable",
            "Can the sidecar read the worker's log file? 0 while it is missing or unreadable (Q8).",
            "short",
            [
                (
                    f"max by (worker) (prefect_exporter_worker_log_readable{{{JOB}}})",
                    "{{worker}}",
                )
            ],
            defaults=on_off("unreadable", "readable"),
            showValue="never",
            mergeValues=True,
        ),
        12,
        7,
    )
    return dashboard(
        "prefect-workers",
        "Prefect / Workers",
        "Are workers alive, polling their queues, and not throttled?",
        ly,
        QUEUE_VARS,
    )


def limits() -> dict[str, Any]:
    """Which limit holds runs back? Slots, leaks, runs awaiting a slot, pool and queue use."""
    ly = Layout()
    saturation = (
        f"max by (limit) (prefect_concurrency_limit_active_slots{{{JOB}}}) / on (limit) "
        f"max by (limit) (prefect_concurrency_limit_slots{{{JOB}}} > 0)"
    )
    ly.add(
        panel(
            "bargauge",
            "Limit saturation now",
            "Which global, tag or deployment limit is full? Taken slots over slots (Q4).",
            "percentunit",
            [(saturation, "{{limit}}")],
            defaults={
                "min": 0,
                "max": 1,
                "thresholds": {
                    "mode": "absolute",
                    "steps": [
                        {"value": None, "color": "green"},
                        {"value": 0.8, "color": "orange"},
                        {"value": 1, "color": "red"},
                    ],
                },
            },
            orientation="horizontal",
            displayMode="gradient",
            reduceOptions={"calcs": ["lastNotNull"]},
        ),
        8,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Slots taken vs slots",
            "How many slots does each limit have, and how many are taken? (Q4)",
            "short",
            [
                (
                    f"max by (limit) (prefect_concurrency_limit_active_slots{{{JOB}}})",
                    "taken {{limit}}",
                ),
                (
                    f"max by (limit) (prefect_concurrency_limit_slots{{{JOB}}})",
                    "slots {{limit}}",
                ),
            ],
            defaults={"min": 0},
        ),
        16,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Leaked slots",
            "Are slots held by runs that already finished? Per tag and deployment limit; "
            "reset the limit to free them (Q4).",
            "short",
            [
                (
                    f"max by (limit, kind) (prefect_concurrency_limit_leaked_slots{{{JOB}}})",
                    "{{limit}}",
                )
            ],
            defaults={"min": 0, **thresholds((None, "green"), (1, "red"))},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "table",
            "Limits",
            "What is configured? Slots, taken, leaked and enabled per limit, now (Q4).",
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
                (
                    f"max by (limit, kind) (prefect_concurrency_limit_enabled{{{JOB}}})",
                    "enabled",
                ),
            ],
            target_options={"instant": True, "format": "table"},
        ),
        12,
        8,
    )
    ly.row("Runs awaiting a slot (Q4)")
    ly.add(
        panel(
            "timeseries",
            "Runs awaiting a slot by deployment",
            "Which deployment's limit holds runs back? Runs in AwaitingConcurrencySlot per "
            "limited deployment (needs --deployments.breakdown).",
            "short",
            [
                (
                    f"max by (deployment) "
                    f"(prefect_deployment_awaiting_concurrency_slot_runs{{{JOB}}})",
                    "{{deployment}}",
                )
            ],
            defaults={"min": 0},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Longest wait for a slot by deployment",
            "How long has each deployment's oldest run waited for a slot? From its original "
            "scheduled time (needs --deployments.breakdown).",
            "s",
            [
                (
                    f"max by (deployment) (time() - "
                    f"prefect_deployment_oldest_awaiting_concurrency_slot_run_timestamp_seconds"
                    f"{{{JOB}}})",
                    "{{deployment}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.row("Pool and queue limits (Q3)")
    ly.add(
        panel(
            "timeseries",
            "Pool saturation",
            "Does a pool's limit hold runs back? In-flight runs (Pending + Running) over the "
            "pool's concurrency limit; 100% with a backlog means yes.",
            "percentunit",
            [
                (
                    f"max by (work_pool) (prefect_work_pool_in_flight_runs{{{POOL}}}) / on "
                    f"(work_pool) max by (work_pool) "
                    f"(prefect_work_pool_concurrency_limit{{{POOL}}} > 0)",
                    "{{work_pool}}",
                )
            ],
            defaults={"min": 0, **thresholds((None, "green"), (1, "red"))},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Queue saturation",
            "Does a queue's limit hold runs back? In-flight runs over the queue's concurrency "
            "limit; 100% with a backlog means yes.",
            "percentunit",
            [
                (
                    f"max by (work_pool, work_queue) "
                    f"(prefect_work_queue_in_flight_runs{{{QUEUE}}}) / on (work_pool, work_queue) "
                    f"max by (work_pool, work_queue) "
                    f"(prefect_work_queue_concurrency_limit{{{QUEUE}}} > 0)",
                    "{{work_pool}}/{{work_queue}}",
                )
            ],
            defaults={"min": 0, **thresholds((None, "green"), (1, "red"))},
        ),
        12,
        8,
    )
    return dashboard(
        "prefect-limits",
        "Prefect / Concurrency limits",
        "Which limit holds runs back: global, tag, deployment, pool or queue?",
        ly,
        QUEUE_VARS,
    )


def deployments() -> dict[str, Any]:
    """Is each deployment healthy? Last success and failure, next run, pause, finished runs."""

    def finished(extra: str = "") -> str:
        return (
            f"rate(prefect_deployment_flow_runs_finished_total{{{DEPLOYMENT}{extra}}}"
            "[$__rate_interval])"
        )

    not_completed = ', state!="Completed"'
    ly = Layout()
    ly.add(
        panel(
            "timeseries",
            "Time since last success",
            "When did each deployment last complete a run?",
            "s",
            [
                (
                    f"max by (deployment) (time() - "
                    f"prefect_deployment_last_success_timestamp_seconds{{{DEPLOYMENT}}})",
                    "{{deployment}}",
                )
            ],
        ),
        12,
        8,
    )
    due = f"max by (deployment) (prefect_deployment_last_due_run_timestamp_seconds{{{DEPLOYMENT}}})"
    success = (
        f"max by (deployment) (prefect_deployment_last_success_timestamp_seconds{{{DEPLOYMENT}}})"
    )
    ly.add(
        panel(
            "timeseries",
            "Due run waiting for a success",
            "Is scheduled work getting done? How long ago each deployment's latest scheduled run "
            "fell due while no run has succeeded since (0 once a success ended after it). "
            "PrefectDeploymentNoRecentSuccess pages past its grace (default 1 h) unless paused.",
            "s",
            [
                (
                    # `or 0 * due`: a deployment whose due run was followed by a success is at 0.
                    f"(time() - {due} and on (deployment) "
                    f"({due} > on (deployment) {success} or {due} unless on (deployment) "
                    f"{success})) or 0 * {due}",
                    "{{deployment}}",
                )
            ],
            defaults={"min": 0, **thresholds((None, "green"), (1800, "orange"), (3600, "red"))},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Time since last failure",
            "When did each deployment last fail, and how? Per terminal failure state.",
            "s",
            [
                (
                    f"max by (deployment, state) (time() - "
                    f"prefect_deployment_last_failure_timestamp_seconds{{{DEPLOYMENT}}})",
                    "{{deployment}} {{state}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Time to next scheduled run",
            "When will each deployment run next? Negative: the next scheduled run is overdue.",
            "s",
            [
                (
                    f"max by (deployment) "
                    f"(prefect_deployment_next_scheduled_run_timestamp_seconds{{{DEPLOYMENT}}}) "
                    f"- time()",
                    "{{deployment}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.row("Runs and schedules")
    ly.add(
        panel(
            "timeseries",
            "Finished runs by state",
            "How many runs of each deployment finish per second, and how?",
            "ops",
            [
                (
                    f"sum by (deployment, state) "
                    f"(rate(prefect_deployment_flow_runs_finished_total{{{DEPLOYMENT}}}"
                    f"[$__rate_interval]))",
                    "{{deployment}} {{state}}",
                )
            ],
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Failure ratio",
            "What share of each deployment's finished runs did not complete? Over the rate "
            "interval; runs that finished in any state other than Completed.",
            "percentunit",
            [
                (
                    # `or 0 * all`: a deployment without failures is at 0, not missing.
                    f"(sum by (deployment) ({finished(not_completed)}) or 0 * "
                    f"sum by (deployment) ({finished()})) / sum by (deployment) ({finished()})",
                    "{{deployment}}",
                )
            ],
            defaults={"min": 0, "max": 1},
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "state-timeline",
            "Paused",
            "Which deployments were paused when? A paused deployment schedules no runs.",
            "short",
            [
                (
                    f"1 - max by (deployment) (prefect_deployment_paused{{{DEPLOYMENT}}})",
                    "{{deployment}}",
                )
            ],
            defaults=on_off("paused", "active"),
            showValue="never",
            mergeValues=True,
        ),
        12,
        8,
    )
    ly.add(
        panel(
            "timeseries",
            "Schedule interval",
            "How often is each deployment scheduled? Its schedule's interval.",
            "s",
            [
                (
                    f"max by (deployment) "
                    f"(prefect_deployment_schedule_interval_seconds{{{DEPLOYMENT}}})",
                    "{{deployment}}",
                )
            ],
        ),
        12,
        8,
    )
    return dashboard(
        "prefect-deployments",
        "Prefect / Deployments",
        "Is each deployment healthy: succeeding on schedule, not failing, not paused?",
        ly,
        ["job", "shard", "deployment"],
    )


DASHBOARDS = {
    "prefect-overview.json": overview,
    "prefect-queues.json": queues,
    "prefect-workers.json": workers,
    "prefect-limits.json": limits,
    "prefect-deployments.json": deployments,
}


def render(build: Any) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    for name, build in DASHBOARDS.items():
        (HERE / name).write_text(render(build))


if __name__ == "__main__":
    main()
