"""The compatibility matrix: a smoke of every part of a poll against older Prefect servers.

The newest server (.venv-prefect-server) is what the rest of the suite runs against; here the
other servers of `scripts/servers.py`'s MATRIX (the oldest 3.x the exporter claims and one in
the middle) each get a real server, a real process worker, real runs and four exporters:

- per-queue, behind the fault proxy (tests/faultproxy.py) that answers 429 with Retry-After;
- run-centric, direct;
- run-centric from the oldest prefect-client pyproject.toml allows (its own environment);
- per-queue through the fake of Prefect Cloud (tests/cloudfake.py: workspace URL, API key).

Every figure is compared with what was seeded; the exporter's log must name every feature it
degraded. `PREFECT_COMPAT_SERVERS=3.2.15` runs other versions of SERVERS by hand.
Environments are built by `scripts/setup.sh --dev` (scripts/servers.py), never in a test.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import httpx
import pytest

from demo.stack import (
    ROOT,
    ExporterProcess,
    PrefectAdmin,
    PrefectServer,
    ProcessExited,
    Worker,
    iso,
    past,
    wait_for,
)
from exporter.features import Feature
from tests.cloudfake import API_KEY, CloudProxy, CloudRules
from tests.faultproxy import EveryNth, Fault, FaultProxy
from tests.scripts import load_script

pytestmark = pytest.mark.integration

SERVERS = load_script(ROOT / "scripts" / "servers.py")
VERSIONS = tuple(
    v.strip() for v in os.environ.get("PREFECT_COMPAT_SERVERS", ",".join(SERVERS.MATRIX)).split(",")
)
OLDEST_CLIENT = min(SERVERS.CLIENTS, key=lambda v: tuple(map(int, v.split("."))))
RETRY_AFTER = 2
INJECTED_429S = 2
# Requests already on the wire when a 429 arrived may reach the proxy a moment after it.
IN_FLIGHT_GRACE = 0.5
DUE_RUNS = 5
EXPORTER_ARGS = (
    "--poll.interval=1s",
    # Served for a minute while polls fail: with 1 s polls the default (3 intervals) dropped
    # every series between two scrapes of one test whenever a poll was slow on a loaded CI
    # machine (both flakes of this file); what is asserted here is the values, not staleness.
    "--poll.max-staleness=60s",
    "--prefect.requests-per-minute=6000",
    "--workers.heartbeat-multiple=2",
    "--events.settle=6s",
)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Prefect's settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, **extra}


def environment(path: Path, requirements: tuple[str, ...]) -> Path:
    if not SERVERS.ready(path, requirements):
        pytest.fail(f"no Prefect environment at {path}; run scripts/setup.sh --dev")
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, PrefectServer]]:
    """Every server of the matrix, started side by side (most of their start is migrations)."""
    started = {
        version: PrefectServer(
            tmp_path_factory.mktemp(f"prefect-{version}"),
            venv=environment(SERVERS.server_dir(version), SERVERS.server_requirements(version)),
        )
        for version in VERSIONS
    }
    try:
        with ThreadPoolExecutor(len(started)) as pool:
            for future in [pool.submit(s.start, 300) for s in started.values()]:
                future.result()
        yield started
    finally:
        for server in started.values():
            server.stop()


class ClientExporter(ExporterProcess):
    """The exporter from this checkout, run by another environment's Python (`python -m`)."""

    def start(self, timeout: float = 60) -> None:
        env = clean_env(PREFECT_API_URL=self.api_url, PYTHONPATH=str(ROOT))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.venv / "bin" / "python"),
                    "-m",
                    "exporter",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    *self.args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.log_path.parent,
            )
        wait_for(self._serving, timeout, "the exporter to serve /healthz")

    def _serving(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise ProcessExited(f"exporter exited; see {self.log_path}")
        return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200


@dataclass
class Scenario:
    version: str
    server: PrefectServer
    admin: PrefectAdmin
    worker: Worker
    proxy: FaultProxy
    storm: EveryNth
    per_queue: ExporterProcess
    run_centric: ExporterProcess
    old_client: ClientExporter
    cloud: ExporterProcess
    cloud_rules: CloudRules
    due_at: datetime
    event_run: str

    @property
    def exporters(self) -> tuple[ExporterProcess, ...]:
        return (self.per_queue, self.run_centric, self.old_client, self.cloud)


@pytest.fixture(scope="module", params=VERSIONS)
def scenario(
    request: pytest.FixtureRequest, servers: dict[str, PrefectServer]
) -> Iterator[Scenario]:
    """One server of the matrix seeded with a pool, queues, limits, runs and a worker."""
    version: str = request.param
    server = servers[version]
    with ExitStack() as cleanup:
        admin = PrefectAdmin(server.api_url)
        cleanup.callback(admin.close)
        admin.create_pool("compat", concurrency_limit=3)
        admin.create_queue("compat", "unpolled")
        admin.create_queue("compat", "events")
        due_at = past(120)
        unpolled = create_deployment(admin, "unpolled-dep", "unpolled")
        create_runs(admin, unpolled, DUE_RUNS, due_at)
        create_runs(admin, unpolled, 2, datetime.now(UTC) + timedelta(hours=2))
        admin.create_tag_limit("compat-tag", 2)
        admin.create_global_limit("compat-global", 4)
        worker = Worker(server, "compat", "compat-worker", queues=["default"], heartbeat_seconds=2)
        cleanup.callback(worker.kill)
        worker.start()
        storm = EveryNth(
            "exporter",
            n=7,
            limit=INJECTED_429S,
            fault=Fault(429, {"Retry-After": str(RETRY_AFTER)}),
        )
        proxy = FaultProxy(server.api_url.removesuffix("/api"), storm)
        proxy.start()
        cleanup.callback(proxy.stop)
        home = server.home
        per_queue = ExporterProcess(
            proxy.url + "/api",
            *EXPORTER_ARGS,
            "--poll.mode=per-queue",
            log_path=home / "exporter-per-queue.log",
        )
        run_centric = ExporterProcess(
            server.api_url,
            *EXPORTER_ARGS,
            "--poll.mode=run-centric",
            "--log.format=json",
            log_path=home / "exporter-run-centric.log",
        )
        old_client = ClientExporter(
            server.api_url,
            *EXPORTER_ARGS,
            "--poll.mode=run-centric",
            log_path=home / "exporter-old-client.log",
            venv=environment(
                SERVERS.client_dir(OLDEST_CLIENT), SERVERS.client_requirements(OLDEST_CLIENT)
            ),
        )
        cloud_rules = CloudRules()
        cloud_proxy = CloudProxy(server.api_url.removesuffix("/api"), cloud_rules)
        cloud_proxy.start()
        cleanup.callback(cloud_proxy.stop)
        # The key from the YAML file: ExporterProcess passes no PREFECT_ variable but the URL.
        config = home / "cloud.yml"
        config.write_text(f"prefect:\n  api_key: {API_KEY}\n")
        cloud = ExporterProcess(
            cloud_proxy.api_url,
            *EXPORTER_ARGS,
            "--poll.mode=per-queue",
            f"--config.file={config}",
            log_path=home / "exporter-cloud.log",
        )
        for exporter in (per_queue, run_centric, old_client, cloud):
            cleanup.callback(exporter.stop)
            exporter.start()
        # A run moved through Pending and Running to Completed: three flow-run events.
        event_deployment = create_deployment(admin, "events-dep", "events")
        (event_run,) = create_runs(admin, event_deployment, 1, past(60))
        for state in ("PENDING", "RUNNING", "COMPLETED"):
            admin.force_state(event_run, state)
        yield Scenario(
            version,
            server,
            admin,
            worker,
            proxy,
            storm,
            per_queue,
            run_centric,
            old_client,
            cloud,
            cloud_rules,
            due_at,
            event_run,
        )


def create_deployment(admin: PrefectAdmin, name: str, queue: str) -> str:
    """A deployment of demo/flows.py's `quick` in pool `compat`; without a parameter schema,
    which Prefect 3.0 would otherwise insist on (409 on every run created)."""
    flow_id = admin.request("POST", "flows/", {"name": "quick"})["id"]
    deployment = admin.request(
        "POST",
        "deployments/",
        {
            "name": name,
            "flow_id": flow_id,
            "work_pool_name": "compat",
            "work_queue_name": queue,
            "entrypoint": "flows.py:quick",
            "enforce_parameter_schema": False,
        },
    )
    return str(deployment["id"])


def create_runs(admin: PrefectAdmin, deployment: str, count: int, scheduled: datetime) -> list[str]:
    """`count` runs of `deployment` scheduled at `scheduled`, one request each: Prefect 3.0
    has no `create_flow_run/bulk` (404), which PrefectAdmin.create_runs uses."""
    state = {"type": "SCHEDULED", "state_details": {"scheduled_time": iso(scheduled)}}
    return [
        str(
            admin.request("POST", f"deployments/{deployment}/create_flow_run", {"state": state})[
                "id"
            ]
        )
        for _ in range(count)
    ]


def until(
    exporter: ExporterProcess,
    condition: Callable[[ExporterProcess], bool],
    timeout: float,
    what: str,
) -> None:
    """Wait until `condition(exporter)` holds; the failure names the exporter's log."""
    wait_for(partial(condition, exporter), timeout, f"{what} (see {exporter.log_path})")


def log_events(path: Path) -> list[dict[str, object]]:
    """The JSON log lines of an exporter (lines that are not JSON are skipped)."""
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


class TestMatrix:
    """Each server of the matrix: the figures, the workers, the limits, events and 429s."""

    def test_backlog_is_exact_in_both_modes_and_from_the_oldest_client(
        self, scenario: Scenario
    ) -> None:
        """Five due runs of the unpolled queue, oldest at their scheduled time, in each mode."""
        queue = {"work_pool": "compat", "work_queue": "unpolled"}

        def scheduled_and_late(e: ExporterProcess) -> float:
            # The server's late-runs service renames the due ones Late; the two far-ahead runs
            # stay Scheduled (counted by the slow round, from the second poll on).
            return sum(
                e.value("prefect_work_queue_flow_runs", **queue, state=state) or 0
                for state in ("Scheduled", "Late")
            )

        for exporter in scenario.exporters:
            until(
                exporter,
                lambda e: (
                    e.value("prefect_work_queue_backlog_runs", **queue) == DUE_RUNS
                    and scheduled_and_late(e) == DUE_RUNS + 2
                ),
                120,
                f"backlog {DUE_RUNS} and {DUE_RUNS + 2} Scheduled or Late on {scenario.version}",
            )
            oldest = exporter.value("prefect_work_queue_oldest_due_run_timestamp_seconds", **queue)
            assert oldest == pytest.approx(scenario.due_at.timestamp(), abs=1)
            assert exporter.value("prefect_work_pool_concurrency_limit", work_pool="compat") == 3
            for reason in ("malformed_response", "internal"):
                errors = exporter.value("prefect_exporter_poll_errors_total", reason=reason)
                assert errors == 0, f"{reason} on {scenario.version}: see {exporter.log_path}"

    def test_server_version_is_reported_as_the_api_answers_it(self, scenario: Scenario) -> None:
        """prefect_server_info carries the version GET /admin/version answers (not on Cloud)."""
        answered = scenario.admin.request("GET", "admin/version")
        assert answered == scenario.version
        for exporter in (scenario.per_queue, scenario.run_centric, scenario.old_client):
            until(
                exporter,
                lambda e: e.value("prefect_server_info", version=scenario.version) == 1,
                60,
                f"prefect_server_info on {scenario.version}",
            )

    def test_a_worker_online_then_offline(self, scenario: Scenario) -> None:
        """The worker's heartbeats make it online; killed, it goes offline within 2 intervals."""
        labels = {"work_pool": "compat", "worker": "compat-worker"}
        exporter = scenario.run_centric
        wait_for(lambda: exporter.value("prefect_worker_online", **labels) == 1, 120, "online")
        assert exporter.value("prefect_work_pool_online_workers", work_pool="compat") == 1
        scenario.worker.kill()
        wait_for(lambda: exporter.value("prefect_worker_online", **labels) == 0, 60, "offline")
        assert exporter.value("prefect_work_pool_online_workers", work_pool="compat") == 0

    def test_concurrency_limits(self, scenario: Scenario) -> None:
        """A tag limit and a global limit with their slots (before 3.4 the tag limit is in the
        v1 view only), both from one scrape, so from one poll's snapshot."""
        tag = {"limit": "tag:compat-tag", "kind": "tag", "deployment": ""}
        glob = {"limit": "compat-global", "kind": "global", "deployment": ""}
        expected = {
            ("prefect_concurrency_limit_slots", frozenset(tag.items())): 2.0,
            ("prefect_concurrency_limit_slots", frozenset(glob.items())): 4.0,
            ("prefect_concurrency_limit_active_slots", frozenset(tag.items())): 0.0,
            ("prefect_concurrency_limit_active_slots", frozenset(glob.items())): 0.0,
        }

        def seen(e: ExporterProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            """The limit series of one scrape (both limits come from one poll's snapshot)."""
            return {k: v for k, v in e.samples().items() if k[0].startswith("prefect_concurrency")}

        last: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}

        def complete(e: ExporterProcess) -> bool:
            last.clear()
            last.update(seen(e))
            return all(last.get(key) == value for key, value in expected.items())

        for exporter in scenario.exporters:
            try:
                until(exporter, complete, 60, f"both limits on {scenario.version}")
            except TimeoutError as exc:
                raise AssertionError(f"{exc}; the last scrape's limit series: {last}") from None

    def test_events_count_each_transition_once(self, scenario: Scenario) -> None:
        """Pending, Running and Completed of the forced run, each counted once, in the pool."""

        def counted(e: ExporterProcess, state: str) -> float | None:
            return e.value(
                "prefect_flow_run_state_transitions_total", work_pool="compat", state=state
            )

        for exporter in scenario.exporters:
            until(
                exporter,
                lambda e: counted(e, "Completed") == 1,
                90,
                f"the Completed transition on {scenario.version}",
            )
            assert counted(exporter, "Pending") == 1
            assert counted(exporter, "Running") == 1

    def test_429_back_off_is_obeyed_and_counted(self, scenario: Scenario) -> None:
        """Each injected 429 is counted once and no request is sent during its Retry-After."""
        exporter = scenario.per_queue
        wait_for(lambda: scenario.storm.sent == INJECTED_429S, 60, "the injected 429s")
        wait_for(lambda: exporter.value("prefect_up") == 1, 60, "prefect_up to recover")
        throttled = scenario.proxy.injected("exporter")
        counted = sum(
            value
            for (name, labels), value in exporter.samples().items()
            if name == "prefect_exporter_api_requests_total" and ("code", "429") in labels
        )
        assert counted == len(throttled) == INJECTED_429S
        requests = scenario.proxy.requests_of("exporter")
        for answer in throttled:
            during = [
                r
                for r in requests
                if answer.answered + IN_FLIGHT_GRACE < r.received < answer.answered + RETRY_AFTER
            ]
            assert during == [], f"requests during a back-off on {scenario.version}: {during}"

    def test_every_degraded_feature_is_logged(self, scenario: Scenario) -> None:
        """feature_available 0 for a feature exactly when the log says feature_unavailable:
        none on a server, the server's version behind Cloud's rules."""
        expected = {scenario.run_centric: set(), scenario.cloud: {str(Feature.SERVER_VERSION)}}
        for exporter, degraded in expected.items():
            until(exporter, lambda e: e.value("prefect_up") == 1, 60, "a successful poll")
            available = {
                str(f): exporter.value("prefect_exporter_feature_available", feature=str(f))
                for f in Feature
            }
            assert {f for f, value in available.items() if value == 0} == degraded, available
            assert {f for f, value in available.items() if value == 1} == set(available) - degraded
            logged = {
                str(e.get("feature"))
                for e in log_events(exporter.log_path)
                if e.get("event") == "feature_unavailable"
            }
            assert logged == degraded

    def test_cloud_workspace_url_and_key(self, scenario: Scenario) -> None:
        """Through Cloud's rules every request carried the key and none was refused but the
        server's version, which is absent, not made up."""
        assert scenario.cloud_rules.statuses(401) == []
        refused = {
            path.split("/workspaces/", 1)[1] for _, path in scenario.cloud_rules.statuses(404)
        }
        assert {p.split("/", 1)[1] for p in refused} == {"admin/version"}
        series = [key for key in scenario.cloud.samples() if key[0] == "prefect_server_info"]
        assert series == []


class TestOldestClient:
    """The oldest prefect-client pyproject.toml allows runs the exporter's command line."""

    def test_help_runs(self) -> None:
        """`python -m exporter --help` from that environment exits 0 and lists the options."""
        venv = environment(
            SERVERS.client_dir(OLDEST_CLIENT), SERVERS.client_requirements(OLDEST_CLIENT)
        )
        done = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "exporter", "--help"],
            env=clean_env(PYTHONPATH=str(ROOT)),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "--prefect.api-url" in done.stdout
