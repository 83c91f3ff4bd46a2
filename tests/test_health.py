"""Tests for /healthz's judgement: a loop that waits on purpose is alive, a stuck one is not."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from exporter.exposition import EMPTY, Exposition
from exporter.server import App
from exporter.store import Store


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def app_and_store(clock: Clock, window: float | None = 100) -> tuple[App, Store[Exposition]]:
    store: Store[Exposition] = Store(lambda s: EMPTY, 90, monotonic=clock)
    app = App(store, CollectorRegistry(), "/metrics", window, "http://p/api", clock, clock.now)
    return app, store


class TestHealth:
    """Liveness follows the poll loop, including its planned back-off waits."""

    def test_a_long_retry_after_wait_is_healthy_throughout(self) -> None:
        """A 600 s back-off with a 100 s window stays healthy until the wait is over."""
        clock = Clock(0)
        app, store = app_and_store(clock)
        store.record_failure("429", 0.5)
        store.loop_waiting(600)
        for now in (50, 101, 300, 599, 650):
            clock.now = now
            health = app.health()
            assert health.healthy, now
        assert app.health().body["status"] == "ok"

    def test_the_seconds_until_the_next_poll_are_reported(self) -> None:
        """The body says when the loop will turn again."""
        clock = Clock(0)
        app, store = app_and_store(clock)
        store.record_failure("429", 0.5)
        store.loop_waiting(600)
        clock.now = 100
        assert app.health().body["seconds_until_next_poll"] == 500

    def test_a_loop_that_does_not_turn_after_its_wait_is_stalled(self) -> None:
        """Past the planned wait plus the window, /healthz says the loop stalled."""
        clock = Clock(0)
        app, store = app_and_store(clock)
        store.record_failure("429", 0.5)
        store.loop_waiting(600)
        clock.now = 701
        health = app.health()
        assert not health.healthy
        assert health.body["status"] == "poll loop stalled"

    def test_a_poll_stuck_without_any_announced_wait_is_stalled(self) -> None:
        """A loop that never turns after start-up is unhealthy after the window."""
        clock = Clock(0)
        app, _ = app_and_store(clock)
        clock.now = 101
        assert not app.health().healthy

    def test_sidecar_only_has_no_loop_to_watch(self) -> None:
        """Without polling, /healthz is always healthy."""
        clock = Clock(0)
        app, _ = app_and_store(clock, window=None)
        clock.now = 1e6
        assert app.health().healthy
