"""Tests for the event cursor and the transition tracker."""

from __future__ import annotations

from pathlib import Path

import structlog

from exporter.records import FlowRunEvent, StateName
from exporter.statefile import StateFile
from exporter.transitions import Cursor, TransitionTracker


def event(eid: str, at: float, run: str, name: str, pool: str = "p") -> FlowRunEvent:
    return FlowRunEvent(eid, at, run, StateName(name).state_type, name, pool)


class TestCursor:
    """The cursor neither skips nor double counts, across pages, duplicates and restarts."""

    def test_events_at_the_cursor_time_are_deduplicated_by_id(self) -> None:
        """`since` is inclusive: an event already counted at the boundary is not counted again."""
        cursor = Cursor(0).advance(
            [event("a", 10, "r1", "Pending"), event("b", 10, "r2", "Pending")]
        )
        page = [
            event("b", 10, "r2", "Pending"),
            event("c", 10, "r3", "Pending"),
            event("d", 11, "r4", "Pending"),
        ]
        assert [e.id for e in cursor.unseen(page)] == ["c", "d"]

    def test_a_page_boundary_inside_a_burst_loses_nothing(self) -> None:
        """Three events at one instant split over two reads are each counted once."""
        burst = [event(x, 5, x, "Pending") for x in ("a", "b", "c")]
        tracker = TransitionTracker(Cursor(0))
        tracker.consume(burst[:2], {})
        tracker.consume(burst, {})  # the next read starts at the same instant
        assert tracker.stats(100, False).transitions[("p", "Pending")] == 3

    def test_a_saved_cursor_resumes_without_double_counting(self, tmp_path: Path) -> None:
        """After a restart from the state file, old events are skipped, new ones counted."""
        file = StateFile(tmp_path / "cursor.json", "events", structlog.get_logger())
        first = TransitionTracker(Cursor(0))
        first.consume([event("a", 5, "r1", "Pending"), event("b", 6, "r1", "Running")], {})
        assert first.cursor.save(file)
        loaded = Cursor.load(file)
        assert loaded == first.cursor
        second = TransitionTracker(loaded or Cursor(0))
        second.consume([event("b", 6, "r1", "Running"), event("c", 7, "r2", "Pending")], {})
        assert second.stats(10, False).transitions == {("p", "Pending"): 1}

    def test_an_unreadable_state_file_means_no_cursor(self, tmp_path: Path) -> None:
        """A corrupt file is ignored rather than crashing start-up."""
        (tmp_path / "cursor.json").write_text("{not json")
        log = structlog.get_logger()
        assert Cursor.load(StateFile(tmp_path / "cursor.json", "events", log)) is None
        assert Cursor.load(StateFile(tmp_path / "missing.json", "events", log)) is None


class TestTracker:
    """Each run's pickup and start delay is observed once."""

    def test_delays_are_measured_from_schedule_and_pending(self) -> None:
        """Scheduled at 100, Pending at 130, Running at 132: pickup 30 s, start 2 s."""
        tracker = TransitionTracker(Cursor(0))
        tracker.consume([event("a", 130, "r1", "Pending")], {"r1": 100.0})
        tracker.consume([event("b", 132, "r1", "Running")], {})
        stats = tracker.stats(200, False)
        assert stats.pickup["p"].count == 1
        assert stats.pickup["p"].total == 30
        assert stats.start["p"].total == 2
        assert stats.lag_seconds == 68

    def test_events_of_pools_not_watched_move_the_cursor_but_count_nothing(self) -> None:
        """A shard counts its own pools' events only, and never reads the others again."""
        tracker = TransitionTracker(Cursor(0))
        tracker.consume(
            [event("a", 130, "r1", "Pending", pool="other"), event("b", 131, "r2", "Pending")],
            {"r1": 100.0, "r2": 101.0},
            counted=lambda pool: pool == "p",
        )
        stats = tracker.stats(200, False)
        assert set(stats.pickup) == {"p"}
        assert stats.transitions == {("p", "Pending"): 1}
        assert tracker.cursor.occurred == 131

    def test_retries_do_not_observe_a_run_twice(self) -> None:
        """A second Pending and Running of the same run counts as transitions only."""
        tracker = TransitionTracker(Cursor(0))
        tracker.consume(
            [
                event("a", 10, "r1", "Pending"),
                event("b", 11, "r1", "Running"),
                event("c", 20, "r1", "Pending"),
                event("d", 21, "r1", "Running"),
            ],
            {"r1": 5.0},
        )
        stats = tracker.stats(30, False)
        assert stats.pickup["p"].count == 1
        assert stats.start["p"].count == 1
        assert stats.transitions[("p", "Running")] == 2

    def test_early_claims_count_as_zero_delay(self) -> None:
        """Prefetch makes Pending precede the schedule; the delay is clamped at 0."""
        tracker = TransitionTracker(Cursor(0))
        tracker.consume([event("a", 95, "r1", "Pending")], {"r1": 100.0})
        assert tracker.stats(100, False).pickup["p"].total == 0

    def test_first_pendings_lists_only_unobserved_runs(self) -> None:
        """Expected starts are looked up only for runs not yet observed."""
        tracker = TransitionTracker(Cursor(0))
        tracker.consume([event("a", 10, "r1", "Pending")], {"r1": 5.0})
        fresh = [event("a", 10, "r1", "Pending"), event("b", 12, "r2", "Pending")]
        assert [e.flow_run_id for e in tracker.first_pendings(fresh)] == ["r2"]
