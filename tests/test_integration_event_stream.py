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

POOL = "streamed"


@pytest.fixture(scope="module")
def admin(prefect_server: PrefectServer) -> Iterator[PrefectAdmin]:
    client = PrefectAdmin(prefect_server.api_url)
    client.create_pool(POOL)
    yield client
    client.close()


def start_runs(admin: PrefectAdmin, count: int) -> list[str]:
    """`count` runs taken through Pending to Running, as a worker would."""
    deployment = admin.create_deployment(f"d-{count}-{id(admin)}", POOL, "default")
    runs = admin.create_runs(deployment, count, scheduled=past(30))
    for run in runs:
        admin.force_state(run, "PENDING")
        admin.force_state(run, "RUNNING")
    return runs


def transitions(exporter: ExporterProcess, state: str) -> float:
    return (
        exporter.value("prefect_flow_run_state_transitions_total", work_pool=POOL, state=state) or 0
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


class TestStream:
    """Transitions arrive within seconds, without paging /events/filter."""

    def test_a_transition_shows_within_seconds_at_no_request_cost(
        self, prefect_server: PrefectServer, admin: PrefectAdmin, tmp_path: Path
    ) -> None:
        """With a two-minute settle, paging could not show it; the stream does, within 30 s."""
        exporter = ExporterProcess(
            prefect_server.api_url,
            "--poll.interval=2s",
            "--prefect.requests-per-minute=6000",
            "--events.settle=120s",
            log_path=tmp_path / "e.log",
        )
        exporter.start()
        try:
            wait_for(
                lambda: exporter.value("prefect_exporter_event_stream_connected") == 1,
                30,
                "the stream to connect",
            )
            start_runs(admin, 3)
            wait_for(lambda: transitions(exporter, "Running") == 3, 30, "three Running")
            assert transitions(exporter, "Pending") == 3
            assert event_pages(exporter) == 0
        finally:
            exporter.stop()


class TestFallback:
    """A refused or dropped stream falls back to paging, then resumes, counting nothing twice."""

    def test_a_refused_stream_pages_instead(
        self, prefect_server: PrefectServer, admin: PrefectAdmin, tmp_path: Path
    ) -> None:
        """Behind a proxy that refuses WebSockets, transitions still arrive through paging."""
        proxy = FaultProxy(prefect_server.api_url.removesuffix("/api"), Once("nobody", "", None))  # type: ignore[arg-type]
        proxy.start()
        exporter = ExporterProcess(
            proxy.url + "/api",
            "--poll.interval=2s",
            "--prefect.requests-per-minute=6000",
            # Longer than Prefect's event persister flush (5 s), which is later still under load.
            "--events.settle=10s",
            log_path=tmp_path / "e.log",
        )
        exporter.start()
        try:
            start_runs(admin, 2)
            wait_for(lambda: transitions(exporter, "Running") == 2, 90, "two Running by paging")
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
        self, prefect_server: PrefectServer, admin: PrefectAdmin, tmp_path: Path
    ) -> None:
        """Runs before, during and after a cut are each counted exactly once."""
        upstream = urlsplit(prefect_server.api_url)
        relay = TcpRelay((upstream.hostname or "127.0.0.1", upstream.port or 80))
        relay.start()
        exporter = ExporterProcess(
            f"http://127.0.0.1:{relay.port}/api",
            "--poll.interval=2s",
            "--prefect.requests-per-minute=6000",
            "--events.settle=10s",
            log_path=tmp_path / "e.log",
        )
        exporter.start()
        try:
            wait_for(
                lambda: exporter.value("prefect_exporter_event_stream_connected") == 1,
                30,
                "the stream to connect",
            )
            start_runs(admin, 2)
            wait_for(lambda: transitions(exporter, "Running") == 2, 30, "the first two")
            relay.cut()
            start_runs(admin, 2)  # while the exporter reconnects
            wait_for(
                lambda: (
                    (
                        exporter.value(
                            "prefect_exporter_event_stream_connects_total", result="success"
                        )
                        or 0
                    )
                    >= 2
                ),
                30,
                "a reconnect",
            )
            start_runs(admin, 2)
            wait_for(lambda: transitions(exporter, "Running") >= 6, 60, "all six")
            settled_polls = (
                exporter.value("prefect_exporter_polls_total", result="success") or 0
            ) + 3
            wait_for(
                lambda: (
                    (exporter.value("prefect_exporter_polls_total", result="success") or 0)
                    >= settled_polls
                ),
                30,
                "three more polls",
            )
            assert transitions(exporter, "Running") == 6
            assert transitions(exporter, "Pending") == 6
        finally:
            exporter.stop()
            relay.stop()
