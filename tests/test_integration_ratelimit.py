"""Rate limiting end to end: a fault-injecting proxy in front of a real Prefect server.

The exporter must obey 429 + Retry-After (no request during a back-off) and count exactly what it
received; a real worker's own 429s, invisible through the API, must be counted by the sidecar
from the worker's log, equal to what the proxy sent the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, Worker, wait_for
from tests.faultproxy import EveryNth, Fault, FaultProxy

pytestmark = pytest.mark.integration

RETRY_AFTER = 3
# Requests of the failing poll that were already on the wire when the 429 arrived may reach
# the proxy a moment after it answered; anything later than this is a violation.
IN_FLIGHT_GRACE = 0.5


def create_pool(server: PrefectServer, name: str) -> None:
    admin = PrefectAdmin(server.api_url)
    try:
        admin.create_pool(name)
    finally:
        admin.close()


@pytest.fixture
def proxy_for(prefect_server: PrefectServer) -> Iterator[list[FaultProxy]]:
    proxies: list[FaultProxy] = []
    yield proxies
    for proxy in proxies:
        proxy.stop()


class TestExporterUnderRateLimiting:
    """429 + Retry-After pauses the whole poller; every 429 is counted; prefect_up recovers."""

    def test_backoff_counts_and_recovery(
        self, prefect_server: PrefectServer, proxy_for: list[FaultProxy], tmp_path: Path
    ) -> None:
        """Six 429s, each obeyed for its full Retry-After, each counted once."""
        create_pool(prefect_server, "limited-api")
        storm = EveryNth(
            "exporter", n=5, limit=6, fault=Fault(429, {"Retry-After": str(RETRY_AFTER)})
        )
        proxy = FaultProxy(prefect_server.api_url.removesuffix("/api"), storm)
        proxy.start()
        proxy_for.append(proxy)
        exporter = ExporterProcess(
            proxy.url + "/api",
            "--poll.interval=1s",
            "--prefect.requests-per-minute=6000",
            log_path=tmp_path / "exporter.log",
        )
        exporter.start()
        try:
            wait_for(lambda: storm.sent == 6, 120, "six injected 429s")
            wait_for(lambda: exporter.value("prefect_up") == 1, 30, "prefect_up to recover")
            throttled = proxy.injected("exporter")
            counted = sum(
                value
                for (name, labels), value in exporter.samples().items()
                if name == "prefect_exporter_api_requests_total" and ("code", "429") in labels
            )
            assert counted == len(throttled) == 6
            requests = proxy.requests_of("exporter")
            for answer in throttled:
                quiet_from = answer.answered + IN_FLIGHT_GRACE
                quiet_until = answer.answered + RETRY_AFTER
                during = [r for r in requests if quiet_from < r.received < quiet_until]
                assert during == [], f"requests during a back-off: {during}"
            assert (
                exporter.value("prefect_exporter_poll_errors_total", reason="http_status") or 0
            ) >= 1
        finally:
            exporter.stop()


class TestSidecarCountsTheWorkersOwn429s:
    """A real worker behind the proxy logs its retries; the sidecar counts them exactly."""

    def test_sidecar_counts_equal_what_the_proxy_sent(
        self, prefect_server: PrefectServer, proxy_for: list[FaultProxy], tmp_path: Path
    ) -> None:
        """Responses with code 429 and retries caused by 429 both equal the injected 429s."""
        create_pool(prefect_server, "throttled-pool")
        storm = EveryNth("worker", n=3, limit=8, fault=Fault(429, {"Retry-After": "1"}))
        proxy = FaultProxy(prefect_server.api_url.removesuffix("/api"), storm)
        proxy.start()
        proxy_for.append(proxy)
        worker = Worker(
            prefect_server,
            "throttled-pool",
            "w-throttled",
            heartbeat_seconds=5,
            api_url=proxy.url + "/api",
            extra_env={
                # The documented way to make a worker log its retries and responses.
                "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG",
                "PREFECT_LOGGING_ROOT_LEVEL": "INFO",
            },
        )
        worker.log_path.write_text("")
        sidecar = ExporterProcess(
            "http://unused.invalid/api",
            "--no-prefect.enabled",
            f"--worker-log=w-throttled={worker.log_path}",
            log_path=tmp_path / "sidecar.log",
        )
        sidecar.start()
        worker.start()
        try:
            wait_for(lambda: storm.sent == 8, 120, "eight 429s sent to the worker")
            labels = {"worker": "w-throttled", "code": "429"}
            wait_for(
                lambda: sidecar.value("prefect_worker_api_responses_total", **labels) == 8,
                30,
                "the sidecar to count eight 429 responses",
            )
            wait_for(
                lambda: sidecar.value("prefect_worker_api_retries_total", **labels) == 8,
                30,
                "the sidecar to count eight retries",
            )
            assert len(proxy.injected("worker")) == 8
            assert (
                sidecar.value("prefect_exporter_log_lines_read_total", worker="w-throttled") or 0
            ) > 8
            assert sidecar.value("prefect_up") is None  # no API in sidecar-only mode
        finally:
            worker.kill()
            sidecar.stop()
