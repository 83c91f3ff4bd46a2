"""Turns the records of one poll into an immutable Snapshot: pure, no I/O and no clock."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from exporter.records import (
    AWAITING_CONCURRENCY_SLOT,
    FAILURE_STATE_TYPES,
    FINISHED_STATE_LABELS,
    IN_FLIGHT_STATE_TYPES,
    KNOWN_STATE_NAMES,
    TERMINAL_STATE_TYPES,
    ConcurrencyLimitRecord,
    DeploymentHealth,
    DeploymentRecord,
    LatencyStats,
    LimitHolders,
    LimitKind,
    PollRecords,
    QueueRunStats,
    StateCount,
    StateType,
    WorkerRecord,
)

# Prefect's own fallback when a worker does not report its heartbeat interval.
DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 30.0


@dataclass(frozen=True)
class PoolState:
    """One work pool; the limit and in-flight counts are runs, `status` a WorkPoolStatus value."""

    name: str
    type: str
    status: str | None
    concurrency_limit: int | None
    online_workers: int
    in_flight: int = 0


@dataclass(frozen=True)
class QueueState:
    """One work queue; timestamps are Unix seconds, None when there is no such run or poll.

    `runs_by_state` pairs each state name (every known one, then custom ones) with its count of
    non-terminal runs; `status` is a WorkQueueStatus.
    """

    pool: str
    name: str
    status: str | None
    priority: int
    concurrency_limit: int | None
    last_polled: float | None
    runs_by_state: tuple[tuple[str, int], ...]
    backlog: int
    oldest_due: float | None
    oldest_pending_since: float | None
    in_flight: int = 0
    oldest_awaiting_slot: float | None = None
    oldest_running_since: float | None = None
    oldest_cancelling_since: float | None = None


@dataclass(frozen=True)
class WorkerState:
    """One worker: last heartbeat in Unix seconds, its reported interval in seconds."""

    pool: str
    name: str
    last_heartbeat: float | None
    heartbeat_interval: float | None
    online: bool


@dataclass(frozen=True)
class LimitState:
    """One concurrency limit; `leaked` is None where holders cannot be checked (global).

    `prefect_name` is the limit's name in Prefect (`deployment:<id>` for a deployment limit),
    the one its CLI commands take; `name` is the one people know.
    """

    name: str
    kind: LimitKind
    deployment: str
    slots: int
    active_slots: int
    enabled: bool
    leaked: int | None
    prefect_name: str = ""


@dataclass(frozen=True)
class DeploymentState:
    """Opt-in per-deployment view of runs held by the deployment's own limit."""

    name: str
    awaiting_slot: int
    oldest_awaiting_slot: float | None


@dataclass(frozen=True)
class DeploymentHealthState:
    """One selected deployment (`flow/deployment`); timestamps Unix seconds, None if unknown.

    `last_failures` pairs each failure outcome seen (Failed, Crashed) with when its latest run
    ended; `schedule_interval` is in seconds (see `schedule_interval`); `last_due` is the
    expected start of the newest auto-scheduled run whose expected start has passed.
    """

    name: str
    paused: bool
    active_schedules: int
    schedule_interval: float | None
    next_run: float | None
    last_success: float | None
    last_failures: tuple[tuple[str, float], ...] = ()
    last_due: float | None = None


@dataclass(frozen=True)
class DeploymentsView:
    """The deployment health series of one poll; `capped` counts matching deployments left
    out by the cap (`--deployments.max`)."""

    deployments: tuple[DeploymentHealthState, ...]
    capped: int


@dataclass(frozen=True)
class Snapshot:
    """The state of one Prefect API as of one successful poll.

    `runs_without_work_queue` counts due Scheduled runs whose work queue was deleted (None when
    not read): they belong to no pool and no worker will take them. `server_version` is the
    server's Prefect version as `GET /admin/version` answers it (None when not offered).
    """

    observed_at: float
    pools: tuple[PoolState, ...]
    queues: tuple[QueueState, ...]
    workers: tuple[WorkerState, ...]
    limits: tuple[LimitState, ...] = ()
    deployments: tuple[DeploymentState, ...] = ()
    latency: LatencyStats | None = None
    features: tuple[tuple[str, bool], ...] = ()
    runs_without_work_queue: int | None = None
    deployment_health: DeploymentsView | None = None
    server_version: str | None = None


EMPTY_STATS = QueueRunStats(
    counts=(),
    due_scheduled=0,
    oldest_due_scheduled=None,
    oldest_awaiting_slot=None,
    oldest_pending_since=None,
)


def is_online(worker: WorkerRecord, now: float, heartbeat_multiple: float) -> bool:
    """A worker is online while its last heartbeat is within `heartbeat_multiple` intervals."""
    if worker.last_heartbeat is None:
        return False
    interval = worker.heartbeat_interval or DEFAULT_HEARTBEAT_INTERVAL_SECONDS
    return now - worker.last_heartbeat <= interval * heartbeat_multiple


def _runs_by_state(stats: QueueRunStats) -> tuple[tuple[str, int], ...]:
    totals = dict.fromkeys(map(str, KNOWN_STATE_NAMES), 0)
    for count in stats.counts:
        totals[count.state_name] = totals.get(count.state_name, 0) + count.count
    return tuple(totals.items())


def _oldest(*timestamps: float | None) -> float | None:
    present = [t for t in timestamps if t is not None]
    return min(present) if present else None


def _in_flight(counts: tuple[StateCount, ...]) -> int:
    return sum(c.count for c in counts if c.state_type in IN_FLIGHT_STATE_TYPES)


def _is_finished(run_id: str, holders: LimitHolders) -> bool:
    """A holder is finished when it, or the flow run it belongs to, is terminal.

    A holder the API does not list is not evidence of a leak: Prefect 3 writes task runs from
    their events, seconds after the task took its slot, so a task that runs briefly is often not
    listed yet (a false leak in 28 of 68 samples of the dashboards' demo, 12-second runs). A
    deleted holder's slot is freed when its lease expires.
    """
    state = holders.holder_states.get(run_id)
    if state is None:
        return False
    if state.state_type in TERMINAL_STATE_TYPES:
        return True
    if state.flow_run_id is not None:
        parent = holders.holder_states.get(state.flow_run_id)
        return parent is not None and parent.state_type in TERMINAL_STATE_TYPES
    return False


def leaked_slots(limit: ConcurrencyLimitRecord, holders: LimitHolders | None) -> int | None:
    """Slots held by runs that no longer run; None when the holders are unknown."""
    if holders is None:
        return None
    if limit.tag is not None:
        tag_holders = holders.tag_holders.get(limit.tag)
        if tag_holders is None:
            return None
        return sum(_is_finished(run_id, holders) for run_id in tag_holders)
    if limit.deployment_id is not None:
        holding = holders.deployment_slot_runs.get(limit.deployment_id)
        return None if holding is None else max(0, limit.active_slots - holding)
    return None


def _limit_state(limit: ConcurrencyLimitRecord, holders: LimitHolders | None) -> LimitState:
    # Ids are opaque to people; the flow/deployment name is what they know.
    names = holders.deployment_names if holders else {}
    return LimitState(
        name=limit.display_name(names),
        kind=limit.kind,
        deployment=limit.deployment_name(names) or "",
        slots=limit.limit,
        active_slots=limit.active_slots,
        enabled=limit.active,
        leaked=leaked_slots(limit, holders),
        prefect_name=limit.name,
    )


def schedule_interval(deployment: DeploymentRecord, upcoming: Sequence[float]) -> float | None:
    """Seconds between two runs of the deployment's active schedules, for information only
    (no alert depends on it); None when unknown.

    Interval schedules give it from their own definition (the shortest when several). Cron and
    rrule schedules have no fixed interval: the largest gap between the upcoming runs read stands
    for it, ignoring zero gaps (two schedules firing at one instant); with both kinds active,
    the shorter of the two. None for a cron alone with fewer than two distinct upcoming starts.
    """
    if not deployment.active_schedules:
        return None
    gaps = [b - a for a, b in pairwise(upcoming) if b > a]
    if not deployment.calendar_schedules or not gaps:
        return deployment.interval
    gap = max(gaps)
    return gap if deployment.interval is None else min(gap, deployment.interval)


def _deployments_view(health: DeploymentHealth) -> DeploymentsView:
    rows = []
    for d in sorted(health.deployments, key=lambda d: d.name):
        ends = health.last_end.get(d.id, {})
        upcoming = health.upcoming.get(d.id, ())
        rows.append(
            DeploymentHealthState(
                name=d.name,
                paused=d.paused,
                active_schedules=d.active_schedules,
                schedule_interval=schedule_interval(d, upcoming),
                next_run=upcoming[0] if upcoming else None,
                last_success=ends.get(StateType.COMPLETED),
                last_due=health.last_due.get(d.id),
                last_failures=tuple(
                    (FINISHED_STATE_LABELS[t], ends[t]) for t in FAILURE_STATE_TYPES if t in ends
                ),
            )
        )
    return DeploymentsView(tuple(rows), max(0, health.matching - len(health.deployments)))


def build_snapshot(
    records: PollRecords,
    heartbeat_multiple: float = 3.0,
    latency: LatencyStats | None = None,
    features: tuple[tuple[str, bool], ...] = (),
    server_version: str | None = None,
) -> Snapshot:
    """Derive the exported state from one poll's records (and the server's version, if read)."""
    now = records.observed_at
    workers = tuple(
        WorkerState(
            pool=w.pool,
            name=w.name,
            last_heartbeat=w.last_heartbeat,
            heartbeat_interval=w.heartbeat_interval,
            online=is_online(w, now, heartbeat_multiple),
        )
        for w in sorted(records.workers, key=lambda w: (w.pool, w.name))
    )
    online_by_pool: dict[str, int] = {}
    for worker in workers:
        online_by_pool[worker.pool] = online_by_pool.get(worker.pool, 0) + worker.online
    queues = []
    for q in sorted(records.queues, key=lambda q: (q.pool, q.name)):
        stats = records.queue_stats.get(q.id, EMPTY_STATS)
        awaiting_slot = sum(
            c.count for c in stats.counts if c.state_name == AWAITING_CONCURRENCY_SLOT
        )
        queues.append(
            QueueState(
                pool=q.pool,
                name=q.name,
                status=q.status,
                priority=q.priority,
                concurrency_limit=q.concurrency_limit,
                last_polled=q.last_polled,
                runs_by_state=_runs_by_state(stats),
                backlog=stats.due_scheduled + awaiting_slot,
                oldest_due=_oldest(stats.oldest_due_scheduled, stats.oldest_awaiting_slot),
                oldest_pending_since=stats.oldest_pending_since,
                in_flight=_in_flight(stats.counts),
                oldest_awaiting_slot=stats.oldest_awaiting_slot,
                oldest_running_since=stats.oldest_running_since,
                oldest_cancelling_since=stats.oldest_cancelling_since,
            )
        )
    # Pool totals are derived from the queue states just built, not counted a second time.
    in_flight_by_pool: dict[str, int] = {}
    for queue in queues:
        in_flight_by_pool[queue.pool] = in_flight_by_pool.get(queue.pool, 0) + queue.in_flight
    pools = tuple(
        PoolState(
            name=p.name,
            type=p.type,
            status=p.status,
            concurrency_limit=p.concurrency_limit,
            online_workers=online_by_pool.get(p.name, 0),
            in_flight=in_flight_by_pool.get(p.name, 0),
        )
        for p in sorted(records.pools, key=lambda p: p.name)
    )
    holders = records.holders
    limits = tuple(
        sorted((_limit_state(limit, holders) for limit in records.limits), key=lambda x: x.name)
    )
    deployments = tuple(
        sorted(
            (
                DeploymentState(
                    name=holders.deployment_names.get(deployment_id, deployment_id),
                    awaiting_slot=count,
                    oldest_awaiting_slot=oldest,
                )
                for deployment_id, (count, oldest) in holders.deployment_awaiting.items()
            ),
            key=lambda d: d.name,
        )
        if holders
        else ()
    )
    return Snapshot(
        observed_at=now,
        pools=pools,
        queues=tuple(queues),
        workers=workers,
        limits=limits,
        deployments=deployments,
        latency=latency,
        features=features,
        runs_without_work_queue=records.runs_without_work_queue,
        deployment_health=(
            _deployments_view(records.deployment_health)
            if records.deployment_health is not None
            else None
        ),
        server_version=server_version,
    )
