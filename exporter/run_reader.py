"""Per-queue figures from runs listed across all queues: the cost follows runs, not queues.

A poll of the per-queue path costs 1 to 6 requests for every queue. This reader instead lists
the runs that matter across every queue at once and groups them locally:

- active runs (Pending, Running, Cancelling, Paused, AwaitingConcurrencySlot), oldest first;
- scheduled runs due before the listing window's end, earliest first.

Each listing is paged by exclusion rather than by offset: a full page marks the queues in it as
incomplete, and the next page asks for the other queues only (the API filters runs by a list of
queue ids to include, so the list shrinks). A queue seen only in the last,
partial page has all its runs listed; an incomplete one (more runs than a page) is read by the
per-queue path instead. So a poll costs one request per listing while fewer than 200 runs match,
and at most one more page and one per-queue read per queue with that many: never one per run.

Runs scheduled far ahead (50,000 of them on a large workspace) are counted per queue on a slow
round: one request per queue at most every `refresh` seconds, counting runs due at or after a
cut `horizon` seconds ahead of the refresh. The listing covers everything before the cuts, so
each run is counted once: by the listing before its queue's cut, by the slow count after it.
A cut must stay ahead of now for that to hold (a run past it may have started since), so an
expired cut is refreshed first and, until then, its queue's far-ahead runs are not counted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from exporter.clock import Deadline, UnixTime
from exporter.errors import MalformedResponse
from exporter.gather import gather_bounded
from exporter.records import (
    AWAITING_CONCURRENCY_SLOT,
    QueueRunStats,
    RunRecord,
    StateCount,
    StateType,
)

PAGE_SIZE = 200  # rows in a full page: the server's maximum, as prefect_api asks for
# Runs scheduled more than an hour ahead change slowly (the scheduler adds them in advance);
# within the hour the listing sees every change at once.
HORIZON_SECONDS = 3600.0
# Each queue's far-ahead counts are refreshed at least this often; it must stay below the
# horizon so that a cut is refreshed before now catches up with it.
REFRESH_SECONDS = 1800.0


class RunsApi(Protocol):
    """The reads this reader needs (prefect_api.PrefectApi has them)."""

    async def active_runs_page(
        self, queue_ids: Sequence[str], deadline: Deadline
    ) -> list[RunRecord]: ...
    async def scheduled_runs_page(
        self, until: UnixTime, queue_ids: Sequence[str], deadline: Deadline
    ) -> list[RunRecord]: ...
    async def scheduled_counts_after(
        self, queue_id: str, after: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]: ...


@dataclass(frozen=True)
class FarCounts:
    """One queue's scheduled runs due at or after `cut` (Unix time), by state, as last read."""

    cut: float
    counts: tuple[StateCount, ...]


@dataclass(frozen=True)
class Listing:
    """Runs of the queues a listing saw in full, by queue id, and the queues it could not."""

    runs: dict[str, list[RunRecord]]
    incomplete: frozenset[str]


@dataclass(frozen=True)
class RunCentricResult:
    """Stats of every queue the listings covered, and the queues left for the per-queue path.

    `stats` has an entry for every queue asked about except those in `incomplete`.
    `far_counts_missing` counts queues whose runs beyond the listing window are not counted
    this time (no valid slow count yet, for want of budget).
    """

    stats: dict[str, QueueRunStats]
    incomplete: frozenset[str]
    far_counts_missing: int


async def list_by_queue(
    fetch: Callable[[Sequence[str]], Awaitable[list[RunRecord]]], queue_ids: Sequence[str]
) -> Listing:
    """Page through a listing by excluding the queues of each full page (see the module doc).

    `fetch(ids)` returns one page of the runs in the queues `ids`. Every full page excludes at
    least one more queue, so at most `len(queue_ids) + 1` pages are read. A full page of runs
    from queues already excluded means the server ignored the filter: MalformedResponse.
    """
    remaining = list(queue_ids)
    excluded: set[str] = set()
    runs: dict[str, list[RunRecord]] = defaultdict(list)
    while remaining:
        page = await fetch(remaining)
        for run in page:
            if run.queue_id is not None:
                runs[run.queue_id].append(run)
        if len(page) < PAGE_SIZE:
            break
        full = {run.queue_id for run in page if run.queue_id is not None}
        if not full - excluded:
            raise MalformedResponse("flow_runs/filter: the queue filter was not applied")
        excluded |= full
        remaining = [q for q in remaining if q not in excluded]
    incomplete = frozenset(excluded)
    return Listing({q: r for q, r in runs.items() if q not in incomplete}, incomplete)


def _oldest(times: Iterable[float | None]) -> float | None:
    return min((t for t in times if t is not None), default=None)


def queue_stats(
    active: Sequence[RunRecord],
    scheduled: Sequence[RunRecord],
    far: FarCounts | None,
    now: UnixTime,
) -> QueueRunStats:
    """One queue's stats from its complete listings, as the per-queue path would compute them.

    `scheduled` holds the queue's scheduled runs up to the listing window's end; those before
    `far.cut` are counted here, the rest are in `far`. Without `far`, only the due ones are.
    """
    counts = Counter((run.state_type, run.state_name) for run in active)
    due = [
        run
        for run in scheduled
        if run.next_scheduled_start is not None and run.next_scheduled_start <= now
    ]
    if far is None:
        counts.update((run.state_type, run.state_name) for run in due)
    else:
        counts.update(
            (run.state_type, run.state_name)
            for run in scheduled
            if run.next_scheduled_start is not None and run.next_scheduled_start < far.cut
        )
        counts.update({(c.state_type, c.state_name): c.count for c in far.counts})

    def entered(state_type: StateType) -> float | None:
        return _oldest(run.state_timestamp for run in active if run.state_type == state_type)

    return QueueRunStats(
        counts=tuple(StateCount(t, n, c) for (t, n), c in sorted(counts.items()) if c),
        due_scheduled=len(due),
        oldest_due_scheduled=_oldest(run.next_scheduled_start for run in due),
        oldest_awaiting_slot=_oldest(
            run.expected_start for run in active if run.state_name == AWAITING_CONCURRENCY_SLOT
        ),
        oldest_pending_since=entered(StateType.PENDING),
        oldest_running_since=entered(StateType.RUNNING),
        oldest_cancelling_since=entered(StateType.CANCELLING),
    )


class RunCentricReader:
    """Reads every queue's run stats with listings plus a slow round of far-ahead counts."""

    def __init__(
        self,
        api: RunsApi,
        concurrency: int,
        horizon: float = HORIZON_SECONDS,
        refresh: float = REFRESH_SECONDS,
    ) -> None:
        self._api = api
        self._concurrency = concurrency
        self._horizon = horizon
        self._refresh = refresh
        self._far: dict[str, FarCounts] = {}

    def refresh_wanted(self, queue_ids: Sequence[str], now: UnixTime) -> list[str]:
        """Queues whose far-ahead counts should be read now, most urgent first.

        Queues never read come first, then those whose counts are oldest; a queue read within
        the last `refresh` seconds is not due.
        """
        stale_from = now - self._refresh + self._horizon
        wanted = [q for q in queue_ids if q not in self._far or self._far[q].cut <= stale_from]
        return sorted(
            wanted, key=lambda q: (q in self._far, self._far[q].cut if q in self._far else 0)
        )

    def unread(self, queue_ids: Sequence[str]) -> int:
        """Queues whose far-ahead counts were never read (new queues, or just started)."""
        return sum(1 for q in queue_ids if q not in self._far)

    def minimum_refreshes(self, queue_count: int, interval: float) -> int:
        """Refreshes per poll that keep every queue within `refresh` seconds (a round robin)."""
        polls_per_round = max(1.0, self._refresh / interval)
        return -(-queue_count // int(polls_per_round))

    async def read(
        self,
        queue_ids: Sequence[str],
        now: UnixTime,
        deadline: Deadline,
        refresh_limit: int,
    ) -> RunCentricResult:
        """Stats for `queue_ids`; at most `refresh_limit` far-ahead counts are read this time.

        Raises PrefectApiError. The reader's own state changes only when every read succeeded.
        """
        present = set(queue_ids)
        far = {q: c for q, c in self._far.items() if q in present}
        refreshing = self.refresh_wanted(queue_ids, now)[: max(0, refresh_limit)]
        cut = UnixTime(now + self._horizon)
        answers = await gather_bounded(
            [self._api.scheduled_counts_after(q, cut, deadline) for q in refreshing],
            self._concurrency,
        )
        far.update(
            {q: FarCounts(cut, counts) for q, counts in zip(refreshing, answers, strict=True)}
        )
        valid = {q: c for q, c in far.items() if c.cut > now}
        until = UnixTime(max([now, *(c.cut for c in valid.values())]))
        active = await list_by_queue(
            lambda ids: self._api.active_runs_page(ids, deadline), queue_ids
        )
        scheduled = await list_by_queue(
            lambda ids: self._api.scheduled_runs_page(until, ids, deadline), queue_ids
        )
        incomplete = active.incomplete | scheduled.incomplete
        stats = {
            q: queue_stats(active.runs.get(q, []), scheduled.runs.get(q, []), valid.get(q), now)
            for q in queue_ids
            if q not in incomplete
        }
        self._far = far
        return RunCentricResult(
            stats, incomplete, sum(1 for q in queue_ids if q not in valid and q not in incomplete)
        )
