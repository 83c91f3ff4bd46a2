"""Deployment health end to end: a real Prefect server, a real process worker, real runs that
complete, fail and crash, the real exporter over HTTP, and a real Prometheus for the alerts.

Every value is compared with the API's own answer for the runs (end times, upcoming runs,
counts); the cost of the reads is measured with 10 and 100 deployments.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry

from demo.stack import (
    FLOWS_DIR,
    ExporterProcess,
    PrefectAdmin,
    PrefectServer,
    Prometheus,
    Worker,
    flow_run_pids,
    iso,
    past,
    wait_for,
)
from exporter.budget import RequestBudget
from exporter.clock import Deadline, UnixTime
from exporter.deployments_reader import DeploymentsReader
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import ApiMetrics, Connection, PrefectHttp
from exporter.prefect_parse import to_timestamp
from exporter.records import DeploymentSelector

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
POOL = "health"  # served by a process worker
IDLE = "idle"  # no worker: scheduled runs there only pile up
FLOW = "quick"
HOUR, DAY = 3600.0, 86400.0
# The grace of PrefectDeploymentNoRecentSuccess in the end-to-end test: seconds.
E2E_GRACE = 5
EXPORTER_ARGS = (
    "--poll.interval=2s",
    "--prefect.requests-per-minute=6000",
    f"--deployments.include={FLOW}/*",
    f"--deployments.exclude={FLOW}/excluded",
)
# Exported by EXPORTER_ARGS, by name: all the deployments below but `excluded`.
EXPORTED = (
    "crashing",
    "cron",
    "cron-twice",
    "cron-twohours",
    "cron-weekday",
    "ended",
    "failing",
    "nightly",
    "paused",
    "stale",
)
FLOW_IDS: dict[tuple[object, str], str] = {}  # by server and flow name: one request per flow
TERMINAL = {"COMPLETED": "Completed", "FAILED": "Failed", "CRASHED": "Crashed"}


@dataclass
class Stack:
    server: PrefectServer
    admin: PrefectAdmin
    exporter: ExporterProcess
    capped: ExporterProcess
    ids: dict[str, str]  # deployment ids by name
    runs: dict[str, str]  # the run of each outcome: nightly, failing, crashing, stale


def interval(seconds: float) -> dict[str, Any]:
    # Anchored a month ahead: the scheduled runs line up with it and none is due during the test.
    anchor = iso(datetime.now(UTC) + timedelta(days=30))
    return {"schedule": {"interval": seconds, "anchor_date": anchor}, "active": True}


def cron(expression: str) -> dict[str, Any]:
    return {"schedule": {"cron": expression, "timezone": "UTC"}, "active": True}


def deploy(
    admin: PrefectAdmin,
    name: str,
    pool: str = POOL,
    schedules: list[dict[str, Any]] | None = None,
    paused: bool = False,
    flow: str = FLOW,
) -> str:
    """A deployment of a flow of demo/flows.py with schedules; its next runs created at once."""
    key = (admin.client.base_url, flow)
    if key not in FLOW_IDS:
        FLOW_IDS[key] = str(admin.request("POST", "flows/", {"name": flow})["id"])
    flow_id = FLOW_IDS[key]
    deployment = admin.request(
        "POST",
        "deployments/",
        {
            "name": name,
            "flow_id": flow_id,
            "work_pool_name": pool,
            "work_queue_name": "default",
            "entrypoint": f"flows.py:{FLOW}",
            "path": str(FLOWS_DIR),
            "paused": paused,
            "schedules": schedules or [],
        },
    )
    if schedules and not paused:
        # What Prefect's scheduler service does within a minute, done now.
        admin.request("POST", f"deployments/{deployment['id']}/schedule", {})
    return str(deployment["id"])


def schedule_after(admin: PrefectAdmin, deployment_id: str, end_time: str) -> None:
    """An hourly schedule whose first run falls due one second after `end_time`, created by
    Prefect's own scheduler code (a backfill from `end_time`): a due run, idle, with no success
    since."""
    first = to_timestamp(end_time, "end_time")
    assert first is not None
    anchor = iso(datetime.fromtimestamp(first + 1, UTC))
    admin.request(
        "POST",
        f"deployments/{deployment_id}/schedules",
        [{"schedule": {"interval": HOUR, "anchor_date": anchor}, "active": True}],
    )
    admin.request("POST", f"deployments/{deployment_id}/schedule", {"start_time": end_time})


def create_in_states(admin: PrefectAdmin, deployment_id: str, states: list[dict[str, Any]]) -> None:
    """Runs of the deployment created in these states, re-submitting those SQLite refused."""
    while states:
        answer = admin.request(
            "POST",
            f"deployments/{deployment_id}/create_flow_run/bulk",
            [{"state": state} for state in states],
        )
        statuses = [result["status"] for result in answer["results"]]
        states = [
            state for state, status in zip(states, statuses, strict=True) if status != "CREATED"
        ]


def run(admin: PrefectAdmin, run_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = admin.request("GET", f"flow_runs/{run_id}")
    return answer


def state_type(admin: PrefectAdmin, run_id: str) -> str:
    return str(run(admin, run_id)["state_type"])


@pytest.fixture(scope="module")
def stack(prefect_server: PrefectServer) -> Iterator[Stack]:
    admin = PrefectAdmin(prefect_server.api_url)
    admin.create_pool(POOL)
    admin.create_pool(IDLE)
    ids = {
        "nightly": deploy(admin, "nightly", schedules=[interval(HOUR)]),
        "failing": deploy(admin, "failing"),
        "crashing": deploy(admin, "crashing"),
        "cron": deploy(admin, "cron", IDLE, [cron("0 2 * * *")]),
        # The crons that broke an interval taken from the next two runs, scheduled by the
        # server's own scheduler code: weekdays, two hours a day, two schedules at one instant.
        "cron-weekday": deploy(admin, "cron-weekday", IDLE, [cron("0 2 * * 1-5")]),
        "cron-twohours": deploy(admin, "cron-twohours", IDLE, [cron("0 2,3 * * *")]),
        "cron-twice": deploy(admin, "cron-twice", IDLE, [cron("0 2 * * *"), cron("0 2 * * *")]),
        # An rrule whose only occurrence is long past: an active schedule with nothing ahead.
        "ended": deploy(
            admin,
            "ended",
            IDLE,
            [{"schedule": {"rrule": "DTSTART:20200101T000000\nRRULE:FREQ=DAILY;COUNT=1"}}],
        ),
        # Its schedule is added once its only success has ended (see `schedule_after`).
        "stale": deploy(admin, "stale", IDLE),
        "paused": deploy(admin, "paused", IDLE, [interval(HOUR)], paused=True),
        "excluded": deploy(admin, "excluded", IDLE, [interval(HOUR)]),
    }
    home = prefect_server.home
    exporter = ExporterProcess(
        prefect_server.api_url, *EXPORTER_ARGS, log_path=home / "exporter.log"
    )
    capped = ExporterProcess(
        prefect_server.api_url,
        *EXPORTER_ARGS,
        "--deployments.max=2",
        "--poll.interval=5s",  # the later flag wins: a lighter second exporter
        log_path=home / "capped.log",
    )
    worker = Worker(prefect_server, POOL, "w-health", heartbeat_seconds=10)
    # The exporters start first, so that their counters see every run end.
    exporter.start()
    capped.start()
    for each in (exporter, capped):
        wait_for(
            lambda e=each: (  # type: ignore[misc]
                e.value("prefect_exporter_event_stream_connected") == 1
                and (e.value("prefect_exporter_polls_total", result="success") or 0) >= 1
            ),
            60,
            "the exporter to follow the event stream",
        )
    worker.start()
    try:
        (stale_run,) = admin.create_runs(ids["stale"], 1, scheduled=past(60))
        admin.force_state(stale_run, "COMPLETED")
        schedule_after(admin, ids["stale"], run(admin, stale_run)["end_time"])
        runs = {
            "nightly": admin.create_runs(ids["nightly"], 1)[0],
            # time.sleep(-1) raises: a flow that really fails, in the real worker.
            "failing": admin.create_runs(ids["failing"], 1, parameters={"seconds": -1})[0],
            "crashing": admin.create_runs(ids["crashing"], 1, parameters={"seconds": 600})[0],
            "stale": stale_run,
        }
        # Killing the flow-run process mid-run: the worker reports the run Crashed.
        pids = wait_for(lambda: flow_run_pids(runs["crashing"]), 180, "the flow-run process")
        wait_for(
            lambda: state_type(admin, runs["crashing"]) == "RUNNING", 120, "the run to be Running"
        )
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for name, wanted in (
            ("nightly", "COMPLETED"),
            ("failing", "FAILED"),
            ("crashing", "CRASHED"),
        ):
            wait_for(
                lambda n=name, w=wanted: state_type(admin, runs[n]) == w,  # type: ignore[misc]
                180,
                f"the {name} run to end {wanted}",
            )
        yield Stack(prefect_server, admin, exporter, capped, ids, runs)
    finally:
        exporter.stop()
        capped.stop()
        worker.stop()
        admin.close()


def end_time(stack: Stack, name: str) -> float | None:
    return to_timestamp(run(stack.admin, stack.runs[name])["end_time"], "end_time")


def upcoming(stack: Stack, name: str) -> list[float]:
    """The deployment's Scheduled runs still ahead, earliest first, from the API."""
    runs = stack.admin.runs(
        {
            "flow_runs": {
                "deployment_id": {"any_": [stack.ids[name]]},
                "state": {"name": {"any_": ["Scheduled"]}},
                "next_scheduled_start_time": {"after_": iso(datetime.now(UTC))},
            },
            "sort": "NEXT_SCHEDULED_START_TIME_ASC",
            "limit": 2,
        }
    )
    return [to_timestamp(r["next_scheduled_start_time"], "x") or 0.0 for r in runs]


def deployment(name: str) -> str:
    return f"{FLOW}/{name}"


class TestTimestamps:
    """Last success and failures are the runs' own end times; schedules as the API has them."""

    def test_last_success_and_failures_equal_the_runs_end_times(self, stack: Stack) -> None:
        """Completed, Failed and Crashed runs, each dated by its own end_time."""
        e = stack.exporter
        expected = {
            ("prefect_deployment_last_success_timestamp_seconds", "nightly", None): "nightly",
            ("prefect_deployment_last_success_timestamp_seconds", "stale", None): "stale",
            ("prefect_deployment_last_failure_timestamp_seconds", "failing", "Failed"): "failing",
            ("prefect_deployment_last_failure_timestamp_seconds", "crashing", "Crashed"): (
                "crashing"
            ),
        }

        def agree() -> bool:
            for (metric, name, state), run_name in expected.items():
                labels = {"deployment": deployment(name)} | ({"state": state} if state else {})
                if e.value(metric, **labels) != end_time(stack, run_name):
                    return False
            return True

        wait_for(agree, 60, "the end times to be exported")
        success = "prefect_deployment_last_success_timestamp_seconds"
        assert e.value(success, deployment=deployment("failing")) is None
        assert e.value(success, deployment=deployment("crashing")) is None

    def test_next_run_interval_pause_and_schedules(self, stack: Stack) -> None:
        """The earliest upcoming run, the interval (cron: the largest gap of the next ones),
        the flags."""
        e = stack.exporter
        wait_for(
            lambda: (
                e.value(
                    "prefect_deployment_next_scheduled_run_timestamp_seconds",
                    deployment=deployment("nightly"),
                )
                == upcoming(stack, "nightly")[0]
            ),
            60,
            "the next run of nightly",
        )
        cron = upcoming(stack, "cron")
        assert (
            e.value(
                "prefect_deployment_next_scheduled_run_timestamp_seconds",
                deployment=deployment("cron"),
            )
            == cron[0]
        )
        # A daily cron: its next runs, created by Prefect's scheduler, are a day apart.
        # (stale's schedule was added after the list was read: its flags wait for a refresh.)
        interval_of = {"nightly": HOUR, "cron": cron[1] - cron[0]}
        assert interval_of["cron"] == DAY
        for name, seconds in interval_of.items():
            labels = {"deployment": deployment(name)}
            assert e.value("prefect_deployment_schedule_interval_seconds", **labels) == seconds
        # The largest non-zero gap of the next three runs: 23 h for 02:00 and 03:00 daily,
        # a day (not 0) for two schedules at one instant, 1 or 3 days for weekdays by the day.
        interval = "prefect_deployment_schedule_interval_seconds"
        assert e.value(interval, deployment=deployment("cron-twohours")) == 23 * HOUR
        assert e.value(interval, deployment=deployment("cron-twice")) == DAY
        assert e.value(interval, deployment=deployment("cron-weekday")) in (DAY, 3 * DAY)
        for name in ("failing", "ended"):
            labels = {"deployment": deployment(name)}
            assert e.value("prefect_deployment_schedule_interval_seconds", **labels) is None
            assert (
                e.value("prefect_deployment_next_scheduled_run_timestamp_seconds", **labels) is None
            )
        assert e.value("prefect_deployment_active_schedules", deployment=deployment("ended")) == 1
        assert e.value("prefect_deployment_active_schedules", deployment=deployment("failing")) == 0
        assert e.value("prefect_deployment_paused", deployment=deployment("paused")) == 1
        assert e.value("prefect_deployment_paused", deployment=deployment("nightly")) == 0

    def test_last_due_run_is_the_latest_auto_scheduled_run_already_due(self, stack: Stack) -> None:
        """stale: its backfilled run one second after its success; manual runs never count."""
        e = stack.exporter
        stale_end = end_time(stack, "stale")
        assert stale_end is not None
        due = "prefect_deployment_last_due_run_timestamp_seconds"
        wait_for(
            lambda: e.value(due, deployment=deployment("stale")) == stale_end + 1,
            60,
            "the due run of stale",
        )
        # Only manual runs (nightly, failing, crashing) or nothing due yet (cron, paused).
        for name in ("nightly", "failing", "crashing", "cron", "paused"):
            assert e.value(due, deployment=deployment(name)) is None, name

    def test_only_selected_deployments_have_series(self, stack: Stack) -> None:
        """The exclude glob wins; nothing is capped under the default maximum."""
        samples = stack.exporter.samples()
        exported = {
            dict(labels)["deployment"]
            for name, labels in samples
            if name == "prefect_deployment_paused"
        }
        assert exported == {deployment(n) for n in EXPORTED}
        assert stack.exporter.value("prefect_exporter_deployments_capped") == 0


class TestFinishedCounter:
    """The counters equal the runs that ended, by state, from the events."""

    def test_counters_equal_the_runs_that_ended(self, stack: Stack) -> None:
        """For every exported deployment and terminal state: the API's count of such runs."""
        e = stack.exporter

        def expected() -> dict[tuple[str, str], int]:
            counts = {}
            for name in EXPORTED:
                for state_type_, label in (*TERMINAL.items(), ("CANCELLED", "Cancelled")):
                    counts[(deployment(name), label)] = stack.admin.count(
                        {
                            "flow_runs": {
                                "deployment_id": {"any_": [stack.ids[name]]},
                                "state": {"type": {"any_": [state_type_]}},
                            }
                        }
                    )
            return counts

        def served() -> dict[tuple[str, str], int]:
            return {
                (dict(labels)["deployment"], dict(labels)["state"]): int(value)
                for (name, labels), value in e.samples().items()
                if name == "prefect_deployment_flow_runs_finished_total"
            }

        wanted = expected()
        assert wanted[(deployment("nightly"), "Completed")] == 1
        assert wanted[(deployment("failing"), "Failed")] == 1
        assert wanted[(deployment("crashing"), "Crashed")] == 1
        wait_for(lambda: served() == wanted, 90, "the counters to equal the runs that ended")


class TestCap:
    """Over `--deployments.max`, the first by name are exported, and the rest counted and logged."""

    def test_the_cap_keeps_two_and_says_how_many_it_left_out(self, stack: Stack) -> None:
        """Seven match, two are exported: capped 5, and one `deployments_capped` log line."""
        c = stack.capped
        wait_for(
            lambda: c.value("prefect_exporter_deployments_capped") == len(EXPORTED) - 2,
            60,
            "the capped count",
        )
        exported = {
            dict(labels)["deployment"]
            for (name, labels) in c.samples()
            if name.startswith("prefect_deployment_")
        }
        assert exported == {deployment("crashing"), deployment("cron")}
        log = (stack.server.home / "capped.log").read_text()
        assert log.count('"deployments_capped"') == 1


def alerts_of(api: str) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = httpx.get(f"{api}/alerts", timeout=5).json()["data"]["alerts"]
    return alerts


class TestPrometheusEndToEnd:
    """A real Prometheus scrapes the exporter and evaluates the shipped deployment alerts."""

    def test_the_deployment_alerts_become_active_for_the_right_deployments(
        self, stack: Stack, tmp_path: Path
    ) -> None:
        """No success since a due run (stale), last run failed (failing, crashing), no upcoming
        run (ended); none of them for the healthy or paused deployments."""
        rules = tmp_path / "rules.yml"
        generated = subprocess.run(
            [
                sys.executable,
                str(ROOT / "alerts" / "generate.py"),
                "--out",
                str(rules),
                "--set",
                f"deployment_due_grace_seconds={E2E_GRACE}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert generated.returncode == 0, generated.stderr
        config = tmp_path / "prometheus.yml"
        target = stack.exporter.url.removeprefix("http://")
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(rules)],
                    "scrape_configs": [
                        {"job_name": "prefect-exporter", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        prometheus = Prometheus(config, tmp_path / "data")
        prometheus.start()
        api = prometheus.api
        wanted = {
            ("PrefectDeploymentNoRecentSuccess", deployment("stale")),
            ("PrefectDeploymentLastRunFailed", deployment("failing")),
            ("PrefectDeploymentLastRunFailed", deployment("crashing")),
            ("PrefectDeploymentNoUpcomingRuns", deployment("ended")),
        }

        def active() -> set[tuple[str, str]]:
            # Pending or firing: the expressions hold on real data (the `for` is minutes).
            return {
                (a["labels"]["alertname"], a["labels"].get("deployment", ""))
                for a in alerts_of(api)
                if a["labels"]["alertname"].startswith("PrefectDeployment")
            }

        try:
            try:
                wait_for(lambda: active() >= wanted, 90, "the deployment alerts to be active")
            except TimeoutError:
                pytest.fail(f"active: {active()}, wanted: {wanted}")
            assert active() == wanted
        finally:
            prometheus.stop()


class TestCost:
    """Requests per poll with 10 and 100 deployments, measured at a real server."""

    def test_ten_and_a_hundred_deployments_cost_the_same(self, stack: Stack) -> None:
        """First read, steady polls, list refresh, a burst of ends and the poll after it: the
        same requests for 10 as for 100, but for ends that fill the first overlap."""
        admin = stack.admin
        admin.create_pool("bulk")
        ahead: dict[str, Any] = {
            "type": "SCHEDULED",
            "state_details": {"scheduled_time": iso(past(-HOUR))},
        }
        ids = []
        for n in range(100):
            deployment_id = deploy(admin, f"d-{n:03}", "bulk", [interval(HOUR)], True, "bulk")
            ids.append(deployment_id)
            # Two runs that ended (one completed, one failed) and two ahead.
            states: list[dict[str, Any]] = [{"type": "COMPLETED"}, {"type": "FAILED"}, ahead, ahead]
            create_in_states(admin, deployment_id, states)

        def measure(include: str, burst_id: str) -> tuple[int, ...]:
            async def reads() -> tuple[int, ...]:
                http = PrefectHttp(
                    Connection(stack.server.api_url),
                    ApiMetrics(CollectorRegistry()),
                    RequestBudget(6000),
                )
                api = PrefectApi(http)
                reader = DeploymentsReader(
                    api, DeploymentSelector((include,)), structlog.get_logger()
                )
                costs = []
                # A first poll, two steady ones, one that re-reads the list (5 minutes on by
                # the reader's clock), then a burst of 300 ends in one deployment read by the
                # next poll, and a steady poll after it.
                for step, ahead in enumerate((300.0, 330.0, 360.0, 660.0, 690.0, 720.0)):
                    if step == 4:
                        burst: list[dict[str, Any]] = [{"type": "COMPLETED"}] * 100
                        for _ in range(3):  # the server creates 100 runs a request at most
                            await asyncio.to_thread(create_in_states, admin, burst_id, burst)
                    before = api.requests_sent
                    now = UnixTime(time.time() + ahead)
                    health = await reader.read(now, Deadline(time.monotonic() + 60))
                    costs.append(api.requests_sent - before)
                    assert len(health.deployments) == len(health.last_end)
                    missing = {i: e for i, e in health.last_end.items() if len(e) != 2}
                    assert not missing, missing
                await api.aclose()
                return tuple(costs)

            return asyncio.run(reads())

        # The hundred first, its burst in bulk/d-050, which bulk/d-00? (ten of the hundred)
        # does not select: neither measurement sees the other's burst.
        hundred, ten = measure("bulk/*", ids[50]), measure("bulk/d-00?", ids[0])
        # First read: list and flow names, one search per outcome, one upcoming listing, one
        # due listing (7). The first steady poll reads the ends of the 120 s overlap before the
        # newest end once: the 200 runs that ended while the hundred were set up fill a page,
        # so one more page (4 for 100, 3 for 10); then ends since, upcoming and due (3). At the
        # list refresh the list, flow names and the three searches again (8). The burst of 300
        # ends: two pages of ends (4); after it, back to 3: the burst is not read again.
        assert hundred == (7, 4, 3, 8, 4, 3), hundred
        assert ten == (7, 3, 3, 8, 4, 3), ten


class TestForcedFinalChange:
    """A run forced from Failed to Completed, read by the reader over the real adapter."""

    def test_the_list_refresh_dates_the_success_and_forgets_the_failure(self, stack: Stack) -> None:
        """Prefect keeps the run's first end_time; the history search at the refresh sees
        the run as Completed and no longer Failed."""
        admin = stack.admin
        deployment_id = deploy(admin, "forced", IDLE, flow="forced-flow")
        (run_id,) = admin.create_runs(deployment_id, 1)
        admin.force_state(run_id, "FAILED")
        failed_end = to_timestamp(run(admin, run_id)["end_time"], "end_time")
        assert failed_end is not None

        async def reads() -> list[dict[str, float]]:
            http = PrefectHttp(
                Connection(stack.server.api_url),
                ApiMetrics(CollectorRegistry()),
                RequestBudget(6000),
            )
            api = PrefectApi(http)
            reader = DeploymentsReader(
                api, DeploymentSelector(("forced-flow/*",)), structlog.get_logger()
            )
            start = time.time()
            seen = []
            for ahead in (0.0, 330.0):
                if ahead:
                    await asyncio.to_thread(admin.force_state, run_id, "COMPLETED")
                health = await reader.read(UnixTime(start + ahead), Deadline(time.monotonic() + 60))
                seen.append(dict(health.last_end[deployment_id]))
            await api.aclose()
            return seen

        before, after = asyncio.run(reads())
        assert before == {"FAILED": failed_end}
        completed_end = to_timestamp(run(admin, run_id)["end_time"], "end_time")
        assert after == {"COMPLETED": completed_end}
