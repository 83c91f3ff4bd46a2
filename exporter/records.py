"""Plain records read from the Prefect API: the only shape in which API data leaves the adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PoolRecord:
    """One work pool as the API describes it."""

    name: str
    type: str
    status: str | None
    is_paused: bool
    concurrency_limit: int | None


@dataclass(frozen=True)
class QueueRecord:
    """One work queue; queue names are unique only within their pool."""

    id: str
    name: str
    pool: str
    status: str | None
    is_paused: bool
    priority: int
    concurrency_limit: int | None
    last_polled: float | None


@dataclass(frozen=True)
class WorkerRecord:
    """One worker's heartbeat as stored by the server."""

    pool: str
    name: str
    last_heartbeat: float | None
    heartbeat_interval: float | None


@dataclass(frozen=True)
class StateCount:
    """How many of a queue's non-terminal runs are in one state."""

    state_type: str
    state_name: str
    count: int


@dataclass(frozen=True)
class QueueRunStats:
    """Aggregates over one queue's runs, read with a fixed number of requests.

    `due_scheduled` counts SCHEDULED-type runs whose next scheduled start has passed, leaving out
    AwaitingConcurrencySlot runs: the deployment limit keeps pushing their next start 30 s ahead,
    so they are counted through `counts` and dated by their original expected start instead.
    """

    counts: tuple[StateCount, ...]
    due_scheduled: int
    oldest_due_scheduled: float | None
    oldest_awaiting_slot: float | None
    oldest_pending_since: float | None


@dataclass(frozen=True)
class PollRecords:
    """Everything one poll read, with the moment the poll started (the snapshot has no clock)."""

    observed_at: float
    pools: tuple[PoolRecord, ...]
    queues: tuple[QueueRecord, ...]
    workers: tuple[WorkerRecord, ...]
    queue_stats: Mapping[str, QueueRunStats] = field(default_factory=dict)
