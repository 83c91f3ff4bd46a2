"""The only module that speaks HTTP to Prefect: budgeted, bounded, counted requests.

Every attempt draws one request from the budget, is counted by route template, method and status
code, and is read within a byte cap and a total time limit. Nothing is retried silently; the one
repetition is the request a CSRF-protected server refused for want of a token.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import httpx
import prefect
from prefect.client.constants import SERVER_API_VERSION
from prometheus_client import CollectorRegistry, Counter, Histogram

from exporter import __version__
from exporter.budget import BudgetExhausted, RequestBudget
from exporter.clock import Deadline
from exporter.errors import (
    ApiBudgetExhausted,
    ApiConnectionError,
    ApiStatusError,
    ApiTimeout,
    MalformedResponse,
)
from exporter.secret import Secret

USER_AGENT = f"prefect-exporter/{__version__} (prefect-client/{prefect.__version__})"
# A page of 200 flow runs is well under 1 MB; 16 MiB leaves room for deployments with large
# parameters while keeping a misbehaving or hostile server from exhausting memory (bytes after
# content decoding, so a gzip bomb is caught too).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class ApiMetrics:
    """The adapter's own counters: every response by route template, method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "prefect_exporter_api_requests",
            "Requests the exporter made to the Prefect API, by route template, method and "
            "HTTP status code (timeout, connection_error or cancelled when no response arrived).",
            ["endpoint", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "prefect_exporter_api_request_duration_seconds",
            "Time the exporter waited for Prefect API responses, in seconds.",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.response_bytes = Counter(
            "prefect_exporter_api_response_bytes",
            "Bytes of response bodies the exporter read from the Prefect API.",
            ["endpoint"],
            registry=registry,
        )

    def observe(self, endpoint: str, method: str, code: str, seconds: float, size: int) -> None:
        self.requests.labels(endpoint, method, code).inc()
        self.duration.labels(endpoint).observe(seconds)
        if size:
            self.response_bytes.labels(endpoint).inc(size)


@dataclass(frozen=True)
class Connection:
    """Where the API is and how to authenticate; secrets stay wrapped until the header is built."""

    api_url: str
    api_key: Secret | None = None
    auth_string: Secret | None = None
    request_timeout: float = 10.0


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110: delay-seconds or an HTTP date).

    `now` is Unix time, for dates. Returns None for a missing or invalid header, including
    non-finite numbers (`inf`, `nan`); the value is not capped here (the back-off caps it).
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _auth_header(connection: Connection) -> dict[str, str]:
    # Prefect's client sends the auth string when both are set; so do we.
    if connection.auth_string is not None:
        encoded = base64.b64encode(connection.auth_string.reveal().encode()).decode()
        return {"Authorization": f"Basic {encoded}"}
    if connection.api_key is not None:
        return {"Authorization": f"Bearer {connection.api_key.reveal()}"}
    return {}


@dataclass(frozen=True)
class _Answer:
    """A complete response read within the size cap."""

    status: int
    headers: httpx.Headers
    content: bytes


class _Oversized(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _decode_json(endpoint: str, content: bytes) -> Any:
    """The body as JSON; NaN and Infinity (which Python's parser accepts) are not JSON."""
    try:
        return json.loads(content, parse_constant=_reject_constant)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MalformedResponse(f"{endpoint}: response is not JSON") from None


class PrefectHttp:
    """Requests to one Prefect API: `call()` returns decoded JSON or raises PrefectApiError.

    `requests_sent` counts every attempt (the poller measures a poll's cost by it).
    """

    def __init__(
        self,
        connection: Connection,
        metrics: ApiMetrics,
        budget: RequestBudget,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._connection = connection
        self._max_response_bytes = max_response_bytes
        self._metrics = metrics
        self._budget = budget
        self._clock = clock
        self._monotonic = monotonic
        self._csrf: dict[str, str] = {}
        self._csrf_lock = asyncio.Lock()
        self.requests_sent = 0
        self._client = httpx.AsyncClient(
            base_url=connection.api_url + "/",
            headers={
                "User-Agent": USER_AGENT,
                "X-PREFECT-API-VERSION": SERVER_API_VERSION,
                **_auth_header(connection),
            },
            transport=transport,
            timeout=connection.request_timeout,
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def call(
        self,
        method: str,
        endpoint: str,
        path: str,
        body: Mapping[str, Any] | None,
        deadline: Deadline,
    ) -> Any:
        """One logical request: budgeted, counted, and repeated once only for a CSRF token.

        Returns the decoded JSON. Raises ApiStatusError for an error status, MalformedResponse
        for a body that is too large, cannot be decoded or is not JSON, and ApiTimeout,
        ApiConnectionError or ApiBudgetExhausted when no answer could be had.
        """
        sent_with = self._csrf
        answer = await self._send(method, endpoint, path, body, deadline)
        if answer.status == 403 and b"CSRF" in answer.content:
            async with self._csrf_lock:
                # Requests refused together fetch one token: the first refreshes, the others
                # find a token newer than the one they were refused with.
                if self._csrf is sent_with:
                    await self._refresh_csrf(deadline)
            answer = await self._send(method, endpoint, path, body, deadline)
        self._raise_for_status(endpoint, answer)
        return _decode_json(endpoint, answer.content)

    def _raise_for_status(self, endpoint: str, answer: _Answer) -> None:
        if answer.status < 400:
            return
        header = answer.headers.get("Retry-After")
        raise ApiStatusError(
            endpoint,
            answer.status,
            parse_retry_after(header, self._clock()),
            answer.headers.get("Prefect-Maintenance", "").lower() == "true",
            retry_after_header=header,
        )

    async def _send(
        self,
        method: str,
        endpoint: str,
        path: str,
        body: Mapping[str, Any] | None,
        deadline: Deadline,
    ) -> _Answer:
        try:
            await self._budget.acquire(deadline)
        except BudgetExhausted as exc:
            raise ApiBudgetExhausted(str(exc)) from None
        remaining = deadline - self._monotonic()
        if remaining <= 0:
            raise ApiTimeout(f"{endpoint}: the poll deadline passed")
        timeout = min(self._connection.request_timeout, remaining)
        self.requests_sent += 1
        started = self._monotonic()
        status, size = "", 0
        try:
            # httpx's timeout bounds each read, not the whole answer: a server that trickles a
            # byte at a time is cut off here.
            async with (
                asyncio.timeout(timeout),
                self._client.stream(
                    method, path, json=body, headers=self._csrf, timeout=timeout
                ) as response,
            ):
                status = str(response.status_code)
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > self._max_response_bytes:
                    raise _Oversized(int(declared))
                content = bytearray()
                # Counted after content decoding, so a compressed bomb is stopped as it inflates.
                async for chunk in response.aiter_bytes():
                    content += chunk
                    size = len(content)
                    if size > self._max_response_bytes:
                        raise _Oversized(size)
                answer = _Answer(response.status_code, response.headers, bytes(content))
        except (httpx.TimeoutException, TimeoutError):
            self._observe(endpoint, method, "timeout", started, size)
            raise ApiTimeout(f"{endpoint}: no complete answer within {timeout:.1f}s") from None
        except _Oversized as exc:
            self._observe(endpoint, method, status, started, size)
            raise MalformedResponse(
                f"{endpoint}: answer larger than {self._max_response_bytes} bytes "
                f"({exc.size} bytes or more)"
            ) from None
        except httpx.DecodingError:
            self._observe(endpoint, method, status, started, size)
            raise MalformedResponse(f"{endpoint}: the body could not be decompressed") from None
        except httpx.TransportError as exc:
            self._observe(endpoint, method, "connection_error", started, size)
            raise ApiConnectionError(f"{endpoint}: {type(exc).__name__}") from None
        except asyncio.CancelledError:
            # The poll's own timeout (or shutdown) cut the request off: it was sent and counts
            # against the budget, so it counts here too.
            self._observe(endpoint, method, "cancelled", started, size)
            raise
        self._observe(endpoint, method, status, started, size)
        return answer

    def _observe(self, endpoint: str, method: str, code: str, started: float, size: int) -> None:
        self._metrics.observe(endpoint, method, code, self._monotonic() - started, size)

    async def _refresh_csrf(self, deadline: Deadline) -> None:
        """Fetch a CSRF token for servers that enable Prefect's CSRF protection.

        The server checks CSRF before authentication, so a wrong password first shows here as
        a 401: error statuses take the same path as on any other endpoint.
        """
        client = str(uuid.uuid4())
        answer = await self._send(
            "GET", "/csrf-token", f"csrf-token?client={client}", None, deadline
        )
        self._raise_for_status("/csrf-token", answer)
        payload = _decode_json("/csrf-token", answer.content)
        if not isinstance(payload, dict) or not isinstance(payload.get("token"), str):
            raise MalformedResponse("/csrf-token: expected an object with a token")
        self._csrf = {"Prefect-Csrf-Token": payload["token"], "Prefect-Csrf-Client": client}
