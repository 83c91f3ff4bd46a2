"""Tests for the families built from a snapshot and from the poll status."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.snapshot import PoolState, QueueState, Snapshot, WorkerState
from exporter.store import PollStatus

NOW = 1_800_000_000.0


def snapshot() -> Snapshot:
    return Snapshot(
        observed_at=NOW,
        pools=(
            PoolState("k8s", "kubernetes", "PAUSED", 5, 1),
            PoolState("legacy", "prefect-agent", None, None, 0),
        ),
        queues=(
            QueueState(
                "k8s",
                "default",
                "READY",
                1,
                None,
                NOW - 20,
                (("Scheduled", 7), ("Running", 2)),
                6,
                NOW - 600,
                None,
            ),
        ),
        workers=(
            WorkerState("k8s", "w1", NOW - 10, 30.0, True),
            WorkerState("k8s", "w2", NOW - 500, None, False),
        ),
    )


def registry_for(*collectors: object) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return registry


class TestSnapshotCollector:
    """Prefect-derived families: closed status sets, absent optional values."""

    def test_pool_status_is_a_state_set_with_every_member(self) -> None:
        """The current status is 1, the other two are 0."""
        r = registry_for(SnapshotCollector(snapshot()))
        get = r.get_sample_value
        assert get("prefect_work_pool_status", {"work_pool": "k8s", "status": "PAUSED"}) == 1
        assert get("prefect_work_pool_status", {"work_pool": "k8s", "status": "READY"}) == 0
        assert get("prefect_work_pool_status", {"work_pool": "k8s", "status": "NOT_READY"}) == 0

    def test_a_pool_without_status_exports_all_zero(self) -> None:
        """Legacy agent pools have no status; no member is claimed."""
        r = registry_for(SnapshotCollector(snapshot()))
        for status in ("READY", "NOT_READY", "PAUSED"):
            assert (
                r.get_sample_value(
                    "prefect_work_pool_status", {"work_pool": "legacy", "status": status}
                )
                == 0
            )

    def test_unlimited_pools_have_no_limit_series(self) -> None:
        """No limit is absence, not zero (zero would mean "nothing may run")."""
        r = registry_for(SnapshotCollector(snapshot()))
        assert r.get_sample_value("prefect_work_pool_concurrency_limit", {"work_pool": "k8s"}) == 5
        assert (
            r.get_sample_value("prefect_work_pool_concurrency_limit", {"work_pool": "legacy"})
            is None
        )

    def test_queue_values(self) -> None:
        """Backlog, runs by state, oldest due and last polled are exported per queue."""
        r = registry_for(SnapshotCollector(snapshot()))
        key = {"work_pool": "k8s", "work_queue": "default"}
        assert r.get_sample_value("prefect_work_queue_backlog_runs", key) == 6
        assert r.get_sample_value("prefect_work_queue_flow_runs", {**key, "state": "Running"}) == 2
        assert (
            r.get_sample_value("prefect_work_queue_oldest_due_run_timestamp_seconds", key)
            == NOW - 600
        )
        assert (
            r.get_sample_value("prefect_work_queue_oldest_pending_run_timestamp_seconds", key)
            is None
        )
        assert (
            r.get_sample_value("prefect_work_queue_last_polled_timestamp_seconds", key) == NOW - 20
        )

    def test_worker_values(self) -> None:
        """Heartbeat, interval (when reported) and online flag per worker."""
        r = registry_for(SnapshotCollector(snapshot()))
        w1 = {"work_pool": "k8s", "worker": "w1"}
        w2 = {"work_pool": "k8s", "worker": "w2"}
        assert r.get_sample_value("prefect_worker_online", w1) == 1
        assert r.get_sample_value("prefect_worker_online", w2) == 0
        assert r.get_sample_value("prefect_worker_heartbeat_interval_seconds", w2) is None
        assert r.get_sample_value("prefect_work_pool_online_workers", {"work_pool": "k8s"}) == 1

    def test_golden_exposition_of_one_small_snapshot(self) -> None:
        """The full text of a tiny snapshot, so any change to the output is deliberate."""
        small = Snapshot(NOW, (PoolState("p", "process", "READY", None, 0),), (), ())
        text = generate_latest(registry_for(SnapshotCollector(small))).decode()
        samples = [line for line in text.splitlines() if not line.startswith("#")]
        assert samples == [
            'prefect_work_pool_info{pool_type="process",work_pool="p"} 1.0',
            'prefect_work_pool_status{status="READY",work_pool="p"} 1.0',
            'prefect_work_pool_status{status="NOT_READY",work_pool="p"} 0.0',
            'prefect_work_pool_status{status="PAUSED",work_pool="p"} 0.0',
            'prefect_work_pool_online_workers{work_pool="p"} 0.0',
            'prefect_work_pool_in_flight_runs{work_pool="p"} 0.0',
        ]
        assert "As of the last successful poll." in text


class TestExporterCollector:
    """The exporter's own gauges follow the poll status."""

    def test_before_any_success(self) -> None:
        """prefect_up is 0 and there is no last-success timestamp yet."""
        r = registry_for(ExporterCollector(PollStatus))
        assert r.get_sample_value("prefect_up") == 0
        assert r.get_sample_value("prefect_exporter_last_success_timestamp_seconds") is None

    def test_after_a_success(self) -> None:
        """prefect_up is 1 with the poll's start time and duration."""
        status = PollStatus(up=True, last_success=NOW, last_duration=0.25)
        r = registry_for(ExporterCollector(lambda: status))
        assert r.get_sample_value("prefect_up") == 1
        assert r.get_sample_value("prefect_exporter_last_success_timestamp_seconds") == NOW
        assert r.get_sample_value("prefect_exporter_poll_duration_seconds") == 0.25
