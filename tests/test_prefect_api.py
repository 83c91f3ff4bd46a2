"""Tests for the Prefect API adapter against an in-process fake server."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter.clock import Deadline, UnixTime
from exporter.errors import (
    ApiConnectionError,
    ApiStatusError,
    ApiTimeout,
    MalformedResponse,
    ObjectGone,
)
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import USER_AGENT, Connection, parse_retry_after
from exporter.prefect_parse import iso
from exporter.secret import Secret
from tests.fakes import API_URL, FakePrefect, make_api, pool_json, queue_json, worker_json

FAR = Deadline(1e12)  # a deadline that never passes in these tests
NOW = UnixTime(1_800_000_000.0)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def call_and_close(api: PrefectApi, coro: Any) -> Any:
    try:
        return await coro
    finally:
        await api.aclose()


def requests_count(
    registry: CollectorRegistry, endpoint: str, code: str, method: str = "POST"
) -> float | None:
    return registry.get_sample_value(
        "prefect_exporter_api_requests_total",
        {"endpoint": endpoint, "method": method, "code": code},
    )


class TestCounting:
    """Every response is counted by route template, method and status code."""

    def test_worker_requests_are_counted_by_route_template_not_raw_url(self) -> None:
        """Pool names never appear in the endpoint label."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/my pool/workers/filter", [worker_json("w1")])
        registry = CollectorRegistry()
        api = make_api(fake, registry)
        workers = run(call_and_close(api, api.workers("my pool", FAR)))
        assert [w.name for w in workers] == ["w1"]
        assert requests_count(registry, "/work_pools/{name}/workers/filter", "200") == 1

    def test_error_statuses_are_counted_and_raised(self) -> None:
        """A 500 is counted under its code and surfaces as ApiStatusError."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", {"exception_message": "boom"}, status=500)
        registry = CollectorRegistry()
        api = make_api(fake, registry)
        with pytest.raises(ApiStatusError) as raised:
            run(call_and_close(api, api.work_pools(FAR)))
        assert raised.value.status == 500
        assert requests_count(registry, "/work_pools/filter", "500") == 1

    def test_a_429_carries_its_retry_after(self) -> None:
        """Retry-After in seconds is parsed onto the error."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "work_pools/filter",
            {"detail": "slow down"},
            status=429,
            headers={"Retry-After": "7"},
        )
        api = make_api(fake)
        with pytest.raises(ApiStatusError) as raised:
            run(call_and_close(api, api.work_pools(FAR)))
        assert raised.value.retry_after == 7

    def test_timeouts_are_counted_with_code_timeout(self) -> None:
        """No response within the timeout counts as code="timeout"."""

        def slow(request: httpx.Request) -> httpx.Response:
            raise httpx.ReadTimeout("slow", request=request)

        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", slow)
        registry = CollectorRegistry()
        api = make_api(fake, registry)
        with pytest.raises(ApiTimeout):
            run(call_and_close(api, api.work_pools(FAR)))
        assert requests_count(registry, "/work_pools/filter", "timeout") == 1

    def test_refused_connections_are_counted_with_code_connection_error(self) -> None:
        """A connection failure is an ApiConnectionError, counted."""

        def refused(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused", request=request)

        fake = FakePrefect()
        fake.on("POST", "work_queues/filter", refused)
        registry = CollectorRegistry()
        api = make_api(fake, registry)
        with pytest.raises(ApiConnectionError):
            run(call_and_close(api, api.work_queues(FAR)))
        assert requests_count(registry, "/work_queues/filter", "connection_error") == 1

    def test_a_request_cut_off_by_the_polls_timeout_is_counted_as_cancelled(self) -> None:
        """The request was sent and spent budget: it shows as code="cancelled", not nowhere."""

        async def never_ends() -> Any:
            yield b"["
            await asyncio.Event().wait()

        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", lambda _: httpx.Response(200, content=never_ends()))
        registry = CollectorRegistry()
        api = make_api(fake, registry)

        async def cut_off() -> None:
            async with asyncio.timeout(0.05):
                await api.work_pools(FAR)

        with pytest.raises(TimeoutError):
            run(call_and_close(api, cut_off()))
        assert requests_count(registry, "/work_pools/filter", "cancelled") == 1

    def test_a_passed_deadline_sends_nothing(self) -> None:
        """Once the poll deadline has passed no request is made."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", [])
        api = make_api(fake)
        with pytest.raises(ApiTimeout):
            run(call_and_close(api, api.work_pools(deadline=Deadline(0))))
        assert fake.requests == []


class TestMalformedResponses:
    """Unexpected bodies raise MalformedResponse, never a crash or a silent zero."""

    @pytest.mark.parametrize(
        "body",
        [
            b"<html>proxy error</html>",
            b'{"not": "a list"}',
            b"[1, 2]",
            json.dumps([{"type": "process"}]).encode(),
            json.dumps([pool_json("p", concurrency_limit="ten")]).encode(),
            json.dumps([pool_json("p", concurrency_limit=True)]).encode(),
        ],
        ids=["html", "object", "numbers", "no-name", "string-limit", "bool-limit"],
    )
    def test_bad_pool_lists_are_rejected(self, body: bytes) -> None:
        """Non-JSON, wrong shapes and wrong field types are all MalformedResponse."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", body)
        api = make_api(fake)
        with pytest.raises(MalformedResponse):
            run(call_and_close(api, api.work_pools(FAR)))

    def test_bad_timestamp_is_rejected(self) -> None:
        """A last_polled that is not ISO-8601 is malformed."""
        fake = FakePrefect()
        fake.on("POST", "work_queues/filter", [queue_json("q", "d", "p", last_polled="yesterday")])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="last_polled"):
            run(call_and_close(api, api.work_queues(FAR)))

    def test_negative_count_is_rejected(self) -> None:
        """A count must be a non-negative integer."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/history",
            [{"states": [{"state_type": "SCHEDULED", "state_name": "Scheduled", "count_runs": 3}]}],
        )
        fake.on("POST", "flow_runs/count", -1)
        api = make_api(fake)
        with pytest.raises(MalformedResponse):
            run(call_and_close(api, api.queue_run_stats("q", NOW, FAR)))


class TestHeaders:
    """Identity and authentication headers."""

    def capture(self, connection: Connection) -> httpx.Request:
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", [])
        api = make_api(fake, connection=connection)
        run(call_and_close(api, api.work_pools(FAR)))
        return fake.requests[0]

    def test_sends_its_own_user_agent_and_api_version(self) -> None:
        """The exporter does not impersonate the Prefect client."""
        request = self.capture(Connection(API_URL))
        assert request.headers["User-Agent"] == USER_AGENT
        assert request.headers["User-Agent"].startswith("prefect-exporter/")
        assert "X-PREFECT-API-VERSION" in request.headers
        assert "Authorization" not in request.headers

    def test_api_key_is_sent_as_bearer(self) -> None:
        """PREFECT_API_KEY becomes a Bearer token."""
        request = self.capture(Connection(API_URL, api_key=Secret("pnu_abc")))
        assert request.headers["Authorization"] == "Bearer pnu_abc"

    def test_auth_string_is_sent_as_basic_and_wins_over_the_key(self) -> None:
        """PREFECT_API_AUTH_STRING wins when both are set, as in Prefect's client."""
        request = self.capture(
            Connection(API_URL, api_key=Secret("k"), auth_string=Secret("admin:pw"))
        )
        assert request.headers["Authorization"] == "Basic " + base64.b64encode(b"admin:pw").decode()

    def test_csrf_protected_servers_get_a_token_and_the_request_is_repeated(self) -> None:
        """A 403 for a missing CSRF token fetches one and repeats the call, all counted."""
        fake = FakePrefect()

        def pools(request: httpx.Request) -> httpx.Response:
            if request.headers.get("Prefect-Csrf-Token") != "tok":
                return httpx.Response(403, json={"detail": "Missing CSRF token."})
            return httpx.Response(200, json=[pool_json("p")])

        fake.on("POST", "work_pools/filter", pools)
        fake.on("GET", "csrf-token", {"token": "tok", "client": "c", "expiration": "x"})
        registry = CollectorRegistry()
        api = make_api(fake, registry)
        result = run(call_and_close(api, api.work_pools(FAR)))
        assert [p.name for p in result] == ["p"]
        assert requests_count(registry, "/work_pools/filter", "403") == 1
        assert requests_count(registry, "/work_pools/filter", "200") == 1
        assert requests_count(registry, "/csrf-token", "200", method="GET") == 1
        client = fake.requests[-1].headers["Prefect-Csrf-Client"]
        assert fake.requests[1].url.params["client"] == client


class TestPaging:
    """Lists longer than one page are read page by page."""

    def test_450_pools_take_three_pages(self) -> None:
        """Offsets advance by the server's maximum page size of 200."""
        all_pools = [pool_json(f"p{i:03}") for i in range(450)]

        def page(request: httpx.Request) -> list[dict[str, Any]]:
            body = json.loads(request.content)
            return all_pools[body["offset"] : body["offset"] + body["limit"]]

        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", page)
        api = make_api(fake)
        pools = run(call_and_close(api, api.work_pools(FAR)))
        assert len(pools) == 450
        assert [b["offset"] for b in fake.bodies("work_pools/filter")] == [0, 200, 400]


class TestQueueRunStats:
    """Per-queue aggregates use a fixed, small number of requests."""

    def history(self, *states: tuple[str, str, int]) -> list[dict[str, Any]]:
        return [
            {
                "interval_start": "x",
                "interval_end": "y",
                "states": [
                    {"state_type": t, "state_name": n, "count_runs": c} for t, n, c in states
                ],
            }
        ]

    def test_an_idle_queue_costs_one_request(self) -> None:
        """No runs means no follow-up count or oldest-run queries."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/history", self.history())
        api = make_api(fake)
        stats = run(call_and_close(api, api.queue_run_stats("q1", NOW, FAR)))
        assert len(fake.requests) == 1
        assert stats.due_scheduled == 0
        assert stats.oldest_due_scheduled is None

    def test_busy_queue_reads_backlog_and_oldest_waits_with_the_right_body_keys(self) -> None:
        """History filters with `work_queues`; count and filter with `work_pool_queues`."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/history",
            self.history(
                ("SCHEDULED", "Scheduled", 700),
                ("SCHEDULED", "AwaitingConcurrencySlot", 3),
                ("PENDING", "Pending", 2),
                ("RUNNING", "Running", 5),
            ),
        )
        fake.on("POST", "flow_runs/count", 650)

        def runs(request: httpx.Request) -> list[dict[str, Any]]:
            body = json.loads(request.content)
            if body["sort"] == "NEXT_SCHEDULED_START_TIME_ASC":
                return [{"next_scheduled_start_time": "2026-11-29T09:00:00Z"}]
            if body["limit"] == 1:
                return [{"expected_start_time": "2026-11-29T08:00:00Z"}]
            return [
                {"state": {"timestamp": "2026-11-29T09:30:00Z"}},
                {"state": {"timestamp": "2026-11-29T09:20:00Z"}},
            ]

        fake.on("POST", "flow_runs/filter", runs)
        api = make_api(fake)
        stats = run(call_and_close(api, api.queue_run_stats("q1", NOW, FAR)))

        assert stats.due_scheduled == 650
        assert stats.oldest_due_scheduled == 1_795_942_800.0  # 2026-11-29T09:00:00Z
        assert stats.oldest_awaiting_slot == 1_795_939_200.0  # 08:00
        assert stats.oldest_pending_since == 1_795_944_000.0  # 09:20, the earlier of two
        assert stats.oldest_running_since == 1_795_944_000.0
        assert stats.oldest_cancelling_since is None  # no Cancelling runs: not even asked
        assert len(fake.requests) == 6
        history = fake.bodies("flow_runs/history")[0]
        assert history["work_queues"] == {"id": {"any_": ["q1"]}}
        assert "work_pool_queues" not in history
        count = fake.bodies("flow_runs/count")[0]
        assert count["work_pool_queues"] == {"id": {"any_": ["q1"]}}
        assert "work_queues" not in count
        assert count["flow_runs"]["state"]["name"]["not_any_"] == ["AwaitingConcurrencySlot"]


class TestReadOnly:
    """The adapter calls only read endpoints."""

    def test_a_full_set_of_reads_touches_no_mutating_or_poll_recording_route(self) -> None:
        """No worker poll, heartbeat, create, update or delete is ever sent."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", [pool_json("p")])
        fake.on("POST", "work_queues/filter", [queue_json("q", "default", "p")])
        fake.on("POST", "work_pools/p/workers/filter", [worker_json("w")])
        fake.on("POST", "flow_runs/history", [])
        api = make_api(fake)

        async def everything() -> None:
            await api.work_pools(FAR)
            await api.work_queues(FAR)
            await api.workers("p", FAR)
            await api.queue_run_stats("q", NOW, FAR)

        run(call_and_close(api, everything()))
        for request in fake.requests:
            path = request.url.path
            assert request.method in ("GET", "POST")
            assert path.endswith(("/filter", "/count", "/history")), path
            assert "get_scheduled_flow_runs" not in path
            assert "get_runs" not in path


class TestRetryAfter:
    """Retry-After comes as seconds or as an HTTP date."""

    def test_seconds(self) -> None:
        """A number of seconds is taken as is."""
        assert parse_retry_after("12", NOW) == 12

    def test_http_date(self) -> None:
        """An HTTP date becomes the seconds until then."""
        assert parse_retry_after("Sun, 29 Nov 2026 10:00:30 GMT", 1_795_946_400.0) == 30

    def test_garbage_is_ignored(self) -> None:
        """An unreadable header means no hint, not a crash."""
        assert parse_retry_after("soon", NOW) is None

    @pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity", "1e999"])
    def test_non_finite_values_are_rejected(self, value: str) -> None:
        """`inf` or `nan` is no delay at all: ignored, so the capped back-off applies."""
        assert parse_retry_after(value, NOW) is None

    def test_a_date_decades_ahead_is_returned_for_the_back_off_to_cap(self) -> None:
        """A far date parses to a finite number of seconds (the back-off caps it)."""
        seconds = parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT", NOW)
        assert seconds is not None
        assert seconds > 1e9

    def test_the_raw_header_travels_with_the_error_for_the_log(self) -> None:
        """A rejected header is still visible to the poller, which logs and counts it."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", {}, status=429, headers={"Retry-After": "inf"})
        api = make_api(fake)
        with pytest.raises(ApiStatusError) as raised:
            run(call_and_close(api, api.work_pools(FAR)))
        assert raised.value.retry_after is None
        assert raised.value.retry_after_header == "inf"


class TestBoundedAnswers:
    """Answers too large, inconsistent or undecodable fail as malformed_response, never internal."""

    def test_a_body_larger_than_the_cap_is_refused_while_reading(self) -> None:
        """The body is read in chunks and given up once past the cap (no Content-Length)."""

        async def chunks() -> Any:
            for _ in range(100):
                yield b" " * 1024

        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", lambda r: httpx.Response(200, content=chunks()))
        registry = CollectorRegistry()
        api = make_api(fake, registry, max_response_bytes=10 * 1024)
        with pytest.raises(MalformedResponse, match="larger than 10240 bytes"):
            run(call_and_close(api, api.work_pools(FAR)))
        assert requests_count(registry, "/work_pools/filter", "200") == 1
        read = registry.get_sample_value(
            "prefect_exporter_api_response_bytes_total", {"endpoint": "/work_pools/filter"}
        )
        assert read is not None
        assert read <= 11 * 1024

    def test_a_declared_length_above_the_cap_is_refused_before_reading(self) -> None:
        """Content-Length alone is enough to refuse."""
        fake = FakePrefect()
        big = b"[" + b" " * 20_000 + b"]"
        fake.on("POST", "work_pools/filter", big)
        api = make_api(fake, max_response_bytes=10_000)
        with pytest.raises(MalformedResponse, match="larger than"):
            run(call_and_close(api, api.work_pools(FAR)))

    def test_a_page_with_more_rows_than_asked_for_is_malformed(self) -> None:
        """201 rows for a limit of 200 is not 'more pages follow' but a wrong answer."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", [pool_json(f"p{i}") for i in range(201)])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="201 rows"):
            run(call_and_close(api, api.work_pools(FAR)))
        assert len(fake.requests) == 1

    def test_a_sample_with_more_runs_than_its_limit_is_malformed(self) -> None:
        """Sort-and-limit reads check the limit too."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/history",
            [{"states": [{"state_type": "SCHEDULED", "state_name": "Scheduled", "count_runs": 3}]}],
        )
        fake.on("POST", "flow_runs/count", 3)
        run_row = {"id": "r", "next_scheduled_start_time": "2026-11-29T10:00:00Z"}
        fake.on("POST", "flow_runs/filter", [run_row, run_row])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="at most 1"):
            run(call_and_close(api, api.queue_run_stats("q", NOW, FAR)))

    @pytest.mark.parametrize(
        "body",
        [b"NaN", b"Infinity", b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00garbage"],
        ids=["nan", "infinity", "deeply-nested", "bad-encoding"],
    )
    def test_bodies_that_are_not_json_are_malformed(self, body: bytes) -> None:
        """Python's parser accepts NaN and recurses; neither escapes as anything else."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/count", body)
        api = make_api(fake)
        with pytest.raises(MalformedResponse):
            run(call_and_close(api, api.deployment_slot_runs("d", FAR)))

    def test_a_body_that_fails_to_decompress_is_malformed(self) -> None:
        """Content-Encoding gzip with a broken body is the server's fault, not ours."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "work_pools/filter",
            # A stream, so that decoding happens as the exporter reads (as over a socket).
            lambda r: httpx.Response(
                200,
                stream=httpx.ByteStream(b"this is not gzip"),
                headers={"Content-Encoding": "gzip"},
            ),
        )
        registry = CollectorRegistry()
        api = make_api(fake, registry)
        with pytest.raises(MalformedResponse, match="decompress"):
            run(call_and_close(api, api.work_pools(FAR)))
        assert requests_count(registry, "/work_pools/filter", "200") == 1

    @pytest.mark.parametrize(
        ("field", "value"),
        [("concurrency_limit", -1), ("concurrency_limit", 2**60)],
    )
    def test_impossible_numbers_are_malformed(self, field: str, value: int) -> None:
        """A negative or astronomically large limit is not a value Prefect stores."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", [pool_json("p", **{field: value})])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="impossible"):
            run(call_and_close(api, api.work_pools(FAR)))

    def test_an_impossible_heartbeat_interval_is_malformed(self) -> None:
        """A worker heartbeating every 0 or -30 seconds cannot be judged online."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/p/workers/filter", [worker_json("w", interval=-30)])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="impossible"):
            run(call_and_close(api, api.workers("p", FAR)))

    def test_a_timestamp_out_of_range_is_malformed(self) -> None:
        """A date that overflows the platform's time is malformed, not a crash."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "work_queues/filter",
            [queue_json("q", "d", "p", last_polled="9999-12-31T23:59:59-23:59")],
        )
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="last_polled"):
            run(call_and_close(api, api.work_queues(FAR)))


class TestVanishedObjects:
    """A per-object route answering 404 means the object went away, not that the API failed."""

    def test_workers_of_a_deleted_pool_raise_object_gone(self) -> None:
        """The pool named in the path is reported gone."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "work_pools/doomed/workers/filter",
            {"detail": 'Work pool "doomed" not found.'},
            status=404,
        )
        api = make_api(fake)
        with pytest.raises(ObjectGone) as raised:
            run(call_and_close(api, api.workers("doomed", FAR)))
        assert raised.value.name == "doomed"


class TestCsrfErrors:
    """The token endpoint's error statuses take the same paths as on any other endpoint."""

    @pytest.mark.parametrize(
        ("status", "retry_after"), [(401, None), (403, None), (429, 7.0), (503, 7.0)]
    )
    def test_token_endpoint_errors_are_status_errors(
        self, status: int, retry_after: float | None
    ) -> None:
        """A wrong password shows as HTTP 401, and throttling carries its Retry-After."""
        fake = FakePrefect()
        fake.on("POST", "work_pools/filter", {"detail": "Missing CSRF token."}, status=403)
        fake.on("GET", "csrf-token", {"detail": "no"}, status=status, headers={"Retry-After": "7"})
        api = make_api(fake)
        with pytest.raises(ApiStatusError) as raised:
            run(call_and_close(api, api.work_pools(FAR)))
        assert raised.value.status == status
        assert raised.value.reason == "http_status"
        assert raised.value.throttled == (status in (429, 503))
        if raised.value.throttled:
            assert raised.value.retry_after == retry_after
        if status == 401:
            assert "401" in str(raised.value)
            assert "PREFECT_API_AUTH_STRING" in str(raised.value)


class TestRunListings:
    """Cross-queue listings use the right body keys and refuse answers the filter cannot give."""

    def test_active_and_scheduled_pages_filter_by_queue_ids_with_the_filter_key(self) -> None:
        """`work_pool_queues` (not `work_queues`) carries the ids; states are OR-ed for active."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/filter", [])
        api = make_api(fake)
        run(call_and_close(api, api.active_runs_page(["q1", "q2"], None, FAR)))
        api = make_api(fake)
        later = UnixTime(NOW - 30)
        run(call_and_close(api, api.scheduled_runs_page(UnixTime(NOW + 60), ["q1"], later, FAR)))
        active, scheduled = fake.bodies("flow_runs/filter")
        assert active["work_pool_queues"] == {"id": {"any_": ["q1", "q2"]}}
        assert active["flow_runs"]["state"]["operator"] == "or_"
        assert active["sort"] == "EXPECTED_START_TIME_ASC"
        assert scheduled["flow_runs"]["next_scheduled_start_time"]["before_"].startswith("2027")
        # Keyset paging: the next page starts at the last run's time.
        assert scheduled["flow_runs"]["next_scheduled_start_time"]["after_"].startswith("2027")
        assert "expected_start_time" not in active["flow_runs"]
        assert scheduled["sort"] == "NEXT_SCHEDULED_START_TIME_ASC"
        assert scheduled["limit"] == 200

    def test_runs_already_listed_are_left_out_by_id(self) -> None:
        """The next page of a tie leaves out, by id, the runs answered before (Prefect 3.0 on)."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/filter", [])
        api = make_api(fake)
        run(call_and_close(api, api.active_runs_page(["q1"], None, FAR, excluded=["r1", "r2"])))
        api = make_api(fake)
        later = UnixTime(NOW - 30)
        page = api.scheduled_runs_page(UnixTime(NOW + 60), ["q1"], later, FAR, excluded=["r3"])
        run(call_and_close(api, page))
        api = make_api(fake)
        run(call_and_close(api, api.scheduled_runs_page(UnixTime(NOW + 60), ["q1"], later, FAR)))
        active, scheduled, plain = fake.bodies("flow_runs/filter")
        assert active["flow_runs"]["id"] == {"not_any_": ["r1", "r2"]}
        assert active["flow_runs"]["state"]["operator"] == "or_"
        assert scheduled["flow_runs"]["id"] == {"not_any_": ["r3"]}
        assert "next_scheduled_start_time" in scheduled["flow_runs"]
        assert "id" not in plain["flow_runs"]

    def test_a_run_from_a_queue_not_asked_for_is_malformed(self) -> None:
        """An ignored filter key would otherwise pass every run off as this queue's."""
        row = {
            "id": "r",
            "work_queue_id": "other",
            "state": {"type": "PENDING", "name": "Pending", "timestamp": "2026-11-29T10:00:00Z"},
            "expected_start_time": "2026-11-29T09:59:00Z",
            "next_scheduled_start_time": None,
        }
        fake = FakePrefect()
        fake.on("POST", "flow_runs/filter", [row])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="queue filter"):
            run(call_and_close(api, api.active_runs_page(["q1"], None, FAR)))

    def test_far_ahead_counts_use_the_history_key_and_the_cut(self) -> None:
        """`/history` names the queue filter `work_queues`; runs at or after the cut count."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/history",
            [{"states": [{"state_type": "SCHEDULED", "state_name": "Scheduled", "count_runs": 7}]}],
        )
        api = make_api(fake)
        counts = run(
            call_and_close(api, api.scheduled_counts_after("q1", UnixTime(NOW + 3600), FAR))
        )
        assert [(c.state_name, c.count) for c in counts] == [("Scheduled", 7)]
        (body,) = fake.bodies("flow_runs/history")
        assert body["work_queues"] == {"id": {"any_": ["q1"]}}
        assert "after_" in body["flow_runs"]["next_scheduled_start_time"]

    def test_counts_of_runs_ahead_are_bounded_on_both_sides(self) -> None:
        """From the poll's time up to the far-ahead cut, SCHEDULED-type runs of one queue."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/history",
            [{"states": [{"state_type": "SCHEDULED", "state_name": "Scheduled", "count_runs": 9}]}],
        )
        api = make_api(fake)
        counts = run(
            call_and_close(api, api.scheduled_counts_between("q1", NOW, UnixTime(NOW + 3600), FAR))
        )
        assert [(c.state_name, c.count) for c in counts] == [("Scheduled", 9)]
        (body,) = fake.bodies("flow_runs/history")
        assert body["work_queues"] == {"id": {"any_": ["q1"]}}
        window = body["flow_runs"]["next_scheduled_start_time"]
        assert window == {"after_": iso(NOW), "before_": iso(UnixTime(NOW + 3600))}
        assert body["flow_runs"]["state"]["name"] == {"not_any_": ["AwaitingConcurrencySlot"]}

    def test_counts_of_due_runs_have_no_start(self) -> None:
        """Due runs of a queue too big to list: every one due by the poll's time."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/history", [])
        api = make_api(fake)
        counts = run(call_and_close(api, api.scheduled_counts_between("q1", None, NOW, FAR)))
        assert counts == ()
        (body,) = fake.bodies("flow_runs/history")
        assert body["flow_runs"]["next_scheduled_start_time"] == {"before_": iso(NOW)}


class TestCsrfConcurrency:
    """Requests refused together for want of a token fetch one token between them."""

    def test_two_refused_requests_fetch_one_token(self) -> None:
        """Both are repeated with the new token; /csrf-token is asked once."""
        fake = FakePrefect()

        def guarded(request: httpx.Request) -> httpx.Response:
            if request.headers.get("Prefect-Csrf-Token") != "tok":
                return httpx.Response(403, json={"detail": "Missing CSRF token."})
            return httpx.Response(200, json=[])

        fake.on("POST", "work_pools/filter", guarded)
        fake.on("POST", "work_queues/filter", guarded)
        fake.on("GET", "csrf-token", {"token": "tok", "client": "c", "expiration": "x"})
        api = make_api(fake)

        async def both() -> None:
            try:
                await asyncio.gather(api.work_pools(FAR), api.work_queues(FAR))
            finally:
                await api.aclose()

        run(both())
        token_requests = [r for r in fake.requests if r.url.path.endswith("/csrf-token")]
        assert len(token_requests) == 1


class TestRunsWithoutWorkQueue:
    """Runs whose queue was deleted: counted in two requests, listed in one."""

    def test_count_is_runs_naming_a_queue_less_those_whose_queue_exists(self) -> None:
        """The queue-existence count is read first; both are cut at the poll's start."""
        fake = FakePrefect()

        def count(request: httpx.Request) -> int:
            return 5 if "work_pool_queues" in json.loads(request.content) else 12

        fake.on("POST", "flow_runs/count", count)
        api = make_api(fake)
        assert run(call_and_close(api, api.runs_without_work_queue(NOW, FAR))) == 7
        first, second = fake.bodies("flow_runs/count")
        assert first["work_pool_queues"] == {}
        assert "work_pool_queues" not in second
        for body in (first, second):
            assert body["flow_runs"] == {
                "state": {"type": {"any_": ["SCHEDULED"]}},
                "work_queue_name": {"is_null_": False},
                "next_scheduled_start_time": {"before_": "2027-01-15T08:00:00Z"},
            }

    def test_a_race_that_would_make_the_count_negative_gives_zero(self) -> None:
        """Runs created between the two counts can only lower the difference, never below 0."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/count",
            lambda r: 9 if "work_pool_queues" in json.loads(r.content) else 8,
        )
        api = make_api(fake)
        assert run(call_and_close(api, api.runs_without_work_queue(NOW, FAR))) == 0

    def test_sample_keeps_only_runs_without_a_queue_id(self) -> None:
        """A run with a queue id is healthy; one without has no pool, whatever the API says."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/filter",
            [
                {"id": "ok", "work_queue_id": "q1", "work_queue_name": "a", "work_pool_name": "p"},
                {
                    "id": "lost",
                    "work_queue_id": None,
                    "work_queue_name": "doomed",
                    "work_pool_name": None,
                    "deployment_id": "d1",
                },
            ],
        )
        api = make_api(fake)
        sample = run(call_and_close(api, api.runs_without_work_queue_sample(NOW, FAR)))
        assert [(s.id, s.work_pool, s.work_queue, s.deployment_id) for s in sample] == [
            ("lost", None, "doomed", "d1")
        ]
        (body,) = fake.bodies("flow_runs/filter")
        assert body["sort"] == "NEXT_SCHEDULED_START_TIME_ASC"
        assert body["limit"] == 200

    def test_a_queue_name_that_is_not_a_string_is_malformed(self) -> None:
        """A number where a name belongs fails the read instead of passing for data."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/filter", [{"id": "x", "work_queue_name": 3}])
        api = make_api(fake)
        with pytest.raises(MalformedResponse, match="work_queue_name"):
            run(call_and_close(api, api.runs_without_work_queue_sample(NOW, FAR)))


class TestTagWaitingRuns:
    """Flow runs whose tagged task waits for a slot, with where they run."""

    def test_running_flow_runs_with_a_pending_tagged_task(self) -> None:
        """One request filtering flow runs by their task runs' tag and state."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/filter",
            [{"id": "f1", "work_queue_id": "q", "work_queue_name": "a", "work_pool_name": "p"}],
        )
        api = make_api(fake)
        places = run(call_and_close(api, api.tag_waiting_runs("db", FAR)))
        assert [(p.id, p.work_pool, p.work_queue) for p in places] == [("f1", "p", "a")]
        (body,) = fake.bodies("flow_runs/filter")
        assert body["task_runs"] == {
            "tags": {"all_": ["db"]},
            "state": {"type": {"any_": ["PENDING"]}},
        }
        assert body["flow_runs"] == {"state": {"type": {"any_": ["RUNNING"]}}}


class TestAwaitingSlotRuns:
    """Runs held by a deployment limit, with their deployment and queue."""

    def test_one_page_of_awaiting_runs_longest_waiting_first(self) -> None:
        """One request by state name; each run keeps its deployment id."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/filter",
            [
                {
                    "id": "r1",
                    "work_queue_id": "q",
                    "work_queue_name": "default",
                    "work_pool_name": "p",
                    "deployment_id": "d1",
                }
            ],
        )
        api = make_api(fake)
        places = run(call_and_close(api, api.awaiting_slot_runs(FAR)))
        assert [(x.work_pool, x.work_queue, x.deployment_id) for x in places] == [
            ("p", "default", "d1")
        ]
        (body,) = fake.bodies("flow_runs/filter")
        assert body["flow_runs"] == {"state": {"name": {"any_": ["AwaitingConcurrencySlot"]}}}
        assert body["sort"] == "EXPECTED_START_TIME_ASC"
