"""Tests for the run-centric reader: listings by exclusion, per-queue stats, the slow round."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence

import pytest

from exporter.clock import Deadline, UnixTime
from exporter.errors import MalformedResponse
from exporter.records import RunRecord, StateCount
from exporter.run_reader import (
    DUE_MOVE_AT,
    DUE_SOFT_PAGES,
    FUTURE_REFRESH_SECONDS,
    HORIZON_SECONDS,
    MAX_EXCLUDED,
    PAGE_SIZE,
    SOFT_PAGES,
    FarCounts,
    Listing,
    RunCentricReader,
    RunCentricResult,
    list_by_queue,
    queue_stats,
)

NOW = UnixTime(1_800_000_000.0)
FAR = Deadline(1e12)


def run(
    rid: str,
    queue: str,
    state_type: str,
    name: str,
    entered: float | None = None,
    expected: float | None = None,
    next_start: float | None = None,
) -> RunRecord:
    return RunRecord(rid, queue, state_type, name, entered, expected, next_start)


def scheduled(rid: str, queue: str, next_start: float, name: str = "Scheduled") -> RunRecord:
    return run(rid, queue, "SCHEDULED", name, next_start - 600, next_start - 600, next_start)


class FakeRuns:
    """Serves listings the way the server does: sorted, limited, with queues excluded."""

    def __init__(self, runs: Sequence[RunRecord], far: dict[str, list[RunRecord]] | None = None):
        self.runs = list(runs)
        self.far = far or {}
        self.pages: list[tuple[str, tuple[str, ...]]] = []
        self.excluded: list[int] = []  # run ids left out, per page request
        self.refreshed: list[str] = []
        self.between: list[str] = []
        self.due_counted: list[str] = []
        self.ahead_untils: set[float] = set()

    def _page(
        self,
        kind: str,
        rows: list[RunRecord],
        queue_ids: Sequence[str],
        after: float | None,
        excluded: Sequence[str],
        key: Callable[[RunRecord], float | None],
    ) -> list[RunRecord]:
        """Sorted by `key`, runs without one last and left out by a time filter (PostgreSQL);
        runs at one time in the order they were made (an index's order)."""
        self.pages.append((kind, tuple(queue_ids)))
        self.excluded.append(len(excluded))
        left_out = set(excluded)
        rows = sorted(rows, key=lambda r: (key(r) is None, key(r) or 0))
        return [
            r
            for r in rows
            if r.queue_id in queue_ids
            and r.id not in left_out
            and (after is None or ((k := key(r)) is not None and k >= after))
        ][:PAGE_SIZE]

    async def active_runs_page(
        self,
        queue_ids: Sequence[str],
        after: UnixTime | None,
        deadline: Deadline,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]:
        rows = [
            r
            for r in self.runs
            if r.state_type != "SCHEDULED" or r.state_name == "AwaitingConcurrencySlot"
        ]
        return self._page("active", rows, queue_ids, after, excluded, lambda r: r.expected_start)

    async def scheduled_runs_page(
        self,
        until: UnixTime,
        queue_ids: Sequence[str],
        after: UnixTime | None,
        deadline: Deadline,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]:
        rows = [
            r
            for r in self.runs
            if r.state_type == "SCHEDULED"
            and r.state_name != "AwaitingConcurrencySlot"
            and (r.next_scheduled_start or 0) <= until
        ]
        # The listing of runs ahead starts at the poll's time and ends an hour later; the due
        # listing ends at the poll's time. Later pages of a listing keep its `until`.
        if after is not None and until - after == HORIZON_SECONDS:
            self.ahead_untils.add(until)
        kind = "ahead" if until in self.ahead_untils else "scheduled"
        return self._page(kind, rows, queue_ids, after, excluded, lambda r: r.next_scheduled_start)

    async def scheduled_counts_between(
        self, queue_id: str, after: UnixTime | None, before: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]:
        if after is None:
            self.due_counted.append(queue_id)
            return self._counts(queue_id, lambda t: t <= before)
        self.between.append(queue_id)
        return self._counts(queue_id, lambda t: after <= t <= before)

    async def scheduled_counts_after(
        self, queue_id: str, after: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]:
        self.refreshed.append(queue_id)
        return self._counts(queue_id, lambda t: t >= after)

    def _counts(self, queue_id: str, when: Callable[[float], bool]) -> tuple[StateCount, ...]:
        rows = [
            r
            for r in self.runs
            if r.queue_id == queue_id
            and r.state_type == "SCHEDULED"
            and r.state_name != "AwaitingConcurrencySlot"
            and when(r.next_scheduled_start or 0)
        ]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.state_name] = counts.get(r.state_name, 0) + 1
        return tuple(StateCount("SCHEDULED", n, c) for n, c in sorted(counts.items()))


def counts_of(stats_counts: Sequence[StateCount]) -> dict[str, int]:
    return {c.state_name: c.count for c in stats_counts}


def listing(
    fake: FakeRuns, queue_ids: Sequence[str], move_at: int = PAGE_SIZE, soft_pages: int = SOFT_PAGES
) -> Listing:
    return asyncio.run(
        list_by_queue(
            lambda ids, after, excluded: fake.scheduled_runs_page(NOW, ids, after, FAR, excluded),
            queue_ids,
            lambda r: r.next_scheduled_start,
            move_at,
            soft_pages,
        )
    )


class TestListByQueue:
    """Keyset paging lists every small queue in full and hands big queues to the per-queue path."""

    def test_fewer_runs_than_a_page_take_one_request(self) -> None:
        """Every queue is complete after one partial page."""
        fake = FakeRuns([scheduled(f"r{i}", f"q{i % 3}", NOW - i) for i in range(50)])
        result = listing(fake, ["q0", "q1", "q2"])
        assert len(fake.pages) == 1
        assert result.incomplete == frozenset()
        assert sum(len(r) for r in result.runs.values()) == 50

    def test_many_small_queues_are_all_listed_in_full(self) -> None:
        """300 queues with one due run each: two pages, every queue exact, none read per queue."""
        fake = FakeRuns([scheduled(f"r{i}", f"q{i}", NOW - 1000 + i) for i in range(300)])
        result = listing(fake, [f"q{i}" for i in range(300)])
        assert len(fake.pages) == 2
        assert result.incomplete == frozenset()
        assert all(len(result.runs[f"q{i}"]) == 1 for i in range(300))

    def test_a_queue_holding_pages_of_runs_goes_to_the_per_queue_path(self) -> None:
        """5,000 due runs in one queue cost a few pages, not 25, and the small queue is exact."""
        big = [scheduled(f"b{i}", "big", NOW - 10_000 + i) for i in range(5000)]
        small = [scheduled(f"s{i}", "small", NOW - 10_000 + 20 * i + 0.5) for i in range(150)]
        fake = FakeRuns(big + small)
        result = listing(fake, ["big", "small"])
        assert len(fake.pages) <= SOFT_PAGES + 5
        assert result.incomplete == frozenset({"big"})
        assert [r.id for r in result.runs["small"]] == [f"s{i}" for i in range(150)]

    def test_runs_at_one_instant_are_paged_by_id(self) -> None:
        """250 runs created at the same time: the second page leaves the first's out by id."""
        burst = [scheduled(f"b{i}", "burst", NOW - 100) for i in range(250)]
        fake = FakeRuns([*burst, scheduled("x", "other", NOW - 50)])
        result = listing(fake, ["burst", "other"])
        assert len(fake.pages) == 2
        assert fake.excluded == [0, PAGE_SIZE]
        assert result.incomplete == frozenset()
        assert len(result.runs["burst"]) == 250
        assert [r.id for r in result.runs["other"]] == ["x"]

    def test_a_thousand_queues_on_one_cron_are_listed_not_read_apart(self) -> None:
        """One run due at the same minute in each of 1,000 queues: five pages, every queue
        complete (a tie handed to per-queue reads would cost 1,000 requests or more)."""
        fake = FakeRuns([scheduled(f"r{i}", f"q{i}", NOW - 60) for i in range(1000)])
        result = listing(fake, [f"q{i}" for i in range(1000)])
        assert len(fake.pages) == 6  # the sixth, empty, says the fifth was the last
        assert result.incomplete == frozenset()
        assert all(len(result.runs[f"q{i}"]) == 1 for i in range(1000))
        assert fake.excluded == [0, 200, 400, 600, 800, 1000]

    @pytest.mark.parametrize("max_excluded", [300, MAX_EXCLUDED])
    def test_a_tie_too_large_to_leave_out_by_id_is_listed_in_parts(self, max_excluded: int) -> None:
        """1,000 queues holding 1 to 5 runs each at one instant (3,000 runs, three hourly
        deployments a queue): no request leaves out more than `max_excluded` ids, no queue
        leaves the listing, every run is listed once, in about one page per 200 runs."""
        runs = [
            scheduled(f"q{q}-{i}", f"q{q}", NOW - 60) for q in range(1000) for i in range(1 + q % 5)
        ]
        fake = FakeRuns([*runs, scheduled("early", "q999", NOW - 90)])
        queues = [f"q{q}" for q in range(1000)]
        result = asyncio.run(
            list_by_queue(
                lambda ids, after, excluded: fake.scheduled_runs_page(
                    NOW, ids, after, FAR, excluded
                ),
                queues,
                lambda r: r.next_scheduled_start,
                max_excluded=max_excluded,
            )
        )
        assert max(fake.excluded) <= max_excluded
        assert result.incomplete == frozenset()
        for q in range(1000):
            assert len(result.runs[f"q{q}"]) == 1 + q % 5 + (q == 999)
        assert len(fake.pages) <= len(runs) // PAGE_SIZE + 2 * (len(runs) // max_excluded) + 2

    def test_a_queue_with_a_quarter_page_of_due_runs_leaves_after_the_first_page(self) -> None:
        """As the due listing does it: a queue holding 67 of the first 400 runs leaves the
        listing after the second page (its 800 later runs are counted, not paged), and its
        first listed run is its earliest. With the active listing's bar (a full page, after
        three pages) it leaves two pages later."""
        light = [scheduled(f"l{i}", f"l{i}", NOW - 10_000 + 10 * i) for i in range(500)]
        heavy = [scheduled(f"h{i}", "heavy", NOW - 10_000 + 50 * i + 1) for i in range(100)]
        heavy += [scheduled(f"H{i}", "heavy", NOW - 5000 + 5 * i) for i in range(800)]
        queues = ["heavy", *(f"l{i}" for i in range(500))]
        fake = FakeRuns(light + heavy)
        result = listing(fake, queues, DUE_MOVE_AT, DUE_SOFT_PAGES)
        assert result.incomplete == frozenset({"heavy"})
        assert result.earliest == {"heavy": NOW - 10_000 + 1}
        assert all(len(result.runs[f"l{i}"]) == 1 for i in range(500))
        assert len(fake.pages) == 3
        fake = FakeRuns(light + heavy)
        assert listing(fake, queues).incomplete == frozenset({"heavy"})
        assert len(fake.pages) == 5

    def test_runs_without_a_time_are_paged_by_id(self) -> None:
        """Runs that have no key at all (sorted last) cannot move the time: the ids do."""
        rows = [run(f"p{i}", "q", "PENDING", "Pending", NOW - 10) for i in range(450)]
        fake = FakeRuns(rows)
        result = asyncio.run(
            list_by_queue(
                lambda ids, after, excluded: fake.active_runs_page(ids, after, FAR, excluded),
                ["q"],
                lambda r: r.expected_start,
            )
        )
        assert len(result.runs["q"]) == 450
        assert len(fake.pages) == 3

    def test_a_server_ignoring_the_filters_is_malformed(self) -> None:
        """Full pages that never change would page on forever: refused instead."""
        rows = [scheduled(f"r{i}", "q", NOW - i) for i in range(PAGE_SIZE)]

        fetches = []

        async def stubborn(
            queue_ids: Sequence[str], after: UnixTime | None, excluded: Sequence[str]
        ) -> list[RunRecord]:
            fetches.append(after)
            return rows

        with pytest.raises(MalformedResponse):
            asyncio.run(list_by_queue(stubborn, ["q", "r", "s"], lambda r: r.next_scheduled_start))
        assert len(fetches) == 2

    def test_a_server_ignoring_the_run_id_filter_is_malformed(self) -> None:
        """300 runs at one instant from a server that honours the time filter but not the ids:
        the second page repeats the first, and the listing stops there."""
        fake = FakeRuns([scheduled(f"r{i}", "q", NOW - 60) for i in range(300)])
        fetches = []

        async def ids_ignored(
            queue_ids: Sequence[str], after: UnixTime | None, excluded: Sequence[str]
        ) -> list[RunRecord]:
            fetches.append(len(excluded))
            return await fake.scheduled_runs_page(NOW, queue_ids, after, FAR)

        with pytest.raises(MalformedResponse, match="run id or time filter"):
            asyncio.run(list_by_queue(ids_ignored, ["q"], lambda r: r.next_scheduled_start))
        assert fetches == [0, PAGE_SIZE]


class TestQueueStats:
    """A complete listing gives the same figures the per-queue path reads."""

    def test_counts_backlog_and_oldest_waits(self) -> None:
        """Due runs, awaiting runs, pending, running and cancelling, each dated as documented."""
        active = [
            run("a1", "q", "SCHEDULED", "AwaitingConcurrencySlot", NOW - 5, NOW - 300, NOW + 30),
            run("p1", "q", "PENDING", "Pending", NOW - 40, NOW - 90),
            run("p2", "q", "PENDING", "Submitting", NOW - 70, NOW - 50),
            run("r1", "q", "RUNNING", "Running", NOW - 900, NOW - 1000),
            run("c1", "q", "CANCELLING", "Cancelling", NOW - 20, NOW - 2000),
        ]
        upcoming = [
            scheduled("d1", "q", NOW - 120, "Late"),
            scheduled("d2", "q", NOW - 60),
            scheduled("f1", "q", NOW + 600),
        ]
        far = FarCounts(NOW + 1800, (StateCount("SCHEDULED", "Scheduled", 40),))
        stats = queue_stats(active, upcoming, far, NOW)
        assert counts_of(stats.counts) == {
            "AwaitingConcurrencySlot": 1,
            "Pending": 1,
            "Submitting": 1,
            "Running": 1,
            "Cancelling": 1,
            "Late": 1,
            "Scheduled": 2 + 40,
        }
        assert stats.due_scheduled == 2
        assert stats.oldest_due_scheduled == NOW - 120
        assert stats.oldest_awaiting_slot == NOW - 300
        assert stats.oldest_pending_since == NOW - 70
        assert stats.oldest_running_since == NOW - 900
        assert stats.oldest_cancelling_since == NOW - 20

    def test_runs_at_or_after_the_cut_are_counted_once_by_the_slow_count(self) -> None:
        """A listed run beyond its queue's cut is already in the far count."""
        upcoming = [scheduled("n", "q", NOW + 100), scheduled("x", "q", NOW + 500)]
        far = FarCounts(NOW + 500, (StateCount("SCHEDULED", "Scheduled", 1),))
        assert counts_of(queue_stats([], upcoming, far, NOW).counts) == {"Scheduled": 2}

    def test_without_a_slow_count_the_listed_runs_are_counted(self) -> None:
        """Runs within the window are known; those beyond it are not guessed."""
        upcoming = [scheduled("d", "q", NOW - 1), scheduled("f", "q", NOW + 100)]
        stats = queue_stats([], upcoming, None, NOW)
        assert counts_of(stats.counts) == {"Scheduled": 2}
        assert stats.due_scheduled == 1


def read(
    reader: RunCentricReader, queue_ids: list[str], now: UnixTime, limit: int
) -> RunCentricResult:
    """One poll's worth: the listings, then the slow round (as the poller does)."""

    async def both() -> RunCentricResult:
        result = await reader.read(queue_ids, now, FAR)
        listed = [q for q in queue_ids if q not in result.incomplete]
        await reader.refresh(listed, now, FAR, limit, lambda: 0.0)
        return result

    return asyncio.run(both())


class TestRunCentricReader:
    """Listings and the slow round together, with the per-queue path left for big queues."""

    def workspace(self) -> FakeRuns:
        runs = [scheduled(f"big{i}", "big", NOW - 5000 + i) for i in range(450)]
        runs += [scheduled(f"far{i}", "idle", NOW + 7200 + i) for i in range(30)]
        runs += [run("p", "busy", "PENDING", "Pending", NOW - 30, NOW - 60)]
        runs += [scheduled("soon", "busy", NOW + 60), scheduled("late", "busy", NOW - 10, "Late")]
        return FakeRuns(runs)

    def test_every_queue_is_exact(self) -> None:
        """Stats for big (three pages), busy and idle equal the truth."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        result = read(reader, ["big", "busy", "idle"], NOW, limit=10)
        assert result.incomplete == frozenset()
        assert result.stats["big"].due_scheduled == 450
        assert result.stats["big"].oldest_due_scheduled == NOW - 5000
        assert counts_of(result.stats["idle"].counts) == {}  # far ahead: next poll
        busy = result.stats["busy"]
        assert counts_of(busy.counts) == {"Pending": 1, "Scheduled": 1, "Late": 1}
        assert busy.due_scheduled == 1
        assert busy.oldest_due_scheduled == NOW - 10
        assert result.far_counts_missing == 3
        later = read(reader, ["big", "busy", "idle"], NOW, limit=10)
        assert counts_of(later.stats["idle"].counts) == {"Scheduled": 30}
        assert later.far_counts_missing == 0

    def test_the_slow_round_reads_each_queue_once_until_it_is_due_again(self) -> None:
        """Far-ahead counts are read on the first poll and not again within the refresh time."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["big", "busy", "idle"], NOW, limit=10)
        assert sorted(fake.refreshed) == ["big", "busy", "idle"]
        fake.refreshed.clear()
        later = UnixTime(NOW + 600)
        read(reader, ["big", "busy", "idle"], later, limit=10)
        assert fake.refreshed == []
        much_later = UnixTime(NOW + 1900)
        read(reader, ["big", "busy", "idle"], much_later, limit=1)
        assert len(fake.refreshed) == 1

    def test_with_no_budget_for_the_slow_round_the_gap_is_reported(self) -> None:
        """Queues without far-ahead counts are counted as missing them, not zeroed."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        result = read(reader, ["busy", "idle"], NOW, limit=0)
        assert fake.refreshed == []
        assert result.far_counts_missing == 2
        assert counts_of(result.stats["idle"].counts) == {}

    def test_the_listing_window_reaches_the_cuts(self) -> None:
        """Scheduled runs are listed up to an hour ahead, so nothing falls between."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["busy", "idle"], NOW, limit=10)
        assert [kind for kind, _ in fake.pages].count("ahead") == 1
        later = UnixTime(NOW + 100)
        result = read(reader, ["busy", "idle"], later, limit=0)
        # "soon" is due at NOW + 60: now due, still counted once.
        assert counts_of(result.stats["busy"].counts) == {"Pending": 1, "Scheduled": 1, "Late": 1}
        assert result.stats["busy"].due_scheduled == 2
        assert HORIZON_SECONDS > 100

    def test_a_standing_backlog_is_counted_not_listed_and_stays_exact(self) -> None:
        """5,000 runs due at one instant in 10 queues (made queue by queue, as the scale bench
        does) beside small queues: the due listing pages a few of them and counts the 10
        queues (one request each), not 25 pages a poll; every figure equals the truth."""
        burst = [
            scheduled(f"b{q}-{i}", f"b{q}", NOW - 300, "Late" if i % 2 else "Scheduled")
            for q in range(10)
            for i in range(500)
        ]
        small = [scheduled(f"s{i}", f"s{i % 40}", NOW - 900 + i) for i in range(120)]
        small += [run(f"p{i}", f"b{i}", "PENDING", "Pending", NOW - 30, NOW - 60) for i in range(3)]
        fake = FakeRuns(burst + small)
        queues = [*(f"b{q}" for q in range(10)), *(f"s{i}" for i in range(40))]
        result = read(RunCentricReader(fake, concurrency=4), queues, NOW, limit=0)
        assert result.incomplete == frozenset()
        assert result.due_counted == 10
        assert sorted(fake.due_counted) == sorted(f"b{q}" for q in range(10))
        # Made queue by queue, a burst's runs come a queue at a time: the first page (the
        # small queues and b0), one page for each other burst queue, one to end; 27 in full.
        assert [kind for kind, _ in fake.pages].count("scheduled") == 11
        for q in queues:
            due = [
                r
                for r in fake.runs
                if r.queue_id == q and r.next_scheduled_start and r.next_scheduled_start <= NOW
            ]
            stats = result.stats[q]
            assert stats.due_scheduled == len(due), q
            assert stats.oldest_due_scheduled == min(r.next_scheduled_start or 0 for r in due), q
            expected = Counter(r.state_name for r in fake.runs if r.queue_id == q)
            assert counts_of(stats.counts) == dict(expected), q

    def test_a_counted_queue_emptied_meanwhile_has_no_oldest(self) -> None:
        """Listed, then claimed before the count: no due run, so no oldest due time either."""
        fake = FakeRuns([scheduled(f"b{i}", "b", NOW - 300) for i in range(900)])

        async def claimed_meanwhile(
            queue_id: str, after: UnixTime | None, before: UnixTime, deadline: Deadline
        ) -> tuple[StateCount, ...]:
            return ()

        fake.scheduled_counts_between = claimed_meanwhile  # type: ignore[method-assign]
        result = read(RunCentricReader(fake, concurrency=4), ["b"], NOW, limit=0)
        assert result.stats["b"].due_scheduled == 0
        assert result.stats["b"].oldest_due_scheduled is None

    def test_a_deleted_queue_is_forgotten(self) -> None:
        """Slow counts of queues that are gone are dropped (memory stays bounded)."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["busy", "idle"], NOW, limit=10)
        read(reader, ["busy"], NOW, limit=10)
        assert reader.refresh_wanted(["idle"], NOW) == ["idle"]


def backfill(count: int = 700) -> list[RunRecord]:
    """`count` runs in queue `burst`, a second apart from NOW + 1000: pages of runs ahead."""
    return [scheduled(f"b{i}", "burst", NOW + 1000 + i) for i in range(count)]


class TestRunsAhead:
    """The window's runs ahead are listed every FUTURE_REFRESH_SECONDS and kept in between."""

    def ahead_pages(self, fake: FakeRuns) -> list[tuple[str, ...]]:
        return [ids for kind, ids in fake.pages if kind == "ahead"]

    def test_listed_once_per_refresh_not_every_poll(self) -> None:
        """Polls in between list only the due runs and the active ones."""
        fake = FakeRuns([scheduled("soon", "q", NOW + 600)])
        reader = RunCentricReader(fake, concurrency=4)
        for offset in (0, 30, 60, FUTURE_REFRESH_SECONDS - 1):
            result = read(reader, ["q"], UnixTime(NOW + offset), limit=10)
            assert counts_of(result.stats["q"].counts) == {"Scheduled": 1}
        assert len(self.ahead_pages(fake)) == 1
        read(reader, ["q"], UnixTime(NOW + FUTURE_REFRESH_SECONDS), limit=10)
        assert len(self.ahead_pages(fake)) == 2

    def test_a_run_falling_due_is_counted_once_and_at_once(self) -> None:
        """Kept runs now due are counted by the due listing; one made due shows at once."""
        fake = FakeRuns([scheduled("soon", "q", NOW + 60)])
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["q"], NOW, limit=10)
        fake.runs.append(scheduled("new", "q", NOW + 10))  # made after the listing ahead
        fake.runs.append(scheduled("later", "q", NOW + 900))  # ahead: the next listing
        result = read(reader, ["q"], UnixTime(NOW + 100), limit=10)
        stats = result.stats["q"]
        assert stats.due_scheduled == 2
        assert counts_of(stats.counts) == {"Scheduled": 2}
        assert len(self.ahead_pages(fake)) == 1
        result = read(reader, ["q"], UnixTime(NOW + FUTURE_REFRESH_SECONDS), limit=10)
        assert counts_of(result.stats["q"].counts) == {"Scheduled": 3}

    @pytest.mark.parametrize(
        ("due_in", "claimed_at"),
        [(60.0, 90.0), (100.0, 95.0)],  # claimed after its time; claimed early (prefetch)
    )
    def test_a_claimed_run_leaves_the_scheduled_count_though_still_kept(
        self, due_in: float, claimed_at: float
    ) -> None:
        """The kept listing still has the run as Scheduled; the active listing wins."""
        fake = FakeRuns([scheduled("r", "q", NOW + due_in)])
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["q"], NOW, limit=10)
        fake.runs = [run("r", "q", "PENDING", "Pending", NOW + claimed_at, NOW + due_in)]
        result = read(reader, ["q"], UnixTime(NOW + claimed_at), limit=10)
        assert counts_of(result.stats["q"].counts) == {"Pending": 1}
        assert result.stats["q"].due_scheduled == 0

    def test_a_queue_holding_pages_of_runs_ahead_is_counted_not_listed(self) -> None:
        """A backfill of 700 runs ahead: one count a poll, never the per-queue path."""
        runs = backfill()
        runs += [scheduled("s", "small", NOW + 500)]
        fake = FakeRuns(runs)
        reader = RunCentricReader(fake, concurrency=4)
        for offset in (0, 30):
            result = read(reader, ["burst", "small"], UnixTime(NOW + offset), limit=10)
            assert result.incomplete == frozenset()
            assert counts_of(result.stats["burst"].counts) == {"Scheduled": 700}
            assert counts_of(result.stats["small"].counts) == {"Scheduled": 1}
        assert fake.between == ["burst", "burst"]
        # Three pages, then one for the small queue alone after the burst is handed over.
        assert len(self.ahead_pages(fake)) == SOFT_PAGES + 1

    def test_a_counted_backfill_that_fell_due_is_no_longer_counted_ahead(self) -> None:
        """Once the count of its runs ahead is 0 (the backfill fell due), the queue is kept as
        listed with nothing ahead until the next listing: no count a poll in between, and a
        run made ahead meanwhile shows at that listing, as in a listed queue."""
        fake = FakeRuns([scheduled(f"b{i}", "burst", NOW + 100 + i / 10) for i in range(700)])
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["burst"], NOW, limit=0)
        assert fake.between == ["burst"]
        result = read(reader, ["burst"], UnixTime(NOW + 200), limit=0)  # all due now
        assert fake.between == ["burst", "burst"]  # counted once more: 0 ahead
        assert result.stats["burst"].due_scheduled == 700
        fake.runs.append(scheduled("new", "burst", NOW + 900))
        for offset in (230, 260):
            result = read(reader, ["burst"], UnixTime(NOW + offset), limit=0)
            assert counts_of(result.stats["burst"].counts) == {"Scheduled": 700}
        assert fake.between == ["burst", "burst"]
        later = UnixTime(NOW + FUTURE_REFRESH_SECONDS + 10)  # the next listing of runs ahead
        result = read(reader, ["burst"], later, limit=0)
        assert counts_of(result.stats["burst"].counts) == {"Scheduled": 701}

    def test_a_count_stopped_short_by_an_old_cut_keeps_the_queue_counted(self) -> None:
        """The count of runs ahead stops at the queue's far-ahead cut; a cut made before the
        kept listing falls short of its reach. A count of 0 there says nothing of the runs in
        between (`late`, beyond the old cut): the queue stays counted, and once the slow round
        moves the cut out, the count finds `late` (kept as listed with nothing ahead, it would
        be counted by none until the next listing)."""
        fake = FakeRuns([scheduled("late", "burst", NOW + 3700)])
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["burst"], NOW, limit=10)  # far-ahead cut at NOW + 3600: `late` beyond it
        fake.runs += [scheduled(f"b{i}", "burst", NOW + 1750 + i / 10) for i in range(700)]
        listed_at = UnixTime(NOW + 1700)  # the next listing of runs ahead: the backfill is ahead
        read(reader, ["burst"], listed_at, limit=0)
        # The backfill fell due; the old cut is due for refresh and moves to NOW + 5300.
        result = read(reader, ["burst"], UnixTime(NOW + 1900), limit=10)
        assert counts_of(result.stats["burst"].counts) == {"Scheduled": 701}
        result = read(reader, ["burst"], UnixTime(NOW + 1930), limit=0)
        assert counts_of(result.stats["burst"].counts) == {"Scheduled": 701}

    def test_a_new_queue_is_listed_alone_and_joins_the_kept_listing(self) -> None:
        """Queues made between two listings cost a listing of their own runs ahead only."""
        fake = FakeRuns([scheduled("a1", "a", NOW + 600), scheduled("b1", "b", NOW + 700)])
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["a"], NOW, limit=10)
        result = read(reader, ["a", "b"], UnixTime(NOW + 30), limit=10)
        assert self.ahead_pages(fake) == [("a",), ("b",)]
        assert counts_of(result.stats["a"].counts) == {"Scheduled": 1}
        assert counts_of(result.stats["b"].counts) == {"Scheduled": 1}
        read(reader, ["a", "b"], UnixTime(NOW + 60), limit=10)
        assert len(self.ahead_pages(fake)) == 2

    def test_the_next_full_listing_is_planned_at_its_own_pages(self) -> None:
        """The poller plans the listing's pages for the poll that makes it (and 0 before):
        as many as the last listing of every queue took, not a new queue's page alone."""
        fake = FakeRuns([*backfill(), scheduled("s", "small", NOW + 500)])
        reader = RunCentricReader(fake, concurrency=4)
        assert reader.ahead_listing_due(NOW) == 0  # nothing listed yet: no cost known
        read(reader, ["burst", "small"], NOW, limit=10)
        full = SOFT_PAGES + 1
        assert len(self.ahead_pages(fake)) == full
        read(reader, ["burst", "small", "new"], UnixTime(NOW + 30), limit=10)
        assert len(self.ahead_pages(fake)) == full + 1  # the new queue's own page
        assert reader.ahead_listing_due(UnixTime(NOW + 60)) == 0
        assert reader.ahead_listing_due(UnixTime(NOW + FUTURE_REFRESH_SECONDS)) == full

    def test_no_run_is_counted_twice_or_lost_at_the_cut(self) -> None:
        """The far-ahead cut starts from the listing's read time, whenever it is refreshed."""
        fake = FakeRuns(
            [
                scheduled("in", "q", NOW + HORIZON_SECONDS - 10),
                scheduled("out", "q", NOW + HORIZON_SECONDS + 100),
                scheduled("far", "q", NOW + 2 * HORIZON_SECONDS),
            ]
        )
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["q"], NOW, limit=0)  # no far-ahead counts yet: the window only
        for offset in (200.0, FUTURE_REFRESH_SECONDS + 1, 2 * FUTURE_REFRESH_SECONDS + 2):
            result = read(reader, ["q"], UnixTime(NOW + offset), limit=10)
            later = read(reader, ["q"], UnixTime(NOW + offset + 30), limit=10)
            assert counts_of(later.stats["q"].counts) == {"Scheduled": 3}, offset
            assert later.far_counts_missing == 0
        assert result.stats["q"].due_scheduled == 0

    def test_runs_on_the_boundaries_are_counted_once(self) -> None:
        """A run due exactly now, and one exactly at the far-ahead cut, in a counted queue."""
        runs = backfill()
        fake = FakeRuns(runs)
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["burst"], NOW, limit=10)  # the cut: NOW + HORIZON_SECONDS
        fake.runs += [
            scheduled("now", "burst", NOW + 30),
            scheduled("cut", "burst", NOW + HORIZON_SECONDS),
            scheduled("past-cut", "burst", NOW + HORIZON_SECONDS + 10),
        ]
        result = read(reader, ["burst"], UnixTime(NOW + 30), limit=0)
        # The far count read at NOW knew none of the three: "cut" and "past-cut" wait for
        # its refresh; "now" is due, counted once (not also by the count of runs ahead).
        assert result.stats["burst"].due_scheduled == 1
        assert counts_of(result.stats["burst"].counts) == {"Scheduled": 701}
        reader._far.clear()  # read the far-ahead count again, as its refresh will
        read(reader, ["burst"], UnixTime(NOW + 31), limit=10)
        result = read(reader, ["burst"], UnixTime(NOW + 32), limit=0)
        assert counts_of(result.stats["burst"].counts) == {"Scheduled": 703}

    def test_the_count_of_runs_ahead_stops_at_the_cut_not_at_the_windows_end(self) -> None:
        """Between listings the window's end moves on; the far-ahead cut does not."""
        runs = backfill()
        runs += [scheduled(f"x{i}", "burst", NOW + HORIZON_SECONDS + 10 + i) for i in range(5)]
        fake = FakeRuns(runs)
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["burst"], NOW, limit=10)
        result = read(reader, ["burst"], UnixTime(NOW + 30), limit=0)
        assert counts_of(result.stats["burst"].counts) == {"Scheduled": 705}

    def test_a_queue_merged_in_keeps_the_old_queues_cuts_within_reach(self) -> None:
        """Counts refreshed after a merge start at the kept listing's end, not later."""
        fake = FakeRuns(
            [
                scheduled("a-in", "a", NOW + 600),
                scheduled("a-edge", "a", NOW + HORIZON_SECONDS + 10),
                scheduled("b1", "b", NOW + 700),
            ]
        )
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["a"], NOW, limit=0)  # kept listing of a, no far-ahead counts yet
        read(reader, ["a", "b"], UnixTime(NOW + 30), limit=10)  # b merged; counts read now
        result = read(reader, ["a", "b"], UnixTime(NOW + 60), limit=0)
        assert counts_of(result.stats["a"].counts) == {"Scheduled": 2}
        assert counts_of(result.stats["b"].counts) == {"Scheduled": 1}
        assert result.far_counts_missing == 0

    def test_no_queue_at_all_is_no_error(self) -> None:
        """A pool selector matching nothing, or a new workspace: empty stats, every poll."""
        reader = RunCentricReader(FakeRuns([]), concurrency=4)
        for offset in (0, 30):
            result = read(reader, [], UnixTime(NOW + offset), limit=10)
            assert result.stats == {}

    def test_a_clock_stepped_back_forgets_cuts_beyond_the_listing(self) -> None:
        """Cuts taken before the step would lie past the new listing's reach: read again."""
        fake = FakeRuns([scheduled("edge", "q", NOW + HORIZON_SECONDS - 300)])
        reader = RunCentricReader(fake, concurrency=4)
        read(reader, ["q"], NOW, limit=10)
        back = UnixTime(NOW - 600)
        result = read(reader, ["q"], back, limit=0)
        # Past the new window, and its old count forgotten: reported missing, not trusted.
        assert result.far_counts_missing == 1
        assert counts_of(result.stats["q"].counts) == {}
        read(reader, ["q"], UnixTime(back + 1), limit=10)  # the count read again
        result = read(reader, ["q"], UnixTime(back + 2), limit=0)
        assert counts_of(result.stats["q"].counts) == {"Scheduled": 1}
        assert result.far_counts_missing == 0
