"""Names why runs are not starting: one snapshot and a few extra reads in, ordered findings out.

Pure: no I/O and no clock (ages are measured from the snapshot's `observed_at`). Every finding
carries one cause of the closed set `Cause`, the pool and queue it concerns, its evidence
(numbers and names, JSON-ready) and the exact command that fixes or confirms it. Findings are
ordered most likely first: the one that holds back the most runs, then, on a tie, the more
fundamental cause (a paused pool before its missing workers). See docs/diagnose.md.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from exporter.records import (
    AWAITING_CONCURRENCY_SLOT,
    DEPLOYMENT_LIMIT_PREFIX,
    TAG_LIMIT_PREFIX,
    HistogramState,
    LatencyStats,
    LimitKind,
    PoolSelector,
    RunPlace,
    StateName,
    StateType,
    WorkPoolStatus,
    WorkQueueStatus,
)
from exporter.snapshot import LimitState, PoolState, QueueState, Snapshot, WorkerState


class Cause(StrEnum):
    """Why runs do not start: the stable identifiers of `diagnose --json`.

    The set is closed: a script may switch on these values. `none` means healthy.
    """

    POOL_PAUSED = "pool_paused"
    QUEUE_PAUSED = "queue_paused"
    POOL_CONCURRENCY_LIMIT = "pool_concurrency_limit"
    QUEUE_CONCURRENCY_LIMIT = "queue_concurrency_limit"
    DEPLOYMENT_CONCURRENCY_LIMIT = "deployment_concurrency_limit"
    TAG_CONCURRENCY_LIMIT = "tag_concurrency_limit"
    LEAKED_CONCURRENCY_SLOTS = "leaked_concurrency_slots"
    NO_ONLINE_WORKER = "no_online_worker"
    QUEUE_NOT_POLLED = "queue_not_polled"
    RUNS_WITHOUT_WORK_QUEUE = "runs_without_work_queue"
    API_RATE_LIMITED = "api_rate_limited"
    SLOW_INFRASTRUCTURE = "slow_infrastructure"
    NONE = "none"


# On a tie in runs held back, the cause that makes the others moot comes first: nothing runs in
# a paused pool whatever its workers, a leaked slot explains a full limit, a limit explains slow
# pickup. A test keeps this a permutation of Cause.
PRIORITY: tuple[Cause, ...] = (
    Cause.POOL_PAUSED,
    Cause.QUEUE_PAUSED,
    Cause.NO_ONLINE_WORKER,
    Cause.QUEUE_NOT_POLLED,
    Cause.RUNS_WITHOUT_WORK_QUEUE,
    Cause.LEAKED_CONCURRENCY_SLOTS,
    Cause.TAG_CONCURRENCY_LIMIT,
    Cause.DEPLOYMENT_CONCURRENCY_LIMIT,
    Cause.POOL_CONCURRENCY_LIMIT,
    Cause.QUEUE_CONCURRENCY_LIMIT,
    Cause.SLOW_INFRASTRUCTURE,
    Cause.API_RATE_LIMITED,
    Cause.NONE,
)

# Causes that concern the read or the whole workspace rather than a pool: kept whatever
# `--work-pool` selects (the read itself was throttled).
ALWAYS_SHOWN = frozenset({Cause.API_RATE_LIMITED})

Evidence = int | float | str | bool | None | tuple[str, ...]

# Run ids listed in evidence, at most: enough to act on, short enough to read.
MAX_LISTED_RUNS = 10
_PENDING_NAMES = frozenset(n for n in StateName if n.state_type is StateType.PENDING)
_RUNNING_NAMES = frozenset(n for n in StateName if n.state_type is StateType.RUNNING)


@dataclass(frozen=True)
class Thresholds:
    """Seconds after which a wait counts as a finding.

    `queue_poll_age`: a queue not polled for longer is not served (Prefect marks it NOT_READY
    after 60 s). `slow_start`: a run claimed (Pending) for longer did not start for reasons of
    its infrastructure.
    """

    queue_poll_age: float = 60.0
    slow_start: float = 300.0


@dataclass(frozen=True)
class ApiRead:
    """What the diagnosis' own read of the API met: requests sent, throttling answers (429),
    the longest Retry-After asked for in seconds (None when none was given), and whether the
    workspace could be read at all (False: the API throttled every attempt)."""

    requests: int = 0
    throttled: int = 0
    retry_after: float | None = None
    complete: bool = True


@dataclass(frozen=True)
class Extras:
    """The reads only a diagnosis needs, beyond the exporter's snapshot.

    `latency` holds the pickup and start delays of runs seen in flow-run events over the last
    `latency_window` seconds (None when events were not read). `tag_waiters` lists, for each
    tag limit with every slot taken, the flow runs whose task waits for one; `awaiting_slot`
    the runs held in AwaitingConcurrencySlot (with their deployment); `orphans` a sample of
    the runs without a work queue; `deployment_names` maps deployment ids to `flow/deployment`.
    `pools` is the `--work-pool` selection (empty: the whole workspace).
    """

    latency: LatencyStats | None = None
    latency_window: float = 0.0
    tag_waiters: Mapping[str, tuple[RunPlace, ...]] = field(default_factory=dict)
    awaiting_slot: tuple[RunPlace, ...] = ()
    orphans: tuple[RunPlace, ...] = ()
    deployment_names: Mapping[str, str] = field(default_factory=dict)
    api: ApiRead = field(default_factory=ApiRead)
    pools: PoolSelector = field(default_factory=PoolSelector)


@dataclass(frozen=True)
class Finding:
    """One cause, where it holds runs back, the proof and the command.

    `runs` counts the runs it holds back (the ranking key); `summary` says it in one sentence;
    `evidence` maps snake_case names to numbers (seconds for `*_seconds`), names or tuples of
    names; `fix` is a shell command (None when no single command exists).
    """

    cause: Cause
    work_pool: str | None
    work_queue: str | None
    runs: int
    summary: str
    evidence: Mapping[str, Evidence]
    fix: str | None


@dataclass(frozen=True)
class DelayReport:
    """Delays of the runs observed over the latency window: how many, and their mean (seconds)."""

    runs: int
    mean_seconds: float


@dataclass(frozen=True)
class QueueReport:
    """One queue as the diagnosis sees it; ages are seconds before the snapshot, None: none.

    `due` counts runs waiting for a worker (backlog without AwaitingConcurrencySlot runs);
    `last_polled_age` is None when no worker ever polled the queue.
    """

    work_pool: str
    work_queue: str
    status: str | None
    priority: int
    concurrency_limit: int | None
    in_flight: int
    backlog: int
    due: int
    awaiting_slot: int
    pending: int
    running: int
    oldest_due_age: float | None
    oldest_awaiting_age: float | None
    oldest_pending_age: float | None
    oldest_running_age: float | None
    last_polled_age: float | None


@dataclass(frozen=True)
class WorkerReport:
    """One worker; `last_heartbeat_age` in seconds, None when it never sent one."""

    name: str
    online: bool
    last_heartbeat_age: float | None


@dataclass(frozen=True)
class PoolReport:
    """One pool with its workers, queues and the delays of its recent runs."""

    name: str
    type: str
    status: str | None
    concurrency_limit: int | None
    in_flight: int
    online_workers: int
    workers: tuple[WorkerReport, ...]
    queues: tuple[QueueReport, ...]
    pickup: DelayReport | None
    start: DelayReport | None


@dataclass(frozen=True)
class LimitReport:
    """One concurrency limit; `waiting` counts the runs known to wait for it (None: unknown)."""

    name: str
    kind: str
    slots: int
    active_slots: int
    enabled: bool
    leaked: int | None
    waiting: int | None


@dataclass(frozen=True)
class Diagnosis:
    """The findings (at least one; `none` alone when healthy) and the report behind them."""

    observed_at: float
    findings: tuple[Finding, ...]
    pools: tuple[PoolReport, ...]
    limits: tuple[LimitReport, ...]
    runs_without_work_queue: int | None
    api: ApiRead
    latency_window: float

    @property
    def healthy(self) -> bool:
        """True when nothing holds runs back."""
        return self.findings[0].cause is Cause.NONE


def duration_text(seconds: float) -> str:
    """A short human duration: `45s`, `12m`, `3h 5m`, `2d 4h` (rounded down)."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if minutes < 60:
        return f"{minutes}m"
    if hours < 24:
        return f"{hours}h {minutes % 60}m" if minutes % 60 else f"{hours}h"
    return f"{days}d {hours % 24}h" if hours % 24 else f"{days}d"


def _q(text: str) -> str:
    """A name as one shell word (names may hold spaces or quotes)."""
    return shlex.quote(text)


def _count(queue: QueueState, names: Iterable[str]) -> int:
    wanted = set(names)
    return sum(n for state, n in queue.runs_by_state if state in wanted)


def _age(now: float, timestamp: float | None) -> float | None:
    return None if timestamp is None else round(max(0.0, now - timestamp), 1)


def runs_text(n: int) -> str:
    """`1 run`, `2 runs`."""
    return f"{n} run" if n == 1 else f"{n} runs"


def _are_due(n: int) -> str:
    return f"{runs_text(n)} {'is' if n == 1 else 'are'} due"


def _wait_for_slot(n: int, pool: str | None) -> str:
    return f"; {runs_text(n)} in {pool} {'waits' if n == 1 else 'wait'} for a slot" if n else ""


def _wait(age: float | None) -> str:
    return f" (oldest waiting {duration_text(age)})" if age is not None else ""


def queue_report(queue: QueueState, now: float) -> QueueReport:
    """The diagnosis' view of one queue (see QueueReport)."""
    awaiting = _count(queue, [AWAITING_CONCURRENCY_SLOT])
    return QueueReport(
        work_pool=queue.pool,
        work_queue=queue.name,
        status=queue.status,
        priority=queue.priority,
        concurrency_limit=queue.concurrency_limit,
        in_flight=queue.in_flight,
        backlog=queue.backlog,
        due=max(0, queue.backlog - awaiting),
        awaiting_slot=awaiting,
        pending=_count(queue, _PENDING_NAMES),
        running=_count(queue, _RUNNING_NAMES),
        oldest_due_age=_age(now, queue.oldest_due),
        oldest_awaiting_age=_age(now, queue.oldest_awaiting_slot),
        oldest_pending_age=_age(now, queue.oldest_pending_since),
        oldest_running_age=_age(now, queue.oldest_running_since),
        last_polled_age=_age(now, queue.last_polled),
    )


def _delay(histograms: Mapping[str, HistogramState], pool: str) -> DelayReport | None:
    state = histograms.get(pool)
    if state is None or not state.count:
        return None
    return DelayReport(state.count, round(state.total / state.count, 1))


def _held(limit: LimitState | None, name: str, waiting: int | None) -> str:
    """`flow/deployment (2 waiting, 1 of 1 slots taken)`, with what is known."""
    parts = [f"{waiting} waiting"] if waiting is not None else []
    if limit is not None:
        parts.append(f"{limit.active_slots} of {limit.slots} slots taken")
    return f"{name} ({', '.join(parts)})" if parts else name


@dataclass(frozen=True)
class _Pool:
    """A pool with the derived figures the rules read."""

    state: PoolState
    workers: tuple[WorkerState, ...]
    queues: tuple[QueueReport, ...]

    @property
    def name(self) -> str:
        return self.state.name

    @property
    def due(self) -> int:
        return sum(q.due for q in self.queues)

    @property
    def oldest_due_age(self) -> float | None:
        ages = [q.oldest_due_age for q in self.queues if q.due and q.oldest_due_age is not None]
        return max(ages, default=None)

    @property
    def paused(self) -> bool:
        return self.state.status == WorkPoolStatus.PAUSED


def _tag(limit: LimitState) -> str:
    """The tag a tag limit limits (its Prefect name, else its display name, less `tag:`)."""
    return (limit.prefect_name or limit.name).removeprefix(TAG_LIMIT_PREFIX)


def _paused(queue: QueueReport) -> bool:
    return queue.status == WorkQueueStatus.PAUSED


class _Rules:
    """The rules, one method per cause, over one snapshot and its extras."""

    def __init__(self, snapshot: Snapshot, extras: Extras, thresholds: Thresholds) -> None:
        self.snapshot = snapshot
        self.extras = extras
        self.thresholds = thresholds
        self.now = snapshot.observed_at
        self.pools = [
            _Pool(
                p,
                tuple(w for w in snapshot.workers if w.pool == p.name),
                tuple(queue_report(q, self.now) for q in snapshot.queues if q.pool == p.name),
            )
            for p in snapshot.pools
        ]

    def findings(self) -> list[Finding]:
        found: list[Finding] = []
        for pool in self.pools:
            found += self.pool_paused(pool)
            found += self.no_online_worker(pool)
            found += self.pool_limit(pool)
            for queue in pool.queues:
                found += self.queue_paused(pool, queue)
                found += self.queue_not_polled(pool, queue)
                found += self.queue_limit(pool, queue)
                found += self.slow_infrastructure(pool, queue)
            found += self.deployment_limits(pool)
        found += self.limits()
        found += self.runs_without_work_queue()
        found += self.api_rate_limited()
        return found

    # -- pools and queues ---------------------------------------------------------------------

    def pool_paused(self, pool: _Pool) -> list[Finding]:
        if not pool.paused or not pool.due:
            return []
        name = pool.name
        return [
            Finding(
                Cause.POOL_PAUSED,
                name,
                None,
                pool.due,
                f"Work pool {name} is paused while {_are_due(pool.due)}"
                f"{_wait(pool.oldest_due_age)}.",
                {
                    "due_runs": pool.due,
                    "oldest_due_age_seconds": pool.oldest_due_age,
                    "queues": tuple(q.work_queue for q in pool.queues if q.due),
                },
                f"prefect work-pool resume {_q(name)}",
            )
        ]

    def queue_paused(self, pool: _Pool, queue: QueueReport) -> list[Finding]:
        if not _paused(queue) or not queue.due:
            return []
        where = f"{pool.name}/{queue.work_queue}"
        return [
            Finding(
                Cause.QUEUE_PAUSED,
                pool.name,
                queue.work_queue,
                queue.due,
                f"Work queue {where} is paused while {_are_due(queue.due)}"
                f"{_wait(queue.oldest_due_age)}.",
                {"due_runs": queue.due, "oldest_due_age_seconds": queue.oldest_due_age},
                f"prefect work-queue resume {_q(queue.work_queue)} --pool {_q(pool.name)}",
            )
        ]

    def no_online_worker(self, pool: _Pool) -> list[Finding]:
        if pool.state.online_workers or not pool.due:
            return []
        seen = [
            f"{w.name} {'never seen' if w.last_heartbeat is None else 'last seen '}"
            + (
                ""
                if w.last_heartbeat is None
                else f"{duration_text(self.now - w.last_heartbeat)} ago"
            )
            for w in pool.workers
        ]
        known = f" ({len(seen)} known: {', '.join(seen)})" if seen else " (none ever registered)"
        return [
            Finding(
                Cause.NO_ONLINE_WORKER,
                pool.name,
                None,
                pool.due,
                f"Work pool {pool.name} has no online worker{known} while "
                f"{_are_due(pool.due)}{_wait(pool.oldest_due_age)}.",
                {
                    "due_runs": pool.due,
                    "oldest_due_age_seconds": pool.oldest_due_age,
                    "online_workers": 0,
                    "offline_workers": tuple(w.name for w in pool.workers),
                },
                f"prefect worker start --pool {_q(pool.name)}",
            )
        ]

    def _polled(self, queue: QueueReport) -> bool:
        age = queue.last_polled_age
        return age is not None and age <= self.thresholds.queue_poll_age

    def queue_not_polled(self, pool: _Pool, queue: QueueReport) -> list[Finding]:
        online = [w.name for w in pool.workers if w.online]
        if not queue.due or not online or pool.paused or _paused(queue) or self._polled(queue):
            return []
        polled = tuple(q.work_queue for q in pool.queues if self._polled(q))
        last = (
            "never polled"
            if queue.last_polled_age is None
            else f"last polled {duration_text(queue.last_polled_age)} ago"
        )
        verb = "polls" if len(online) == 1 else "poll"
        served = f"{verb} only {', '.join(polled)}" if polled else f"{verb} none of its queues"
        where = f"{pool.name}/{queue.work_queue}"
        return [
            Finding(
                Cause.QUEUE_NOT_POLLED,
                pool.name,
                queue.work_queue,
                queue.due,
                f"{runs_text(queue.due).capitalize()} due in {where}, {last}; the pool's "
                f"{len(online)} online worker{'s' if len(online) > 1 else ''} "
                f"({', '.join(online)}) {served}.",
                {
                    "due_runs": queue.due,
                    "oldest_due_age_seconds": queue.oldest_due_age,
                    "last_polled_age_seconds": queue.last_polled_age,
                    "online_workers": tuple(online),
                    "polled_queues": polled,
                },
                f"prefect worker start --pool {_q(pool.name)} --work-queue {_q(queue.work_queue)}",
            )
        ]

    def pool_limit(self, pool: _Pool) -> list[Finding]:
        limit = pool.state.concurrency_limit
        if limit is None or pool.state.in_flight < limit or not pool.due or pool.paused:
            return []
        return [
            Finding(
                Cause.POOL_CONCURRENCY_LIMIT,
                pool.name,
                None,
                pool.due,
                f"Work pool {pool.name} has {runs_text(pool.state.in_flight)} in flight, its limit "
                f"of {limit}, while {_are_due(pool.due)}{_wait(pool.oldest_due_age)}.",
                {
                    "concurrency_limit": limit,
                    "in_flight_runs": pool.state.in_flight,
                    "due_runs": pool.due,
                    "oldest_due_age_seconds": pool.oldest_due_age,
                },
                f"prefect work-pool set-concurrency-limit {_q(pool.name)} {limit + pool.due}",
            )
        ]

    def queue_limit(self, pool: _Pool, queue: QueueReport) -> list[Finding]:
        limit = queue.concurrency_limit
        if limit is None or queue.in_flight < limit or not queue.due or _paused(queue):
            return []
        where = f"{pool.name}/{queue.work_queue}"
        return [
            Finding(
                Cause.QUEUE_CONCURRENCY_LIMIT,
                pool.name,
                queue.work_queue,
                queue.due,
                f"Work queue {where} has {runs_text(queue.in_flight)} in flight, its limit of "
                f"{limit}, while {_are_due(queue.due)}{_wait(queue.oldest_due_age)}.",
                {
                    "concurrency_limit": limit,
                    "in_flight_runs": queue.in_flight,
                    "due_runs": queue.due,
                    "oldest_due_age_seconds": queue.oldest_due_age,
                },
                f"prefect work-queue set-concurrency-limit {_q(queue.work_queue)} "
                f"{limit + queue.due} --pool {_q(pool.name)}",
            )
        ]

    def slow_infrastructure(self, pool: _Pool, queue: QueueReport) -> list[Finding]:
        age = queue.oldest_pending_age
        if not queue.pending or age is None or age <= self.thresholds.slow_start:
            return []
        where = f"{pool.name}/{queue.work_queue}"
        latency = self.extras.latency
        pickup = _delay(latency.pickup, pool.name) if latency else None
        start = _delay(latency.start, pool.name) if latency else None
        delays = ""
        if pickup is not None and start is not None:
            delays = (
                f" Recent runs of the pool were claimed {duration_text(pickup.mean_seconds)} "
                f"after their scheduled time and started {duration_text(start.mean_seconds)} "
                "after that, on average."
            )
        return [
            Finding(
                Cause.SLOW_INFRASTRUCTURE,
                pool.name,
                queue.work_queue,
                queue.pending,
                f"{runs_text(queue.pending).capitalize()} in {where} were claimed by a worker but "
                f"have not started for {duration_text(age)}: the infrastructure is slow to "
                f"start them.{delays}",
                {
                    "pending_runs": queue.pending,
                    "oldest_pending_age_seconds": age,
                    "pool_type": pool.state.type,
                    "mean_pickup_delay_seconds": pickup.mean_seconds if pickup else None,
                    "mean_start_delay_seconds": start.mean_seconds if start else None,
                },
                "prefect flow-run ls --state Pending",
            )
        ]

    # -- concurrency limits -----------------------------------------------------------------

    def _awaiting_by_deployment(self, pool: _Pool) -> dict[str, dict[str, int]]:
        """Queue name -> deployment id -> AwaitingConcurrencySlot runs, from the sample."""
        found: dict[str, dict[str, int]] = {}
        for run in self.extras.awaiting_slot:
            if run.work_pool == pool.name and run.work_queue and run.deployment_id:
                by_deployment = found.setdefault(run.work_queue, {})
                by_deployment[run.deployment_id] = by_deployment.get(run.deployment_id, 0) + 1
        return found

    def _deployment_limit(self, deployment_id: str) -> LimitState | None:
        name = f"{DEPLOYMENT_LIMIT_PREFIX}{deployment_id}"
        return next((x for x in self.snapshot.limits if x.prefect_name == name), None)

    def _deployment_name(self, deployment_id: str) -> str:
        limit = self._deployment_limit(deployment_id)
        if limit is not None and limit.deployment:
            return limit.deployment
        return self.extras.deployment_names.get(deployment_id, deployment_id)

    def _saturated_deployment_limits(self) -> list[LimitState]:
        return [
            x
            for x in self.snapshot.limits
            if x.kind is LimitKind.DEPLOYMENT and x.enabled and x.active_slots >= x.slots
        ]

    def deployment_limits(self, pool: _Pool) -> list[Finding]:
        found = []
        sampled = self._awaiting_by_deployment(pool)
        for queue in pool.queues:
            if not queue.awaiting_slot:
                continue
            counted = sorted(
                sampled.get(queue.work_queue, {}).items(), key=lambda item: (-item[1], item[0])
            )
            # Without a sample for this queue (more than a page of such runs elsewhere), every
            # full deployment limit is a candidate.
            behind: list[tuple[LimitState | None, str, int | None]] = [
                (self._deployment_limit(d), self._deployment_name(d), n) for d, n in counted
            ] or [(x, x.deployment, None) for x in self._saturated_deployment_limits()]
            live = [
                (limit, name, n)
                for limit, name, n in behind
                if limit is None or limit.active_slots - (limit.leaked or 0) >= limit.slots
            ]
            if behind and not live:
                continue  # every limit behind them leaks slots: that finding says so
            held = ", ".join(_held(limit, name, n) for limit, name, n in live)
            top, _, top_waiting = live[0] if live else (None, "", None)
            # The first of the sampled deployments, or the only candidate.
            fix = (
                f"prefect gcl update {_q(top.prefect_name)} "
                f"--limit {top.slots + (top_waiting or queue.awaiting_slot)}"
                if top is not None and (counted or len(live) == 1)
                else None
            )
            behind_text = f" behind the deployment limit of {held}" if held else ""
            found.append(
                Finding(
                    Cause.DEPLOYMENT_CONCURRENCY_LIMIT,
                    pool.name,
                    queue.work_queue,
                    queue.awaiting_slot,
                    f"{runs_text(queue.awaiting_slot).capitalize()} in {pool.name}/"
                    f"{queue.work_queue} wait in AwaitingConcurrencySlot"
                    f"{_wait(queue.oldest_awaiting_age)}{behind_text}.",
                    {
                        "awaiting_slot_runs": queue.awaiting_slot,
                        "oldest_awaiting_age_seconds": queue.oldest_awaiting_age,
                        "deployments": tuple(name for _, name, _ in live),
                    },
                    fix,
                )
            )
        return found

    def _by_pool(self, runs: Iterable[RunPlace]) -> dict[str | None, list[RunPlace]]:
        grouped: dict[str | None, list[RunPlace]] = {}
        for run in runs:
            grouped.setdefault(run.work_pool, []).append(run)
        return grouped

    def limits(self) -> list[Finding]:
        found: list[Finding] = []
        for limit in self.snapshot.limits:
            if not limit.enabled:
                continue
            if limit.kind is LimitKind.TAG:
                found += self._tag_limit(limit)
            elif limit.kind is LimitKind.DEPLOYMENT and limit.leaked:
                found += self._leaked_deployment_limit(limit)
        return found

    def _tag_limit(self, limit: LimitState) -> list[Finding]:
        tag = _tag(limit)
        waiters = self.extras.tag_waiters.get(tag, ())
        leaked = limit.leaked or 0
        groups = self._by_pool(waiters) or {None: []}
        found = []
        for pool, runs in sorted(groups.items(), key=lambda item: (item[0] is None, item[0])):
            waiting = _wait_for_slot(len(runs), pool)
            queues = tuple(sorted({r.work_queue for r in runs if r.work_queue}))
            if leaked:
                found.append(
                    Finding(
                        Cause.LEAKED_CONCURRENCY_SLOTS,
                        pool,
                        queues[0] if len(queues) == 1 else None,
                        len(runs),
                        f"Tag limit {tag}: {leaked} of its {limit.slots} slots "
                        f"{'is' if leaked == 1 else 'are'} held by finished or crashed "
                        f"runs{waiting}.",
                        {
                            "limit": limit.name,
                            "slots": limit.slots,
                            "active_slots": limit.active_slots,
                            "leaked_slots": leaked,
                            "waiting_runs": len(runs),
                        },
                        f"prefect concurrency-limit reset {_q(tag)}",
                    )
                )
            if runs and limit.active_slots - leaked >= limit.slots:
                found.append(
                    Finding(
                        Cause.TAG_CONCURRENCY_LIMIT,
                        pool,
                        queues[0] if len(queues) == 1 else None,
                        len(runs),
                        f"Tag limit {tag} has all {limit.slots} slots taken by running tasks"
                        f"{waiting}.",
                        {
                            "limit": limit.name,
                            "slots": limit.slots,
                            "active_slots": limit.active_slots,
                            "waiting_runs": len(runs),
                        },
                        f"prefect concurrency-limit create {_q(tag)} {limit.slots + len(runs)}",
                    )
                )
        return found

    def _leaked_deployment_limit(self, limit: LimitState) -> list[Finding]:
        deployment_id = limit.prefect_name.removeprefix(DEPLOYMENT_LIMIT_PREFIX)
        waiting = [r for r in self.extras.awaiting_slot if r.deployment_id == deployment_id]
        groups = self._by_pool(waiting) or {None: []}
        leaked = limit.leaked or 0
        found = []
        for pool, runs in sorted(groups.items(), key=lambda item: (item[0] is None, item[0])):
            queues = tuple(sorted({r.work_queue for r in runs if r.work_queue}))
            waits = _wait_for_slot(len(runs), pool)
            found.append(
                Finding(
                    Cause.LEAKED_CONCURRENCY_SLOTS,
                    pool,
                    queues[0] if len(queues) == 1 else None,
                    len(runs),
                    f"Deployment limit of {limit.deployment}: {leaked} of its {limit.slots} "
                    f"slots {'is' if leaked == 1 else 'are'} held without a Pending, Running "
                    f"or Cancelling run{waits}.",
                    {
                        "limit": limit.name,
                        "slots": limit.slots,
                        "active_slots": limit.active_slots,
                        "leaked_slots": leaked,
                        "waiting_runs": len(runs),
                    },
                    f"prefect gcl update {_q(limit.prefect_name)} "
                    f"--active-slots {max(0, limit.active_slots - leaked)}",
                )
            )
        return found

    # -- the workspace and the read -----------------------------------------------------------

    def runs_without_work_queue(self) -> list[Finding]:
        count = self.snapshot.runs_without_work_queue
        if not count:
            return []
        sample = self.extras.orphans
        queues = tuple(sorted({r.work_queue for r in sample if r.work_queue}))
        deployments = tuple(
            sorted({self._deployment_name(r.deployment_id) for r in sample if r.deployment_id})
        )
        ids = tuple(r.id for r in sample[:MAX_LISTED_RUNS])
        named = f" {', '.join(queues)}" if queues else ""
        by = f" (deployments: {', '.join(deployments)})" if deployments else ""
        return [
            Finding(
                Cause.RUNS_WITHOUT_WORK_QUEUE,
                None,
                queues[0] if len(queues) == 1 else None,
                count,
                f"{count} due {'run names' if count == 1 else 'runs name'} the deleted work "
                f"queue{'s' if len(queues) > 1 else ''}{named}{by}: no worker will ever take "
                "them. Point the deployments at an existing queue, then delete these runs and "
                "run them again.",
                {
                    "runs": count,
                    "deleted_queues": queues,
                    "deployments": deployments,
                    "run_ids": ids,
                },
                f"prefect flow-run delete {ids[0]}" if ids else None,
            )
        ]

    def api_rate_limited(self) -> list[Finding]:
        api = self.extras.api
        if not api.throttled:
            return []
        retry = (
            f" (Retry-After {duration_text(api.retry_after)})"
            if api.retry_after is not None
            else ""
        )
        pools = [p.name for p in self.pools]
        pool = pools[0] if len(pools) == 1 else "POOL"
        return [
            Finding(
                Cause.API_RATE_LIMITED,
                None,
                None,
                0,
                f"The Prefect API answered {api.throttled} of this read's {api.requests} requests "
                f"with 429{retry}: workers share that limit, back off and pick up runs late.",
                {
                    "throttled_responses": api.throttled,
                    "requests": api.requests,
                    "retry_after_seconds": api.retry_after,
                },
                f"PREFECT_WORKER_QUERY_SECONDS=30 prefect worker start --pool {_q(pool)}",
            )
        ]


def _rank(finding: Finding) -> tuple[int, int, str, str]:
    return (
        -finding.runs,
        PRIORITY.index(finding.cause),
        finding.work_pool or "",
        finding.work_queue or "",
    )


HEALTHY = Finding(
    Cause.NONE,
    None,
    None,
    0,
    "No cause found: every due run has a worker, a slot and a polled queue.",
    {},
    None,
)


def rank(findings: Sequence[Finding], selector: PoolSelector) -> tuple[Finding, ...]:
    """Findings most likely first; `none` alone when there are none.

    With a pool selection (`--work-pool`), findings of no pool are left out (they concern other
    parts of the workspace) except those about the read itself (ALWAYS_SHOWN).
    """
    selected = bool(selector.include or selector.exclude)
    kept = [
        f
        for f in findings
        if f.cause in ALWAYS_SHOWN
        or (f.work_pool is not None and selector.selects(f.work_pool))
        or (f.work_pool is None and not selected)
    ]
    return tuple(sorted(kept, key=_rank)) or (HEALTHY,)


def _limit_report(limit: LimitState, extras: Extras) -> LimitReport:
    waiting: int | None = None
    if limit.kind is LimitKind.TAG:
        tag = _tag(limit)
        if tag in extras.tag_waiters:
            waiting = len(extras.tag_waiters[tag])
    elif limit.kind is LimitKind.DEPLOYMENT:
        deployment_id = limit.prefect_name.removeprefix(DEPLOYMENT_LIMIT_PREFIX)
        waiting = sum(r.deployment_id == deployment_id for r in extras.awaiting_slot)
    return LimitReport(
        name=limit.name,
        kind=str(limit.kind),
        slots=limit.slots,
        active_slots=limit.active_slots,
        enabled=limit.enabled,
        leaked=limit.leaked,
        waiting=waiting,
    )


def diagnose(snapshot: Snapshot, extras: Extras, thresholds: Thresholds | None = None) -> Diagnosis:
    """Findings, most likely first, and the per-pool and per-queue report of one read."""
    rules = _Rules(snapshot, extras, thresholds or Thresholds())
    latency = extras.latency
    pools = tuple(
        PoolReport(
            name=p.name,
            type=p.state.type,
            status=p.state.status,
            concurrency_limit=p.state.concurrency_limit,
            in_flight=p.state.in_flight,
            online_workers=p.state.online_workers,
            workers=tuple(
                WorkerReport(w.name, w.online, _age(snapshot.observed_at, w.last_heartbeat))
                for w in p.workers
            ),
            queues=p.queues,
            pickup=_delay(latency.pickup, p.name) if latency else None,
            start=_delay(latency.start, p.name) if latency else None,
        )
        for p in rules.pools
    )
    return Diagnosis(
        observed_at=snapshot.observed_at,
        findings=rank(rules.findings(), extras.pools),
        pools=pools,
        limits=tuple(_limit_report(limit, extras) for limit in snapshot.limits),
        runs_without_work_queue=snapshot.runs_without_work_queue,
        api=extras.api,
        latency_window=extras.latency_window,
    )
