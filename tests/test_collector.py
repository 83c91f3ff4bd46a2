"""Tests for the families built from a snapshot and from the poll status."""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from exporter.collector import OWN_FAMILIES, SNAPSHOT_FAMILIES, ExporterCollector, SnapshotCollector
from exporter.records import HistogramState, LatencyStats, LimitKind
from exporter.snapshot import (
    DeploymentHealthState,
    DeploymentState,
    DeploymentsView,
    LimitState,
    PoolState,
    QueueState,
    Snapshot,
    WorkerState,
)
from exporter.store import PollStatus
from tests.metrics_docs import documented_metrics

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


def full_snapshot() -> Snapshot:
    """A snapshot in which every family of the table has a series."""
    base = snapshot()
    return Snapshot(
        observed_at=NOW,
        pools=base.pools,
        queues=(
            QueueState(
                pool="k8s",
                name="default",
                status="READY",
                priority=1,
                concurrency_limit=4,
                last_polled=NOW - 20,
                runs_by_state=(("Running", 2),),
                backlog=6,
                oldest_due=NOW - 600,
                oldest_pending_since=NOW - 60,
                in_flight=2,
                oldest_awaiting_slot=NOW - 500,
                oldest_running_since=NOW - 30,
                oldest_cancelling_since=NOW - 10,
            ),
        ),
        workers=base.workers,
        limits=(LimitState("tag:etl", LimitKind.TAG, "", 3, 2, True, 1),),
        deployments=(DeploymentState("etl/nightly", 2, NOW - 90),),
        latency=LatencyStats(
            pickup={"k8s": HistogramState().observe(3)},
            transitions={("k8s", "Completed"): 4},
            lag_seconds=30.0,
        ),
        features=(("events", True),),
        runs_without_work_queue=3,
        deployment_health=DeploymentsView(
            (
                DeploymentHealthState(
                    name="etl/nightly",
                    paused=False,
                    active_schedules=1,
                    schedule_interval=86400.0,
                    next_run=NOW + 3600,
                    last_success=NOW - 7200,
                    last_failures=(("Crashed", NOW - 90000),),
                    last_due=NOW - 7260,
                ),
            ),
            capped=0,
        ),
        server_version="3.9.1",
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


class TestFamilyTable:
    """The collector is a loop over its table: the table is exactly what is served."""

    def test_a_full_snapshot_serves_every_family_of_the_table_in_order(self) -> None:
        """Each declared family appears once, in table order, with its type and HELP."""
        served = list(SnapshotCollector(full_snapshot()).collect())
        assert [(m.name, m.type) for m in served] == [(f.name, f.type) for f in SNAPSHOT_FAMILIES]
        for metric, family in zip(served, SNAPSHOT_FAMILIES, strict=True):
            assert metric.documentation == f"{family.help} As of the last successful poll."
            assert metric.samples, family.name

    def test_optional_groups_are_left_out_without_their_data(self) -> None:
        """No deployment breakdown and no events: those families are absent, HELP and all."""
        served = {m.name for m in SnapshotCollector(snapshot()).collect()}
        optional = {f.name for f in SNAPSHOT_FAMILIES if f.present(snapshot()) is False}
        assert "prefect_flow_run_pickup_delay_seconds" in optional
        assert "prefect_deployment_awaiting_concurrency_slot_runs" in optional
        assert served == {f.name for f in SNAPSHOT_FAMILIES} - optional

    def test_counters_are_served_with_total(self) -> None:
        """The table names a counter without `_total`; the exposition adds it."""
        text = generate_latest(registry_for(SnapshotCollector(full_snapshot()))).decode()
        assert (
            'prefect_flow_run_state_transitions_total{state="Completed",work_pool="k8s"} 4.0'
            in text
        )

    def test_family_names_are_unique(self) -> None:
        """No family is declared twice across both tables."""
        names = [f.name for f in (*SNAPSHOT_FAMILIES, *OWN_FAMILIES)]
        assert len(names) == len(set(names))


def names_in_other_modules() -> set[str]:
    """String constants of the exporter's modules other than the collector (metric names)."""
    package = Path(__file__).resolve().parent.parent / "exporter"
    found: set[str] = set()
    for path in package.glob("*.py"):
        if path.name != "collector.py":
            found |= {
                node.value
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
            }
    return found


class TestMetricsDocs:
    """docs/metrics.md and the collector's tables describe the same families."""

    def test_every_family_of_the_tables_is_documented_with_its_type_and_labels(self) -> None:
        """A family added to a table must get its row in docs/metrics.md."""
        documented = documented_metrics()
        for family in (*SNAPSHOT_FAMILIES, *OWN_FAMILIES):
            assert documented.get(family.name) == (family.type, set(family.labels)), family.name

    def test_every_documented_family_is_declared(self) -> None:
        """A documented family is in the tables, or named by the module that registers it."""
        declared = {f.name for f in (*SNAPSHOT_FAMILIES, *OWN_FAMILIES)} | names_in_other_modules()
        assert set(documented_metrics()) - declared == set()


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
