"""Plain data from the readers to the snapshot, and the one home of the Prefect vocabulary.

The API adapter and the event reader hand their results to the pure snapshot only in these
shapes. The vocabulary below (state types and names, statuses, concurrency-limit names) is what
the exporter knows about Prefect; it is spelled out here once, without importing prefect, and
tests/test_records.py pins it to prefect-client's own enums.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class StateType(StrEnum):
    """Prefect's state types (`StateType` in prefect-client): the coarse kind of a run's state."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


TERMINAL_STATE_TYPES = frozenset(
    {StateType.COMPLETED, StateType.FAILED, StateType.CANCELLED, StateType.CRASHED}
)
# Prefect's pool and queue limits count runs of these types as occupying a slot.
IN_FLIGHT_STATE_TYPES = frozenset({StateType.PENDING, StateType.RUNNING})
# A deployment limit's slot is held from Pending until the run leaves Cancelling.
SLOT_HOLDING_STATE_TYPES = frozenset({StateType.PENDING, StateType.RUNNING, StateType.CANCELLING})


class StateName(StrEnum):
    """The state names Prefect 3 gives runs (a state's `name`; each belongs to one type).

    Members are in the order the exporter lists them: the non-terminal names first.
    """

    SCHEDULED = "Scheduled"
    LATE = "Late"
    AWAITING_RETRY = "AwaitingRetry"
    AWAITING_CONCURRENCY_SLOT = "AwaitingConcurrencySlot"
    PENDING = "Pending"
    SUBMITTING = "Submitting"
    INFRASTRUCTURE_PENDING = "InfrastructurePending"
    RUNNING = "Running"
    RETRYING = "Retrying"
    PAUSED = "Paused"
    SUSPENDED = "Suspended"
    CANCELLING = "Cancelling"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CRASHED = "Crashed"
    CANCELLED = "Cancelled"

    @property
    def state_type(self) -> StateType:
        """The type Prefect gives a state of this name (`Late` is SCHEDULED)."""
        return _STATE_TYPE_OF_NAME[self]


_STATE_TYPE_OF_NAME = {
    StateName.SCHEDULED: StateType.SCHEDULED,
    StateName.LATE: StateType.SCHEDULED,
    StateName.AWAITING_RETRY: StateType.SCHEDULED,
    StateName.AWAITING_CONCURRENCY_SLOT: StateType.SCHEDULED,
    StateName.PENDING: StateType.PENDING,
    StateName.SUBMITTING: StateType.PENDING,
    StateName.INFRASTRUCTURE_PENDING: StateType.PENDING,
    StateName.RUNNING: StateType.RUNNING,
    StateName.RETRYING: StateType.RUNNING,
    StateName.PAUSED: StateType.PAUSED,
    StateName.SUSPENDED: StateType.PAUSED,
    StateName.CANCELLING: StateType.CANCELLING,
    StateName.COMPLETED: StateType.COMPLETED,
    StateName.FAILED: StateType.FAILED,
    StateName.CRASHED: StateType.CRASHED,
    StateName.CANCELLED: StateType.CANCELLED,
}

# Deployment limits park runs in this SCHEDULED-type state and keep moving their next start.
AWAITING_CONCURRENCY_SLOT = StateName.AWAITING_CONCURRENCY_SLOT
# Non-terminal names, in export order. The set is closed so that every queue always exports
# each of them (0 when empty) and series never vanish; custom names seen in the API are added.
KNOWN_STATE_NAMES = tuple(n for n in StateName if n.state_type not in TERMINAL_STATE_TYPES)
TERMINAL_STATE_NAMES = frozenset(n for n in StateName if n.state_type in TERMINAL_STATE_TYPES)


class WorkPoolStatus(StrEnum):
    """A work pool's status (`WorkPoolStatus` in prefect-client); legacy agent pools have none."""

    READY = "READY"
    NOT_READY = "NOT_READY"
    PAUSED = "PAUSED"


class WorkQueueStatus(StrEnum):
    """A work queue's status (`WorkQueueStatus`); NOT_READY when no worker polled it for 60 s."""

    READY = "READY"
    NOT_READY = "NOT_READY"
    PAUSED = "PAUSED"


class LimitKind(StrEnum):
    """What a row of the v2 concurrency-limit table limits, told by its name's prefix."""

    GLOBAL = "global"
    TAG = "tag"
    DEPLOYMENT = "deployment"


# Prefect names tag limits `tag:<tag>` and deployment limits `deployment:<deployment id>`.
TAG_LIMIT_PREFIX = "tag:"
DEPLOYMENT_LIMIT_PREFIX = "deployment:"


@dataclass(frozen=True)
class PoolSelector:
    """Which work pools one exporter watches: shell-style globs, exclusion winning.

    No `include` means every pool. Several exporters with disjoint selections split one
    workspace, each within its own request budget.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def selects(self, pool: str) -> bool:
        """True when `pool` (a work pool name) is watched."""
        if any(fnmatch.fnmatchcase(pool, pattern) for pattern in self.exclude):
            return False
        return not self.include or any(fnmatch.fnmatchcase(pool, p) for p in self.include)


@dataclass(frozen=True)
class DeploymentSelector:
    """Which deployments get health series: shell-style globs on `flow/deployment`, opt-in.

    No `include` means none (the feature is off): every deployment adds series. `exclude` wins
    over `include`, and at most `max` deployments are exported (the first by name).
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max: int = 100

    @property
    def enabled(self) -> bool:
        """True when some deployment may be selected (an include glob was given)."""
        return bool(self.include)

    def selects(self, name: str) -> bool:
        """True when `name` (`flow/deployment`) matches an include glob and no exclude glob."""
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.include)


# The terminal state types a deployment's runs are counted by, with the label people know (the
# state name Prefect gives each type by default).
FINISHED_STATE_LABELS: Mapping[str, str] = {
    StateType.COMPLETED: "Completed",
    StateType.FAILED: "Failed",
    StateType.CRASHED: "Crashed",
    StateType.CANCELLED: "Cancelled",
}
# The outcomes a deployment's last failure is dated by.
FAILURE_STATE_TYPES = (StateType.FAILED, StateType.CRASHED)


@dataclass(frozen=True)
class DeploymentRecord:
    """One deployment as `/deployments/filter` describes it, named `flow/deployment`.

    `interval` is the shortest active interval schedule in seconds (from the schedule's own
    definition), None when there is none; `calendar_schedules` counts active cron and rrule
    schedules (they have no fixed interval), `active_schedules` all active schedules.
    """

    id: str
    name: str
    paused: bool
    active_schedules: int = 0
    interval: float | None = None
    calendar_schedules: int = 0


@dataclass(frozen=True)
class EndedRun:
    """A flow run of a deployment that reached a terminal state; `end_time` in Unix seconds."""

    id: str
    deployment_id: str
    state_type: str
    end_time: float


@dataclass(frozen=True)
class UpcomingRun:
    """A Scheduled flow run of a deployment; `start` is its next scheduled start, Unix seconds."""

    id: str
    deployment_id: str
    start: float


# The run listings of deployment health; a malformed row of one is skipped and counted by it.
DEPLOYMENT_RUN_LISTINGS = ("ended", "upcoming", "due")
# Prefect's scheduler tags every run it creates from a deployment schedule so
# (server/models/deployments.py, _generate_scheduled_flow_runs): a filter every Prefect 3 server
# understands, unlike the newer `created_by` filter.
AUTO_SCHEDULED_TAG = "auto-scheduled"


@dataclass(frozen=True)
class DueRun:
    """A flow run of a deployment by its expected start (Unix seconds), latest first.

    `auto_scheduled` is Prefect's own flag (server/schemas/core.py FlowRun): True for runs its
    scheduler created from a deployment schedule, False for manual and triggered runs.
    """

    id: str
    deployment_id: str
    expected_start: float
    auto_scheduled: bool


@dataclass(frozen=True)
class DeploymentHealth:
    """What the deployments reader knows as of one poll, for the snapshot.

    `deployments` are the exported ones (at most the selector's `max`), `matching` how many
    matched the globs; `last_end` maps a deployment id to the latest end time (Unix seconds)
    of its runs by terminal state type (COMPLETED, FAILED, CRASHED), `upcoming` to the next
    scheduled starts of its runs (at most three, earliest first), `last_due` to the expected
    start of its newest auto-scheduled run whose expected start is in the past.
    """

    deployments: tuple[DeploymentRecord, ...] = ()
    matching: int = 0
    last_end: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    upcoming: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    last_due: Mapping[str, float] = field(default_factory=dict)


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
class RunRecord:
    """One flow run from a cross-queue listing, reduced to what per-queue figures need.

    Times are Unix seconds; `state_timestamp` is when the run entered its current state.
    `queue_id` is None for a run whose work queue was deleted (no worker can take it).
    """

    id: str
    queue_id: str | None
    state_type: str
    state_name: str
    state_timestamp: float | None
    expected_start: float | None
    next_scheduled_start: float | None


@dataclass(frozen=True)
class RunPlace:
    """Where one flow run waits: its work pool and queue names, None where there is none.

    A run whose work queue was deleted keeps the queue's name but loses its pool (and its
    queue id): `work_pool` None with a `work_queue` name is such a run.
    """

    id: str
    work_pool: str | None
    work_queue: str | None
    deployment_id: str | None = None


@dataclass(frozen=True)
class PollRecords:
    """Everything one poll read, with the moment the poll started (the snapshot has no clock).

    `runs_without_work_queue` is None when it was not read.
    """

    observed_at: float
    pools: tuple[PoolRecord, ...]
    queues: tuple[QueueRecord, ...]
    workers: tuple[WorkerRecord, ...]
    queue_stats: Mapping[str, QueueRunStats] = field(default_factory=dict)
    limits: tuple[ConcurrencyLimitRecord, ...] = ()
    holders: LimitHolders | None = None
    runs_without_work_queue: int | None = None
    deployment_health: DeploymentHealth | None = None


@dataclass(frozen=True)
class ConcurrencyLimitRecord:
    """One row of the v2 concurrency-limit table (global, `tag:<tag>` or `deployment:<id>`).

    `limit` and `active_slots` count slots; `active` is False when the limit is switched off.
    """

    id: str
    name: str
    limit: int
    active_slots: int
    active: bool

    @property
    def kind(self) -> LimitKind:
        """Global, tag or deployment, from the name's prefix."""
        if self.name.startswith(TAG_LIMIT_PREFIX):
            return LimitKind.TAG
        if self.name.startswith(DEPLOYMENT_LIMIT_PREFIX):
            return LimitKind.DEPLOYMENT
        return LimitKind.GLOBAL

    @property
    def tag(self) -> str | None:
        """The task-run tag a tag limit limits; None for other kinds."""
        return self.name.removeprefix(TAG_LIMIT_PREFIX) if self.kind is LimitKind.TAG else None

    @property
    def deployment_id(self) -> str | None:
        """The id of the deployment a deployment limit limits; None for other kinds."""
        if self.kind is not LimitKind.DEPLOYMENT:
            return None
        return self.name.removeprefix(DEPLOYMENT_LIMIT_PREFIX)

    def deployment_name(self, names: Mapping[str, str]) -> str | None:
        """The deployment's name from `names` (id to `flow/deployment`), else its id.

        None for limits of other kinds.
        """
        deployment_id = self.deployment_id
        return None if deployment_id is None else names.get(deployment_id, deployment_id)

    def display_name(self, names: Mapping[str, str]) -> str:
        """The name people know: `deployment:<flow>/<deployment>` instead of an opaque id."""
        deployment = self.deployment_name(names)
        return self.name if deployment is None else f"{DEPLOYMENT_LIMIT_PREFIX}{deployment}"


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
    deployment: str | None = None  # `flow/deployment`, None for a run of no deployment


# Waits from seconds (a warm process worker) to hours (a starved pool).
DELAY_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)


@dataclass(frozen=True)
class HistogramState:
    """Cumulative bucket counts (one per bound of DELAY_BUCKETS, then +Inf), sum and count.

    `total` is the sum of the observed values, in seconds.
    """

    buckets: tuple[int, ...] = (0,) * (len(DELAY_BUCKETS) + 1)
    total: float = 0.0

    @property
    def count(self) -> int:
        """How many values were observed."""
        return self.buckets[-1]

    def observe(self, value: float) -> HistogramState:
        """A new state with `value` (seconds) added."""
        bounds = (*DELAY_BUCKETS, float("inf"))
        buckets = tuple(n + (value <= bound) for n, bound in zip(self.buckets, bounds, strict=True))
        return HistogramState(buckets, self.total + value)


@dataclass(frozen=True)
class LatencyStats:
    """Everything the event reader has counted, as immutable data for the snapshot.

    `pickup` and `start` are delay histograms by work pool, `transitions` counts runs entering
    each (pool, state name), `finished` runs of selected deployments reaching each terminal
    state (deployment, FINISHED_STATE_LABELS value), `lag_seconds` is how far the reader trails
    the poll and `behind` says that the last poll left events unread.
    """

    pickup: Mapping[str, HistogramState] = field(default_factory=dict)
    start: Mapping[str, HistogramState] = field(default_factory=dict)
    transitions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    finished: Mapping[tuple[str, str], int] = field(default_factory=dict)
    lag_seconds: float | None = None
    behind: bool = False
    events_read: int = 0
