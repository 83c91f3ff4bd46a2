"""Run-centric mode against a real Prefect server: exact values, and a cost that follows runs.

The request counts asserted here are deterministic (they follow from the listings' pages), so
this is the CI smoke of the scale benchmark: a poll of 200 queues costs what a poll of 11 costs
plus one page of the queue list, and 300 more due runs in a queue already past one page cost
nothing more.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, past, wait_for
from exporter.budget import RequestBudget
from exporter.clock import Deadline, UnixTime
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import ApiMetrics, Connection, PrefectHttp
from exporter.prefect_parse import to_timestamp
from exporter.records import RunRecord

pytestmark = pytest.mark.integration

POOL = "scale"


@dataclass
class Workspace:
    server: PrefectServer
    admin: PrefectAdmin
    exporter: ExporterProcess
    hot: str  # deployment ids
    warm: str
    future: str


def queue_ids(admin: PrefectAdmin) -> dict[str, str]:
    """Every queue of the pool by name (paged: more than one page of queues here)."""
    found: dict[str, str] = {}
    offset = 0
    while True:
        page = admin.request("POST", "work_queues/filter", {"limit": 200, "offset": offset})
        found |= {q["name"]: q["id"] for q in page if q["work_pool_name"] == POOL}
        if len(page) < 200:
            return found
        offset += 200


def last_poll(workspace: Workspace) -> dict[str, Any]:
    lines = workspace.server.home.joinpath("exporter.log").read_text().splitlines()
    polls = [json.loads(line) for line in lines if '"poll_succeeded"' in line]
    poll: dict[str, Any] = polls[-1]
    return poll


def successful_polls(workspace: Workspace) -> float:
    return workspace.exporter.value("prefect_exporter_polls_total", result="success") or 0


def steady_cost(poll: dict[str, Any]) -> int:
    """A poll's core requests less its listing of runs ahead, which comes every 5 minutes."""
    return int(poll["core_requests"]) - int(poll["ahead_listing_requests"])


def settle(workspace: Workspace, polls: int = 2) -> dict[str, Any]:
    """The log line of a poll that started after everything above it happened."""
    start = successful_polls(workspace)
    wait_for(lambda: successful_polls(workspace) >= start + polls, 90, f"{polls} more polls")
    return last_poll(workspace)


@pytest.fixture(scope="module")
def workspace(prefect_server: PrefectServer) -> Iterator[Workspace]:
    admin = PrefectAdmin(prefect_server.api_url)
    admin.create_pool(POOL)
    for name in ("hot", "warm", "future", *(f"idle-{i}" for i in range(7))):
        admin.create_queue(POOL, name)
    hot = admin.create_deployment("hot", POOL, "hot")
    warm = admin.create_deployment("warm", POOL, "warm")
    future = admin.create_deployment("future", POOL, "future")
    admin.create_runs(hot, 250, scheduled=past(600))
    admin.create_runs(warm, 20, scheduled=past(60))
    admin.create_runs(future, 15, scheduled=datetime.now(UTC) + timedelta(days=2))
    exporter = ExporterProcess(
        prefect_server.api_url,
        # 8 s (the poll's deadline too): a poll of 201 queues and its slow round must fit it on
        # a busy machine.
        "--poll.interval=8s",
        "--prefect.requests-per-minute=6000",
        "--poll.mode=run-centric",
        "--no-events.enabled",
        "--log.format=json",
        log_path=prefect_server.home / "exporter.log",
    )
    exporter.start()
    yield Workspace(prefect_server, admin, exporter, hot, warm, future)
    exporter.stop()
    admin.close()


def backlog(workspace: Workspace, queue: str) -> float | None:
    return workspace.exporter.value(
        "prefect_work_queue_backlog_runs", work_pool=POOL, work_queue=queue
    )


class TestExactInRunCentricMode:
    """Listed queues and the per-queue fallback both equal the API's own answers."""

    def test_backlog_and_oldest_due_equal_the_runs_own_timestamps(
        self, workspace: Workspace
    ) -> None:
        """warm (listed in full) and hot (250 runs due at one instant: a backlog its first
        page shows, so counted by one request, its oldest from the listing) are both exact."""
        wait_for(lambda: backlog(workspace, "hot") == 250, 120, "hot backlog 250")
        assert settle(workspace, polls=1)["due_counted_queues"] == 1
        assert backlog(workspace, "warm") == 20
        ids = queue_ids(workspace.admin)
        for queue in ("hot", "warm"):
            runs = workspace.admin.runs(
                {
                    "work_pool_queues": {"id": {"any_": [ids[queue]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                    "sort": "NEXT_SCHEDULED_START_TIME_ASC",
                    "limit": 1,
                }
            )
            expected = to_timestamp(runs[0]["next_scheduled_start_time"], "test")
            served = workspace.exporter.value(
                "prefect_work_queue_oldest_due_run_timestamp_seconds",
                work_pool=POOL,
                work_queue=queue,
            )
            assert served == expected, queue
        assert workspace.exporter.value("prefect_exporter_poll_mode", mode="run-centric") == 1

    def test_runs_two_days_ahead_are_counted_by_the_slow_round(self, workspace: Workspace) -> None:
        """15 runs beyond the listing window show in the Scheduled count; nothing is missing."""
        wait_for(
            lambda: (
                workspace.exporter.value(
                    "prefect_work_queue_flow_runs",
                    work_pool=POOL,
                    work_queue="future",
                    state="Scheduled",
                )
                == 15
            ),
            120,
            "15 far-ahead runs counted",
        )
        assert backlog(workspace, "future") == 0
        wait_for(
            lambda: workspace.exporter.value("prefect_exporter_far_counts_missing_queues") == 0,
            120,
            "every queue's far-ahead counts read",
        )

    def test_a_pending_run_is_dated_by_its_own_state_timestamp(self, workspace: Workspace) -> None:
        """The listing gives the exact time the run became Pending."""
        run_id = workspace.admin.create_pending_run(POOL, "idle-0")
        state = workspace.admin.request("GET", f"flow_runs/{run_id}")["state"]
        expected = to_timestamp(state["timestamp"], "test")
        wait_for(
            lambda: (
                workspace.exporter.value(
                    "prefect_work_queue_oldest_pending_run_timestamp_seconds",
                    work_pool=POOL,
                    work_queue="idle-0",
                )
                == expected
            ),
            120,
            "the pending run's own timestamp",
        )


class TestListingPagesByRunId:
    """The real server honours the run id exclusion that pages runs sharing one time."""

    def test_a_tie_of_250_runs_pages_into_two_disjoint_pages(self, workspace: Workspace) -> None:
        """hot's 250 runs are due at one instant: the second page leaves the first's ids out."""
        wait_for(lambda: backlog(workspace, "hot") is not None, 120, "hot polled")
        hot = queue_ids(workspace.admin)["hot"]

        async def two_pages() -> tuple[list[RunRecord], list[RunRecord]]:
            http = PrefectHttp(
                Connection(workspace.server.api_url),
                ApiMetrics(CollectorRegistry()),
                RequestBudget(6000),
            )
            api = PrefectApi(http)
            now, deadline = UnixTime(time.time()), Deadline(time.monotonic() + 60)
            first = await api.scheduled_runs_page(now, [hot], None, deadline)
            times = {r.next_scheduled_start for r in first}
            assert len(times) == 1, "the runs were made due at one instant"
            after = UnixTime(min(t for t in times if t is not None) - 0.001)
            second = await api.scheduled_runs_page(
                now, [hot], after, deadline, excluded=[r.id for r in first]
            )
            await api.aclose()
            return first, second

        first, second = asyncio.run(two_pages())
        assert len(first) == 200
        assert len(second) >= 50  # 250 at least (a later test adds 300 more)
        assert not {r.id for r in first} & {r.id for r in second}


class TestCostFollowsRunsNotQueues:
    """Deterministic request counts: the CI smoke of the scale benchmark."""

    def test_more_due_runs_in_a_queue_past_one_page_cost_nothing_more(
        self, workspace: Workspace
    ) -> None:
        """250 and 550 due runs in `hot` cost the same requests per poll."""
        wait_for(lambda: backlog(workspace, "hot") == 250, 120, "hot backlog 250")
        before = steady_cost(settle(workspace))
        workspace.admin.create_runs(workspace.hot, 300, scheduled=past(300))
        wait_for(lambda: backlog(workspace, "hot") == 550, 120, "hot backlog 550")
        assert steady_cost(settle(workspace)) == before

    def test_two_hundred_queues_cost_one_more_page_than_eleven(self, workspace: Workspace) -> None:
        """Adding 190 idle queues adds the queue list's second page, and nothing per queue."""
        wait_for(
            lambda: workspace.exporter.value("prefect_exporter_far_counts_missing_queues") == 0,
            120,
            "every queue's far-ahead counts read",
        )
        before = settle(workspace)
        assert before["work_queues"] == 11  # the pool's default queue and ten more
        for i in range(190):
            workspace.admin.create_queue(POOL, f"more-{i}")
        wait_for(lambda: last_poll(workspace)["work_queues"] == 201, 120, "201 queues polled")
        # The new queues' far-ahead counts are read once (a one-off, paid from spare budget).
        wait_for(
            lambda: workspace.exporter.value("prefect_exporter_far_counts_missing_queues") == 0,
            120,
            "the new queues' far-ahead counts read",
        )
        after = settle(workspace)
        assert steady_cost(after) == steady_cost(before) + 1
