"""Tests for the poll loop against a fake API adapter."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_api import ApiStatusError, MalformedResponse
from exporter.records import PoolRecord, QueueRecord, QueueRunStats, WorkerRecord
from exporter.snapshot import Snapshot

NOW = 1_800_000_000.0
SETTINGS = PollSettings(interval=30, timeout=5, concurrency=2, heartbeat_multiple=3)


class FakeApi:
    requests_sent = 0

    def __init__(self, fail: Exception | None = None, fail_on_queue: str | None = None) -> None:
        self.fail = fail
        self.fail_on_queue = fail_on_queue
        self.stats_calls: list[str] = []

    async def work_pools(self, deadline: float) -> list[PoolRecord]:
        if self.fail:
            raise self.fail
        return [PoolRecord("p", "process", "READY", False, None)]

    async def work_queues(self, deadline: float) -> list[QueueRecord]:
        return [QueueRecord(q, q, "p", "READY", False, 1, None, None) for q in ("a", "b", "c")]

    async def workers(self, pool: str, deadline: float) -> list[WorkerRecord]:
        return [WorkerRecord(pool, "w", NOW - 1, 30.0)]

    async def queue_run_stats(self, queue_id: str, now: float, deadline: float) -> QueueRunStats:
        self.stats_calls.append(queue_id)
        if queue_id == self.fail_on_queue:
            raise MalformedResponse("flow_runs/count: expected a non-negative integer")
        return QueueRunStats((), 2, now - 60, None, None)


class FakeStore:
    def __init__(self) -> None:
        self.published: list[Snapshot] = []
        self.failures: list[str] = []

    def publish(self, snapshot: Snapshot, duration: float) -> None:
        self.published.append(snapshot)

    def record_failure(self, error: str, duration: float) -> None:
        self.failures.append(error)


def poller(api: Any, store: FakeStore, registry: CollectorRegistry) -> Poller:
    return Poller(
        api, store, SETTINGS, PollMetrics(registry), structlog.get_logger(), clock=lambda: NOW
    )


class TestPoller:
    """A poll publishes a snapshot or records why it failed."""

    def test_success_publishes_a_snapshot_of_every_queue(self) -> None:
        """All queues are read and one snapshot is published."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi()
        wait = asyncio.run(poller(api, store, registry).poll_and_publish())
        assert len(store.published) == 1
        snapshot = store.published[0]
        assert [q.backlog for q in snapshot.queues] == [2, 2, 2]
        assert snapshot.queues[0].oldest_due == NOW - 60
        assert sorted(api.stats_calls) == ["a", "b", "c"]
        assert registry.get_sample_value("prefect_exporter_polls_total", {"result": "success"}) == 1
        assert 0 < wait <= 30

    def test_a_malformed_answer_fails_the_whole_poll_and_is_counted(self) -> None:
        """No partial snapshot is published; the reason is counted."""
        store, registry = FakeStore(), CollectorRegistry()
        asyncio.run(poller(FakeApi(fail_on_queue="b"), store, registry).poll_and_publish())
        assert store.published == []
        assert "non-negative" in store.failures[0]
        assert (
            registry.get_sample_value(
                "prefect_exporter_poll_errors_total", {"reason": "malformed_response"}
            )
            == 1
        )
        assert registry.get_sample_value("prefect_exporter_polls_total", {"result": "failure"}) == 1

    def test_retry_after_delays_the_next_poll(self) -> None:
        """A 429 asking for 120 s pushes the next poll past the 30 s interval."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi(fail=ApiStatusError("/work_pools/filter", 429, retry_after=120))
        wait = asyncio.run(poller(api, store, registry).poll_and_publish())
        assert wait > 100
        assert (
            registry.get_sample_value(
                "prefect_exporter_poll_errors_total", {"reason": "http_status"}
            )
            == 1
        )

    def test_a_bug_is_caught_counted_and_survived(self) -> None:
        """An unexpected exception is counted as internal, not raised."""
        store, registry = FakeStore(), CollectorRegistry()
        asyncio.run(
            poller(FakeApi(fail=ZeroDivisionError("oops")), store, registry).poll_and_publish()
        )
        assert store.failures == ["ZeroDivisionError: oops"]
        assert (
            registry.get_sample_value("prefect_exporter_poll_errors_total", {"reason": "internal"})
            == 1
        )

    def test_every_failure_reason_exists_from_the_start(self) -> None:
        """The reason set is closed, so rate() works before the first failure."""
        registry = CollectorRegistry()
        PollMetrics(registry)
        for reason in (
            "timeout",
            "connection",
            "http_status",
            "malformed_response",
            "budget",
            "internal",
        ):
            assert (
                registry.get_sample_value("prefect_exporter_poll_errors_total", {"reason": reason})
                == 0
            )

    def test_run_stops_when_asked(self) -> None:
        """The loop polls at once and returns promptly when the stop event is set."""
        store = FakeStore()
        p = poller(FakeApi(), store, CollectorRegistry())

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(p.run(stop))
            while not store.published:
                await asyncio.sleep(0)
            stop.set()
            await asyncio.wait_for(task, timeout=5)

        asyncio.run(scenario())
        assert len(store.published) == 1
