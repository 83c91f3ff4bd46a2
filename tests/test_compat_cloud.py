"""Prefect Cloud: the whole poll through the real adapter against a fake of Cloud's API.

The fake (tests/cloudfake.py) puts Cloud's rules in front of an in-process self-hosted fake:
the workspace URL shape, `Authorization: Bearer` or 401, 429 with Retry-After, and 404 for the
routes Cloud does not offer (`/admin/version`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, MutableMapping
from typing import Any

import httpx
import structlog.testing
from prometheus_client import CollectorRegistry

from exporter.budget import RequestBudget
from exporter.collector import SnapshotCollector
from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import ApiMetrics, Connection, PrefectHttp
from exporter.secret import Secret
from exporter.server_info import ServerInfoReader
from tests.cloudfake import API_KEY, PREFIX, CloudGate, CloudRules
from tests.fakes import FakePrefect, pool_json, queue_json, worker_json
from tests.test_poller import FakeStore

CLOUD_URL = "https://api.prefect.cloud" + PREFIX
NOW = 1_800_000_000.0


def workspace() -> FakePrefect:
    """A small workspace: one pool, one queue, one worker, nothing due."""
    fake = FakePrefect()
    fake.on("GET", "admin/version", "3.9.1")  # Cloud's rules hide it; the server would answer
    fake.on("POST", "work_pools/filter", [pool_json("cloud-pool")])
    fake.on("POST", "work_queues/filter", [queue_json("q1", "default", "cloud-pool")])
    fake.on("POST", "work_pools/cloud-pool/workers/filter", [worker_json("w1")])
    fake.on("POST", "flow_runs/history", [{"states": []}])
    fake.on("POST", "flow_runs/count", 0)
    fake.on("POST", "v2/concurrency_limits/filter", [])
    fake.on("POST", "concurrency_limits/filter", [])
    fake.on("POST", "events/filter", {"events": [], "total": 0, "next_page": None})
    return fake


class Run:
    """One poll of a Cloud workspace through PrefectHttp, PrefectApi and the Poller."""

    def __init__(
        self,
        api_key: str | None = API_KEY,
        throttle: Callable[[str, str], float | None] = lambda method, path: None,
    ) -> None:
        self.fake = workspace()
        self.rules = CloudRules(throttle=throttle)
        self.registry = CollectorRegistry()
        self.store = FakeStore()
        api = PrefectApi(
            PrefectHttp(
                Connection(CLOUD_URL, api_key=Secret(api_key) if api_key else None),
                ApiMetrics(self.registry),
                RequestBudget(625 // 5),
                transport=httpx.MockTransport(CloudGate(self.rules, self.fake)),
                clock=lambda: NOW,
            )
        )
        self.poller = Poller(
            api,
            self.store,
            PollSettings(interval=30, timeout=5, concurrency=2, heartbeat_multiple=3),
            PollMetrics(self.registry),
            structlog.get_logger(),
            clock=lambda: NOW,
            orphans=api,
            server_info=ServerInfoReader(api, lambda: 0.0),
        )
        with structlog.testing.capture_logs() as logs:
            self.wait = asyncio.run(self.poller.poll_and_publish())
        self.logs = logs

    def events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [e for e in self.logs if e["event"] == name]


class TestCloudWorkspace:
    """With the API key, every read goes below the workspace URL and the poll succeeds."""

    def test_a_poll_reads_the_workspace_with_the_bearer_key(self) -> None:
        """Every request is below /api/accounts/<a>/workspaces/<w>/ and carries the key."""
        run = Run()
        assert len(run.store.published) == 1
        assert run.store.published[0].pools[0].name == "cloud-pool"
        forwarded = [path for _, path, status in run.rules.log if status == 0]
        assert forwarded
        assert all(p.startswith(PREFIX + "/") for _, p, _ in run.rules.log)
        assert run.rules.statuses(401) == []

    def test_the_server_version_is_not_offered_the_feature_degrades(self) -> None:
        """/admin/version answers 404 on Cloud: no info series, feature 0, logged once."""
        run = Run()
        assert run.rules.statuses(404) == [("GET", PREFIX + "/admin/version")]
        snapshot = run.store.published[0]
        assert snapshot.server_version is None
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(snapshot))
        assert (
            registry.get_sample_value(
                "prefect_exporter_feature_available", {"feature": "server_version"}
            )
            == 0
        )
        assert [e["feature"] for e in run.events("feature_unavailable")] == ["server_version"]


class TestCloudRefusals:
    """A missing key is a failed poll that names the fix; a 429 pauses for its Retry-After."""

    def test_without_the_key_the_poll_fails_with_401_and_a_hint(self) -> None:
        """HTTP 401, reason http_status, and the log says which variable to check."""
        run = Run(api_key=None)
        assert run.store.published == []
        assert run.rules.statuses(401)
        failed = run.events("poll_failed")
        assert failed[0]["reason"] == "http_status"
        assert "401" in failed[0]["error"]
        assert "PREFECT_API_KEY" in failed[0]["error"]

    def test_a_wrong_key_is_refused_like_a_missing_one(self) -> None:
        """Cloud answers 401 to any key but the workspace's."""
        run = Run(api_key="pnu_notTheKey")
        assert run.store.published == []
        assert "401" in run.events("poll_failed")[0]["error"]

    def test_a_429_pauses_the_poller_for_its_retry_after(self) -> None:
        """The next poll waits the 45 s Cloud asked for, longer than the 30 s interval."""
        run = Run(throttle=lambda method, path: 45.0 if "work_queues" in path else None)
        assert run.store.published == []
        assert run.wait == 45.0
        assert (
            run.registry.get_sample_value(
                "prefect_exporter_api_requests_total",
                {"endpoint": "/work_queues/filter", "method": "POST", "code": "429"},
            )
            == 1
        )
