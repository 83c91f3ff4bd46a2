"""Per-queue figures from runs listed across all queues: the cost follows runs, not queues.

A poll of the per-queue path costs 1 to 6 requests for every queue. This reader instead lists
the runs that matter across every queue at once and groups them locally:

- active runs (Pending, Running, Cancelling, Paused, AwaitingConcurrencySlot), oldest expected
  start first;
- scheduled runs due before the listing window's end, earliest first.

Pages follow a time key (keyset paging: each page asks for runs at or after the last one's time,
less a millisecond, leaving out by id the runs already answered at or after it), never an offset,
which would skip runs as others leave the listing. The ids make runs that share one time (a burst
created at once, a thousand deployments on the same cron) page like any others; a request leaves
out at most MAX_EXCLUDED ids, and a larger tie is listed in parts, half the queues at a time. A
queue holding many runs leaves the listing: from the active listing, after three pages, to the
per-queue path (1 to 6 requests, at a full page of runs); from the due listing, after its first
full page, its due runs are counted by state (one request, at a quarter page of runs listed), and
its oldest due run is the first one listed, as the listing asked about the queue from its start.
So a backlog of thousands of due runs in a few queues costs a few pages and one request a queue,
not one page per 200 runs: measured at 1,000 queues, a standing backlog of 5,000 runs due at one
instant in 10 queues took polls from 45 to 85-94 requests when its queues were handed to the
per-queue path a tie page at a time. Many small queues with a few runs each cost their runs / 200
pages.

Scheduled runs not yet due but within the window (the next hour) change slowly: the scheduler
adds runs far ahead, and a run only matters to the backlog once due. So the window is listed in
two tiers: the due part (`next_scheduled_start <= now`) every poll, and the part ahead every
`future_refresh` seconds, kept in between with its read time. A poll counts the kept runs still
ahead of it (by id, never twice with the due listing); a run made or deleted within the hour
shows in the Scheduled count within `future_refresh`, and once due at the next poll. A queue
holding more than the listing's soft pages of runs ahead (5,000 runs of a backfill scheduled for
midnight, say) is not listed: its runs ahead are counted every poll, one request a queue, until
a count reaching as far as the kept listing finds none (the backfill fell due), after which it
is kept as listed with none.
Measured at 1,000 queues with a 5,000-run burst 28 minutes ahead in 10 queues: listing the whole
window every poll cost 72 requests a poll against 39 before the burst, and with a budget of 125 a
minute two such polls no longer fit in one minute.

Runs scheduled far ahead (50,000 of them on a large workspace) are counted per queue on a slow
round: one request per queue at most every `refresh` seconds, counting runs due at or after a
cut `horizon` seconds ahead of the refresh. The listing reaches `now + horizon`, past every cut,
and each run is counted once: by the listing before its queue's cut, by the slow count after it.
A cut must stay ahead of now for that to hold (a run past it may have started since), so an
expired cut is refreshed first and, until then, only its runs within the window are counted. The
slow round runs after the listings, within a share of the poll's time, and keeps whatever it read
even when it runs out of time or budget: it never makes a poll fail for want of either.

The two listings are read concurrently but not atomically: a run that changes state between the
two answers may be counted in neither or both for one poll (the per-queue path's single history
request has no such gap). Likewise a counted queue's oldest due run is listed before its runs
are counted: claimed in between, it is still reported for that poll. And a kept run ahead that is
moved earlier, to due, in a counted queue is counted twice (kept and counted) unless the due
listing saw it, until the next listing of runs ahead (at most `future_refresh`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from exporter.clock import Deadline, UnixTime
from exporter.errors import ApiBudgetExhausted, ApiTimeout, MalformedResponse
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
# The runs ahead within the window are listed again this often (far below the horizon, so that
# the cuts, which start from the listing's read time, stay ahead of now).
FUTURE_REFRESH_SECONDS = 300.0
# After this many pages of one listing, queues holding many listed runs leave it: a full page
# of active or ahead runs (the per-queue path costs up to 6 requests, a count of runs ahead is
# made every poll while the listing is every 5 minutes), or a quarter page of due runs after the
# first page (a count of them costs one request, the listing of the rest a page per 200 runs,
# both every poll).
SOFT_PAGES = 3
# Due runs leave after the first full page: a queue holding a quarter of it is a backlog.
DUE_SOFT_PAGES = 1
DUE_MOVE_AT = PAGE_SIZE // 4
# Run ids a page request leaves out at most (about 40 bytes each in the body); a larger tie is
# listed in parts, a half of the queues at a time.
MAX_EXCLUDED = 2000
# A listing longer than this is a server that does not honour the filters, not a workspace.
MAX_PAGES = 1000
# Times travel as ISO text; paging from a millisecond earlier cannot skip a run at the cut.
KEY_OVERLAP_SECONDS = 0.001
# The API's time filters include both ends (`before_` is <=, `after_` >=): a count that must
# start just after a listing's end, or stop just before a cut, is moved by this much (the
# API keeps microseconds).
BOUNDARY_SECONDS = 1e-6
# The slow round may use at most this share of the time left in the poll.
SLOW_ROUND_SHARE = 0.5


class RunsApi(Protocol):
    """The reads this reader needs (prefect_api.PrefectApi has them)."""

    async def active_runs_page(
        self,
        queue_ids: Sequence[str],
        after: UnixTime | None,
        deadline: Deadline,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]: ...
    async def scheduled_runs_page(
        self,
        until: UnixTime,
        queue_ids: Sequence[str],
        after: UnixTime | None,
        deadline: Deadline,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]: ...
    async def scheduled_counts_after(
        self, queue_id: str, after: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]: ...
    async def scheduled_counts_between(
        self, queue_id: str, after: UnixTime | None, before: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]: ...


@dataclass(frozen=True)
class AheadListing:
    """The runs scheduled ahead within the window, as listed at `read_at` (Unix time).

    `queues` are the queue ids the listing asked about; `runs` holds those it saw in full and
    `incomplete` those holding more runs ahead than the soft pages allow.
    """

    read_at: float
    queues: frozenset[str]
    runs: dict[str, list[RunRecord]]
    incomplete: frozenset[str]


@dataclass(frozen=True)
class FarCounts:
    """One queue's scheduled runs due at or after `cut` (Unix time), by state, as last read."""

    cut: float
    counts: tuple[StateCount, ...]


@dataclass(frozen=True)
class DueCount:
    """A queue's due scheduled runs counted by the API rather than listed: `counts` by state
    name, `oldest` the next scheduled start (Unix time) of the earliest, or None when none."""

    counts: tuple[StateCount, ...]
    oldest: float | None


@dataclass(frozen=True)
class Listing:
    """Runs of the queues a listing saw in full, by queue id, and the queues it could not.

    `earliest` gives, for each queue in `incomplete`, the key (Unix time) of its first run in
    the listing's order: the listing asked about the queue from its first page until the queue
    left, so no run of it sorts before that one.
    """

    runs: dict[str, list[RunRecord]]
    incomplete: frozenset[str]
    earliest: dict[str, float] = field(default_factory=dict)
    seen: frozenset[str] = frozenset()  # ids of every run listed, of incomplete queues too


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
    ahead_listing_requests: int = 0  # pages of the periodic listing of runs ahead, this poll
    due_counted: int = 0  # queues whose due runs were counted, not listed (one request each)


# fetch(queue ids, after, excluded run ids) -> one page
Fetch = Callable[[Sequence[str], UnixTime | None, Sequence[str]], Awaitable[list[RunRecord]]]


async def list_by_queue(
    fetch: Fetch,
    queue_ids: Sequence[str],
    key: Callable[[RunRecord], float | None],
    move_at: int = PAGE_SIZE,
    soft_pages: int = SOFT_PAGES,
    max_excluded: int = MAX_EXCLUDED,
) -> Listing:
    """Page through one listing of the queues `queue_ids` (see the module doc).

    `fetch(ids, after, excluded)` returns one page of the runs in the queues `ids` whose `key`
    is at or after `after`, sorted by `key`, without the runs whose ids are `excluded` (at most
    `max_excluded`). After `soft_pages` full pages, a queue holding `move_at` listed runs
    leaves the listing (it is in `incomplete`, with the key of its first run in `earliest`).
    Raises MalformedResponse when the pages show the server ignored a filter.
    """
    paging = _Paging(fetch, key, move_at, soft_pages, max_excluded)
    await paging.page_on(list(queue_ids), None, [])
    incomplete = paging.incomplete
    earliest = {
        q: first
        for q in incomplete
        if (first := _oldest(key(run) for run in paging.runs.get(q, ()))) is not None
    }
    return Listing(
        {q: r for q, r in paging.runs.items() if q not in incomplete},
        frozenset(incomplete),
        earliest,
        frozenset(paging.seen),
    )


class _Paging:
    """One listing's progress: the runs seen, by queue, and the queues that left it."""

    def __init__(
        self,
        fetch: Fetch,
        key: Callable[[RunRecord], float | None],
        move_at: int,
        soft_pages: int,
        max_excluded: int,
    ) -> None:
        self._fetch = fetch
        self._key = key
        self._move_at = move_at
        self._soft_pages = soft_pages
        self._max_excluded = max_excluded
        self.pages = 0
        self.seen: set[str] = set()
        self.runs: dict[str, list[RunRecord]] = defaultdict(list)
        self.incomplete: set[str] = set()

    async def page_on(
        self, remaining: list[str], after: UnixTime | None, tail: list[RunRecord]
    ) -> None:
        """List the queues `remaining` from `after`, leaving out the runs of `tail` by id.

        `tail` holds the runs already answered at or after `after`: leaving them out by id
        makes runs that share one time (a burst created at once) page like any others. When
        it outgrows `max_excluded`, the queues are split in two halves, each listed on from
        here with its own part of the tail: the body stays bounded and no queue leaves.
        """
        key = self._key
        while remaining:
            if len(tail) > self._max_excluded:
                if len(remaining) == 1:
                    # One queue holding that many runs at one time: counted or read apart.
                    self.incomplete.add(remaining[0])
                    return
                middle = len(remaining) // 2
                for part in (remaining[:middle], remaining[middle:]):
                    # A queue of the second part may have left while the first was listed.
                    queues = [q for q in part if q not in self.incomplete]
                    held = set(queues)
                    await self.page_on(queues, after, [r for r in tail if r.queue_id in held])
                return
            if self.pages >= MAX_PAGES:
                raise MalformedResponse(f"flow_runs/filter: more than {MAX_PAGES} pages")
            self.pages += 1
            page = await self._fetch(remaining, after, [r.id for r in tail])
            fresh = [r for r in page if r.id not in self.seen and r.queue_id not in self.incomplete]
            for run in fresh:
                self.seen.add(run.id)
                if run.queue_id is not None:
                    self.runs[run.queue_id].append(run)
            if len(page) < PAGE_SIZE:
                return
            if not fresh:
                # Every run was answered before, although left out by id or by time.
                raise MalformedResponse(
                    "flow_runs/filter: the run id or time filter was not applied"
                )
            last = key(page[-1])
            if last is not None:
                after = UnixTime(last - KEY_OVERLAP_SECONDS)
            # Once `after` is set, the time filter leaves runs without a time out; before, the
            # ids alone move the listing on.
            tail = [
                r
                for r in (*tail, *page)
                if after is None or ((k := key(r)) is not None and k >= after)
            ]
            if self.pages >= self._soft_pages:
                self.incomplete |= {
                    q for q, listed in self.runs.items() if len(listed) >= self._move_at
                }
            remaining = [q for q in remaining if q not in self.incomplete]
            tail = [r for r in tail if r.queue_id not in self.incomplete]


def _oldest(times: Iterable[float | None]) -> float | None:
    return min((t for t in times if t is not None), default=None)


def queue_stats(
    active: Sequence[RunRecord],
    scheduled: Sequence[RunRecord],
    far: FarCounts | None,
    now: UnixTime,
    ahead: Sequence[StateCount] = (),
    due_count: DueCount | None = None,
) -> QueueRunStats:
    """One queue's stats from its complete listings, as the per-queue path would compute them.

    `scheduled` holds the queue's scheduled runs up to the listing window's end; those before
    `far.cut` are counted here, the rest are in `far`. Without `far`, all listed ones are
    (runs beyond the window are then missing, and reported so). `ahead` adds runs ahead counted
    by the API instead of listed (a queue holding too many to list); `due_count` stands for the
    due runs of a queue holding too many to list (`scheduled` then holds none of them).
    """
    counts = Counter((run.state_type, run.state_name) for run in active)
    counts.update({(c.state_type, c.state_name): c.count for c in ahead})
    due = [
        run
        for run in scheduled
        if run.next_scheduled_start is not None and run.next_scheduled_start <= now
    ]
    due_runs, oldest_due = len(due), _oldest(run.next_scheduled_start for run in due)
    if due_count is not None:
        counts.update({(c.state_type, c.state_name): c.count for c in due_count.counts})
        due_runs += sum(c.count for c in due_count.counts)
        oldest_due = _oldest((oldest_due, due_count.oldest)) if due_runs else None
    if far is None:
        counts.update((run.state_type, run.state_name) for run in scheduled)
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
        due_scheduled=due_runs,
        oldest_due_scheduled=oldest_due,
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
        future_refresh: float = FUTURE_REFRESH_SECONDS,
    ) -> None:
        self._api = api
        self._concurrency = concurrency
        self._horizon = horizon
        self._refresh = refresh
        self._future_refresh = future_refresh
        self._far: dict[str, FarCounts] = {}
        self._ahead: AheadListing | None = None
        self._ahead_listing_pages = 0  # of the last poll that listed runs ahead

    def _ahead_to_list(self, queue_ids: Sequence[str], now: UnixTime) -> list[str]:
        """Queues whose runs ahead must be listed now: all when the kept listing is too old,
        else those new to it (their listing joins the kept one, see `read`)."""
        ahead = self._ahead
        if ahead is None or not ahead.read_at <= now < ahead.read_at + self._future_refresh:
            return list(queue_ids)
        return [q for q in queue_ids if q not in ahead.queues]

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

    def ahead_listing_share(self, interval: float) -> int:
        """Requests per poll of the listing of runs ahead, spread over its period: the pages
        of the last poll that made one, once every `future_refresh` seconds."""
        return math.ceil(self._ahead_listing_pages * interval / self._future_refresh)

    def ahead_listing_due(self, at: UnixTime) -> int:
        """Requests a read at `at` (Unix time) will spend listing runs ahead: the pages of the
        last such listing when the kept one is too old by then, else 0 (new queues' listings,
        a page or so, aside)."""
        ahead = self._ahead
        if ahead is not None and ahead.read_at <= at < ahead.read_at + self._future_refresh:
            return 0
        return self._ahead_listing_pages

    async def read(
        self, queue_ids: Sequence[str], now: UnixTime, deadline: Deadline
    ) -> RunCentricResult:
        """Stats for `queue_ids` from the listings and the far-ahead counts read so far.

        Raises PrefectApiError when a listing fails. `refresh()` reads far-ahead counts.
        """
        present = set(queue_ids)
        listings = [
            list_by_queue(
                lambda ids, after, excluded: self._api.active_runs_page(
                    ids, after, deadline, excluded
                ),
                queue_ids,
                lambda run: run.expected_start,
            ),
            list_by_queue(
                lambda ids, after, excluded: self._api.scheduled_runs_page(
                    now, ids, after, deadline, excluded
                ),
                queue_ids,
                lambda run: run.next_scheduled_start,
                move_at=DUE_MOVE_AT,
                soft_pages=DUE_SOFT_PAGES,
            ),
        ]
        to_list = self._ahead_to_list(queue_ids, now)
        pages: list[int] = []
        if to_list:
            until = UnixTime(now + self._horizon)  # past every cut

            def ahead_page(
                ids: Sequence[str], after: UnixTime | None, excluded: Sequence[str]
            ) -> Awaitable[list[RunRecord]]:
                pages.append(len(ids))
                start = after if after is not None else now
                return self._api.scheduled_runs_page(until, ids, start, deadline, excluded)

            listings.append(list_by_queue(ahead_page, to_list, lambda r: r.next_scheduled_start))
        active, due, *fresh = await asyncio.gather(*listings)
        self._ahead = self._kept_ahead(fresh[0] if fresh else None, to_list, present, now)
        if pages and len(to_list) == len(queue_ids):
            # Only a listing of every queue tells what the next full one costs (a listing of
            # new queues alone is a page or so).
            self._ahead_listing_pages = len(pages)
        ahead = self._ahead
        # A count whose cut lies beyond the kept listing's reach (made before the clock stepped
        # back) would leave the runs in between counted by neither: forget it, read it again.
        reach = ahead.read_at + self._horizon
        self._far = {q: c for q, c in self._far.items() if q in present and c.cut <= reach}
        valid = {q: c for q, c in self._far.items() if c.cut > now}
        # Queues the active listing could not finish go to the per-queue path; those the due
        # listing could not finish have their due runs counted.
        incomplete = active.incomplete
        # Runs already listed as due or active, in any queue: a kept run ahead that a worker
        # claimed early (prefetch), or that moved queue, is not counted again as Scheduled. (A
        # kept run moved earlier, to due, in a queue whose due runs are counted is counted
        # twice unless listed before the queue left: until the next listing of runs ahead.)
        listed = active.seen | due.seen
        counted = [q for q in queue_ids if q in ahead.incomplete and q not in incomplete]
        due_counted = [q for q in queue_ids if q in due.incomplete and q not in incomplete]
        answers = await gather_bounded(
            [
                *(
                    self._api.scheduled_counts_between(
                        q,
                        UnixTime(now + BOUNDARY_SECONDS),
                        self._window_end(valid.get(q), now),
                        deadline,
                    )
                    for q in counted
                ),
                # The same time filter as the due listing's: due at `now` or before.
                *(self._api.scheduled_counts_between(q, None, now, deadline) for q in due_counted),
            ],
            self._concurrency,
        )
        ahead_counts = dict(zip(counted, answers[: len(counted)], strict=True))
        emptied = {
            q
            for q, counts in ahead_counts.items()
            if not any(c.count for c in counts) and (q not in valid or valid[q].cut >= reach)
        }
        if emptied:
            # A backfill that fell due leaves nothing ahead: kept as listed with no runs (a run
            # made ahead since shows at the next listing, as in any listed queue), not counted
            # every poll until then. Measured at 1,000 queues: 10 requests a poll for up to
            # 5 minutes after a 5,000-run backfill fell due. Only when the count reached as far
            # as the kept listing does: a far-ahead cut made before it stops the count short,
            # and the runs between that cut and the listing's reach would be counted by none.
            self._ahead = replace(
                ahead,
                runs={**ahead.runs, **{q: [] for q in emptied}},
                incomplete=ahead.incomplete - emptied,
            )
        due_counts = {
            q: DueCount(counts, due.earliest.get(q))
            for q, counts in zip(due_counted, answers[len(counted) :], strict=True)
        }
        stats = {}
        for q in queue_ids:
            if q in incomplete:
                continue
            due_runs = due.runs.get(q, [])
            # Kept runs still ahead; those now due are in the due listing, or have left.
            still_ahead = [
                run
                for run in ahead.runs.get(q, [])
                if run.next_scheduled_start is not None
                and run.next_scheduled_start > now
                and run.id not in listed
            ]
            stats[q] = queue_stats(
                active.runs.get(q, []),
                due_runs + still_ahead,
                valid.get(q),
                now,
                ahead_counts.get(q, ()),
                due_counts.get(q),
            )
        missing = sum(1 for q in stats if q not in valid)
        return RunCentricResult(stats, incomplete, missing, len(pages), len(due_counts))

    def _kept_ahead(
        self, listed: Listing | None, asked: Sequence[str], present: set[str], now: UnixTime
    ) -> AheadListing:
        """The kept listing of runs ahead after this poll's listing of `asked` (if any).

        A listing of only the queues new to the kept one joins it under the kept read time:
        it reaches further (now + horizon) than the kept one, whose cuts start from its read
        time, and the runs in between are due now, so in the due listing.
        """
        kept = self._ahead
        if listed is None:
            # Nothing was asked: every queue is in the kept listing, or there is no queue.
            return kept or AheadListing(now, frozenset(), {}, frozenset())
        if kept is None or set(asked) >= present:
            return AheadListing(now, frozenset(present), listed.runs, listed.incomplete)
        return AheadListing(
            kept.read_at,
            frozenset(q for q in kept.queues | set(asked) if q in present),
            {q: r for q, r in (kept.runs | listed.runs).items() if q in present},
            frozenset(q for q in kept.incomplete | listed.incomplete if q in present),
        )

    def _window_end(self, far: FarCounts | None, now: UnixTime) -> UnixTime:
        """Where the runs ahead stop and the far-ahead count starts (or the window's end).

        The API's time filters include both ends; the count stops just short of the cut,
        which the far-ahead count starts at.
        """
        if far is None:
            return UnixTime(now + self._horizon)
        return UnixTime(far.cut - BOUNDARY_SECONDS)

    async def refresh(
        self,
        queue_ids: Sequence[str],
        now: UnixTime,
        deadline: Deadline,
        limit: int,
        monotonic: Callable[[], float],
    ) -> None:
        """The slow round: at most `limit` of the far-ahead counts `refresh_wanted` names.

        Each count is kept as it arrives, within a share of the time left before `deadline`
        (`monotonic` tells the time); running out of time or budget only shortens the round.
        Other API errors (throttling, a malformed answer) are raised as in any read.
        """
        queue_ids = self.refresh_wanted(queue_ids, now)[: max(0, limit)]
        if not queue_ids:
            return
        share = Deadline(monotonic() + (deadline - monotonic()) * SLOW_ROUND_SHARE)
        # The kept listing of runs ahead reaches `read_at + horizon`: a cut beyond it would
        # leave the runs in between counted by neither.
        listed_at = self._ahead.read_at if self._ahead is not None else now
        cut = UnixTime(min(now, listed_at) + self._horizon)

        async def refresh(queue_id: str) -> None:
            counts = await self._api.scheduled_counts_after(queue_id, cut, share)
            self._far[queue_id] = FarCounts(cut, counts)

        with contextlib.suppress(ApiTimeout, ApiBudgetExhausted, TimeoutError):
            async with asyncio.timeout(max(0.0, share - monotonic())):
                await gather_bounded([refresh(q) for q in queue_ids], self._concurrency)
