"""Tests for the HTTP routes, served by the real threading server on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.exposition import Exposition, render
from exporter.server import App, MetricsServer
from exporter.snapshot import PoolState, Snapshot
from exporter.store import Store


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def setup() -> Iterator[tuple[str, Store[Exposition], Clock]]:
    clock = Clock()
    store: Store[Exposition] = Store(
        lambda s: render(SnapshotCollector(s)), 90, clock=clock, monotonic=clock
    )
    own = CollectorRegistry()
    own.register(ExporterCollector(store.status))
    app = App(
        store,
        own,
        "/metrics",
        health_window=60,
        api_url="http://prefect:4200/api",
        monotonic=clock,
        started_at=clock.now,
    )
    server = MetricsServer("127.0.0.1", 0, app)
    server.start()
    yield f"http://127.0.0.1:{server.port}", store, clock
    server.stop()


class TestRoutes:
    """/metrics, /healthz, / and unknown paths."""

    def test_metrics_before_the_first_poll_has_only_exporter_series(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """prefect_up 0 is served at once; no Prefect series are invented."""
        url, _, _ = setup
        body = httpx.get(f"{url}/metrics").text
        assert "prefect_up 0.0" in body
        assert "prefect_work_pool" not in body

    def test_metrics_after_a_poll_gzip_when_asked(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """A published snapshot is served; gzip is used when accepted."""
        url, store, clock = setup
        store.publish(
            Snapshot(clock.now, (PoolState("p", "process", "READY", None, 1),), (), ()), 0.1
        )
        raw = httpx.get(f"{url}/metrics", headers={"Accept-Encoding": "gzip"})
        assert raw.headers["Content-Encoding"] == "gzip"
        assert 'prefect_work_pool_online_workers{work_pool="p"} 1.0' in raw.text
        assert "prefect_up 1.0" in raw.text
        plain = httpx.get(f"{url}/metrics", headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in plain.headers
        # httpx has already decoded the gzip body: it must equal the plain one.
        assert raw.content == plain.content

    def test_healthz_reports_the_loop_not_prefect(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """A failing Prefect still leaves /healthz at 200; a stalled loop gives 503."""
        url, store, clock = setup
        store.record_failure("connection refused", 1.0)
        answer = httpx.get(f"{url}/healthz")
        assert answer.status_code == 200
        assert answer.json()["prefect_up"] is False
        clock.now += 61
        assert httpx.get(f"{url}/healthz").status_code == 503

    def test_landing_page_links_metrics_and_health(
        self, setup: tuple[str, Store[Exposition], Clock]
    ) -> None:
        """The landing page is HTML with links."""
        url, _, _ = setup
        page = httpx.get(url + "/")
        assert page.status_code == 200
        assert 'href="/metrics"' in page.text
        assert 'href="/healthz"' in page.text

    def test_unknown_path_is_404(self, setup: tuple[str, Store[Exposition], Clock]) -> None:
        """Anything else is not found."""
        url, _, _ = setup
        assert httpx.get(f"{url}/nope").status_code == 404
