"""Tests for the server's version: the reader, its parsing, the poll and the exported series."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog.testing
from prometheus_client import CollectorRegistry

from exporter.clock import Deadline
from exporter.collector import SnapshotCollector
from exporter.errors import (
    ApiConnectionError,
    ApiStatusError,
    ApiTimeout,
    MalformedResponse,
    PrefectApiError,
)
from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_parse import parse_version
from exporter.server_info import SERVER_INFO_REFRESH_SECONDS, ServerInfoReader
from exporter.snapshot import Snapshot
from tests.fakes import FakePrefect, make_api
from tests.test_poller import NOW, FakeApi, FakeStore

DEADLINE = Deadline(1e12)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class VersionApi:
    """Answers `server_version` with the next of `answers` (a version or an exception)."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def server_version(self, deadline: Deadline) -> str:
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class TestServerInfoReader:
    """One request at start, then one an hour at most; nothing stale after a failure."""

    def test_reads_at_start_and_not_again_within_the_hour(self) -> None:
        """The second and later polls of the hour cost no request."""
        api, clock = VersionApi("3.9.1"), Clock()
        reader = ServerInfoReader(api, clock)
        assert asyncio.run(reader.read(DEADLINE)) == "3.9.1"
        clock.now += SERVER_INFO_REFRESH_SECONDS - 1
        assert asyncio.run(reader.read(DEADLINE)) == "3.9.1"
        assert api.calls == 1

    def test_refreshes_after_an_hour_and_sees_an_upgrade(self) -> None:
        """An upgraded server is noticed without restarting the exporter."""
        api, clock = VersionApi("3.9.0", "3.9.1"), Clock()
        reader = ServerInfoReader(api, clock)
        asyncio.run(reader.read(DEADLINE))
        clock.now += SERVER_INFO_REFRESH_SECONDS
        assert asyncio.run(reader.read(DEADLINE)) == "3.9.1"
        assert api.calls == 2

    def test_a_shortened_poll_sends_no_request(self) -> None:
        """Without `refresh` the known version (or None) comes back at no cost."""
        api = VersionApi("3.9.1")
        reader = ServerInfoReader(api, Clock())
        assert asyncio.run(reader.read(DEADLINE, refresh=False)) is None
        assert api.calls == 0

    def test_a_failed_read_forgets_the_version_and_asks_again(self) -> None:
        """The error passes through; no stale version is kept, the next call asks again."""
        api = VersionApi("3.9.0", ApiStatusError("/admin/version", 500, None), "3.9.1")
        clock = Clock()
        reader = ServerInfoReader(api, clock)
        asyncio.run(reader.read(DEADLINE))
        clock.now += SERVER_INFO_REFRESH_SECONDS
        with pytest.raises(ApiStatusError):
            asyncio.run(reader.read(DEADLINE))
        assert reader.version is None
        assert reader.due()
        assert asyncio.run(reader.read(DEADLINE)) == "3.9.1"


class TestParseVersion:
    """GET /admin/version answers a JSON string; anything else is malformed."""

    @pytest.mark.parametrize("version", ["3.9.1", "3.0.11", "3.6.0rc2+12.gabcdef0"])
    def test_accepts_prefect_versions(self, version: str) -> None:
        """Release, pre-release and local versions pass unchanged."""
        assert parse_version(version) == version

    @pytest.mark.parametrize(
        "payload", [None, 3.9, ["3.9.1"], {"version": "3.9.1"}, "", "3.9.1 beta", "3.9\n", "9" * 65]
    )
    def test_refuses_what_no_server_answers(self, payload: Any) -> None:
        """Not a string, empty, blank or control characters, or too long for a label."""
        with pytest.raises(MalformedResponse):
            parse_version(payload)

    def test_the_adapter_asks_admin_version_once(self) -> None:
        """One GET of /api/admin/version, its JSON string returned."""
        fake = FakePrefect()
        fake.on("GET", "admin/version", "3.9.1")
        assert asyncio.run(make_api(fake).server_version(DEADLINE)) == "3.9.1"
        assert [(r.method, r.url.path) for r in fake.requests] == [("GET", "/api/admin/version")]


class VersionedApi(FakeApi):
    """The poller's fake API with a server version, or a 404 where the route is missing."""

    def __init__(self, version: str | None, error: PrefectApiError | None = None) -> None:
        super().__init__()
        self.version = version
        self.error = error
        self.version_calls = 0

    async def server_version(self, deadline: Deadline) -> str:
        self.version_calls += 1
        if self.error is not None:
            raise self.error
        if self.version is None:
            raise ApiStatusError("/admin/version", 404, None)
        return self.version


def poll(
    api: VersionedApi, polls: int = 1
) -> tuple[list[Snapshot], list[MutableMapping[str, Any]]]:
    """Run `polls` polls with a server info reader; the snapshots and the captured log."""
    store = FakeStore()
    with structlog.testing.capture_logs() as logs:
        poller = Poller(
            api,
            store,
            PollSettings(interval=30, timeout=5, concurrency=2, heartbeat_multiple=3),
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=lambda: NOW,
            monotonic=Clock(),
            server_info=ServerInfoReader(api, Clock()),
        )
        for _ in range(polls):
            asyncio.run(poller.poll_and_publish())
    return store.published, logs


def exposition(snapshot: Snapshot) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(snapshot))
    return registry


class TestServerInfoInThePoll:
    """prefect_server_info from a real read; a server without the route degrades, logged."""

    def test_version_is_exported_as_an_info_series(self) -> None:
        """prefect_server_info{version="3.9.1"} 1, read once over three polls."""
        api = VersionedApi("3.9.1")
        snapshots, _ = poll(api, polls=3)
        assert [s.server_version for s in snapshots] == ["3.9.1"] * 3
        assert api.version_calls == 1
        registry = exposition(snapshots[-1])
        assert registry.get_sample_value("prefect_server_info", {"version": "3.9.1"}) == 1
        assert (
            registry.get_sample_value(
                "prefect_exporter_feature_available", {"feature": "server_version"}
            )
            == 1
        )

    def test_a_missing_route_degrades_the_feature_and_says_so(self) -> None:
        """A 404 (Prefect Cloud): the poll succeeds, no info series, feature 0, one log line."""
        snapshots, logs = poll(VersionedApi(None))
        assert snapshots[0].server_version is None
        registry = exposition(snapshots[0])
        assert registry.get_sample_value("prefect_server_info", {"version": "3.9.1"}) is None
        assert (
            registry.get_sample_value(
                "prefect_exporter_feature_available", {"feature": "server_version"}
            )
            == 0
        )
        unavailable = [e for e in logs if e["event"] == "feature_unavailable"]
        assert [e["feature"] for e in unavailable] == ["server_version"]
        assert "404" in unavailable[0]["error"]

    @pytest.mark.parametrize(
        "error",
        [
            MalformedResponse("admin/version: expected a string, got list"),
            ApiStatusError("/admin/version", 403, None),
        ],
    )
    def test_a_bad_answer_degrades_the_feature_never_the_poll(self, error: PrefectApiError) -> None:
        """The version is informational: a malformed body or a 403 must not blind the exporter."""
        snapshots, logs = poll(VersionedApi("3.9.1", error), polls=2)
        assert len(snapshots) == 2  # both polls published
        assert all(s.server_version is None for s in snapshots)
        assert dict(snapshots[-1].features)["server_version"] is False
        unavailable = [e for e in logs if e["event"] == "feature_unavailable"]
        assert [e["feature"] for e in unavailable] == ["server_version"]

    def test_throttling_of_the_version_read_still_fails_the_poll(self) -> None:
        """A 429 there is a 429 like any other: the poller backs off."""
        snapshots, logs = poll(VersionedApi("3.9.1", ApiStatusError("/admin/version", 429, 5.0)))
        assert snapshots == []
        assert [e["reason"] for e in logs if e["event"] == "poll_failed"] == ["http_status"]

    @pytest.mark.parametrize(
        "error",
        [
            ApiTimeout("/admin/version: no answer within 5s"),
            ApiConnectionError("/admin/version: connection refused"),
        ],
    )
    def test_a_failure_that_is_no_answer_fails_the_poll_and_keeps_the_feature(
        self, error: PrefectApiError
    ) -> None:
        """A time-out or a refused connection says nothing about the route: not degraded."""
        snapshots, logs = poll(VersionedApi("3.9.1", error))
        assert snapshots == []
        assert [e["reason"] for e in logs if e["event"] == "poll_failed"] == [error.reason]
        assert [e for e in logs if e["event"] == "feature_unavailable"] == []
