"""Tests for the store: atomic publication and bounded staleness."""

from __future__ import annotations

import time

import pytest

from exporter.snapshot import Snapshot
from exporter.store import Store


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def snap(at: float) -> Snapshot:
    return Snapshot(at, (), (), ())


class TestStore:
    """The last snapshot is served until it is older than max_staleness."""

    def test_failure_keeps_the_last_snapshot_while_fresh_enough(self) -> None:
        """After a failed poll the old snapshot is still served, with up false."""
        clock = Clock(1000)
        store: Store[str] = Store(lambda s: "rendered", 90, monotonic=clock)
        store.publish(snap(1000), 0.1)
        clock.now = 1060
        store.record_failure("boom", 2.0)
        assert not store.status().up
        assert store.status().last_success == 1000
        assert store.status().last_error == "boom"
        published = store.current()
        assert published is not None
        assert published.rendered == "rendered"

    def test_a_snapshot_older_than_max_staleness_is_dropped(self) -> None:
        """Beyond the bound, nothing Prefect-derived is served."""
        clock = Clock(1000)
        store: Store[str] = Store(lambda s: "x", 90, monotonic=clock)
        store.publish(snap(1000), 0.1)
        clock.now = 1091
        assert store.current() is None

    def test_render_runs_once_per_publication(self) -> None:
        """Rendering happens at publish time, not per read."""
        calls: list[Snapshot] = []

        def render(snapshot: Snapshot) -> int:
            calls.append(snapshot)
            return len(calls)

        store: Store[int] = Store(render, 90, monotonic=Clock(0))
        store.publish(snap(0), 0.1)
        for _ in range(5):
            store.current()
        assert len(calls) == 1

    def test_a_wall_clock_step_back_does_not_keep_a_stale_snapshot(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Age is monotonic: an hour's step back of the wall clock changes nothing."""
        mono = Clock(50)
        store: Store[str] = Store(lambda s: "x", 90, monotonic=mono)
        store.publish(snap(1000), 0.1)
        monkeypatch.setattr(time, "time", lambda: 1000.0 - 3600)
        mono.now += 91
        assert store.current() is None

    def test_a_wall_clock_step_forward_does_not_drop_a_fresh_snapshot(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """An hour's step forward leaves a snapshot of 10 s ago served."""
        mono = Clock(50)
        store: Store[str] = Store(lambda s: "x", 90, monotonic=mono)
        store.publish(snap(1000), 0.1)
        monkeypatch.setattr(time, "time", lambda: 1000.0 + 3600)
        mono.now += 10
        assert store.current() is not None

    def test_the_planned_wait_is_kept_in_the_status(self) -> None:
        """The loop's announced wait survives until the next poll's outcome replaces it."""
        clock = Clock(0)
        store: Store[str] = Store(lambda s: "x", 90, monotonic=clock)
        store.record_failure("429", 0.1)
        store.loop_waiting(600)
        assert store.status().loop_waits_until == 600
