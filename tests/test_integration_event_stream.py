"""Prefect's event stream against a real server: fast, free, and exact across a dropped socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, past, wait_for
from tests.faultproxy import FaultProxy, Once
from tests.tcprelay import TcpRelay

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def admin(prefect_server: PrefectServer) -> Iterator[PrefectAdmin]:
    client = PrefectAdmin(prefect_server.api_url)
    yield client
    client.close()


@pytest.fixture
def pool(admin: PrefectAdmin, request: pytest.FixtureRequest) -> str:
    """A pool of the test's own: events of an earlier test's runs can never be counted in it."""
    name = f"streamed-{request.node.name[-40:]}"
    admin.create_pool(name)
    return name


def start_runs(admin: PrefectAdmin, pool: str, count: int) -> list[str]:
    """`count` runs taken through Pending to Running, as a worker would."""
    deployment = admin.create_deployment(f"d-{count}", pool, "default")
    runs = admin.create_runs(deployment, count, scheduled=past(30))
    for run in runs:
        admin.force_state(run, "PENDING")
        admin.force_state(run, "RUNNING")
    return runs


def transitions(exporter: ExporterProcess, pool: str, state: str) -> float:
    return (
        exporter.value("prefect_flow_run_state_transitions_total", work_pool=pool, state=state) or 0
    )


def event_pages(exporter: ExporterProcess) -> float:
    return (
        exporter.value(
            "prefect_exporter_api_requests_total",
            endpoint="/events/filter",
            method="POST",
            code="200",
        )
        or 0
    )


def streaming_exporter(api_url: str, settle: str, tmp_path: Path) -> ExporterProcess:
    """A started exporter polling every 2 s with a generous budget and the given settle time."""
    exporter = ExporterProcess(
        api_url,
        "--poll.interval=2s",
        "--prefect.requests-per-minute=6000",
        f"--events.settle={settle}",
        log_path=tmp_path / "e.log",
    )
    exporter.start()
    return exporter


def counter(exporter: ExporterProcess, name: str, **labels: str) -> float:
    return exporter.value(name, **labels) or 0


def wait_connected(exporter: ExporterProcess, connects: int = 1) -> None:
    """Wait until the stream is connected, after `connects` successful connections in all."""
    wait_for(
        lambda: (
            exporter.value("prefect_exporter_event_stream_connected") == 1
            and counter(exporter, "prefect_exporter_event_stream_connects_total", result="success")
            >= connects
        ),
        30,
        f"the stream to connect ({connects})",
    )


class TestStream:
    """Transitions arrive within seconds, without paging /events/filter."""

    def test_a_transition_shows_within_seconds_at_no_request_cost(
        self, prefect_server: PrefectServer, admin: PrefectAdmin, pool: str, tmp_path: Path
    ) -> None:
        """With a two-minute settle, paging could not show it; the stream does, within 30 s."""
        exporter = streaming_exporter(prefect_server.api_url, "120s", tmp_path)
        try:
            wait_connected(exporter)
            start_runs(admin, pool, 3)
            wait_for(lambda: transitions(exporter, pool, "Running") == 3, 30, "three Running")
            assert transitions(exporter, pool, "Pending") == 3
            assert event_pages(exporter) == 0
        finally:
            exporter.stop()

    def test_the_stream_passes_a_proxy_that_relays_websockets(
        self, prefect_server: PrefectServer, admin: PrefectAdmin, pool: str, tmp_path: Path
    ) -> None:
        """The scale bench counts requests through this proxy: the stream must work through
        it as it does without one, so that the bench measures the exporter as deployed."""
        proxy = FaultProxy(
            prefect_server.api_url.removesuffix("/api"), lambda *_: None, websockets=True
        )
        proxy.start()
        exporter = streaming_exporter(proxy.url + "/api", "120s", tmp_path)
        try:
            wait_connected(exporter)
            start_runs(admin, pool, 2)
            wait_for(lambda: transitions(exporter, pool, "Running") == 2, 30, "two Running")
            assert event_pages(exporter) == 0
            assert proxy.tunnels >= 1
            assert not [r for r in proxy.requests_of("exporter") if "events" in r.path]
        finally:
            exporter.stop()
            proxy.stop()


class TestFallback:
    """A refused or dropped stream falls back to paging, then resumes, counting nothing twice."""

    def test_a_refused_stream_pages_instead(
        self, prefect_server: PrefectServer, admin: PrefectAdmin, pool: str, tmp_path: Path
    ) -> None:
        """Behind a proxy that refuses WebSockets, transitions still arrive through paging."""
        proxy = FaultProxy(prefect_server.api_url.removesuffix("/api"), Once("nobody", "", None))  # type: ignore[arg-type]
        proxy.start()
        # Settled longer than Prefect's event persister flush (5 s), later still under load.
        exporter = streaming_exporter(proxy.url + "/api", "10s", tmp_path)
        try:
            start_runs(admin, pool, 2)
            wait_for(
                lambda: transitions(exporter, pool, "Running") == 2, 90, "two Running by paging"
            )
            assert exporter.value("prefect_exporter_event_stream_connected") == 0
            failures = exporter.value(
                "prefect_exporter_event_stream_connects_total", result="failure"
            )
            assert (failures or 0) >= 1
            assert event_pages(exporter) >= 1
        finally:
            exporter.stop()
            proxy.stop()

    def test_a_socket_cut_mid_stream_resumes_without_double_counting(
        self, prefect_server: PrefectServer, admin: PrefectAdmin, pool: str, tmp_path: Path
    ) -> None:
        """Runs before, during and after a cut are each counted exactly once."""
        upstream = urlsplit(prefect_server.api_url)
        relay = TcpRelay((upstream.hostname or "127.0.0.1", upstream.port or 80))
        relay.start()
        exporter = streaming_exporter(f"http://127.0.0.1:{relay.port}/api", "10s", tmp_path)
        try:
            wait_connected(exporter)
            start_runs(admin, pool, 2)
            wait_for(lambda: transitions(exporter, pool, "Running") == 2, 30, "the first two")
            relay.cut()
            start_runs(admin, pool, 2)  # while the exporter reconnects
            wait_connected(exporter, connects=2)
            start_runs(admin, pool, 2)
            wait_for(lambda: transitions(exporter, pool, "Running") >= 6, 60, "all six")
            polls = counter(exporter, "prefect_exporter_polls_total", result="success") + 3
            wait_for(
                lambda: (
                    counter(exporter, "prefect_exporter_polls_total", result="success") >= polls
                ),
                30,
                "three more polls",
            )
            assert transitions(exporter, pool, "Running") == 6
            assert transitions(exporter, pool, "Pending") == 6
        finally:
            exporter.stop()
            relay.stop()
