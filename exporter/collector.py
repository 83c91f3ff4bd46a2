"""Builds metric families: Prefect-derived ones from a Snapshot, the exporter's own from the store.

Sample of the Prefect-derived exposition (see docs/metrics.md for every family):

    prefect_work_queue_backlog_runs{work_pool="k8s",work_queue="default"} 748.0
    prefect_work_queue_oldest_due_run_timestamp_seconds{work_pool="k8s",work_queue="default"} 1.8e9
    prefect_worker_online{work_pool="k8s",worker="k8s-worker-1"} 1.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.snapshot import Snapshot
from exporter.store import PollStatus

# Pool and queue statuses form a closed set: every member is exported, 1 for the current one.
STATUSES = ("READY", "NOT_READY", "PAUSED")
AS_OF = "As of the last successful poll."

POOL = ["work_pool"]
QUEUE = ["work_pool", "work_queue"]
WORKER = ["work_pool", "worker"]


@dataclass(frozen=True)
class Family:
    name: str
    help: str
    labels: list[str]


def _family(spec: Family) -> GaugeMetricFamily:
    return GaugeMetricFamily(spec.name, f"{spec.help} {AS_OF}", labels=spec.labels)


# Declared up front so the exported set is visible in one place; docs/metrics.md mirrors it.
POOL_INFO = Family(
    "prefect_work_pool_info", "Work pools, always 1, with their type.", ["work_pool", "pool_type"]
)
POOL_STATUS = Family(
    "prefect_work_pool_status",
    "Work pool status: 1 for the current one of READY, NOT_READY, PAUSED.",
    ["work_pool", "status"],
)
POOL_LIMIT = Family(
    "prefect_work_pool_concurrency_limit",
    "Work pool concurrency limit in runs (absent when unlimited).",
    POOL,
)
POOL_ONLINE = Family(
    "prefect_work_pool_online_workers",
    "Workers of the pool whose last heartbeat is within the online window.",
    POOL,
)
QUEUE_STATUS = Family(
    "prefect_work_queue_status",
    "Work queue status: 1 for the current one of READY, NOT_READY, PAUSED.",
    [*QUEUE, "status"],
)
QUEUE_LIMIT = Family(
    "prefect_work_queue_concurrency_limit",
    "Work queue concurrency limit in runs (absent when unlimited).",
    QUEUE,
)
QUEUE_PRIORITY = Family(
    "prefect_work_queue_priority", "Work queue priority within its pool (1 is served first).", QUEUE
)
QUEUE_POLLED = Family(
    "prefect_work_queue_last_polled_timestamp_seconds",
    "When a worker last polled the queue, Unix seconds (absent if never).",
    QUEUE,
)
QUEUE_BACKLOG = Family(
    "prefect_work_queue_backlog_runs",
    "Runs due and not yet claimed: SCHEDULED-type runs whose scheduled time "
    "has passed, whatever their state name.",
    QUEUE,
)
QUEUE_RUNS = Family(
    "prefect_work_queue_flow_runs",
    "Non-terminal flow runs of the queue by state name.",
    [*QUEUE, "state"],
)
QUEUE_OLDEST_DUE = Family(
    "prefect_work_queue_oldest_due_run_timestamp_seconds",
    "Scheduled time of the queue's oldest due, unclaimed run, Unix seconds "
    "(absent when there is none).",
    QUEUE,
)
QUEUE_OLDEST_PENDING = Family(
    "prefect_work_queue_oldest_pending_run_timestamp_seconds",
    "When the queue's longest-waiting Pending run entered Pending, "
    "Unix seconds (absent when there is none).",
    QUEUE,
)
WORKER_HEARTBEAT = Family(
    "prefect_worker_last_heartbeat_timestamp_seconds",
    "When the worker last sent a heartbeat, Unix seconds.",
    WORKER,
)
WORKER_INTERVAL = Family(
    "prefect_worker_heartbeat_interval_seconds",
    "Heartbeat interval the worker reported, in seconds.",
    WORKER,
)
WORKER_ONLINE = Family(
    "prefect_worker_online",
    "1 while the worker's last heartbeat is within the configured multiple "
    "of its interval, else 0.",
    WORKER,
)


class SnapshotCollector(Collector):
    """Yields the Prefect-derived families of one snapshot; never calls the API."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._snapshot
        info, status, limit, online = (
            _family(f) for f in (POOL_INFO, POOL_STATUS, POOL_LIMIT, POOL_ONLINE)
        )
        for pool in s.pools:
            info.add_metric([pool.name, pool.type], 1)
            for member in STATUSES:
                status.add_metric([pool.name, member], float(pool.status == member))
            if pool.concurrency_limit is not None:
                limit.add_metric([pool.name], pool.concurrency_limit)
            online.add_metric([pool.name], pool.online_workers)
        yield from (info, status, limit, online)

        q_status, q_limit, q_priority, q_polled, q_backlog, q_runs, q_due, q_pending = (
            _family(f)
            for f in (
                QUEUE_STATUS,
                QUEUE_LIMIT,
                QUEUE_PRIORITY,
                QUEUE_POLLED,
                QUEUE_BACKLOG,
                QUEUE_RUNS,
                QUEUE_OLDEST_DUE,
                QUEUE_OLDEST_PENDING,
            )
        )
        for q in s.queues:
            key = [q.pool, q.name]
            for member in STATUSES:
                q_status.add_metric([*key, member], float(q.status == member))
            if q.concurrency_limit is not None:
                q_limit.add_metric(key, q.concurrency_limit)
            q_priority.add_metric(key, q.priority)
            if q.last_polled is not None:
                q_polled.add_metric(key, q.last_polled)
            q_backlog.add_metric(key, q.backlog)
            for state, count in q.runs_by_state:
                q_runs.add_metric([*key, state], count)
            if q.oldest_due is not None:
                q_due.add_metric(key, q.oldest_due)
            if q.oldest_pending_since is not None:
                q_pending.add_metric(key, q.oldest_pending_since)
        yield from (q_status, q_limit, q_priority, q_polled, q_backlog, q_runs, q_due, q_pending)

        heartbeat, interval, w_online = (
            _family(f) for f in (WORKER_HEARTBEAT, WORKER_INTERVAL, WORKER_ONLINE)
        )
        for w in s.workers:
            key = [w.pool, w.name]
            if w.last_heartbeat is not None:
                heartbeat.add_metric(key, w.last_heartbeat)
            if w.heartbeat_interval is not None:
                interval.add_metric(key, w.heartbeat_interval)
            w_online.add_metric(key, float(w.online))
        yield from (heartbeat, interval, w_online)


class ExporterCollector(Collector):
    """The exporter's own health, read from the poll status at scrape time."""

    def __init__(self, status: Callable[[], PollStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        status = self._status()
        yield GaugeMetricFamily(
            "prefect_up",
            "1 if the last poll of the Prefect API succeeded, else 0.",
            value=float(status.up),
        )
        last_success = GaugeMetricFamily(
            "prefect_exporter_last_success_timestamp_seconds",
            "When the last successful poll started, Unix seconds (absent before the first).",
        )
        if status.last_success is not None:
            last_success.add_metric([], status.last_success)
        yield last_success
        duration = GaugeMetricFamily(
            "prefect_exporter_poll_duration_seconds",
            "How long the most recent poll took, successful or not, in seconds.",
        )
        if status.last_duration is not None:
            duration.add_metric([], status.last_duration)
        yield duration
        info = GaugeMetricFamily(
            "prefect_exporter_build_info", "The exporter's version, always 1.", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info
