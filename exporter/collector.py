"""Builds metric families: Prefect-derived ones from a Snapshot, the exporter's own from the store.

Every family is declared once, as data, in SNAPSHOT_FAMILIES or OWN_FAMILIES: its name, help,
type, labels and the function that yields its samples (kube-state-metrics' generators). The
collectors only loop over those tables, and the docs check (tests/test_collector.py) compares the
same tables with docs/metrics.md.

Sample of the Prefect-derived exposition (see docs/metrics.md for every family):

    prefect_work_queue_backlog_runs{work_pool="k8s",work_queue="default"} 748.0
    prefect_work_queue_oldest_due_run_timestamp_seconds{work_pool="k8s",work_queue="default"} 1.8e9
    prefect_worker_online{work_pool="k8s",worker="k8s-worker-1"} 1.0
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from exporter import __version__
from exporter.records import (
    DELAY_BUCKETS,
    FINISHED_STATE_LABELS,
    KNOWN_STATE_NAMES,
    TERMINAL_STATE_NAMES,
    HistogramState,
    LatencyStats,
    WorkPoolStatus,
    WorkQueueStatus,
)
from exporter.snapshot import (
    DeploymentHealthState,
    DeploymentState,
    LimitState,
    PoolState,
    QueueState,
    Snapshot,
    WorkerState,
)
from exporter.store import PollStatus

AS_OF = "As of the last successful poll."

Source = TypeVar("Source")
Row = TypeVar("Row")
Labels = tuple[str, ...]
Sample = tuple[Labels, float]  # label values in the order of the family's labels, then value
HistogramSample = tuple[Labels, HistogramState]

POOL = ("work_pool",)
QUEUE = ("work_pool", "work_queue")
WORKER = ("work_pool", "worker")
LIMIT = ("limit", "kind", "deployment")


def _always(source: object) -> bool:
    return True


@dataclass(frozen=True, kw_only=True)
class Family(Generic[Source]):
    """One gauge or counter family: its contract and the function that yields its samples.

    `samples(source)` yields (label values, value) pairs. A family whose `present(source)` is
    False is left out of the exposition altogether, HELP and TYPE included. A counter's `name`
    has no `_total` suffix: prometheus-client adds it.
    """

    name: str
    help: str
    labels: Labels = ()
    samples: Callable[[Source], Iterable[Sample]]
    present: Callable[[Source], bool] = _always
    counter: bool = False

    @property
    def type(self) -> str:
        """The Prometheus type: `gauge` or `counter`."""
        return "counter" if self.counter else "gauge"

    def build(self, source: Source, help_suffix: str = "") -> Metric:
        """A fresh family holding the samples of `source`; `help_suffix` is appended to HELP."""
        help_text = f"{self.help} {help_suffix}" if help_suffix else self.help
        kind = CounterMetricFamily if self.counter else GaugeMetricFamily
        family = kind(self.name, help_text, labels=self.labels)
        for labels, value in self.samples(source):
            family.add_metric(labels, value)
        return family


@dataclass(frozen=True, kw_only=True)
class HistogramFamily(Generic[Source]):
    """A histogram family over DELAY_BUCKETS; `samples` yields (label values, HistogramState)."""

    name: str
    help: str
    labels: Labels = ()
    samples: Callable[[Source], Iterable[HistogramSample]]
    present: Callable[[Source], bool] = _always

    @property
    def type(self) -> str:
        """The Prometheus type: always `histogram`."""
        return "histogram"

    def build(self, source: Source, help_suffix: str = "") -> Metric:
        """A fresh family holding the samples of `source`; `help_suffix` is appended to HELP."""
        help_text = f"{self.help} {help_suffix}" if help_suffix else self.help
        family = HistogramMetricFamily(self.name, help_text, labels=self.labels)
        bounds = [*(str(float(b)) for b in DELAY_BUCKETS), "+Inf"]
        for labels, state in self.samples(source):
            buckets = list(zip(bounds, map(float, state.buckets), strict=True))
            family.add_metric(labels, buckets, state.total)
        return family


def _each(
    rows: Callable[[Source], Iterable[Row]],
    key: Callable[[Row], Labels],
    value: Callable[[Row], float | None],
) -> Callable[[Source], Iterator[Sample]]:
    """One sample per row; a value that does not exist (None) is an absent series, never 0."""

    def samples(source: Source) -> Iterator[Sample]:
        for row in rows(source):
            if (v := value(row)) is not None:
                yield key(row), v

    return samples


def _single(value: Callable[[Source], float | None]) -> Callable[[Source], Iterator[Sample]]:
    """The one unlabelled sample of a family, absent when the value is None."""

    def samples(source: Source) -> Iterator[Sample]:
        if (v := value(source)) is not None:
            yield (), v

    return samples


def _single_labelled(
    label: Callable[[Source], str | None],
) -> Callable[[Source], Iterator[Sample]]:
    """An info series: value 1 labelled with a fact, absent when the fact is unknown (None)."""

    def samples(source: Source) -> Iterator[Sample]:
        if (value := label(source)) is not None:
            yield (value,), 1

    return samples


def _state_set(
    rows: Callable[[Snapshot], Iterable[Row]],
    key: Callable[[Row], Labels],
    status: Callable[[Row], str | None],
    members: Iterable[str],
) -> Callable[[Snapshot], Iterator[Sample]]:
    """A closed set: every member for every row, 1 for the current one (all 0 without one)."""
    closed = tuple(map(str, members))

    def samples(snapshot: Snapshot) -> Iterator[Sample]:
        for row in rows(snapshot):
            current = status(row)
            for member in closed:
                yield (*key(row), member), float(current == member)

    return samples


def _pools(s: Snapshot) -> tuple[PoolState, ...]:
    return s.pools


def _pool(p: PoolState) -> Labels:
    return (p.name,)


def _queues(s: Snapshot) -> tuple[QueueState, ...]:
    return s.queues


def _queue(q: QueueState) -> Labels:
    return (q.pool, q.name)


def _queue_runs(s: Snapshot) -> Iterator[Sample]:
    for q in s.queues:
        for state, count in q.runs_by_state:
            yield (q.pool, q.name, state), count


def _workers(s: Snapshot) -> tuple[WorkerState, ...]:
    return s.workers


def _worker(w: WorkerState) -> Labels:
    return (w.pool, w.name)


def _limits(s: Snapshot) -> tuple[LimitState, ...]:
    return s.limits


def _limit(limit: LimitState) -> Labels:
    return (limit.name, str(limit.kind), limit.deployment)


def _deployments(s: Snapshot) -> tuple[DeploymentState, ...]:
    return s.deployments


def _deployment(d: DeploymentState) -> Labels:
    return (d.name,)


def _has_deployments(s: Snapshot) -> bool:
    return bool(s.deployments)


def _health(s: Snapshot) -> tuple[DeploymentHealthState, ...]:
    return s.deployment_health.deployments if s.deployment_health else ()


def _health_key(d: DeploymentHealthState) -> Labels:
    return (d.name,)


def _has_health(s: Snapshot) -> bool:
    return s.deployment_health is not None


def _last_failures(s: Snapshot) -> Iterator[Sample]:
    for d in _health(s):
        for state, ended in d.last_failures:
            yield (d.name, state), ended


def _finished(s: Snapshot) -> Iterator[Sample]:
    """Every terminal outcome for every exported deployment, 0 when none was seen."""
    counts = s.latency.finished if s.latency else {}
    for d in _health(s):
        for state in FINISHED_STATE_LABELS.values():
            yield (d.name, state), counts.get((d.name, state), 0)


def _has_latency(s: Snapshot) -> bool:
    return s.latency is not None


def _latency_pools(s: Snapshot, latency: LatencyStats) -> list[str]:
    """Every pool gets every latency series, also pools only the events still mention."""
    return sorted(
        {p.name for p in s.pools}
        | set(latency.pickup)
        | set(latency.start)
        | {pool for pool, _ in latency.transitions}
    )


def _delays(
    by_pool: Callable[[LatencyStats], Mapping[str, HistogramState]],
) -> Callable[[Snapshot], Iterator[HistogramSample]]:
    def samples(s: Snapshot) -> Iterator[HistogramSample]:
        if s.latency is None:
            return
        histograms = by_pool(s.latency)
        for pool in _latency_pools(s, s.latency):
            yield (pool,), histograms.get(pool, HistogramState())

    return samples


def _transitions(s: Snapshot) -> Iterator[Sample]:
    """Every known state name (terminal ones included) for every pool, 0 when none was seen."""
    if s.latency is None:
        return
    counts = s.latency.transitions
    known = {str(name) for name in (*KNOWN_STATE_NAMES, *TERMINAL_STATE_NAMES)}
    states = sorted(known | {state for _, state in counts})
    for pool in _latency_pools(s, s.latency):
        for state in states:
            yield (pool, state), counts.get((pool, state), 0)


SnapshotFamily = Family[Snapshot] | HistogramFamily[Snapshot]

# Exposition order is table order.
SNAPSHOT_FAMILIES: tuple[SnapshotFamily, ...] = (
    Family(
        name="prefect_work_pool_info",
        help="Work pools, always 1, with their type.",
        labels=("work_pool", "pool_type"),
        samples=_each(_pools, lambda p: (p.name, p.type), lambda p: 1),
    ),
    Family(
        name="prefect_work_pool_status",
        help="Work pool status: 1 for the current one of READY, NOT_READY, PAUSED.",
        labels=(*POOL, "status"),
        samples=_state_set(_pools, _pool, lambda p: p.status, WorkPoolStatus),
    ),
    Family(
        name="prefect_work_pool_concurrency_limit",
        help="Work pool concurrency limit in runs (absent when unlimited).",
        labels=POOL,
        samples=_each(_pools, _pool, lambda p: p.concurrency_limit),
    ),
    Family(
        name="prefect_work_pool_online_workers",
        help="Workers of the pool whose last heartbeat is within the online window.",
        labels=POOL,
        samples=_each(_pools, _pool, lambda p: p.online_workers),
    ),
    Family(
        name="prefect_work_pool_in_flight_runs",
        help="Runs of the pool holding a pool slot (Pending or Running types), as Prefect counts "
        "them against the pool's concurrency limit.",
        labels=POOL,
        samples=_each(_pools, _pool, lambda p: p.in_flight),
    ),
    Family(
        name="prefect_work_queue_status",
        help="Work queue status: 1 for the current one of READY, NOT_READY, PAUSED.",
        labels=(*QUEUE, "status"),
        samples=_state_set(_queues, _queue, lambda q: q.status, WorkQueueStatus),
    ),
    Family(
        name="prefect_work_queue_priority",
        help="Work queue priority within its pool (1 is served first).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.priority),
    ),
    Family(
        name="prefect_work_queue_backlog_runs",
        help="Runs due and not yet claimed: SCHEDULED-type runs whose scheduled time has passed, "
        "whatever their state name.",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.backlog),
    ),
    Family(
        name="prefect_work_queue_in_flight_runs",
        help="Runs of the queue holding a queue slot (Pending or Running types).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.in_flight),
    ),
    Family(
        name="prefect_work_queue_flow_runs",
        help="Non-terminal flow runs of the queue by state name.",
        labels=(*QUEUE, "state"),
        samples=_queue_runs,
    ),
    Family(
        name="prefect_work_queue_concurrency_limit",
        help="Work queue concurrency limit in runs (absent when unlimited).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.concurrency_limit),
    ),
    Family(
        name="prefect_work_queue_last_polled_timestamp_seconds",
        help="When a worker last polled the queue, Unix seconds (absent if never).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.last_polled),
    ),
    Family(
        name="prefect_work_queue_oldest_due_run_timestamp_seconds",
        help="Scheduled time of the queue's oldest due, unclaimed run, Unix seconds "
        "(absent when there is none).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.oldest_due),
    ),
    Family(
        name="prefect_work_queue_oldest_pending_run_timestamp_seconds",
        help="When the queue's longest-waiting Pending run entered Pending, "
        "Unix seconds (absent when there is none).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.oldest_pending_since),
    ),
    Family(
        name="prefect_work_queue_oldest_awaiting_slot_run_timestamp_seconds",
        help="Original scheduled time of the queue's oldest AwaitingConcurrencySlot run, "
        "Unix seconds (absent when there is none).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.oldest_awaiting_slot),
    ),
    Family(
        name="prefect_work_queue_oldest_running_run_timestamp_seconds",
        help="When the queue's longest-running run entered Running, Unix seconds "
        "(absent when none).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.oldest_running_since),
    ),
    Family(
        name="prefect_work_queue_oldest_cancelling_run_timestamp_seconds",
        help="When the queue's longest-cancelling run entered Cancelling, Unix seconds "
        "(absent when none).",
        labels=QUEUE,
        samples=_each(_queues, _queue, lambda q: q.oldest_cancelling_since),
    ),
    Family(
        name="prefect_worker_last_heartbeat_timestamp_seconds",
        help="When the worker last sent a heartbeat, Unix seconds.",
        labels=WORKER,
        samples=_each(_workers, _worker, lambda w: w.last_heartbeat),
    ),
    Family(
        name="prefect_worker_heartbeat_interval_seconds",
        help="Heartbeat interval the worker reported, in seconds.",
        labels=WORKER,
        samples=_each(_workers, _worker, lambda w: w.heartbeat_interval),
    ),
    Family(
        name="prefect_worker_online",
        help="1 while the worker's last heartbeat is within the configured multiple "
        "of its interval, else 0.",
        labels=WORKER,
        samples=_each(_workers, _worker, lambda w: float(w.online)),
    ),
    Family(
        name="prefect_concurrency_limit_slots",
        help="Slots of a concurrency limit (global, tag or deployment).",
        labels=LIMIT,
        samples=_each(_limits, _limit, lambda limit: limit.slots),
    ),
    Family(
        name="prefect_concurrency_limit_active_slots",
        help="Slots of a concurrency limit currently taken.",
        labels=LIMIT,
        samples=_each(_limits, _limit, lambda limit: limit.active_slots),
    ),
    Family(
        name="prefect_concurrency_limit_enabled",
        help="1 if the concurrency limit is active (enforced), 0 if it is switched off.",
        labels=LIMIT,
        samples=_each(_limits, _limit, lambda limit: float(limit.enabled)),
    ),
    Family(
        name="prefect_concurrency_limit_leaked_slots",
        help="Slots held by runs that have already finished: tag limits whose holding task run "
        "or its flow run is terminal or gone, deployment limits holding more slots than the "
        "deployment has Pending, Running or Cancelling runs. Absent for global limits (holders "
        "unknown).",
        labels=("limit", "kind"),
        samples=_each(_limits, lambda x: (x.name, str(x.kind)), lambda x: x.leaked),
    ),
    Family(
        name="prefect_deployment_awaiting_concurrency_slot_runs",
        help="Runs of the deployment in AwaitingConcurrencySlot (opt-in: --deployments.breakdown).",
        labels=("deployment",),
        samples=_each(_deployments, _deployment, lambda d: d.awaiting_slot),
        present=_has_deployments,
    ),
    Family(
        name="prefect_deployment_oldest_awaiting_concurrency_slot_run_timestamp_seconds",
        help="Original scheduled time of the deployment's oldest AwaitingConcurrencySlot run "
        "(opt-in: --deployments.breakdown).",
        labels=("deployment",),
        samples=_each(_deployments, _deployment, lambda d: d.oldest_awaiting_slot),
        present=_has_deployments,
    ),
    Family(
        name="prefect_deployment_last_success_timestamp_seconds",
        help="When the deployment's latest Completed run ended, Unix seconds (absent when it "
        "has none; opt-in: --deployments.include).",
        labels=("deployment",),
        samples=_each(_health, _health_key, lambda d: d.last_success),
        present=_has_health,
    ),
    Family(
        name="prefect_deployment_last_failure_timestamp_seconds",
        help="When the deployment's latest run in each failure state (Failed, Crashed) ended, "
        "Unix seconds (absent when it has none).",
        labels=("deployment", "state"),
        samples=_last_failures,
        present=_has_health,
    ),
    Family(
        name="prefect_deployment_next_scheduled_run_timestamp_seconds",
        help="Next scheduled start of the deployment's earliest upcoming Scheduled run, Unix "
        "seconds (absent when none is scheduled).",
        labels=("deployment",),
        samples=_each(_health, _health_key, lambda d: d.next_run),
        present=_has_health,
    ),
    Family(
        name="prefect_deployment_last_due_run_timestamp_seconds",
        help="Expected start of the deployment's newest auto-scheduled run whose expected start "
        "has passed (in any state), Unix seconds: when the schedule last expected a run (absent "
        "when none has fallen due).",
        labels=("deployment",),
        samples=_each(_health, _health_key, lambda d: d.last_due),
        present=_has_health,
    ),
    Family(
        name="prefect_deployment_paused",
        help="1 if the deployment is paused (its schedules create no runs), else 0.",
        labels=("deployment",),
        samples=_each(_health, _health_key, lambda d: float(d.paused)),
        present=_has_health,
    ),
    Family(
        name="prefect_deployment_active_schedules",
        help="Active schedules of the deployment (0: runs only when triggered).",
        labels=("deployment",),
        samples=_each(_health, _health_key, lambda d: d.active_schedules),
        present=_has_health,
    ),
    Family(
        name="prefect_deployment_schedule_interval_seconds",
        help="Seconds between two scheduled runs, informational: the interval schedule's own, "
        "or for cron and rrule schedules the largest non-zero gap between the next upcoming runs "
        "(absent without an active schedule, or with fewer than two distinct upcoming starts).",
        labels=("deployment",),
        samples=_each(_health, _health_key, lambda d: d.schedule_interval),
        present=_has_health,
    ),
    Family(
        name="prefect_exporter_deployments_capped",
        help="Deployments matching --deployments.include left without series because of "
        "--deployments.max (0 when all are exported).",
        samples=_single(lambda s: s.deployment_health.capped if s.deployment_health else None),
        present=_has_health,
    ),
    Family(
        name="prefect_flow_runs_without_work_queue",
        help="Scheduled runs due before the poll whose work queue was deleted: they name a queue "
        "that no longer exists, belong to no pool, and no worker will ever take them.",
        samples=_single(lambda s: s.runs_without_work_queue),
        present=lambda s: s.runs_without_work_queue is not None,
    ),
    Family(
        name="prefect_server_info",
        help="The Prefect server's version as its API reports it (GET /admin/version, read at "
        "start and hourly), always 1; absent where the API does not offer it (Prefect Cloud).",
        labels=("version",),
        samples=_single_labelled(lambda s: s.server_version),
        present=lambda s: s.server_version is not None,
    ),
    Family(
        name="prefect_exporter_feature_available",
        help="1 if the Prefect API offers what a feature needs (events, concurrency_limits, "
        "server_version), 0 if the exporter degraded because the server lacks it.",
        labels=("feature",),
        samples=_each(lambda s: s.features, lambda f: (f[0],), lambda f: float(f[1])),
    ),
    HistogramFamily(
        name="prefect_flow_run_pickup_delay_seconds",
        help="Seconds from a run's scheduled time to its first Pending state (claimed by a "
        "worker); early claims count as 0.",
        labels=POOL,
        samples=_delays(lambda latency: latency.pickup),
        present=_has_latency,
    ),
    HistogramFamily(
        name="prefect_flow_run_start_delay_seconds",
        help="Seconds from a run's first Pending state to its first Running state "
        "(infrastructure start-up).",
        labels=POOL,
        samples=_delays(lambda latency: latency.start),
        present=_has_latency,
    ),
    Family(
        name="prefect_flow_run_state_transitions",
        help="Flow runs entering each state, by pool, read from Prefect's events.",
        labels=(*POOL, "state"),
        samples=_transitions,
        present=_has_latency,
        counter=True,
    ),
    Family(
        name="prefect_deployment_flow_runs_finished",
        help="Runs of the deployment that finished, by terminal state (Completed, Failed, "
        "Crashed, Cancelled), read from Prefect's events since the exporter started.",
        labels=("deployment", "state"),
        samples=_finished,
        present=lambda s: s.latency is not None and s.deployment_health is not None,
        counter=True,
    ),
    Family(
        name="prefect_exporter_events_lag_seconds",
        help="How far the event reader trails the poll time: the age of the newest event "
        "counted, at least the settle delay; grows when it falls behind.",
        samples=_single(lambda s: s.latency.lag_seconds if s.latency else None),
        present=_has_latency,
    ),
    Family(
        name="prefect_exporter_events_behind",
        help="1 if the last poll left flow-run events unread because of its page limit, else 0.",
        samples=_single(lambda s: float(s.latency.behind) if s.latency else None),
        present=_has_latency,
    ),
)

OWN_FAMILIES: tuple[Family[PollStatus], ...] = (
    Family(
        name="prefect_up",
        help="1 if the last poll of the Prefect API succeeded, else 0.",
        samples=_single(lambda status: float(status.up)),
    ),
    Family(
        name="prefect_exporter_last_success_timestamp_seconds",
        help="When the last successful poll started, Unix seconds (absent before the first).",
        samples=_single(lambda status: status.last_success),
    ),
    Family(
        name="prefect_exporter_poll_duration_seconds",
        help="How long the most recent poll took, successful or not, in seconds.",
        samples=_single(lambda status: status.last_duration),
    ),
    Family(
        name="prefect_exporter_build_info",
        help="The exporter's version, always 1.",
        labels=("version",),
        samples=lambda status: [((__version__,), 1)],
    ),
)


class SnapshotCollector(Collector):
    """Yields the Prefect-derived families of one snapshot; never calls the API."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """The families of SNAPSHOT_FAMILIES present in the snapshot, in table order."""
        for family in SNAPSHOT_FAMILIES:
            if family.present(self._snapshot):
                yield family.build(self._snapshot, AS_OF)


class ExporterCollector(Collector):
    """The exporter's own health, read from the poll status at scrape time."""

    def __init__(self, status: Callable[[], PollStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        """The families of OWN_FAMILIES for the current poll status."""
        status = self._status()
        for family in OWN_FAMILIES:
            yield family.build(status)
