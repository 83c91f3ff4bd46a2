"""Tests for building a Snapshot from one poll's records."""

from __future__ import annotations

from exporter.records import (
    KNOWN_STATE_NAMES,
    PollRecords,
    PoolRecord,
    QueueRecord,
    QueueRunStats,
    StateCount,
    WorkerRecord,
)
from exporter.snapshot import build_snapshot

NOW = 1_800_000_000.0


def pool(name: str = "p", status: str | None = "READY") -> PoolRecord:
    return PoolRecord(
        name=name, type="process", status=status, is_paused=False, concurrency_limit=None
    )


def queue(qid: str = "q1", name: str = "default", pool_name: str = "p") -> QueueRecord:
    return QueueRecord(
        id=qid,
        name=name,
        pool=pool_name,
        status="READY",
        is_paused=False,
        priority=1,
        concurrency_limit=None,
        last_polled=NOW - 5,
    )


def stats(**overrides: object) -> QueueRunStats:
    values: dict[str, object] = {
        "counts": (),
        "due_scheduled": 0,
        "oldest_due_scheduled": None,
        "oldest_awaiting_slot": None,
        "oldest_pending_since": None,
    }
    values.update(overrides)
    return QueueRunStats(**values)  # type: ignore[arg-type]


class TestWorkers:
    """A worker is online while its heartbeat is within the multiple of its own interval."""

    def test_recent_heartbeat_is_online_and_counted_for_its_pool(self) -> None:
        """A heartbeat 80 s ago with a 30 s interval is within 3 intervals."""
        records = PollRecords(NOW, (pool(),), (), (WorkerRecord("p", "w", NOW - 80, 30.0),))
        snapshot = build_snapshot(records, heartbeat_multiple=3)
        assert snapshot.workers[0].online
        assert snapshot.pools[0].online_workers == 1

    def test_stale_heartbeat_is_offline(self) -> None:
        """A heartbeat 16 s ago with a 5 s interval is beyond 3 intervals."""
        records = PollRecords(NOW, (pool(),), (), (WorkerRecord("p", "w", NOW - 16, 5.0),))
        snapshot = build_snapshot(records, heartbeat_multiple=3)
        assert not snapshot.workers[0].online
        assert snapshot.pools[0].online_workers == 0

    def test_missing_interval_uses_prefects_30_second_default(self) -> None:
        """Without a reported interval, 30 s applies, as on the server."""
        records = PollRecords(NOW, (pool(),), (), (WorkerRecord("p", "w", NOW - 89, None),))
        assert build_snapshot(records).workers[0].online

    def test_worker_without_heartbeat_is_offline(self) -> None:
        """A worker row with no heartbeat time is never online."""
        records = PollRecords(NOW, (pool(),), (), (WorkerRecord("p", "w", None, 30.0),))
        assert not build_snapshot(records).workers[0].online


class TestQueues:
    """Backlog, state counts and oldest waits per queue."""

    def test_backlog_adds_runs_awaiting_a_concurrency_slot(self) -> None:
        """AwaitingConcurrencySlot runs are due even though their next start moved ahead."""
        counts = (
            StateCount("SCHEDULED", "Scheduled", 4),
            StateCount("SCHEDULED", "AwaitingConcurrencySlot", 2),
        )
        records = PollRecords(
            NOW, (pool(),), (queue(),), (), {"q1": stats(counts=counts, due_scheduled=3)}
        )
        assert build_snapshot(records).queues[0].backlog == 5

    def test_every_known_state_is_exported_and_custom_names_are_kept(self) -> None:
        """The closed set of state names is always present; a custom name is added."""
        counts = (StateCount("RUNNING", "Running", 2), StateCount("PENDING", "Warming", 1))
        records = PollRecords(NOW, (pool(),), (queue(),), (), {"q1": stats(counts=counts)})
        by_state = dict(build_snapshot(records).queues[0].runs_by_state)
        assert set(KNOWN_STATE_NAMES) <= set(by_state)
        assert by_state["Running"] == 2
        assert by_state["Warming"] == 1
        assert by_state["Scheduled"] == 0

    def test_oldest_due_is_the_earlier_of_scheduled_and_awaiting_slot(self) -> None:
        """The oldest due run may be one held by a deployment limit."""
        records = PollRecords(
            NOW,
            (pool(),),
            (queue(),),
            (),
            {"q1": stats(oldest_due_scheduled=NOW - 10, oldest_awaiting_slot=NOW - 300)},
        )
        assert build_snapshot(records).queues[0].oldest_due == NOW - 300

    def test_no_waiting_runs_means_no_oldest_timestamp(self) -> None:
        """An empty queue has no oldest due or pending run (absent, not zero)."""
        records = PollRecords(NOW, (pool(),), (queue(),), (), {"q1": stats()})
        q = build_snapshot(records).queues[0]
        assert q.oldest_due is None
        assert q.oldest_pending_since is None
        assert q.backlog == 0

    def test_queues_are_sorted_by_pool_and_name(self) -> None:
        """Output order is stable whatever order the API answered in."""
        records = PollRecords(
            NOW,
            (pool("a"), pool("b")),
            (queue("2", "z", "b"), queue("1", "a", "b"), queue("3", "m", "a")),
            (),
        )
        names = [(q.pool, q.name) for q in build_snapshot(records).queues]
        assert names == [("a", "m"), ("b", "a"), ("b", "z")]

    def test_pool_in_flight_is_the_sum_of_its_queues(self) -> None:
        """Pending and Running runs of every queue count towards the pool, other states not."""
        counts = (
            StateCount("PENDING", "Pending", 1),
            StateCount("RUNNING", "Running", 2),
            StateCount("SCHEDULED", "Scheduled", 9),
        )
        records = PollRecords(
            NOW,
            (pool(),),
            (queue("1", "a"), queue("2", "b")),
            (),
            {"1": stats(counts=counts), "2": stats(counts=counts[1:])},
        )
        snapshot = build_snapshot(records)
        assert [q.in_flight for q in snapshot.queues] == [3, 2]
        assert snapshot.pools[0].in_flight == 5
