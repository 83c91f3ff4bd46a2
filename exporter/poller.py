"""The poll loop: reads the API within a deadline, builds a snapshot and publishes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from structlog.typing import FilteringBoundLogger

from exporter.budget import Backoff, PollPlan, RequestBudget, plan_poll, requests_to_wait_for
from exporter.clock import Deadline, UnixTime
from exporter.deployments_reader import DeploymentsApi, DeploymentsReader
from exporter.errors import (
    ERROR_REASONS,
    ApiBudgetExhausted,
    ApiStatusError,
    MalformedResponse,
    ObjectGone,
    PrefectApiError,
)
from exporter.events_reader import EventsApi, EventsReader, Stream
from exporter.features import Feature, FeatureGate
from exporter.gather import gather_bounded
from exporter.limits_reader import LimitsApi, LimitsReader
from exporter.records import (
    DEPLOYMENT_RUN_LISTINGS,
    ConcurrencyLimitRecord,
    DeploymentHealth,
    DeploymentSelector,
    LatencyStats,
    LimitHolders,
    PollRecords,
    PoolRecord,
    PoolSelector,
    QueueRecord,
    QueueRunStats,
    WorkerRecord,
)
from exporter.run_reader import RunCentricReader, RunsApi
from exporter.server_info import ServerInfoReader
from exporter.snapshot import Snapshot, build_snapshot
from exporter.statefile import StateFile

T = TypeVar("T")
POLL_RESULTS = ("success", "failure")
BUDGET_OUTCOMES = {
    PollPlan.WAIT: "delayed",
    PollPlan.SHORTENED: "shortened",
    PollPlan.SKIP: "skipped",
}
INTERNAL = "internal"  # a bug in the exporter, not a failure of the API
FAILURE_REASONS = (*ERROR_REASONS, INTERNAL)


class PollMode(StrEnum):
    """How a poll reads the queues' runs (see run_reader for run-centric)."""

    PER_QUEUE = "per-queue"
    RUN_CENTRIC = "run-centric"


# Requests the slow round leaves in the budget for the unexpected (a CSRF token, say).
SLOW_ROUND_RESERVE = 4
# A poll waits at most this share of the interval for its full cost to be affordable, rather
# than be shortened: the data is then at most one and a half intervals old.
BUDGET_PATIENCE_SHARE = 0.5
# `auto` switches mode only when the other is clearly cheaper, so that it does not flap.
MODE_SWITCH_FACTOR = 1.5


class Api(LimitsApi, EventsApi, RunsApi, Protocol):
    """What the poller needs from the Prefect API adapter (prefect_api.PrefectApi)."""

    @property
    def requests_sent(self) -> int: ...

    async def work_pools(self, deadline: Deadline) -> list[PoolRecord]: ...
    async def work_queues(self, deadline: Deadline) -> list[QueueRecord]: ...
    async def workers(self, pool: str, deadline: Deadline) -> list[WorkerRecord]: ...
    async def queue_run_stats(
        self, queue_id: str, now: UnixTime, deadline: Deadline
    ) -> QueueRunStats: ...


class OrphanRunsApi(Protocol):
    """The read of runs no worker can take (prefect_api.PrefectApi has it)."""

    async def runs_without_work_queue(self, now: UnixTime, deadline: Deadline) -> int: ...


class Publisher(Protocol):
    """Where snapshots go (the store); also told how long the loop will wait on purpose."""

    def publish(self, snapshot: Snapshot, duration: float) -> None: ...
    def record_failure(self, error: str, duration: float) -> None: ...
    def loop_waiting(self, until_monotonic: float) -> None: ...


@dataclass(frozen=True)
class PollSettings:
    """Seconds for `interval`, `timeout` and `events_settle`; `concurrency` in requests."""

    interval: float
    timeout: float
    concurrency: int
    heartbeat_multiple: float
    events_enabled: bool = True
    events_max_pages: int = 10
    events_settle: float = 30.0
    events_state_file: Path | None = None
    deployments_breakdown: bool = False
    mode: str = "auto"  # "auto" or a PollMode value
    max_backoff: float = 600.0
    pools: PoolSelector = field(default_factory=PoolSelector)
    deployments: DeploymentSelector = field(default_factory=DeploymentSelector)


class PollMetrics:
    """Counters of poll outcomes; reasons form a closed set so every series exists from start."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.polls = Counter(
            "prefect_exporter_polls",
            "Polls of the Prefect API by result.",
            ["result"],
            registry=registry,
        )
        self.errors = Counter(
            "prefect_exporter_poll_errors",
            f"Failed polls by reason: {', '.join(FAILURE_REASONS)} (a bug in the exporter).",
            ["reason"],
            registry=registry,
        )
        self.budget_polls = Counter(
            "prefect_exporter_request_budget_polls",
            "Polls the request budget could not afford in full at once: delayed (waited up to "
            "half an interval for the full cost: pacing, not a shortage), shortened (concurrency "
            "limits and events left for a later poll) or skipped.",
            ["outcome"],
            registry=registry,
        )
        self.backoff_until = Gauge(
            "prefect_exporter_backoff_until_timestamp_seconds",
            "Until when the exporter pauses polling because the API throttled it (429 or 503), "
            "Unix seconds; 0 when not backing off.",
            registry=registry,
        )
        self.retry_after_clamped = Counter(
            "prefect_exporter_retry_after_clamped",
            "Throttling answers whose Retry-After was not obeyed as sent: longer than the "
            "back-off cap (clamped to it) or not a valid finite delay (ignored).",
            registry=registry,
        )
        self.deployments_errors = Counter(
            "prefect_exporter_deployments_read_errors",
            "Failed reads of the opt-in deployment health by reason "
            f"({', '.join(ERROR_REASONS)}): the poll goes on and the last values are served.",
            ["reason"],
            registry=registry,
        )
        for reason in ERROR_REASONS:
            self.deployments_errors.labels(reason)
        self.deployments_rows_skipped = Counter(
            "prefect_exporter_deployment_runs_skipped",
            "Malformed runs left out of the deployment health listings (ended, upcoming, due): "
            "the rest of the read goes on.",
            ["listing"],
            registry=registry,
        )
        for listing in DEPLOYMENT_RUN_LISTINGS:
            self.deployments_rows_skipped.labels(listing)
        self.gone = Counter(
            "prefect_exporter_objects_gone",
            "Objects left out of a poll because they were deleted between two of its requests "
            "(a per-object request answered 404).",
            ["kind"],
            registry=registry,
        )
        self.gone.labels("work_pool")
        self.mode = Gauge(
            "prefect_exporter_poll_mode",
            "1 for the way the last poll read the queues' runs: per-queue (1 to 6 requests a "
            "queue) or run-centric (runs listed across all queues).",
            ["mode"],
            registry=registry,
        )
        for mode in PollMode:
            self.mode.labels(str(mode))
        self.far_counts_missing = Gauge(
            "prefect_exporter_far_counts_missing_queues",
            "Queues whose runs scheduled more than an hour ahead are not in "
            "prefect_work_queue_flow_runs as of the last poll (run-centric mode, counts not "
            "read yet for want of request budget).",
            registry=registry,
        )
        self.maintenance = Gauge(
            "prefect_exporter_api_maintenance",
            "1 while the API's last throttling answer carried Prefect-Maintenance: true.",
            registry=registry,
        )
        for result in POLL_RESULTS:
            self.polls.labels(result)
        for reason in FAILURE_REASONS:
            self.errors.labels(reason)
        for outcome in BUDGET_OUTCOMES.values():
            self.budget_polls.labels(outcome)


class Poller:
    """Polls on a fixed interval; a failed poll keeps the last snapshot (the store ages it).

    `cursor_file` keeps the events cursor across restarts (built from
    `settings.events_state_file` when not given); `deployments_api` reads deployment health
    when `settings.deployments` selects some.
    """

    def __init__(
        self,
        api: Api,
        store: Publisher,
        settings: PollSettings,
        metrics: PollMetrics,
        log: FilteringBoundLogger,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        budget: RequestBudget | None = None,
        backoff: Backoff | None = None,
        cursor_file: StateFile | None = None,
        orphans: OrphanRunsApi | None = None,
        event_stream: Stream | None = None,
        deployments_api: DeploymentsApi | None = None,
        server_info: ServerInfoReader | None = None,
    ) -> None:
        self._api = api
        # The server's version, read at start and hourly when given (cli gives one), else None.
        self._server_info = server_info
        # Runs whose queue was deleted: counted when given (cli gives the adapter), else None.
        self._orphans = orphans
        self._budget = budget
        self._backoff = backoff or Backoff(settings.interval, cap=settings.max_backoff)
        # Requests one poll took, measured: all of it, and without the optional parts; both
        # without its slow round and its listing of runs ahead (see `_next_costs`).
        self._full_cost: int | None = None
        self._core_cost: int | None = None
        # Pages of the last poll's periodic listing of runs ahead (every 5 minutes).
        self._ahead_listing_requests = 0
        self._due_counted = 0  # queues whose due runs the last poll counted rather than listed
        # Requests of the last run-centric poll before its slow round (its listing of runs
        # ahead aside): what the next one is compared with.
        self._spent_before_slow_round: int | None = None
        self._last_plan = PollPlan.FULL  # of the last poll attempted (skips do not count)
        # Seconds the coming poll has waited so far for its full cost (plan WAIT).
        self._budget_wait = 0.0
        self._last_limits: tuple[ConcurrencyLimitRecord, ...] = ()
        self._last_holders: LimitHolders | None = None
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._monotonic = monotonic
        self._polls = 0
        # Monotonic seconds until which the API asked us to stay away (0: not throttled); the
        # event stream waits for it too before it connects.
        self.throttled_until = 0.0
        self._features = FeatureGate(log)
        self._limits = LimitsReader(api, settings.concurrency, settings.deployments_breakdown)
        self._runs = RunCentricReader(api, settings.concurrency)
        # Measured cost of reading the queues' runs: per-queue (requests, queues), run-centric
        # (requests without the slow round, which is paid for by spare budget).
        self._per_queue_cost: tuple[int, int] | None = None
        self._run_centric_cost: int | None = None
        self._mode = PollMode.PER_QUEUE
        # Deployment health (opt-in, cli gives the adapter): read on full polls, carried over
        # on shortened ones.
        self._deployments = (
            DeploymentsReader(deployments_api, settings.deployments, log)
            if deployments_api is not None and settings.deployments.enabled
            else None
        )
        self._last_health: DeploymentHealth | None = None
        self._deployments_failing = False  # logged once per run of failed reads
        self._deployments_api = deployments_api
        self._rows_skipped: dict[str, int] = {}
        if cursor_file is None and settings.events_state_file is not None:
            cursor_file = StateFile(settings.events_state_file, "events", log)
        self._events = EventsReader(
            api,
            settings.events_max_pages,
            settings.events_settle,
            UnixTime(clock()),
            cursor_file,
            settings.pools,
            event_stream,
            self._deployments.counts if self._deployments else None,
        )

    async def _optional(
        self, feature: Feature, read: Callable[[], Awaitable[T]], informational: bool = False
    ) -> T | None:
        """A feature's read, or None when the server lacks its endpoint (it is degraded).

        An `informational` feature (nothing but itself depends on it) is degraded on any bad
        answer but throttling, so that a server answering it badly (a malformed body, a 403)
        never fails the polls that the rest of the metrics need; throttling still fails the
        poll, so that the poller backs off, and so do failures that are not an answer (a
        time-out, a refused connection, the budget): they say nothing about the endpoint.
        """
        try:
            return await read()
        except PrefectApiError as exc:
            status = exc.status if isinstance(exc, ApiStatusError) else None
            throttled = isinstance(exc, ApiStatusError) and exc.throttled
            answered = isinstance(exc, ApiStatusError | MalformedResponse)
            if status != 404 and (not informational or throttled or not answered):
                raise
            self._features.degrade(feature, exc, self._polls)
            return None

    async def _read_deployments(self, now: UnixTime, deadline: Deadline) -> DeploymentHealth | None:
        """The opt-in deployment health, or the last one when its read failed.

        An expected API failure of this read must not fail the whole poll (pools, queues and
        workers would go stale for a feature the user opted into): it is counted by reason,
        logged once when it starts and once when it ends, and the last values are served.
        Throttling (429, 503) still fails the poll, so that the poller backs off.
        """
        assert self._deployments is not None
        try:
            health = await self._deployments.read(now, deadline)
        except PrefectApiError as exc:
            if isinstance(exc, ApiStatusError) and exc.throttled:
                raise
            self._metrics.deployments_errors.labels(exc.reason).inc()
            if not self._deployments_failing:
                self._log.warning("deployments_read_failed", reason=exc.reason, error=str(exc))
            self._deployments_failing = True
            return self._last_health
        if self._deployments_failing:
            self._log.info("deployments_read_recovered")
        self._deployments_failing = False
        assert self._deployments_api is not None
        skipped = self._deployments_api.rows_skipped
        new = {k: n - self._rows_skipped.get(k, 0) for k, n in skipped.items()}
        new = {k: n for k, n in new.items() if n > 0}
        for listing, count in new.items():
            self._metrics.deployments_rows_skipped.labels(listing).inc(count)
        if new:
            self._log.warning("deployment_runs_skipped", malformed_rows=new)
        self._rows_skipped = dict(skipped)
        return health

    @property
    def budget(self) -> RequestBudget | None:
        """The request budget this poller draws from (shared with the event stream)."""
        return self._budget

    def _available(self, feature: Feature) -> bool:
        return self._features.available(feature, self._polls)

    async def _pool_workers(self, pool: str, deadline: Deadline) -> list[WorkerRecord] | None:
        """The pool's workers, or None when the pool was deleted after the pool list was read."""
        try:
            return await self._api.workers(pool, deadline)
        except ObjectGone as exc:
            self._metrics.gone.labels("work_pool").inc()
            self._log.info("work_pool_gone", work_pool=pool, error=str(exc))
            return None

    def _choose_mode(self, queue_count: int) -> PollMode:
        """The configured mode, or under `auto` the cheaper one by the last measured costs."""
        if self._settings.mode != "auto":
            return PollMode(self._settings.mode)
        if self._per_queue_cost is None:
            per_queue = float(queue_count)  # at least one request a queue
        else:
            spent, queues = self._per_queue_cost
            per_queue = spent * queue_count / max(1, queues)
        run_centric = float(
            self._run_centric_cost
            if self._run_centric_cost is not None
            else 2 + self._runs.minimum_refreshes(queue_count, self._settings.interval)
        )
        if self._mode is PollMode.PER_QUEUE and run_centric * MODE_SWITCH_FACTOR < per_queue:
            return PollMode.RUN_CENTRIC
        if self._mode is PollMode.RUN_CENTRIC and per_queue * MODE_SWITCH_FACTOR < run_centric:
            return PollMode.PER_QUEUE
        return self._mode

    def _refresh_limit(
        self, queue_ids: Sequence[str], next_poll: UnixTime, spent: int | None = None
    ) -> int:
        """Far-ahead counts to read now: the unread ones and a steady round, as far as spare
        budget allows: what is free once the rest of this poll is paid for, and no more than
        the poll's share of the minute's budget leaves beside the next poll's full cost (the
        next poll is due at `next_poll`, Unix time). `spent` is what this poll's core has cost
        so far (its listing of runs ahead aside): a poll dearer than the last one (a backlog
        fell due) makes the next one expected as dear.

        The share is a rate: over a minute, the polls and the counts stay within the budget.
        Within a 60 s window they may not (slots are held 61 s, and at 30 s a window holds
        parts of three polls), so a poll after a slow round may wait a few seconds for its
        slots: the plan WAIT, which keeps it whole. Measured at 1,000 queues, polls of 45
        every 30 s, budget 125: 13 counts a poll; planned without that wait, every poll after
        one was skipped or shortened; counting only budget the next poll cannot need left
        nothing at all, and every queue lacked its count.
        """
        steady = 2 * self._runs.minimum_refreshes(len(queue_ids), self._settings.interval)
        wanted = max(steady, self._runs.unread(queue_ids))
        if self._budget is None:
            return wanted
        if self._full_cost is None:
            # No full poll measured yet, so what the rest of this one costs is unknown: at
            # 1,000 queues a first slow round of 58 left the same poll's limits and events
            # without budget, and the poll failed for budget (scale bench, full point).
            return 0
        # Still to come in this poll: concurrency limits and events, as last measured.
        rest = self._full_cost - (self._core_cost or 0) + SLOW_ROUND_RESERVE
        spare_now = int(self._budget.available) - rest
        next_full, _ = self._next_costs(next_poll)
        if next_full is not None and spent is not None:
            # Measured at 1,000 queues: a 5,000-run backlog fell due, its first poll cost 63
            # (45 before) and still took 13 counts planned on 45, and the next poll was skipped.
            # Compared with the same part of the last poll (the core less what comes after the
            # slow round), or with its whole core before one was measured.
            last = self._spent_before_slow_round
            next_full += max(0, spent - (last if last is not None else (self._core_cost or 0)))
        share = self._budget.per_minute * self._settings.interval / 60
        spare_per_poll = int(share) - (next_full or 0) - SLOW_ROUND_RESERVE
        return max(0, min(wanted, spare_now, spare_per_poll))

    async def _queue_stats(
        self,
        queues: Sequence[QueueRecord],
        now: UnixTime,
        deadline: Deadline,
        next_poll: UnixTime,
        poll_started: int,
    ) -> tuple[dict[str, QueueRunStats], int]:
        """Every queue's run stats, per queue or run-centric as planned, and the requests the
        slow round spent (they are not part of the poll's core cost); `next_poll` is when the
        next poll is due (Unix time), `poll_started` the API's request count when the poll
        began."""
        concurrency = self._settings.concurrency
        mode = self._choose_mode(len(queues))
        before = self._api.requests_sent
        fallback: Sequence[QueueRecord] = queues
        stats: dict[str, QueueRunStats] = {}
        if mode is PollMode.RUN_CENTRIC:
            result = await self._runs.read([q.id for q in queues], now, deadline)
            self._ahead_listing_requests = result.ahead_listing_requests
            self._due_counted = result.due_counted
            stats = dict(result.stats)
            fallback = [q for q in queues if q.id in result.incomplete]
            self._metrics.far_counts_missing.set(result.far_counts_missing)
        else:
            self._ahead_listing_requests = 0
            self._due_counted = 0
            self._metrics.far_counts_missing.set(0)
        answers = await gather_bounded(
            [self._api.queue_run_stats(q.id, now, deadline) for q in fallback], concurrency
        )
        stats.update({q.id: s for q, s in zip(fallback, answers, strict=True)})
        spent = self._api.requests_sent - before
        slow = 0
        if mode is PollMode.RUN_CENTRIC:
            listed = [q.id for q in queues if q.id in stats and q not in fallback]
            slow_before = self._api.requests_sent
            so_far = slow_before - poll_started - self._ahead_listing_requests
            limit = self._refresh_limit(listed, next_poll, so_far)
            self._spent_before_slow_round = so_far
            await self._runs.refresh(listed, now, deadline, limit, self._monotonic)
            slow = self._api.requests_sent - slow_before
            interval = self._settings.interval
            steady = self._runs.minimum_refreshes(len(queues), interval)
            # The listing of runs ahead comes every few minutes: compare modes on its share
            # per poll, not on whether this poll happened to make it.
            ahead_share = self._runs.ahead_listing_share(interval)
            self._run_centric_cost = spent - self._ahead_listing_requests + steady + ahead_share
        else:
            self._per_queue_cost = (spent, len(queues))
        self._mode = mode
        for each in PollMode:
            self._metrics.mode.labels(str(each)).set(1 if each is mode else 0)
        return stats, slow

    def _next_costs(self, at: UnixTime) -> tuple[int | None, int | None]:
        """What a poll at `at` (Unix time) is expected to cost, in all and its core: the last
        measured costs, plus the listing of runs ahead when that poll will make one (measured
        at 1,000 queues: 16 pages every 5 minutes; planned as part of every poll, the polls
        after it waited for 16 requests they did not need)."""
        if self._full_cost is None or self._core_cost is None:
            return None, None
        ahead = self._runs.ahead_listing_due(at) if self._mode is PollMode.RUN_CENTRIC else 0
        if self._budget is not None:
            # A cost learned from a budget failure is already the whole budget at most, and
            # may include the listing: never planned beyond the budget because of it.
            ahead = min(ahead, max(0, self._budget.per_minute - self._core_cost))
        return self._full_cost + ahead, self._core_cost + ahead

    def _plan(self, full_cost: int | None, core_cost: int | None) -> tuple[PollPlan, int]:
        """The plan for a poll now that should cost `full_cost` requests (`core_cost` without
        its optional parts), and the requests it waits for when it does not poll now."""
        if self._budget is None:
            return PollPlan.FULL, 0
        patience = self._settings.interval * BUDGET_PATIENCE_SHARE - self._budget_wait
        last_shortened = self._last_plan is PollPlan.SHORTENED
        plan = plan_poll(
            self._budget.available,
            self._budget.per_minute,
            full_cost,
            core_cost,
            last_shortened,
            full_wait=self._budget.seconds_until(full_cost or 1),
            patience=max(0.0, patience),
        )
        if plan is PollPlan.WAIT:
            return plan, full_cost or 1
        return plan, requests_to_wait_for(
            full_cost, core_cost, self._budget.per_minute, last_shortened
        )

    async def poll_once(self, full: bool = True) -> Snapshot:
        """One read of the API; raises PrefectApiError or TimeoutError on failure.

        A shortened poll reads pools, queues, workers and runs, and carries the concurrency
        limits of the last full poll over (the latency counters are cumulative anyway).
        """
        now = UnixTime(self._clock())
        requests_before = self._api.requests_sent
        deadline = Deadline(self._monotonic() + self._settings.timeout)
        concurrency = self._settings.concurrency
        async with asyncio.timeout(self._settings.timeout):
            pools, queues = await asyncio.gather(
                self._api.work_pools(deadline), self._api.work_queues(deadline)
            )
            selects = self._settings.pools.selects
            pools = [p for p in pools if selects(p.name)]
            queues = [q for q in queues if selects(q.pool)]
            worker_lists = await gather_bounded(
                [self._pool_workers(p.name, deadline) for p in pools], concurrency
            )
            found = zip(pools, worker_lists, strict=True)
            gone = {pool.name for pool, workers in found if workers is None}
            if gone:
                pools = [p for p in pools if p.name not in gone]
                queues = [q for q in queues if q.pool not in gone]
            stats, slow_requests = await self._queue_stats(
                queues,
                now,
                deadline,
                next_poll=UnixTime(now + self._settings.interval),
                poll_started=requests_before,
            )
            orphaned = (
                await self._orphans.runs_without_work_queue(now, deadline)
                if self._orphans is not None
                else None
            )
            # The slow round is paid from spare budget: not part of what a poll must afford.
            core_cost = self._api.requests_sent - requests_before - slow_requests
            version = None
            if (info := self._server_info) is not None and self._available(Feature.SERVER_VERSION):
                version = await self._optional(
                    Feature.SERVER_VERSION,
                    lambda: info.read(deadline, refresh=full),
                    informational=True,
                )
            limits, holders = self._last_limits, self._last_holders
            if full and self._available(Feature.CONCURRENCY_LIMITS):
                read = await self._optional(
                    Feature.CONCURRENCY_LIMITS, lambda: self._limits.read(deadline)
                )
                limits, holders = read if read is not None else ((), None)
            health = self._last_health
            if full and self._deployments is not None:
                health = await self._read_deployments(now, deadline)
            latency: LatencyStats | None = None
            if self._settings.events_enabled and self._available(Feature.EVENTS):
                if full:
                    # Last: the events cursor must only move when nothing after it can fail.
                    latency = await self._optional(
                        Feature.EVENTS, lambda: self._events.read(now, deadline)
                    )
                else:
                    latency = self._events.stats(now, behind=True)
        # Costs are kept without the listing of runs ahead, which only every 5th minute's
        # poll makes (`_next_costs` adds it back for that poll).
        ahead = self._ahead_listing_requests
        if full:
            self._full_cost = self._api.requests_sent - requests_before - slow_requests - ahead
            self._last_limits, self._last_holders = limits, holders
            self._last_health = health
        self._core_cost = core_cost - ahead
        records = PollRecords(
            observed_at=now,
            pools=tuple(pools),
            queues=tuple(queues),
            workers=tuple(w for workers in worker_lists if workers for w in workers),
            queue_stats=stats,
            limits=limits,
            holders=holders,
            runs_without_work_queue=orphaned,
            deployment_health=health,
        )
        features = self._features.states(self._polls)
        return build_snapshot(
            records, self._settings.heartbeat_multiple, latency, features, server_version=version
        )

    async def poll_and_publish(self) -> float:
        """Poll once, publish or record the failure, log one line; returns the wait before next."""
        started = self._monotonic()
        full_cost, core_cost = self._next_costs(UnixTime(self._clock()))
        plan, wanted = self._plan(full_cost, core_cost)
        if plan is PollPlan.WAIT:
            # Pacing, not a shortage: counted once the poll runs in full, and its log line says
            # how long it waited. Not a poll attempt (feature retries count those).
            assert self._budget is not None
            pause = max(0.05, self._budget.seconds_until(wanted))
            self._budget_wait += pause
            return pause
        self._polls += 1
        requests_before = self._api.requests_sent
        events_before = self._events.events_read
        wait = self._settings.interval
        if plan is PollPlan.FULL and self._budget_wait > 0:
            self._metrics.budget_polls.labels(BUDGET_OUTCOMES[PollPlan.WAIT]).inc()
        if plan is not PollPlan.FULL:
            self._metrics.budget_polls.labels(BUDGET_OUTCOMES[plan]).inc()
            self._log.warning(
                "request_budget_short",
                plan=str(plan),
                available_requests=round(self._budget.available, 1) if self._budget else None,
                full_poll_requests=full_cost,
                core_poll_requests=core_cost,
                budget_wait_seconds=round(self._budget_wait, 3),
                hint="raise --prefect.requests-per-minute or --poll.interval",
            )
        if plan is PollPlan.SKIP:
            # Poll as soon as the budget affords the core of a poll, not a whole interval later:
            # at scale a poll may cost more than one interval's share, and waiting the interval
            # out again and again left the data minutes old (measured at 1,000 queues).
            if self._budget is not None:
                return max(0.5, self._budget.seconds_until(wanted))
            return wait
        self._last_plan = plan
        budget_wait, self._budget_wait = self._budget_wait, 0.0
        try:
            snapshot = await self.poll_once(full=plan is PollPlan.FULL)
        except (PrefectApiError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, PrefectApiError) else "timeout"
            error = str(exc) or f"no complete poll within {self._settings.timeout:g}s"
            duration = self._monotonic() - started
            self._fail(reason, error, duration)
            if isinstance(exc, ApiBudgetExhausted):
                self._learn_from_budget_failure(self._api.requests_sent - requests_before)
            if isinstance(exc, ApiStatusError) and exc.throttled:
                # Pause the whole poller, not just one call: every request we send counts
                # against a bucket the workers share.
                wait = self._backoff.throttled(exc.retry_after)
                self.throttled_until = self._monotonic() + wait
                self._check_retry_after(exc, wait)
                self._metrics.backoff_until.set(self._clock() + wait)
                self._metrics.maintenance.set(float(exc.maintenance))
                if exc.maintenance:
                    self._log.warning("prefect_maintenance", retry_after_seconds=exc.retry_after)
            self._log.warning(
                "poll_failed",
                reason=reason,
                error=error,
                duration_seconds=round(duration, 3),
                requests=self._api.requests_sent - requests_before,
                budget_wait_seconds=round(budget_wait, 3),
                next_poll_seconds=wait,
            )
        except Exception as exc:  # a bug must not stop the exporter serving: count, log, go on
            duration = self._monotonic() - started
            self._fail(INTERNAL, f"{type(exc).__name__}: {exc}", duration)
            self._log.exception(
                "poll_crashed",
                duration_seconds=round(duration, 3),
                budget_wait_seconds=round(budget_wait, 3),
            )
        else:
            duration = self._monotonic() - started
            self._backoff.reset()
            self.throttled_until = 0.0
            self._metrics.backoff_until.set(0)
            self._metrics.maintenance.set(0)
            self._store.publish(snapshot, duration)
            self._metrics.polls.labels("success").inc()
            self._log.info(
                "poll_succeeded",
                duration_seconds=round(duration, 3),
                requests=self._api.requests_sent - requests_before,
                # Pools, queues, workers and runs; the rest is limits and event pages.
                core_requests=(self._core_cost or 0) + self._ahead_listing_requests,
                # Of those, the listing of runs ahead that run-centric polls make every 5 min.
                ahead_listing_requests=self._ahead_listing_requests,
                # Queues whose due runs were counted (one request each) rather than listed.
                due_counted_queues=self._due_counted,
                # Seconds this poll waited for its full cost to be affordable (plan WAIT).
                budget_wait_seconds=round(budget_wait, 3),
                work_pools=len(snapshot.pools),
                work_queues=len(snapshot.queues),
                workers=len(snapshot.workers),
                backlog_runs=sum(q.backlog for q in snapshot.queues),
                events_read=snapshot.latency.events_read - events_before if snapshot.latency else 0,
            )
        if self._backoff.consecutive:
            return wait  # a back-off counts from the throttling answer, not the poll's start
        return max(0.0, wait - (self._monotonic() - started))

    def _learn_from_budget_failure(self, spent: int) -> None:
        """A poll ran out of budget: it costs more than measured, so wait for more next time.

        Its true cost is unknown (it stopped), so the next attempt waits until twice what it
        spent is free, or the whole budget: at 1,000 queues a 5,000-run burst falling due took
        a poll from 45 to 77 requests, and attempts planned on the old cost failed for budget
        one after another for 4 minutes.
        """
        if self._budget is None:
            return
        least = min(self._budget.per_minute, 2 * spent)
        optional = (self._full_cost or 0) - (self._core_cost or 0)
        self._core_cost = max(self._core_cost or 0, least)
        self._full_cost = max(self._full_cost or 0, self._core_cost + optional)

    def _check_retry_after(self, error: ApiStatusError, wait: float) -> None:
        """Say so when a Retry-After header was not obeyed as sent (invalid or too long)."""
        header = error.retry_after_header
        if header is None:
            return
        if error.retry_after is not None and error.retry_after <= self._backoff.cap:
            return
        self._metrics.retry_after_clamped.inc()
        self._log.warning(
            "retry_after_clamped",
            retry_after=header,
            wait_seconds=round(wait, 3),
            cap_seconds=self._backoff.cap,
        )

    def _fail(self, reason: str, error: str, duration: float) -> None:
        self._store.record_failure(error, duration)
        self._metrics.polls.labels("failure").inc()
        self._metrics.errors.labels(reason).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; the first poll starts at once.

        A poll in flight when `stop` is set is cancelled at once (whatever the poll timeout), so
        a SIGTERM ends the exporter well within Kubernetes' grace period.
        """
        stopping = asyncio.create_task(stop.wait())
        poll: asyncio.Task[float] | None = None
        try:
            while not stop.is_set():
                poll = asyncio.create_task(self.poll_and_publish())
                await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    self._log.info("poll_cancelled", reason="shutdown")
                    return  # the poll is cancelled below
                wait = poll.result()
                # Waiting on purpose (interval, back-off) is not a stalled loop: say until when.
                self._store.loop_waiting(self._monotonic() + wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopping), timeout=wait)
        finally:
            # On shutdown, and when this loop itself is cancelled: never leave a poll running.
            stopping.cancel()
            if poll is not None and not poll.done():
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poll
