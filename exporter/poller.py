"""The poll loop: reads the API within a deadline, builds a snapshot and publishes it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter
from structlog.typing import FilteringBoundLogger

from exporter.prefect_api import ERROR_REASONS, ApiStatusError, PrefectApiError
from exporter.records import PollRecords, PoolRecord, QueueRecord, QueueRunStats, WorkerRecord
from exporter.snapshot import Snapshot, build_snapshot

T = TypeVar("T")
POLL_RESULTS = ("success", "failure")
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


class Publisher(Protocol):
    def publish(self, snapshot: Snapshot, duration: float) -> None: ...
    def record_failure(self, error: str, duration: float) -> None: ...


@dataclass(frozen=True)
class PollSettings:
    interval: float
    timeout: float
    concurrency: int
    heartbeat_multiple: float


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
        for result in POLL_RESULTS:
            self.polls.labels(result)
        for reason in FAILURE_REASONS:
            self.errors.labels(reason)


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
    ) -> None:
        self._api = api
        self._store = store
        self._settings = settings
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._monotonic = monotonic

    async def poll_once(self) -> Snapshot:
        """One complete read of the API; raises PrefectApiError or TimeoutError on failure."""
        now = self._clock()
        deadline = self._monotonic() + self._settings.timeout
        limit = self._settings.concurrency
        async with asyncio.timeout(self._settings.timeout):
            pools, queues = await asyncio.gather(
                self._api.work_pools(deadline), self._api.work_queues(deadline)
            )
            worker_lists = await _all([self._api.workers(p.name, deadline) for p in pools], limit)
            stats = await _all(
                [self._api.queue_run_stats(q.id, now, deadline) for q in queues], limit
            )
        records = PollRecords(
            observed_at=now,
            pools=tuple(pools),
            queues=tuple(queues),
            workers=tuple(w for workers in worker_lists for w in workers),
            queue_stats={q.id: s for q, s in zip(queues, stats, strict=True)},
        )
        return build_snapshot(records, self._settings.heartbeat_multiple)

    async def poll_and_publish(self) -> float:
        """Poll once, publish or record the failure, log one line; returns the wait before next."""
        started = self._monotonic()
        requests_before = self._api.requests_sent
        wait = self._settings.interval
        try:
            snapshot = await self.poll_once()
        except (PrefectApiError, TimeoutError) as exc:
            reason = exc.reason if isinstance(exc, PrefectApiError) else "timeout"
            error = str(exc) or f"no complete poll within {self._settings.timeout:g}s"
            duration = self._monotonic() - started
            self._fail(reason, error, duration)
            if isinstance(exc, ApiStatusError) and exc.retry_after is not None:
                wait = max(wait, exc.retry_after)
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
            self._store.publish(snapshot, duration)
            self._metrics.polls.labels("success").inc()
            self._log.info(
                "poll_succeeded",
                duration_seconds=round(duration, 3),
                requests=self._api.requests_sent - requests_before,
                work_pools=len(snapshot.pools),
                work_queues=len(snapshot.queues),
                workers=len(snapshot.workers),
                backlog_runs=sum(q.backlog for q in snapshot.queues),
            )
        return max(0.0, wait - (self._monotonic() - started))

    def _fail(self, reason: str, error: str, duration: float) -> None:
        self._store.record_failure(error, duration)
        self._metrics.polls.labels("failure").inc()
        self._metrics.errors.labels(reason).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; the first poll starts at once."""
        while not stop.is_set():
            wait = await self.poll_and_publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=wait)
