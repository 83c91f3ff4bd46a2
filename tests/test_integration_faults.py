"""Hostile-but-real answers through a fault-injecting proxy in front of a real Prefect server.

Each test is one row of "trust under stress": the exporter stays exact where it can, fails a
poll as `malformed_response` where it cannot, never blinds itself for long, never grows without
bound, and stops promptly when told to.
"""

from __future__ import annotations

import gzip
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, wait_for
from tests.faultproxy import Fault, FaultProxy, Once

pytestmark = pytest.mark.integration

FAST = ("--poll.interval=1s", "--prefect.requests-per-minute=6000", "--log.format=json")


@pytest.fixture
def proxies() -> Iterator[list[FaultProxy]]:
    started: list[FaultProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="module")
def admin(prefect_server: PrefectServer) -> Iterator[PrefectAdmin]:
    client = PrefectAdmin(prefect_server.api_url)
    client.create_pool("stays")
    yield client
    client.close()


def start_proxy(
    server: PrefectServer, proxies: list[FaultProxy], rule: Once, after: object = None
) -> FaultProxy:
    proxy = FaultProxy(server.api_url.removesuffix("/api"), rule, after)  # type: ignore[arg-type]
    proxy.start()
    proxies.append(proxy)
    return proxy


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def errors(exporter: ExporterProcess, reason: str) -> float:
    return exporter.value("prefect_exporter_poll_errors_total", reason=reason) or 0


class TestOversizedAndBrokenAnswers:
    """Huge, inconsistent or undecodable answers fail the poll as malformed; memory stays flat."""

    def test_fifty_megabyte_pages_leave_memory_flat(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
    ) -> None:
        """Three 50 MB pool lists: three malformed polls, RSS grows by far less than one page."""
        huge = b"[" + b" " * (50 * 1024 * 1024) + b"]"
        rule = Once("exporter", "/work_pools/filter", Fault(200, {}, body=huge), times=3)
        proxy = start_proxy(prefect_server, proxies, rule)
        exporter = ExporterProcess(proxy.url + "/api", *FAST, log_path=tmp_path / "e.log")
        exporter.start()
        try:
            assert exporter.process is not None
            before = rss_bytes(exporter.process.pid)
            wait_for(lambda: errors(exporter, "malformed_response") == 3, 60, "three refusals")
            wait_for(lambda: exporter.value("prefect_up") == 1, 30, "recovery")
            assert rss_bytes(exporter.process.pid) - before < 40 * 1024 * 1024
            assert errors(exporter, "internal") == 0
            assert exporter.value("prefect_work_pool_info", work_pool="stays", pool_type="process")
        finally:
            exporter.stop()

    @pytest.mark.parametrize(
        ("body", "headers"),
        [
            (json.dumps([{"name": f"p{i}"} for i in range(201)]).encode(), {}),
            (b"this is not gzip", {"Content-Encoding": "gzip"}),
            (gzip.compress(b"NaN"), {"Content-Encoding": "gzip"}),
        ],
        ids=["more-rows-than-the-limit", "broken-gzip", "nan"],
    )
    def test_answers_that_cannot_be_true_are_malformed_not_internal(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        """The poll fails as malformed_response, is counted by status, and the next one heals."""
        rule = Once("exporter", "/work_pools/filter", Fault(200, headers, body=body))
        proxy = start_proxy(prefect_server, proxies, rule)
        exporter = ExporterProcess(proxy.url + "/api", *FAST, log_path=tmp_path / "e.log")
        exporter.start()
        try:
            wait_for(lambda: errors(exporter, "malformed_response") == 1, 30, "one refusal")
            wait_for(lambda: exporter.value("prefect_up") == 1, 30, "recovery")
            assert errors(exporter, "internal") == 0
            assert (
                exporter.value(
                    "prefect_exporter_api_requests_total",
                    endpoint="/work_pools/filter",
                    method="POST",
                    code="200",
                )
                or 0
            ) >= 2
        finally:
            exporter.stop()


class TestVanishedPool:
    """A pool deleted right after the pool list was served is left out; the poll succeeds."""

    def test_the_first_poll_publishes_the_other_pools(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
    ) -> None:
        """prefect_up 1 at once, `stays` exported, `doomed` absent, one object counted gone."""
        admin.create_pool("doomed")
        deleted: list[str] = []

        def delete_after_list(client: str, method: str, path: str, status: int) -> None:
            if client == "exporter" and path.endswith("/work_pools/filter") and not deleted:
                admin.request("DELETE", "work_pools/doomed")
                deleted.append("doomed")

        rule = Once("nobody", "", Fault(500, {}))
        proxy = start_proxy(prefect_server, proxies, rule, delete_after_list)
        # A whole interval for the first poll: it must not time out on a busy machine.
        exporter = ExporterProcess(
            proxy.url + "/api",
            "--poll.interval=10s",
            "--prefect.requests-per-minute=6000",
            log_path=tmp_path / "e.log",
        )
        exporter.start()

        def polls() -> float:
            return sum(
                exporter.value("prefect_exporter_polls_total", result=result) or 0
                for result in ("success", "failure")
            )

        try:
            wait_for(lambda: polls() >= 1, 30, "the first poll")
            assert exporter.value("prefect_up") == 1
            assert errors(exporter, "http_status") == 0
            assert exporter.value("prefect_work_pool_info", work_pool="stays", pool_type="process")
            assert not exporter.value(
                "prefect_work_pool_info", work_pool="doomed", pool_type="process"
            )
            assert exporter.value("prefect_exporter_objects_gone_total", kind="work_pool") == 1
        finally:
            exporter.stop()


class TestThrottling:
    """Retry-After is bounded, and a deliberate back-off is not a stalled loop."""

    @pytest.mark.parametrize(
        "header", ["inf", "999999", "Wed, 21 Oct 2099 07:28:00 GMT"], ids=["inf", "days", "2099"]
    )
    def test_an_unbounded_retry_after_is_clamped_and_polling_resumes(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
        header: str,
    ) -> None:
        """One 429 asking for forever; the exporter is back after the cap (3 s here), says why."""
        rule = Once("exporter", "/work_pools/filter", Fault(429, {"Retry-After": header}))
        proxy = start_proxy(prefect_server, proxies, rule)
        log = tmp_path / "e.log"
        exporter = ExporterProcess(proxy.url + "/api", *FAST, "--poll.max-backoff=3s", log_path=log)
        exporter.start()
        try:
            wait_for(lambda: exporter.value("prefect_up") == 1, 30, "polling to resume")
            assert exporter.value("prefect_exporter_retry_after_clamped_total") == 1
            lines = [json.loads(line) for line in log.read_text().splitlines() if line]
            clamped = [line for line in lines if line["event"] == "retry_after_clamped"]
            assert [line["retry_after"] for line in clamped] == [header]
            assert clamped[0]["wait_seconds"] <= 3
        finally:
            exporter.stop()

    def test_healthz_stays_up_during_a_long_retry_after(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
    ) -> None:
        """A 60 s Retry-After with a 4 s health window: /healthz answers 200 throughout."""
        rule = Once("exporter", "/work_pools/filter", Fault(429, {"Retry-After": "60"}))
        proxy = start_proxy(prefect_server, proxies, rule)
        exporter = ExporterProcess(
            proxy.url + "/api", *FAST, "--poll.timeout=1s", log_path=tmp_path / "e.log"
        )
        exporter.start()
        try:
            wait_for(lambda: rule.left == 0, 30, "the 429")
            watched_until = time.monotonic() + 10  # 2.5 health windows
            while time.monotonic() < watched_until:
                answer = httpx.get(f"{exporter.url}/healthz", timeout=5)
                assert answer.status_code == 200, answer.text
                time.sleep(0.5)
            assert answer.json()["seconds_until_next_poll"] > 40
            # And the back-off was obeyed: nothing was sent to Prefect meanwhile.
            assert len(proxy.requests_of("exporter")) <= 4
        finally:
            exporter.stop()


class TestBudgetCeiling:
    """--prefect.requests-per-minute is never exceeded, not even in the first minute."""

    def test_the_first_twenty_seconds_stay_within_the_minutes_budget(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
    ) -> None:
        """20/min with a 1 s interval: at most 20 requests reach the server in 20 s."""
        rule = Once("nobody", "", Fault(500, {}))
        proxy = start_proxy(prefect_server, proxies, rule)
        exporter = ExporterProcess(
            proxy.url + "/api",
            "--poll.interval=1s",
            "--prefect.requests-per-minute=20",
            log_path=tmp_path / "e.log",
        )
        started = time.monotonic()
        exporter.start()
        try:
            wait_for(lambda: time.monotonic() - started > 20, 30, "twenty seconds")
            sent = proxy.requests_of("exporter")
            assert 0 < len(sent) <= 20
        finally:
            exporter.stop()


class TestShutdown:
    """SIGTERM during a poll exits within 5 s whatever the poll and request timeouts."""

    def test_sigterm_while_prefect_is_slow_to_answer(
        self,
        prefect_server: PrefectServer,
        admin: PrefectAdmin,
        proxies: list[FaultProxy],
        tmp_path: Path,
    ) -> None:
        """A poll waiting on a 30 s answer is cancelled; exit code 0 within 5 s."""
        rule = Once("exporter", "/work_pools/filter", Fault(200, {}, body=b"[]", delay=30))
        proxy = start_proxy(prefect_server, proxies, rule)
        log = tmp_path / "e.log"
        exporter = ExporterProcess(
            proxy.url + "/api",
            "--poll.interval=60s",
            "--poll.timeout=60s",
            "--prefect.request-timeout=50s",
            "--log.format=json",
            log_path=log,
        )
        exporter.start()
        assert exporter.process is not None
        try:
            wait_for(lambda: rule.left == 0, 30, "the slow request to be on the wire")
            exporter.process.send_signal(signal.SIGTERM)
            assert exporter.process.wait(timeout=5) == 0
            events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line]
            assert "poll_cancelled" in events
            assert "exporter_stopped" in events
        finally:
            exporter.stop()


class TestCsrfWithWrongCredentials:
    """With auth and CSRF on, a wrong password is reported as HTTP 401, not a bad body."""

    def test_wrong_password_is_an_http_status_error(self, tmp_path: Path) -> None:
        """poll_errors{reason=http_status} grows, the log names 401; malformed stays 0."""
        server = PrefectServer(
            tmp_path / "home",
            extra_env={
                "PREFECT_SERVER_API_AUTH_STRING": "admin:right",
                "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
            },
        )
        server.start()
        config = tmp_path / "exporter.yml"
        config.write_text("prefect:\n  auth_string: admin:wrong\n")
        log = tmp_path / "e.log"
        exporter = ExporterProcess(server.api_url, *FAST, f"--config.file={config}", log_path=log)
        exporter.start()
        try:
            wait_for(lambda: errors(exporter, "http_status") >= 1, 30, "a failed poll")
            assert errors(exporter, "malformed_response") == 0
            lines = [json.loads(line) for line in log.read_text().splitlines() if line]
            failed = [line for line in lines if line["event"] == "poll_failed"]
            assert "HTTP 401" in failed[0]["error"]
        finally:
            exporter.stop()
            server.stop()
