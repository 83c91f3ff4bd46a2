"""Builds metric families: Prefect-derived ones from a Snapshot, the exporter's own from the store.

Sample of the Prefect-derived exposition (see docs/metrics.md for every family):

    prefect_work_queue_backlog_runs{work_pool="k8s",work_queue="default"} 748.0
    prefect_work_queue_oldest_due_run_timestamp_seconds{work_pool="k8s",work_queue="default"} 1.8e9
    prefect_worker_online{work_pool="k8s",worker="k8s-worker-1"} 1.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.snapshot import KNOWN_STATE_NAMES, Snapshot
from exporter.store import PollStatus
from exporter.transitions import DELAY_BUCKETS, HistogramState

# Pool and queue statuses form a closed set: every member is exported, 1 for the current one.
STATUSES = ("READY", "NOT_READY", "PAUSED")
AS_OF = "As of the last successful poll."

POOL = ["work_pool"]
QUEUE = ["work_pool", "work_queue"]
WORKER = ["work_pool", "worker"]
LIMIT = ["limit", "kind", "deployment"]


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


POOL_IN_FLIGHT = Family(
    "prefect_work_pool_in_flight_runs",
    "Runs of the pool holding a pool slot (Pending or Running types), as Prefect counts them "
    "against the pool's concurrency limit.",
    POOL,
)
QUEUE_IN_FLIGHT = Family(
    "prefect_work_queue_in_flight_runs",
    "Runs of the queue holding a queue slot (Pending or Running types).",
    QUEUE,
)
QUEUE_OLDEST_AWAITING = Family(
    "prefect_work_queue_oldest_awaiting_slot_run_timestamp_seconds",
    "Original scheduled time of the queue's oldest AwaitingConcurrencySlot run, Unix seconds "
    "(absent when there is none).",
    QUEUE,
)
QUEUE_OLDEST_RUNNING = Family(
    "prefect_work_queue_oldest_running_run_timestamp_seconds",
    "When the queue's longest-running run entered Running, Unix seconds (absent when none).",
    QUEUE,
)
QUEUE_OLDEST_CANCELLING = Family(
    "prefect_work_queue_oldest_cancelling_run_timestamp_seconds",
    "When the queue's longest-cancelling run entered Cancelling, Unix seconds (absent when none).",
    QUEUE,
)
LIMIT_SLOTS = Family(
    "prefect_concurrency_limit_slots",
    "Slots of a concurrency limit (global, tag or deployment).",
    LIMIT,
)
LIMIT_ACTIVE = Family(
    "prefect_concurrency_limit_active_slots",
    "Slots of a concurrency limit currently taken.",
    LIMIT,
)
LIMIT_ENABLED = Family(
    "prefect_concurrency_limit_enabled",
    "1 if the concurrency limit is active (enforced), 0 if it is switched off.",
    LIMIT,
)
LIMIT_LEAKED = Family(
    "prefect_concurrency_limit_leaked_slots",
    "Slots held by runs that have already finished: tag limits whose holding task run or its "
    "flow run is terminal or gone, deployment limits holding more slots than the deployment has "
    "Pending, Running or Cancelling runs. Absent for global limits (holders unknown).",
    ["limit", "kind"],
)
DEPLOYMENT_AWAITING = Family(
    "prefect_deployment_awaiting_concurrency_slot_runs",
    "Runs of the deployment in AwaitingConcurrencySlot (opt-in: --deployments.breakdown).",
    ["deployment"],
)
DEPLOYMENT_OLDEST_AWAITING = Family(
    "prefect_deployment_oldest_awaiting_concurrency_slot_run_timestamp_seconds",
    "Original scheduled time of the deployment's oldest AwaitingConcurrencySlot run "
    "(opt-in: --deployments.breakdown).",
    ["deployment"],
)
EVENTS_LAG = Family(
    "prefect_exporter_events_lag_seconds",
    "How far the event reader trails the poll time: the age of the newest event counted, at "
    "least the settle delay; grows when it falls behind.",
    [],
)
EVENTS_BEHIND = Family(
    "prefect_exporter_events_behind",
    "1 if the last poll left flow-run events unread because of its page limit, else 0.",
    [],
)
FEATURE = Family(
    "prefect_exporter_feature_available",
    "1 if the Prefect API offers what a feature needs (events, concurrency_limits), 0 if the "
    "exporter degraded because the server lacks it.",
    ["feature"],
)
HISTOGRAM_HELP = {
    "prefect_flow_run_pickup_delay_seconds": "Seconds from a run's scheduled time to its first "
    "Pending state (claimed by a worker); early claims count as 0.",
    "prefect_flow_run_start_delay_seconds": "Seconds from a run's first Pending state to its "
    "first Running state (infrastructure start-up).",
}


def _histogram(name: str, by_pool: dict[str, HistogramState], pools: list[str]) -> Metric:
    family = HistogramMetricFamily(name, f"{HISTOGRAM_HELP[name]} {AS_OF}", labels=["work_pool"])
    for pool in pools:
        state = by_pool.get(pool, HistogramState())
        bounds = [*(str(float(b)) for b in DELAY_BUCKETS), "+Inf"]
        family.add_metric(
            [pool], list(zip(bounds, map(float, state.buckets), strict=True)), state.total
        )
    return family


class SnapshotCollector(Collector):
    """Yields the Prefect-derived families of one snapshot; never calls the API."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._pools_and_queues()
        yield from self._limits()
        yield from self._latency()

    def _pools_and_queues(self) -> Iterator[Metric]:
        s = self._snapshot
        info, status, limit, online, in_flight = (
            _family(f) for f in (POOL_INFO, POOL_STATUS, POOL_LIMIT, POOL_ONLINE, POOL_IN_FLIGHT)
        )
        for pool in s.pools:
            info.add_metric([pool.name, pool.type], 1)
            for member in STATUSES:
                status.add_metric([pool.name, member], float(pool.status == member))
            if pool.concurrency_limit is not None:
                limit.add_metric([pool.name], pool.concurrency_limit)
            online.add_metric([pool.name], pool.online_workers)
            in_flight.add_metric([pool.name], pool.in_flight)
        yield from (info, status, limit, online, in_flight)

        q_status, q_priority, q_backlog, q_in_flight, q_runs = (
            _family(f)
            for f in (QUEUE_STATUS, QUEUE_PRIORITY, QUEUE_BACKLOG, QUEUE_IN_FLIGHT, QUEUE_RUNS)
        )
        # Values that may not exist (no limit, never polled, no such run) are absent, not 0.
        optional = {
            spec.name: _family(spec)
            for spec in (
                QUEUE_LIMIT,
                QUEUE_POLLED,
                QUEUE_OLDEST_DUE,
                QUEUE_OLDEST_PENDING,
                QUEUE_OLDEST_AWAITING,
                QUEUE_OLDEST_RUNNING,
                QUEUE_OLDEST_CANCELLING,
            )
        }
        for q in s.queues:
            key = [q.pool, q.name]
            for member in STATUSES:
                q_status.add_metric([*key, member], float(q.status == member))
            q_priority.add_metric(key, q.priority)
            q_backlog.add_metric(key, q.backlog)
            q_in_flight.add_metric(key, q.in_flight)
            for state, count in q.runs_by_state:
                q_runs.add_metric([*key, state], count)
            for spec, value in (
                (QUEUE_LIMIT, q.concurrency_limit),
                (QUEUE_POLLED, q.last_polled),
                (QUEUE_OLDEST_DUE, q.oldest_due),
                (QUEUE_OLDEST_PENDING, q.oldest_pending_since),
                (QUEUE_OLDEST_AWAITING, q.oldest_awaiting_slot),
                (QUEUE_OLDEST_RUNNING, q.oldest_running_since),
                (QUEUE_OLDEST_CANCELLING, q.oldest_cancelling_since),
            ):
                if value is not None:
                    optional[spec.name].add_metric(key, value)
        yield from (q_status, q_priority, q_backlog, q_in_flight, q_runs)
        yield from optional.values()

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

    def _limits(self) -> Iterator[Metric]:
        s = self._snapshot
        slots, active, enabled, leaked = (
            _family(f) for f in (LIMIT_SLOTS, LIMIT_ACTIVE, LIMIT_ENABLED, LIMIT_LEAKED)
        )
        for limit in s.limits:
            key = [limit.name, limit.kind, limit.deployment]
            slots.add_metric(key, limit.slots)
            active.add_metric(key, limit.active_slots)
            enabled.add_metric(key, float(limit.enabled))
            if limit.leaked is not None:
                leaked.add_metric([limit.name, limit.kind], limit.leaked)
        yield from (slots, active, enabled, leaked)
        if s.deployments:
            awaiting, oldest = _family(DEPLOYMENT_AWAITING), _family(DEPLOYMENT_OLDEST_AWAITING)
            for d in s.deployments:
                awaiting.add_metric([d.name], d.awaiting_slot)
                if d.oldest_awaiting_slot is not None:
                    oldest.add_metric([d.name], d.oldest_awaiting_slot)
            yield from (awaiting, oldest)
        features = _family(FEATURE)
        for feature, available in s.features:
            features.add_metric([feature], float(available))
        yield features

    def _latency(self) -> Iterator[Metric]:
        latency = self._snapshot.latency
        if latency is None:
            return
        pools = sorted(
            {p.name for p in self._snapshot.pools}
            | set(latency.pickup)
            | set(latency.start)
            | {pool for pool, _ in latency.transitions}
        )
        yield _histogram("prefect_flow_run_pickup_delay_seconds", dict(latency.pickup), pools)
        yield _histogram("prefect_flow_run_start_delay_seconds", dict(latency.start), pools)
        transitions = CounterMetricFamily(
            "prefect_flow_run_state_transitions",
            f"Flow runs entering each state, by pool, read from Prefect's events. {AS_OF}",
            labels=["work_pool", "state"],
        )
        counts = dict(latency.transitions)
        states = sorted(
            set(KNOWN_STATE_NAMES)
            | {"Completed", "Failed", "Crashed", "Cancelled"}
            | {state for _, state in counts}
        )
        for pool in pools:
            for state in states:
                transitions.add_metric([pool, state], counts.get((pool, state), 0))
        yield transitions
        lag, behind = _family(EVENTS_LAG), _family(EVENTS_BEHIND)
        if latency.lag_seconds is not None:
            lag.add_metric([], latency.lag_seconds)
        behind.add_metric([], float(latency.behind))
        yield from (lag, behind)


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
