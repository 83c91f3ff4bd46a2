"""End-to-end for "which limit holds my runs?": real server, real process workers, real flows.

Pool, deployment and tag limits, a slot leaked by a killed flow-run process, and latency
histograms compared with the runs' own state timestamps.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from demo.stack import (
    ExporterProcess,
    PrefectAdmin,
    PrefectServer,
    Worker,
    flow_run_pids,
    past,
    wait_for,
)
from exporter.prefect_parse import to_timestamp

pytestmark = pytest.mark.integration

POLL_INTERVAL = 2.0
BURST = 6


@dataclass
class Stack:
    server: PrefectServer
    admin: PrefectAdmin
    exporter: ExporterProcess
    burst_runs: list[str]
    tagged_run: str


@pytest.fixture(scope="module")
def stack(prefect_server: PrefectServer) -> Iterator[Stack]:
    admin = PrefectAdmin(prefect_server.api_url)
    admin.create_pool("limited", concurrency_limit=2)
    burst = admin.create_deployment("burst", "limited", "default")
    admin.create_pool("deplim")
    one = admin.create_deployment("one-at-a-time", "deplim", "default", concurrency_limit=1)
    admin.create_pool("tags")
    tagged = admin.create_deployment("tagged-dep", "tags", "default", flow="tagged")
    admin.create_tag_limit("demo-tag", 1)
    exporter = ExporterProcess(
        prefect_server.api_url,
        f"--poll.interval={POLL_INTERVAL}s",
        "--prefect.requests-per-minute=6000",
        "--events.settle=15s",  # Prefect stores events in batches; see --events.settle
        "--deployments.breakdown",
        log_path=prefect_server.home / "exporter-limits.log",
    )
    exporter.start()  # before the runs, so the event reader sees every transition
    workers = [Worker(prefect_server, pool, f"w-{pool}") for pool in ("limited", "deplim", "tags")]
    for worker in workers:
        worker.start()
    burst_runs = admin.create_runs(burst, BURST, scheduled=past(5), parameters={"seconds": 6})
    admin.create_runs(one, 3, scheduled=past(5), parameters={"seconds": 15})
    tagged_run = admin.create_runs(tagged, 1, parameters={"seconds": 120})[0]
    yield Stack(prefect_server, admin, exporter, burst_runs, tagged_run)
    exporter.stop()
    for worker in workers:
        worker.kill()
    admin.close()


class TestPoolLimit:
    """A pool limit of 2 with a burst: backlog waits while in-flight stays at the limit."""

    def test_in_flight_never_exceeds_the_limit_while_the_backlog_waits(self, stack: Stack) -> None:
        """Saturation is visible: in-flight 2 of 2, the rest in the backlog."""
        e = stack.exporter

        def saturated() -> bool:
            return (
                e.value("prefect_work_pool_in_flight_runs", work_pool="limited") == 2
                and (
                    e.value(
                        "prefect_work_queue_backlog_runs", work_pool="limited", work_queue="default"
                    )
                    or 0
                )
                >= 1
            )

        wait_for(saturated, 90, "the pool to be saturated with a backlog")
        assert e.value("prefect_work_pool_concurrency_limit", work_pool="limited") == 2
        for _ in range(5):
            assert (e.value("prefect_work_pool_in_flight_runs", work_pool="limited") or 0) <= 2


class TestDeploymentLimit:
    """A deployment limit of 1 with three runs: 1/1 slots, the others AwaitingConcurrencySlot."""

    def test_slots_and_awaiting_runs(self, stack: Stack) -> None:
        """The limit is named after the deployment, and waiting runs are counted."""
        e = stack.exporter
        name = "deployment:quick/one-at-a-time"
        labels = {"limit": name, "kind": "deployment", "deployment": "quick/one-at-a-time"}

        def held() -> bool:
            waiting = (
                e.value(
                    "prefect_work_queue_flow_runs",
                    work_pool="deplim",
                    work_queue="default",
                    state="AwaitingConcurrencySlot",
                )
                or 0
            )
            return e.value("prefect_concurrency_limit_active_slots", **labels) == 1 and waiting >= 1

        wait_for(held, 120, "one slot taken and runs awaiting a slot")
        assert e.value("prefect_concurrency_limit_slots", **labels) == 1
        assert e.value("prefect_concurrency_limit_enabled", **labels) == 1
        assert e.value("prefect_concurrency_limit_leaked_slots", limit=name, kind="deployment") == 0
        assert (
            e.value(
                "prefect_deployment_awaiting_concurrency_slot_runs",
                deployment="quick/one-at-a-time",
            )
            or 0
        ) >= 1
        assert (
            e.value(
                "prefect_work_queue_oldest_awaiting_slot_run_timestamp_seconds",
                work_pool="deplim",
                work_queue="default",
            )
            is not None
        )


class TestTagLimit:
    """A tag limit held by a running task, then leaked when its flow-run process is killed."""

    def test_held_then_leaked(self, stack: Stack) -> None:
        """Active slots 1 while the task runs; leaked 1 once the flow run crashed under it."""
        e = stack.exporter
        labels = {"limit": "tag:demo-tag", "kind": "tag", "deployment": ""}
        wait_for(
            lambda: e.value("prefect_concurrency_limit_active_slots", **labels) == 1,
            120,
            "the tag slot to be taken",
        )
        assert e.value("prefect_concurrency_limit_slots", **labels) == 1
        assert (
            e.value("prefect_concurrency_limit_leaked_slots", limit="tag:demo-tag", kind="tag") == 0
        )
        assert (
            e.value(
                "prefect_work_queue_oldest_running_run_timestamp_seconds",
                work_pool="tags",
                work_queue="default",
            )
            is not None
        )

        pids = wait_for(lambda: flow_run_pids(stack.tagged_run), 30, "the flow-run process")
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        # The worker marks the run Crashed; the task run stays Running and keeps its slot
        # until its lease expires (about a minute): that is a leaked slot.
        wait_for(
            lambda: (
                e.value("prefect_concurrency_limit_leaked_slots", limit="tag:demo-tag", kind="tag")
                == 1
            ),
            45,
            "the leaked slot",
        )


def state_times(admin: PrefectAdmin, run_id: str) -> dict[str, float]:
    """First time the run entered each state name, from its own state history."""
    states: list[dict[str, Any]] = admin.request("GET", f"flow_run_states/?flow_run_id={run_id}")
    first: dict[str, float] = {}
    for state in sorted(states, key=lambda s: s["timestamp"]):
        first.setdefault(state["name"], to_timestamp(state["timestamp"], "x") or 0.0)
    return first


class TestLatency:
    """Histograms observe each started run once, with the runs' own timestamps."""

    def test_counts_and_sums_match_the_runs_state_history(self, stack: Stack) -> None:
        """Counts equal the runs started; sums equal their Pending/Running/schedule gaps."""
        admin, e = stack.admin, stack.exporter
        wait_for(
            lambda: all(
                admin.request("GET", f"flow_runs/{r}")["state_type"] == "COMPLETED"
                for r in stack.burst_runs
            ),
            180,
            "the burst to complete",
        )
        pool = {"work_pool": "limited"}
        wait_for(
            lambda: e.value("prefect_flow_run_start_delay_seconds_count", **pool) == BURST,
            30,
            "every started run to be observed",
        )
        assert e.value("prefect_flow_run_pickup_delay_seconds_count", **pool) == BURST

        pickup = start = 0.0
        for run_id in stack.burst_runs:
            run = admin.request("GET", f"flow_runs/{run_id}")
            times = state_times(admin, run_id)
            expected = to_timestamp(run["expected_start_time"], "x") or 0.0
            pickup += max(0.0, times["Pending"] - expected)
            start += times["Running"] - times["Pending"]
        # Events carry the same timestamps as the states; allow float noise only.
        assert e.value("prefect_flow_run_start_delay_seconds_sum", **pool) == pytest.approx(
            start, abs=0.01
        )
        assert e.value("prefect_flow_run_pickup_delay_seconds_sum", **pool) == pytest.approx(
            pickup, abs=0.01
        )
        completed = {"work_pool": "limited", "state": "Completed"}
        wait_for(
            lambda: e.value("prefect_flow_run_state_transitions_total", **completed) == BURST,
            60,
            "every completion counted",
        )
        assert e.value("prefect_exporter_events_behind") == 0
