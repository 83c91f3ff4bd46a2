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
    oldest_running_since: float | None = None
    oldest_cancelling_since: float | None = None


@dataclass(frozen=True)
class PollRecords:
    """Everything one poll read, with the moment the poll started (the snapshot has no clock)."""

    observed_at: float
    pools: tuple[PoolRecord, ...]
    queues: tuple[QueueRecord, ...]
    workers: tuple[WorkerRecord, ...]
    queue_stats: Mapping[str, QueueRunStats] = field(default_factory=dict)
    limits: tuple[ConcurrencyLimitRecord, ...] = ()
    holders: LimitHolders | None = None


@dataclass(frozen=True)
class ConcurrencyLimitRecord:
    """One row of the v2 concurrency-limit table (global, `tag:<tag>` or `deployment:<id>`)."""

    id: str
    name: str
    limit: int
    active_slots: int
    active: bool


@dataclass(frozen=True)
class RunState:
    """The current state of one task or flow run, for checking who holds a slot."""

    id: str
    state_type: str | None
    flow_run_id: str | None = None


@dataclass(frozen=True)
class LimitHolders:
    """What is known about who holds concurrency slots.

    `tag_holders` lists the task runs holding each tag limit (from the v1 API), `holder_states`
    their states and those of their flow runs, `deployment_names` maps deployment ids to names,
    and `deployment_slot_runs` counts each limited deployment's runs that really hold a slot
    (Pending, Running or Cancelling). A limit missing from these maps was not checked.
    """

    tag_holders: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    holder_states: Mapping[str, RunState] = field(default_factory=dict)
    deployment_names: Mapping[str, str] = field(default_factory=dict)
    deployment_slot_runs: Mapping[str, int] = field(default_factory=dict)
    deployment_awaiting: Mapping[str, tuple[int, float | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowRunEvent:
    """One `prefect.flow-run.<state>` event, reduced to what latency and throughput need."""

    id: str
    occurred: float
    flow_run_id: str
    state_type: str
    state_name: str
    work_pool: str
