"""The poll loop: reads the API within a deadline, builds a snapshot and publishes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from structlog.typing import FilteringBoundLogger

from exporter.budget import Backoff, RequestBudget
from exporter.prefect_api import ERROR_REASONS, ApiStatusError, ObjectGone, PrefectApiError
from exporter.records import (
    ConcurrencyLimitRecord,
    FlowRunEvent,
    LatencyStats,
    LimitHolders,
    PollRecords,
    PoolRecord,
    QueueRecord,
    QueueRunStats,
    RunState,
    WorkerRecord,
)
from exporter.snapshot import Snapshot, build_snapshot
from exporter.statefile import StateFile
from exporter.transitions import Cursor, TransitionTracker

T = TypeVar("T")
POLL_RESULTS = ("success", "failure")
BUDGET_OUTCOMES = ("shortened", "skipped")
FAILURE_REASONS = (*ERROR_REASONS, "internal")


class Api(Protocol):
    """What the poller needs from the Prefect API adapter."""

    requests_sent: int

    async def work_pools(self, deadline: float) -> list[PoolRecord]: ...
    async def work_queues(self, deadline: float) -> list[QueueRecord]: ...
    async def workers(self, pool: str, deadline: float) -> list[WorkerRecord]: ...
    async def queue_run_stats(
        self, queue_id: str, now: float, deadline: float
    ) -> QueueRunStats: ...
    async def concurrency_limits(self, deadline: float) -> list[ConcurrencyLimitRecord]: ...
    async def tag_limit_holders(self, deadline: float) -> dict[str, tuple[str, ...]]: ...
    async def task_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]: ...
    async def flow_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]: ...
    async def deployment_names(self, ids: Sequence[str], deadline: float) -> dict[str, str]: ...
    async def deployment_slot_runs(self, deployment_id: str, deadline: float) -> int: ...
    async def deployment_awaiting_slot(
        self, deployment_id: str, deadline: float
    ) -> tuple[int, float | None]: ...
    async def flow_run_events(
        self, since: float, until: float, max_pages: int, deadline: float
    ) -> tuple[list[FlowRunEvent], bool]: ...
    async def expected_start_times(
        self, ids: Sequence[str], deadline: float
    ) -> dict[str, float | None]: ...


class Publisher(Protocol):
    """Where snapshots go (the store); also told how long the loop will wait on purpose."""

    def publish(self, snapshot: Snapshot, duration: float) -> None: ...
    def record_failure(self, error: str, duration: float) -> None: ...
    def loop_waiting(self, until_monotonic: float) -> None: ...


@dataclass(frozen=True)
class PollSettings:
    interval: float
    timeout: float
    concurrency: int
    heartbeat_multiple: float
    events_enabled: bool = True
    events_max_pages: int = 10
    events_settle: float = 30.0
    events_state_file: Path | None = None
    deployments_breakdown: bool = False


FEATURES = ("concurrency_limits", "events")
# A feature the server lacked (404) is asked for again after this many polls, so an upgraded
# server is noticed without restarting the exporter.
FEATURE_RETRY_POLLS = 20


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
            "Failed polls by reason: timeout, connection, http_status, malformed_response, "
            "budget, internal (a bug in the exporter).",
            ["reason"],
            registry=registry,
        )
        self.budget_polls = Counter(
            "prefect_exporter_request_budget_polls",
            "Polls the request budget could not afford in full: shortened (concurrency limits "
            "and events left for a later poll) or skipped.",
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
        self.gone = Counter(
            "prefect_exporter_objects_gone",
            "Objects left out of a poll because they were deleted between two of its requests "
            "(a per-object request answered 404).",
            ["kind"],
            registry=registry,
        )
        self.gone.labels("work_pool")
        self.maintenance = Gauge(
            "prefect_exporter_api_maintenance",
            "1 while the API's last throttling answer carried Prefect-Maintenance: true.",
            registry=registry,
        )
        for result in POLL_RESULTS:
            self.polls.labels(result)
        for reason in FAILURE_REASONS:
            self.errors.labels(reason)
        for outcome in BUDGET_OUTCOMES:
            self.budget_polls.labels(outcome)


async def _all(coroutines: Sequence[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """Run coroutines with at most `limit` at once; the first failure cancels the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def limited(coroutine: Awaitable[T]) -> T:
        async with semaphore:
            return await coroutine

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(limited(c)) for c in coroutines]
    except BaseExceptionGroup as group_error:
        # Report the first real cause, not the group wrapper.
        raise group_error.exceptions[0] from None
    finally:
        # A task cancelled before it started never awaited its coroutine; close those so that
        # no "coroutine was never awaited" warning escapes into the log (a no-op for the rest).
        for coroutine in coroutines:
            coroutine.close()
    return [task.result() for task in tasks]


class Poller:
    """Polls on a fixed interval; a failed poll keeps the last snapshot (the store ages it)."""

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
    ) -> None:
        self._api = api
        self._budget = budget
        self._backoff = backoff or Backoff(settings.interval)
        # Requests one poll took, measured: all of it, and without the optional parts.
        self._full_cost: int | None = None
        self._core_cost: int | None = None
        self._last_limits: tuple[ConcurrencyLimitRecord, ...] = ()
        self._last_holders: LimitHolders | None = None
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._monotonic = monotonic
        self._polls = 0
        self._unavailable_until: dict[str, int] = {}
        state_file = settings.events_state_file
        # A save that fails (full disk) is recorded and logged by the file; the poll goes on.
        self._cursor_file = StateFile(state_file, "events", log) if state_file else None
        saved = Cursor.load(self._cursor_file) if self._cursor_file else None
        self._tracker = TransitionTracker(saved or Cursor(clock() - settings.events_settle))

    def _available(self, feature: str) -> bool:
        return self._polls >= self._unavailable_until.get(feature, 0)

    def _degrade(self, feature: str, error: ApiStatusError) -> None:
        """The server lacks an endpoint (older Prefect 3.x): go on without the feature."""
        self._unavailable_until[feature] = self._polls + FEATURE_RETRY_POLLS
        self._log.warning(
            "feature_unavailable",
            feature=feature,
            error=str(error),
            retry_after_polls=FEATURE_RETRY_POLLS,
        )

    async def _limits(
        self, deadline: float
    ) -> tuple[tuple[ConcurrencyLimitRecord, ...], LimitHolders | None]:
        """Concurrency limits and who holds their slots; a server lacking them degrades."""
        try:
            return await self._read_limits(deadline)
        except ApiStatusError as exc:
            if exc.status != 404:
                raise
            self._degrade("concurrency_limits", exc)
            return (), None

    async def _read_limits(
        self, deadline: float
    ) -> tuple[tuple[ConcurrencyLimitRecord, ...], LimitHolders]:
        """A few requests per poll: the v2 table, then only the holders worth checking."""
        api, limit = self._api, self._settings.concurrency
        limits = tuple(await api.concurrency_limits(deadline))
        kinds = {record.name: record.kind for record in limits}
        tag_holders = await api.tag_limit_holders(deadline) if "tag" in kinds.values() else {}
        holder_ids = sorted({run for runs in tag_holders.values() for run in runs})
        task_states = await api.task_run_states(holder_ids, deadline) if holder_ids else []
        parent_ids = sorted({s.flow_run_id for s in task_states if s.flow_run_id})
        flow_states = await api.flow_run_states(parent_ids, deadline) if parent_ids else []
        deployment_limits = [r for r in limits if kinds[r.name] == "deployment"]
        deployment_ids = [r.name.removeprefix("deployment:") for r in deployment_limits]
        names = await api.deployment_names(deployment_ids, deadline) if deployment_ids else {}
        # Only limits with taken slots can leak; the others need no request.
        busy = [r.name.removeprefix("deployment:") for r in deployment_limits if r.active_slots]
        holding = await _all([api.deployment_slot_runs(d, deadline) for d in busy], limit)
        slot_runs = dict.fromkeys(deployment_ids, 0) | dict(zip(busy, holding, strict=True))
        awaiting: dict[str, tuple[int, float | None]] = {}
        if self._settings.deployments_breakdown:
            answers = await _all(
                [api.deployment_awaiting_slot(d, deadline) for d in deployment_ids], limit
            )
            awaiting = dict(zip(deployment_ids, answers, strict=True))
        holders = LimitHolders(
            tag_holders=tag_holders,
            holder_states={s.id: s for s in (*task_states, *flow_states)},
            deployment_names=names,
            deployment_slot_runs=slot_runs,
            deployment_awaiting=awaiting,
        )
        return limits, holders

    async def _events(self, now: float, deadline: float) -> LatencyStats | None:
        """Read the flow-run events since the cursor; the tracker changes only on success."""
        settings = self._settings
        until = now - settings.events_settle
        since = self._tracker.cursor.occurred
        behind = False
        if until > since:
            try:
                events, behind = await self._api.flow_run_events(
                    since, until, settings.events_max_pages, deadline
                )
            except ApiStatusError as exc:
                if exc.status != 404:
                    raise
                self._degrade("events", exc)
                return None
            pendings = self._tracker.first_pendings(events)
            expected = (
                await self._api.expected_start_times(
                    sorted({e.flow_run_id for e in pendings}), deadline
                )
                if pendings
                else {}
            )
            self._tracker.consume(events, expected)
            if self._cursor_file is not None:
                self._tracker.cursor.save(self._cursor_file)
        return self._tracker.stats(now, behind)

    async def _pool_workers(self, pool: str, deadline: float) -> list[WorkerRecord] | None:
        """The pool's workers, or None when the pool was deleted after the pool list was read."""
        try:
            return await self._api.workers(pool, deadline)
        except ObjectGone as exc:
            self._metrics.gone.labels("work_pool").inc()
            self._log.info("work_pool_gone", work_pool=pool, error=str(exc))
            return None

    def _plan(self) -> str:
        """`full`, `shortened` (no limits or events this time) or `skip`, by the budget left."""
        if self._budget is None or self._full_cost is None or self._core_cost is None:
            return "full"
        available = self._budget.available
        if available >= self._full_cost:
            return "full"
        if self._core_cost > self._budget.per_minute:
            return "full"  # never affordable: try anyway; the poll fails with reason budget
        return "shortened" if available >= self._core_cost else "skip"

    async def poll_once(self, full: bool = True) -> Snapshot:
        """One read of the API; raises PrefectApiError or TimeoutError on failure.

        A shortened poll reads pools, queues, workers and runs, and carries the concurrency
        limits of the last full poll over (the latency counters are cumulative anyway).
        """
        now = self._clock()
        requests_before = self._api.requests_sent
        deadline = self._monotonic() + self._settings.timeout
        limit = self._settings.concurrency
        async with asyncio.timeout(self._settings.timeout):
            pools, queues = await asyncio.gather(
                self._api.work_pools(deadline), self._api.work_queues(deadline)
            )
            worker_lists = await _all([self._pool_workers(p.name, deadline) for p in pools], limit)
            gone = {
                p.name for p, workers in zip(pools, worker_lists, strict=True) if workers is None
            }
            if gone:
                pools = [p for p in pools if p.name not in gone]
                queues = [q for q in queues if q.pool not in gone]
            stats = await _all(
                [self._api.queue_run_stats(q.id, now, deadline) for q in queues], limit
            )
            core_cost = self._api.requests_sent - requests_before
            limits, holders = self._last_limits, self._last_holders
            if full and self._available("concurrency_limits"):
                limits, holders = await self._limits(deadline)
            latency = None
            if self._settings.events_enabled and self._available("events"):
                if full:
                    # Last: the events cursor must only move when nothing after it can fail.
                    latency = await self._events(now, deadline)
                else:
                    latency = self._tracker.stats(now, behind=True)
        if full:
            self._full_cost = self._api.requests_sent - requests_before
            self._last_limits, self._last_holders = limits, holders
        self._core_cost = core_cost
        features = tuple((f, self._available(f)) for f in FEATURES)
        records = PollRecords(
            observed_at=now,
            pools=tuple(pools),
            queues=tuple(queues),
            workers=tuple(w for workers in worker_lists if workers for w in workers),
            queue_stats={q.id: s for q, s in zip(queues, stats, strict=True)},
            limits=limits,
            holders=holders,
        )
        return build_snapshot(records, self._settings.heartbeat_multiple, latency, features)

    async def poll_and_publish(self) -> float:
        """Poll once, publish or record the failure, log one line; returns the wait before next."""
        started = self._monotonic()
        self._polls += 1
        requests_before = self._api.requests_sent
        events_before = self._tracker.events_read
        wait = self._settings.interval
        plan = self._plan()
        if plan != "full":
            self._metrics.budget_polls.labels("skipped" if plan == "skip" else "shortened").inc()
            self._log.warning(
                "request_budget_short",
                plan=plan,
                available_requests=round(self._budget.available, 1) if self._budget else None,
                full_poll_requests=self._full_cost,
                core_poll_requests=self._core_cost,
                hint="raise --prefect.requests-per-minute or --poll.interval",
            )
        if plan == "skip":
            return wait
        try:
            snapshot = await self.poll_once(full=plan == "full")
        except (PrefectApiError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, PrefectApiError) else "timeout"
            error = str(exc) or f"no complete poll within {self._settings.timeout:g}s"
            duration = self._monotonic() - started
            self._fail(reason, error, duration)
            if isinstance(exc, ApiStatusError) and exc.throttled:
                # Pause the whole poller, not just one call: every request we send counts
                # against a bucket the workers share.
                wait = self._backoff.throttled(exc.retry_after)
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
                next_poll_seconds=wait,
            )
        except Exception as exc:  # a bug must not stop the exporter serving: count, log, go on
            duration = self._monotonic() - started
            self._fail("internal", f"{type(exc).__name__}: {exc}", duration)
            self._log.exception("poll_crashed", duration_seconds=round(duration, 3))
        else:
            duration = self._monotonic() - started
            self._backoff.reset()
            self._metrics.backoff_until.set(0)
            self._metrics.maintenance.set(0)
            self._store.publish(snapshot, duration)
            self._metrics.polls.labels("success").inc()
            self._log.info(
                "poll_succeeded",
                duration_seconds=round(duration, 3),
                requests=self._api.requests_sent - requests_before,
                # Pools, queues, workers and runs; the rest is limits and event pages.
                core_requests=self._core_cost,
                work_pools=len(snapshot.pools),
                work_queues=len(snapshot.queues),
                workers=len(snapshot.workers),
                backlog_runs=sum(q.backlog for q in snapshot.queues),
                events_read=snapshot.latency.events_read - events_before if snapshot.latency else 0,
            )
        if self._backoff.consecutive:
            return wait  # a back-off counts from the throttling answer, not the poll's start
        return max(0.0, wait - (self._monotonic() - started))

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
        try:
            while not stop.is_set():
                poll = asyncio.create_task(self.poll_and_publish())
                await asyncio.wait({poll, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    poll.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await poll
                    self._log.info("poll_cancelled", reason="shutdown")
                    return
                wait = poll.result()
                # Waiting on purpose (interval, back-off) is not a stalled loop: say until when.
                self._store.loop_waiting(self._monotonic() + wait)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stopping), timeout=wait)
        finally:
            stopping.cancel()
