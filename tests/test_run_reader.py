"""Tests for the run-centric reader: listings by exclusion, per-queue stats, the slow round."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from exporter.clock import Deadline, UnixTime
from exporter.errors import MalformedResponse
from exporter.records import RunRecord, StateCount
from exporter.run_reader import (
    HORIZON_SECONDS,
    PAGE_SIZE,
    FarCounts,
    RunCentricReader,
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
        self.refreshed: list[str] = []

    def _page(self, kind: str, rows: list[RunRecord], queue_ids: Sequence[str]) -> list[RunRecord]:
        self.pages.append((kind, tuple(queue_ids)))
        return [r for r in rows if r.queue_id in queue_ids][:PAGE_SIZE]

    async def active_runs_page(
        self, queue_ids: Sequence[str], deadline: Deadline
    ) -> list[RunRecord]:
        rows = [
            r
            for r in self.runs
            if r.state_type != "SCHEDULED" or r.state_name == "AwaitingConcurrencySlot"
        ]
        rows.sort(key=lambda r: r.expected_start or 0)
        return self._page("active", rows, queue_ids)

    async def scheduled_runs_page(
        self, until: UnixTime, queue_ids: Sequence[str], deadline: Deadline
    ) -> list[RunRecord]:
        rows = [
            r
            for r in self.runs
            if r.state_type == "SCHEDULED"
            and r.state_name != "AwaitingConcurrencySlot"
            and (r.next_scheduled_start or 0) <= until
        ]
        rows.sort(key=lambda r: r.next_scheduled_start or 0)
        return self._page("scheduled", rows, queue_ids)

    async def scheduled_counts_after(
        self, queue_id: str, after: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]:
        self.refreshed.append(queue_id)
        rows = [
            r
            for r in self.runs
            if r.queue_id == queue_id
            and r.state_type == "SCHEDULED"
            and r.state_name != "AwaitingConcurrencySlot"
            and (r.next_scheduled_start or 0) >= after
        ]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.state_name] = counts.get(r.state_name, 0) + 1
        return tuple(StateCount("SCHEDULED", n, c) for n, c in sorted(counts.items()))


def counts_of(stats_counts: Sequence[StateCount]) -> dict[str, int]:
    return {c.state_name: c.count for c in stats_counts}


class TestListByQueue:
    """Paging by exclusion lists small queues in full and names the big ones."""

    def test_fewer_runs_than_a_page_take_one_request(self) -> None:
        """Every queue is complete after one partial page."""
        fake = FakeRuns([scheduled(f"r{i}", f"q{i % 3}", NOW - i) for i in range(50)])
        listing = asyncio.run(
            list_by_queue(lambda ids: fake.scheduled_runs_page(NOW, ids, FAR), ["q0", "q1", "q2"])
        )
        assert len(fake.pages) == 1
        assert listing.incomplete == frozenset()
        assert sum(len(r) for r in listing.runs.values()) == 50

    def test_a_queue_with_more_runs_than_a_page_is_incomplete_the_others_are_listed(self) -> None:
        """5,000 due runs in one queue cost two pages, not 25, and that queue is named."""
        big = [scheduled(f"b{i}", "big", NOW - 10_000 + i) for i in range(5000)]
        small = [scheduled(f"s{i}", "small", NOW - 100 + i) for i in range(7)]
        fake = FakeRuns(big + small)
        listing = asyncio.run(
            list_by_queue(lambda ids: fake.scheduled_runs_page(NOW, ids, FAR), ["big", "small"])
        )
        assert [ids for _, ids in fake.pages] == [("big", "small"), ("small",)]
        assert listing.incomplete == frozenset({"big"})
        assert [r.id for r in listing.runs["small"]] == [f"s{i}" for i in range(7)]
        assert "big" not in listing.runs

    def test_a_server_ignoring_the_exclusion_is_malformed(self) -> None:
        """Full pages that never change would page on forever: refused instead."""
        rows = [scheduled(f"r{i}", "q", NOW - i) for i in range(PAGE_SIZE)]

        async def stubborn(queue_ids: Sequence[str]) -> list[RunRecord]:
            return rows

        with pytest.raises(MalformedResponse):
            asyncio.run(list_by_queue(stubborn, ["q", "r", "s"]))


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

    def test_without_a_slow_count_only_due_runs_are_counted(self) -> None:
        """Unknown far-ahead runs are not guessed."""
        upcoming = [scheduled("d", "q", NOW - 1), scheduled("f", "q", NOW + 100)]
        stats = queue_stats([], upcoming, None, NOW)
        assert counts_of(stats.counts) == {"Scheduled": 1}
        assert stats.due_scheduled == 1


class TestRunCentricReader:
    """Listings and the slow round together, with the per-queue path left for big queues."""

    def workspace(self) -> FakeRuns:
        runs = [scheduled(f"big{i}", "big", NOW - 5000 + i) for i in range(450)]
        runs += [scheduled(f"far{i}", "idle", NOW + 7200 + i) for i in range(30)]
        runs += [run("p", "busy", "PENDING", "Pending", NOW - 30, NOW - 60)]
        runs += [scheduled("soon", "busy", NOW + 60), scheduled("late", "busy", NOW - 10, "Late")]
        return FakeRuns(runs)

    def test_every_small_queue_is_exact_and_the_big_one_is_left_over(self) -> None:
        """Stats for busy and idle equal the truth; big goes to the per-queue path."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        result = asyncio.run(reader.read(["big", "busy", "idle"], NOW, FAR, refresh_limit=10))
        assert result.incomplete == frozenset({"big"})
        assert set(result.stats) == {"busy", "idle"}
        assert counts_of(result.stats["idle"].counts) == {"Scheduled": 30}
        busy = result.stats["busy"]
        assert counts_of(busy.counts) == {"Pending": 1, "Scheduled": 1, "Late": 1}
        assert busy.due_scheduled == 1
        assert busy.oldest_due_scheduled == NOW - 10
        assert result.far_counts_missing == 0

    def test_the_slow_round_reads_each_queue_once_until_it_is_due_again(self) -> None:
        """Far-ahead counts are read on the first poll and not again within the refresh time."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        asyncio.run(reader.read(["big", "busy", "idle"], NOW, FAR, refresh_limit=10))
        assert sorted(fake.refreshed) == ["big", "busy", "idle"]
        fake.refreshed.clear()
        later = UnixTime(NOW + 600)
        asyncio.run(reader.read(["big", "busy", "idle"], later, FAR, refresh_limit=10))
        assert fake.refreshed == []
        much_later = UnixTime(NOW + 1900)
        asyncio.run(reader.read(["big", "busy", "idle"], much_later, FAR, refresh_limit=1))
        assert len(fake.refreshed) == 1

    def test_with_no_budget_for_the_slow_round_the_gap_is_reported(self) -> None:
        """Queues without far-ahead counts are counted as missing them, not zeroed."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        result = asyncio.run(reader.read(["busy", "idle"], NOW, FAR, refresh_limit=0))
        assert fake.refreshed == []
        assert result.far_counts_missing == 2
        assert counts_of(result.stats["idle"].counts) == {}

    def test_the_listing_window_reaches_the_cuts(self) -> None:
        """Scheduled runs are listed up to an hour ahead, so nothing falls between."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        asyncio.run(reader.read(["busy", "idle"], NOW, FAR, refresh_limit=10))
        assert fake.pages[-1][0] == "scheduled"
        later = UnixTime(NOW + 100)
        result = asyncio.run(reader.read(["busy", "idle"], later, FAR, refresh_limit=0))
        # "soon" is due at NOW + 60: now due, still counted once.
        assert counts_of(result.stats["busy"].counts) == {"Pending": 1, "Scheduled": 1, "Late": 1}
        assert result.stats["busy"].due_scheduled == 2
        assert HORIZON_SECONDS > 100

    def test_a_deleted_queue_is_forgotten(self) -> None:
        """Slow counts of queues that are gone are dropped (memory stays bounded)."""
        fake = self.workspace()
        reader = RunCentricReader(fake, concurrency=4)
        asyncio.run(reader.read(["busy", "idle"], NOW, FAR, refresh_limit=10))
        asyncio.run(reader.read(["busy"], NOW, FAR, refresh_limit=10))
        assert reader.refresh_wanted(["idle"], NOW) == ["idle"]
