"""Turns the records of one poll into an immutable Snapshot: pure, no I/O and no clock."""

from __future__ import annotations

from dataclasses import dataclass

from exporter.records import PollRecords, QueueRunStats, WorkerRecord

AWAITING_CONCURRENCY_SLOT = "AwaitingConcurrencySlot"

# Non-terminal state names Prefect 3 uses. The set is closed so that every queue always exports
# each of them (0 when empty) and series never vanish; custom names seen in the API are added.
KNOWN_STATE_NAMES = (
    "Scheduled",
    "Late",
    "AwaitingRetry",
    AWAITING_CONCURRENCY_SLOT,
    "Pending",
    "Submitting",
    "InfrastructurePending",
    "Running",
    "Retrying",
    "Paused",
    "Suspended",
    "Cancelling",
)

# Prefect's own fallback when a worker does not report its heartbeat interval.
DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 30.0


@dataclass(frozen=True)
class PoolState:
    name: str
    type: str
    status: str | None
    concurrency_limit: int | None
    online_workers: int


@dataclass(frozen=True)
class QueueState:
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


@dataclass(frozen=True)
class WorkerState:
    pool: str
    name: str
    last_heartbeat: float | None
    heartbeat_interval: float | None
    online: bool


@dataclass(frozen=True)
class Snapshot:
    """The state of one Prefect API as of one successful poll."""

    observed_at: float
    pools: tuple[PoolState, ...]
    queues: tuple[QueueState, ...]
    workers: tuple[WorkerState, ...]


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
    totals = dict.fromkeys(KNOWN_STATE_NAMES, 0)
    for count in stats.counts:
        totals[count.state_name] = totals.get(count.state_name, 0) + count.count
    return tuple(totals.items())


def _oldest(*timestamps: float | None) -> float | None:
    present = [t for t in timestamps if t is not None]
    return min(present) if present else None


def build_snapshot(records: PollRecords, heartbeat_multiple: float = 3.0) -> Snapshot:
    """Derive the exported state from one poll's records."""
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
    pools = tuple(
        PoolState(
            name=p.name,
            type=p.type,
            status=p.status,
            concurrency_limit=p.concurrency_limit,
            online_workers=online_by_pool.get(p.name, 0),
        )
        for p in sorted(records.pools, key=lambda p: p.name)
    )
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
            )
        )
    return Snapshot(observed_at=now, pools=pools, queues=tuple(queues), workers=workers)
