"""`prefect-exporter diagnose` against a real server with real process workers: one pool per cause.

One server for the module. Each pool is set up for one cause (paused pool, paused queue, pool
limit, queue limit, deployment limit, a tag slot leaked by a killed flow-run process, no worker,
a worker on the wrong queue), plus runs whose queue was deleted, 429s through the fault proxy and
a healthy pool; each test runs the real command once, narrowed with --work-pool, and checks the
first finding and its fix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from demo.stack import (
    ROOT,
    PrefectAdmin,
    PrefectServer,
    Worker,
    flow_run_pids,
    past,
    wait_for,
)
from tests.faultproxy import Fault, FaultProxy, Once

pytestmark = pytest.mark.integration

LONG = {"seconds": 240}  # runs that hold their slot for the whole module
COMMAND = str(ROOT / ".venv" / "bin" / "prefect-exporter")


def env(api_url: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PREFECT_API_URL": api_url}


@dataclass
class Stack:
    server: PrefectServer
    admin: PrefectAdmin
    deplim_id: str
    tagged_runs: list[str]


def diagnose(api_url: str, *args: str) -> tuple[int, dict[str, Any]]:
    """The real command with --json; its exit code and document."""
    result = subprocess.run(
        [COMMAND, "diagnose", "--json", *args],
        env=env(api_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def first(document: dict[str, Any]) -> dict[str, Any]:
    finding: dict[str, Any] = document["findings"][0]
    return finding


def runs_in(admin: PrefectAdmin, pool: str, *state_types: str) -> int:
    return admin.count(
        {
            "work_pools": {"name": {"any_": [pool]}},
            "flow_runs": {"state": {"type": {"any_": list(state_types)}}},
        }
    )


@pytest.fixture(scope="module")
def stack(prefect_server: PrefectServer) -> Iterator[Stack]:
    admin = PrefectAdmin(prefect_server.api_url)
    due = past(60)
    # Pools that need a worker first, so the workers start while the rest is seeded.
    admin.create_pool("dx-paused-queue")
    admin.create_queue("dx-paused-queue", "held")
    admin.request("PATCH", "work_pools/dx-paused-queue/queues/held", {"is_paused": True})
    held = admin.create_deployment("dx-held", "dx-paused-queue", "held")
    admin.create_pool("dx-pool-limit", concurrency_limit=1)
    burst = admin.create_deployment("dx-burst", "dx-pool-limit", "default")
    admin.create_pool("dx-queue-limit")
    admin.create_queue("dx-queue-limit", "capped", concurrency_limit=1)
    capped = admin.create_deployment("dx-capped", "dx-queue-limit", "capped")
    admin.create_pool("dx-deplim")
    deplim = admin.create_deployment("dx-one", "dx-deplim", "default", concurrency_limit=1)
    admin.create_pool("dx-tags")
    tagged = admin.create_deployment("dx-tagged", "dx-tags", "default", flow="tagged")
    admin.create_tag_limit("demo-tag", 1)
    admin.create_pool("dx-wrong-queue")
    admin.create_queue("dx-wrong-queue", "high")
    high = admin.create_deployment("dx-high", "dx-wrong-queue", "high")
    admin.create_pool("dx-healthy")
    workers = [
        Worker(prefect_server, pool, f"w-{pool}", queues=queues)
        for pool, queues in (
            ("dx-paused-queue", []),
            ("dx-pool-limit", []),
            ("dx-queue-limit", []),
            ("dx-deplim", []),
            ("dx-tags", []),
            ("dx-wrong-queue", ["default"]),
            ("dx-healthy", []),
        )
    ]
    for worker in workers:
        worker.start()
    admin.create_runs(held, 2, scheduled=due)
    admin.create_runs(burst, 4, scheduled=due, parameters=LONG)
    admin.create_runs(capped, 4, scheduled=due, parameters=LONG)
    admin.create_runs(deplim, 3, scheduled=due, parameters=LONG)
    tagged_runs = admin.create_runs(tagged, 2, scheduled=due, parameters={"seconds": 120})
    admin.create_runs(high, 2, scheduled=due)
    # Pools without a worker.
    admin.create_pool("dx-paused-pool", paused=True)
    paused = admin.create_deployment("dx-paused", "dx-paused-pool", "default")
    admin.create_runs(paused, 2, scheduled=due)
    admin.create_pool("dx-no-worker")
    lonely = admin.create_deployment("dx-lonely", "dx-no-worker", "default")
    admin.create_runs(lonely, 2, scheduled=due)
    # Runs whose queue is deleted under them: more than any other scenario holds back.
    admin.create_pool("dx-orphans")
    admin.create_queue("dx-orphans", "doomed")
    doomed = admin.create_deployment("dx-doomed", "dx-orphans", "doomed")
    admin.create_runs(doomed, 30, scheduled=due)
    admin.request("DELETE", "work_pools/dx-orphans/queues/doomed")
    yield Stack(prefect_server, admin, deplim, tagged_runs)
    for worker in workers:
        worker.kill()
    admin.close()


class TestPools:
    """A pool or queue that nothing may take runs from."""

    def test_paused_pool(self, stack: Stack) -> None:
        """Paused with two due runs (and no worker): pool_paused first, resume is the fix."""
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-paused-pool")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["runs"]) == ("pool_paused", 2)
        assert finding["fix"] == "prefect work-pool resume dx-paused-pool"

    def test_paused_queue(self, stack: Stack) -> None:
        """A worker polls the pool, the queue `held` is paused: resume the queue."""
        wait_for(
            lambda: stack.admin.workers("dx-paused-queue"), 60, "the worker of dx-paused-queue"
        )
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-paused-queue")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["work_queue"], finding["runs"]) == (
            "queue_paused",
            "held",
            2,
        )
        assert finding["fix"] == "prefect work-queue resume held --pool dx-paused-queue"


class TestWorkers:
    """Nobody to take the runs."""

    def test_no_worker(self, stack: Stack) -> None:
        """Two due runs and no worker ever: start one."""
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-no-worker")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["runs"]) == ("no_online_worker", 2)
        assert finding["fix"] == "prefect worker start --pool dx-no-worker"

    def test_worker_on_the_wrong_queue(self, stack: Stack) -> None:
        """The worker polls `default`; `high` holds the runs: start one for `high`."""

        def default_polled() -> bool:
            return any(
                q["work_pool_name"] == "dx-wrong-queue"
                and q["name"] == "default"
                and q["last_polled"]
                for q in stack.admin.queues()
            )

        wait_for(default_polled, 60, "the worker to poll dx-wrong-queue/default")
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-wrong-queue")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["work_queue"], finding["runs"]) == (
            "queue_not_polled",
            "high",
            2,
        )
        assert finding["evidence"]["polled_queues"] == ["default"]
        assert finding["fix"] == "prefect worker start --pool dx-wrong-queue --work-queue high"


class TestLimits:
    """Runs held by a pool, queue, deployment or tag limit."""

    def test_pool_limit(self, stack: Stack) -> None:
        """Limit 1, one run in flight, three due: raise the limit to admit them."""
        wait_for(
            lambda: runs_in(stack.admin, "dx-pool-limit", "PENDING", "RUNNING") == 1,
            90,
            "one run in flight in dx-pool-limit",
        )
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-pool-limit")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["runs"]) == ("pool_concurrency_limit", 3)
        assert finding["evidence"]["in_flight_runs"] == 1
        assert finding["fix"] == "prefect work-pool set-concurrency-limit dx-pool-limit 4"

    def test_queue_limit(self, stack: Stack) -> None:
        """Queue `capped` with limit 1: raise the queue's limit."""
        wait_for(
            lambda: runs_in(stack.admin, "dx-queue-limit", "PENDING", "RUNNING") == 1,
            90,
            "one run in flight in dx-queue-limit",
        )
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-queue-limit")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["work_queue"], finding["runs"]) == (
            "queue_concurrency_limit",
            "capped",
            3,
        )
        assert finding["fix"] == (
            "prefect work-queue set-concurrency-limit capped 4 --pool dx-queue-limit"
        )

    def test_deployment_limit(self, stack: Stack) -> None:
        """Deployment limit 1: two runs AwaitingConcurrencySlot; raise that limit."""

        def awaiting() -> bool:
            waiting = stack.admin.count(
                {
                    "work_pools": {"name": {"any_": ["dx-deplim"]}},
                    "flow_runs": {"state": {"name": {"any_": ["AwaitingConcurrencySlot"]}}},
                }
            )
            return waiting == 2

        wait_for(awaiting, 90, "two runs awaiting a deployment slot")
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-deplim")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["runs"]) == ("deployment_concurrency_limit", 2)
        assert finding["evidence"]["deployments"] == ["quick/dx-one"]
        assert finding["fix"] == f"prefect gcl update deployment:{stack.deplim_id} --limit 3"

    def test_tag_slot_leaked_by_a_killed_flow_run(self, stack: Stack) -> None:
        """The holder's process is killed: its slot leaks while the other run waits; reset."""
        admin = stack.admin

        def holder() -> str | None:
            (limit,) = admin.request("POST", "concurrency_limits/filter", {})
            if not limit["active_slots"]:
                return None
            task = admin.request("GET", f"task_runs/{limit['active_slots'][0]}")
            return str(task["flow_run_id"])

        holding = wait_for(holder, 120, "a task to hold the demo-tag slot")
        (waiting,) = [r for r in stack.tagged_runs if r != holding]
        wait_for(
            lambda: admin.request("GET", f"flow_runs/{waiting}")["state_type"] == "RUNNING",
            60,
            "the other run to wait inside its flow",
        )
        for pid in wait_for(lambda: flow_run_pids(holding), 30, "the holder's process"):
            os.kill(pid, signal.SIGKILL)
        wait_for(
            lambda: admin.request("GET", f"flow_runs/{holding}")["state_type"] == "CRASHED",
            30,
            "the killed run to be marked Crashed",
        )
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-tags")
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["work_pool"], finding["runs"]) == (
            "leaked_concurrency_slots",
            "dx-tags",
            1,
        )
        assert finding["evidence"]["leaked_slots"] == 1
        assert finding["fix"] == "prefect concurrency-limit reset demo-tag"


class TestWorkspace:
    """What no pool shows: runs whose queue was deleted, and the API throttling the read."""

    def test_runs_whose_queue_was_deleted(self, stack: Stack) -> None:
        """Thirty runs lost their queue: the first finding of the whole workspace."""
        code, document = diagnose(stack.server.api_url)
        finding = first(document)
        assert code == 1
        assert (finding["cause"], finding["work_pool"], finding["work_queue"]) == (
            "runs_without_work_queue",
            None,
            "doomed",
        )
        assert finding["runs"] == document["runs_without_work_queue"] == 30
        assert finding["evidence"]["deployments"] == ["quick/dx-doomed"]
        assert finding["fix"] == f"prefect flow-run delete {finding['evidence']['run_ids'][0]}"

    def test_throttled_read(self, stack: Stack) -> None:
        """One 429 with Retry-After 1 through the proxy: obeyed, retried, reported first."""
        proxy = FaultProxy(
            stack.server.api_url.removesuffix("/api"),
            Once("exporter", "/work_pools/filter", Fault(429, {"Retry-After": "1"})),
        )
        proxy.start()
        try:
            code, document = diagnose(proxy.url + "/api", "--work-pool", "dx-healthy")
        finally:
            proxy.stop()
        finding = first(document)
        assert code == 1
        assert [f["cause"] for f in document["findings"]] == ["api_rate_limited"]
        assert finding["evidence"]["throttled_responses"] == 1
        assert finding["evidence"]["retry_after_seconds"] == 1.0
        assert len(proxy.injected("exporter")) == 1
        assert finding["fix"] == (
            "PREFECT_WORKER_QUERY_SECONDS=30 prefect worker start --pool dx-healthy"
        )

    def test_healthy_pool(self, stack: Stack) -> None:
        """An online worker and nothing due: `none`, exit 0, in the table as well."""
        wait_for(lambda: stack.admin.workers("dx-healthy"), 60, "the worker of dx-healthy")
        code, document = diagnose(stack.server.api_url, "--work-pool", "dx-healthy")
        assert code == 0
        assert [f["cause"] for f in document["findings"]] == ["none"]
        assert document["work_pools"][0]["online_workers"] == 1
        table = subprocess.run(
            [COMMAND, "diagnose", "--work-pool", "dx-healthy"],
            env=env(stack.server.api_url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert table.returncode == 0
        assert ": healthy" in table.stdout.splitlines()[0]
