"""The only module that speaks HTTP to Prefect: read-only calls, each response counted and timed.

Exceptions, all expected failures of a remote API (the poll fails, the exporter keeps serving):

    PrefectApiError            reason: a closed set used as a metric label
    ├── ApiTimeout             "timeout"
    ├── ApiConnectionError     "connection"
    ├── ApiStatusError         "http_status" (carries the status and any Retry-After)
    ├── MalformedResponse      "malformed_response" (undecodable, oversized or impossible answers)
    └── ApiBudgetExhausted     "budget"

    ObjectGone                 not a failure: one object vanished between two requests of a poll
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import prefect
from prefect.client.constants import SERVER_API_VERSION
from prefect.client.schemas.objects import TERMINAL_STATES, StateType
from prometheus_client import CollectorRegistry, Counter, Histogram

from exporter import __version__
from exporter.budget import BudgetExhausted, RequestBudget
from exporter.config import Secret
from exporter.records import (
    AWAITING_CONCURRENCY_SLOT,
    ConcurrencyLimitRecord,
    FlowRunEvent,
    PoolRecord,
    QueueRecord,
    QueueRunStats,
    RunState,
    StateCount,
    WorkerRecord,
)

USER_AGENT = f"prefect-exporter/{__version__} (prefect-client/{prefect.__version__})"
PAGE_SIZE = 200  # the server's maximum page size
MAX_PAGES = 100  # a list this long is a misbehaving server, not a Prefect installation
# Pending runs sampled per queue to find the one waiting longest: the API cannot sort by state
# timestamp, so we take the earliest-due few (claim order follows due order) and compare.
PENDING_SAMPLE = 10
_HISTORY_START = "2000-01-01T00:00:00Z"
_HISTORY_END = "2100-01-01T00:00:00Z"
_HISTORY_SECONDS = (datetime(2100, 1, 1) - datetime(2000, 1, 1)).total_seconds()
_TERMINAL = sorted(s.value for s in TERMINAL_STATES)
# A deployment slot is held from Pending until the run leaves these types (Prefect's
# ReleaseFlowConcurrencySlots rule).
SLOT_HOLDING_TYPES = (StateType.PENDING.value, StateType.RUNNING.value, StateType.CANCELLING.value)
EVENT_PAGE_SIZE = 50  # the events API's maximum
_FLOW_RUN_EVENT_PREFIX = "prefect.flow-run."
# A page of 200 flow runs is well under 1 MB; 16 MiB leaves room for deployments with large
# parameters while keeping a misbehaving or hostile server from exhausting memory (bytes after
# content decoding, so a gzip bomb is caught too).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
_LATEST_PLAUSIBLE_TIMESTAMP = datetime(2200, 1, 1, tzinfo=UTC).timestamp()
# Counts, limits and slots above this are not numbers a Prefect database produces.
MAX_PLAUSIBLE_COUNT = 2**53


_STATUS_HINTS = {
    401: " (unauthorized: check PREFECT_API_KEY or PREFECT_API_AUTH_STRING)",
    403: " (forbidden: check the key's permissions on this workspace)",
}


class PrefectApiError(Exception):
    """An expected failure of the Prefect API."""

    reason = "http_status"


class ApiTimeout(PrefectApiError):
    reason = "timeout"


class ApiConnectionError(PrefectApiError):
    reason = "connection"


class MalformedResponse(PrefectApiError):
    reason = "malformed_response"


class ApiBudgetExhausted(PrefectApiError):
    reason = "budget"


class ApiStatusError(PrefectApiError):
    """An HTTP error status; `retry_after` is the header's finite value in seconds, if any."""

    reason = "http_status"

    def __init__(
        self,
        endpoint: str,
        status: int,
        retry_after: float | None,
        maintenance: bool = False,
        retry_after_header: str | None = None,
    ) -> None:
        super().__init__(f"{endpoint} answered HTTP {status}{_STATUS_HINTS.get(status, '')}")
        self.status = status
        self.retry_after = retry_after
        self.maintenance = maintenance
        # The header as sent (cut short), so a value that was rejected or clamped can be logged.
        self.retry_after_header = retry_after_header[:64] if retry_after_header else None

    @property
    def throttled(self) -> bool:
        """Rate limited (429) or overloaded (503): the whole poller should back off."""
        return self.status in (429, 503)


# The closed set of reasons for a failed request, in the order of the class diagram above.
ERROR_CLASSES: tuple[type[PrefectApiError], ...] = (
    ApiTimeout,
    ApiConnectionError,
    ApiStatusError,
    MalformedResponse,
    ApiBudgetExhausted,
)
ERROR_REASONS = tuple(cls.reason for cls in ERROR_CLASSES)


class ObjectGone(Exception):
    """An object named in a per-object route answered 404: it was deleted since it was listed.

    Not a failure of the API: the poller leaves the object out of this snapshot.
    """

    def __init__(self, endpoint: str, name: str) -> None:
        super().__init__(f"{endpoint}: {name!r} is gone")
        self.name = name


class ApiMetrics:
    """The adapter's own counters: every response by route template, method and status code."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "prefect_exporter_api_requests",
            "Requests the exporter made to the Prefect API, by route template, method and "
            "HTTP status code (timeout or connection_error when no response arrived).",
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


def to_timestamp(value: object, where: str) -> float | None:
    """Epoch seconds from the API's ISO-8601 strings; None stays None."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedResponse(f"{where}: expected a timestamp, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        timestamp = parsed.timestamp()
    except (ValueError, OverflowError):
        raise MalformedResponse(f"{where}: not an ISO-8601 timestamp") from None
    if not 0 <= timestamp < _LATEST_PLAUSIBLE_TIMESTAMP:
        # A heartbeat in the year 9999 would keep a worker "online" forever.
        raise MalformedResponse(f"{where}: impossible timestamp")
    return timestamp


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _get(obj: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int in Python, but never a valid count or limit in the API.
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise MalformedResponse(f"{where}.{key}: unexpected {type(value).__name__}")
    return value


def _count_field(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    """A count, limit or slot number: a whole number a database can hold, never negative."""
    value: int | None = _get(obj, key, int, where)
    if value is not None and not 0 <= value <= MAX_PLAUSIBLE_COUNT:
        raise MalformedResponse(f"{where}.{key}: impossible value")
    return value


def _required(obj: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    value = _get(obj, key, kinds, where)
    if value is None:
        raise MalformedResponse(f"{where}.{key}: missing")
    return value


def _objects(payload: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(payload, list) or not all(isinstance(item, dict) for item in payload):
        raise MalformedResponse(f"{where}: expected a list of objects")
    return payload


def _page(payload: Any, where: str, limit: int) -> list[Mapping[str, Any]]:
    """A page of objects that honours the `limit` asked for.

    More rows than asked for cannot be a correct answer, and would otherwise read as "more pages
    follow" and page on without end.
    """
    rows = _objects(payload, where)
    if len(rows) > limit:
        raise MalformedResponse(f"{where}: {len(rows)} rows where at most {limit} were asked for")
    return rows


def parse_pool(obj: Mapping[str, Any]) -> PoolRecord:
    where = "work_pool"
    return PoolRecord(
        name=_required(obj, "name", str, where),
        type=_get(obj, "type", str, where) or "unknown",
        status=_get(obj, "status", str, where),
        is_paused=bool(_get(obj, "is_paused", bool, where)),
        concurrency_limit=_count_field(obj, "concurrency_limit", where),
    )


def parse_queue(obj: Mapping[str, Any]) -> QueueRecord:
    where = "work_queue"
    return QueueRecord(
        id=_required(obj, "id", str, where),
        name=_required(obj, "name", str, where),
        pool=_required(obj, "work_pool_name", str, where),
        status=_get(obj, "status", str, where),
        is_paused=bool(_get(obj, "is_paused", bool, where)),
        priority=_get(obj, "priority", int, where) or 0,
        concurrency_limit=_count_field(obj, "concurrency_limit", where),
        last_polled=to_timestamp(obj.get("last_polled"), f"{where}.last_polled"),
    )


def parse_worker(pool: str, obj: Mapping[str, Any]) -> WorkerRecord:
    where = "worker"
    interval = _get(obj, "heartbeat_interval_seconds", (int, float), where)
    if interval is not None and not 0 < interval < MAX_PLAUSIBLE_COUNT:
        raise MalformedResponse(f"{where}.heartbeat_interval_seconds: impossible value")
    return WorkerRecord(
        pool=pool,
        name=_required(obj, "name", str, where),
        last_heartbeat=to_timestamp(obj.get("last_heartbeat_time"), f"{where}.last_heartbeat_time"),
        heartbeat_interval=float(interval) if interval is not None else None,
    )


def parse_limit(obj: Mapping[str, Any]) -> ConcurrencyLimitRecord:
    where = "concurrency_limit"
    limit = _count_field(obj, "limit", where)
    if limit is None:
        raise MalformedResponse(f"{where}.limit: missing")
    return ConcurrencyLimitRecord(
        id=_required(obj, "id", str, where),
        name=_required(obj, "name", str, where),
        limit=limit,
        active_slots=_count_field(obj, "active_slots", where) or 0,
        active=_get(obj, "active", bool, where) is not False,
    )


def parse_run_state(obj: Mapping[str, Any], where: str) -> RunState:
    state = obj.get("state")
    state_type = obj.get("state_type")
    if state_type is None and isinstance(state, dict):
        state_type = state.get("type")
    if state_type is not None and not isinstance(state_type, str):
        raise MalformedResponse(f"{where}.state_type: unexpected {type(state_type).__name__}")
    return RunState(
        id=_required(obj, "id", str, where),
        state_type=state_type,
        flow_run_id=_get(obj, "flow_run_id", str, where),
    )


def parse_event(obj: Mapping[str, Any]) -> FlowRunEvent | None:
    """A flow-run state event, or None for events of another kind."""
    where = "event"
    name = _required(obj, "event", str, where)
    resource = obj.get("resource")
    if not name.startswith(_FLOW_RUN_EVENT_PREFIX) or not isinstance(resource, dict):
        return None
    state_type = resource.get("prefect.state-type")
    state_name = resource.get("prefect.state-name")
    resource_id = resource.get("prefect.resource.id", "")
    if not isinstance(state_type, str) or not isinstance(state_name, str):
        return None  # not a state change (e.g. a heartbeat from a newer client)
    pool = ""
    related = obj.get("related") or []
    if isinstance(related, list):
        for item in related:
            if isinstance(item, dict) and item.get("prefect.resource.role") == "work-pool":
                pool = str(item.get("prefect.resource.name", ""))
    occurred = to_timestamp(obj.get("occurred"), "event.occurred")
    if occurred is None:
        raise MalformedResponse("event.occurred: missing")
    return FlowRunEvent(
        id=_required(obj, "id", str, where),
        occurred=occurred,
        flow_run_id=str(resource_id).removeprefix(_FLOW_RUN_EVENT_PREFIX),
        state_type=state_type,
        state_name=state_name,
        work_pool=pool,
    )


def _page_token(next_page: object) -> str | None:
    if not next_page:
        return None
    if not isinstance(next_page, str):
        raise MalformedResponse("events.next_page: expected a URL")
    # The server builds the URL from its own idea of its base; only the token is ours to use.
    token = parse_qs(urlsplit(next_page).query).get("page-token")
    if not token:
        raise MalformedResponse("events.next_page: no page-token")
    return quote(token[0], safe="")


def parse_history(payload: Any) -> tuple[StateCount, ...]:
    """Sum the single-bucket /flow_runs/history answer by state type and name."""
    totals: dict[tuple[str, str], int] = {}
    for bucket in _objects(payload, "history"):
        for state in _objects(bucket.get("states", []), "history.states"):
            key = (
                _required(state, "state_type", str, "history.state"),
                _required(state, "state_name", str, "history.state"),
            )
            count = _count_field(state, "count_runs", "history.state")
            if count is None:
                raise MalformedResponse("history.state.count_runs: missing")
            totals[key] = totals.get(key, 0) + count
    return tuple(StateCount(t, n, c) for (t, n), c in sorted(totals.items()))


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


class PrefectApi:
    """Read-only client for the Prefect 3 REST API.

    It never calls endpoints that change state or record a worker poll
    (`get_scheduled_flow_runs`, `work_queues/{id}/get_runs`), never retries silently (every
    attempt is counted), and draws one budget token per request.
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

    # -- reads -------------------------------------------------------------------------------

    async def work_pools(self, deadline: float) -> list[PoolRecord]:
        rows = await self._paged("/work_pools/filter", "work_pools/filter", {}, deadline)
        return [parse_pool(row) for row in rows]

    async def work_queues(self, deadline: float) -> list[QueueRecord]:
        rows = await self._paged("/work_queues/filter", "work_queues/filter", {}, deadline)
        return [parse_queue(row) for row in rows]

    async def workers(self, pool: str, deadline: float) -> list[WorkerRecord]:
        """The pool's workers. Raises ObjectGone when the pool was deleted since it was listed."""
        endpoint = "/work_pools/{name}/workers/filter"
        path = f"work_pools/{quote(pool, safe='')}/workers/filter"
        try:
            rows = await self._paged(endpoint, path, {}, deadline)
        except ApiStatusError as exc:
            if exc.status == 404:
                raise ObjectGone(endpoint, pool) from None
            raise
        return [parse_worker(pool, row) for row in rows]

    async def queue_run_stats(self, queue_id: str, now: float, deadline: float) -> QueueRunStats:
        """Counts by state, backlog and oldest waits of one queue in 1 to 6 requests.

        The follow-up requests are made only when the counts say there is something to find,
        so an idle queue costs one request and the cost never grows with the number of runs.
        """
        history = await self._call(
            "POST",
            "/flow_runs/history",
            "flow_runs/history",
            {
                "history_start": _HISTORY_START,
                "history_end": _HISTORY_END,
                "history_interval_seconds": _HISTORY_SECONDS,
                # Body-key trap: /history names the queue filter `work_queues`.
                "work_queues": {"id": {"any_": [queue_id]}},
                "flow_runs": {"state": {"type": {"not_any_": _TERMINAL}}},
            },
            deadline,
        )
        counts = parse_history(history)
        in_queue = {"work_pool_queues": {"id": {"any_": [queue_id]}}}
        due_filter = {
            **in_queue,
            "flow_runs": {
                "state": {
                    "type": {"any_": [StateType.SCHEDULED.value]},
                    "name": {"not_any_": [AWAITING_CONCURRENCY_SLOT]},
                },
                "next_scheduled_start_time": {"before_": _iso(now)},
            },
        }
        scheduled = sum(c.count for c in counts if c.state_type == StateType.SCHEDULED.value)
        awaiting = sum(c.count for c in counts if c.state_name == AWAITING_CONCURRENCY_SLOT)
        pending = sum(c.count for c in counts if c.state_type == StateType.PENDING.value)
        running = sum(c.count for c in counts if c.state_type == StateType.RUNNING.value)
        cancelling = sum(c.count for c in counts if c.state_type == StateType.CANCELLING.value)

        due, oldest_due, oldest_awaiting, oldest_pending = 0, None, None, None
        if scheduled > awaiting:
            due = await self._count(due_filter, deadline)
        if due:
            oldest_due = await self._first_run_time(
                due_filter, "NEXT_SCHEDULED_START_TIME_ASC", "next_scheduled_start_time", deadline
            )
        if awaiting:
            awaiting_filter = {
                **in_queue,
                "flow_runs": {"state": {"name": {"any_": [AWAITING_CONCURRENCY_SLOT]}}},
            }
            oldest_awaiting = await self._first_run_time(
                awaiting_filter, "EXPECTED_START_TIME_ASC", "expected_start_time", deadline
            )
        oldest_pending = await self._oldest_entry(
            in_queue, StateType.PENDING, "EXPECTED_START_TIME_ASC", pending, deadline
        )
        oldest_running = await self._oldest_entry(
            in_queue, StateType.RUNNING, "START_TIME_ASC", running, deadline
        )
        oldest_cancelling = await self._oldest_entry(
            in_queue, StateType.CANCELLING, "EXPECTED_START_TIME_ASC", cancelling, deadline
        )
        return QueueRunStats(
            counts=counts,
            due_scheduled=due,
            oldest_due_scheduled=oldest_due,
            oldest_awaiting_slot=oldest_awaiting,
            oldest_pending_since=oldest_pending,
            oldest_running_since=oldest_running,
            oldest_cancelling_since=oldest_cancelling,
        )

    async def _oldest_entry(
        self,
        scope: Mapping[str, Any],
        state_type: StateType,
        sort: str,
        count: int,
        deadline: float,
    ) -> float | None:
        """When the longest-waiting run of `state_type` entered it (sampled, see PENDING_SAMPLE)."""
        if not count:
            return None
        body = {**scope, "flow_runs": {"state": {"type": {"any_": [state_type.value]}}}}
        runs = await self._runs(body, sort, PENDING_SAMPLE, deadline)
        entered = [self._state_timestamp(run) for run in runs]
        return min((t for t in entered if t is not None), default=None)

    async def concurrency_limits(self, deadline: float) -> list[ConcurrencyLimitRecord]:
        """Every row of the v2 table: global, tag and deployment limits alike."""
        rows = await self._paged(
            "/v2/concurrency_limits/filter", "v2/concurrency_limits/filter", {}, deadline
        )
        return [parse_limit(row) for row in rows]

    async def tag_limit_holders(self, deadline: float) -> dict[str, tuple[str, ...]]:
        """Task-run ids holding each tag limit (the v1 view of the `tag:` limits)."""
        rows = await self._paged(
            "/concurrency_limits/filter", "concurrency_limits/filter", {}, deadline
        )
        holders: dict[str, tuple[str, ...]] = {}
        for row in rows:
            tag = _required(row, "tag", str, "concurrency_limit")
            slots = row.get("active_slots") or []
            if not isinstance(slots, list) or not all(isinstance(x, str) for x in slots):
                raise MalformedResponse("concurrency_limit.active_slots: expected a list of ids")
            holders[tag] = tuple(slots)
        return holders

    async def task_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]:
        rows = await self._by_ids(
            "/task_runs/filter", "task_runs/filter", "task_runs", ids, deadline
        )
        return [parse_run_state(row, "task_run") for row in rows]

    async def flow_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]:
        rows = await self._by_ids(
            "/flow_runs/filter", "flow_runs/filter", "flow_runs", ids, deadline
        )
        return [parse_run_state(row, "flow_run") for row in rows]

    async def expected_start_times(
        self, ids: Sequence[str], deadline: float
    ) -> dict[str, float | None]:
        rows = await self._by_ids(
            "/flow_runs/filter", "flow_runs/filter", "flow_runs", ids, deadline
        )
        return {
            _required(row, "id", str, "flow_run"): to_timestamp(
                row.get("expected_start_time"), "flow_run.expected_start_time"
            )
            for row in rows
        }

    async def deployment_names(self, ids: Sequence[str], deadline: float) -> dict[str, str]:
        """`flow/deployment` names by deployment id: deployment names repeat across flows."""
        rows = await self._by_ids(
            "/deployments/filter", "deployments/filter", "deployments", ids, deadline
        )
        deployments = {
            _required(row, "id", str, "deployment"): (
                _required(row, "flow_id", str, "deployment"),
                _required(row, "name", str, "deployment"),
            )
            for row in rows
        }
        flow_ids = sorted({flow_id for flow_id, _ in deployments.values()})
        flows = await self._by_ids("/flows/filter", "flows/filter", "flows", flow_ids, deadline)
        flow_names = {
            _required(row, "id", str, "flow"): _required(row, "name", str, "flow") for row in flows
        }
        return {
            deployment_id: f"{flow_names.get(flow_id, flow_id)}/{name}"
            for deployment_id, (flow_id, name) in deployments.items()
        }

    async def deployment_slot_runs(self, deployment_id: str, deadline: float) -> int:
        """Runs of the deployment that hold one of its concurrency slots right now."""
        return await self._count(
            {
                "flow_runs": {
                    "deployment_id": {"any_": [deployment_id]},
                    "state": {"type": {"any_": list(SLOT_HOLDING_TYPES)}},
                }
            },
            deadline,
        )

    async def deployment_awaiting_slot(
        self, deployment_id: str, deadline: float
    ) -> tuple[int, float | None]:
        """The deployment's AwaitingConcurrencySlot runs and the oldest one's expected start."""
        body = {
            "flow_runs": {
                "deployment_id": {"any_": [deployment_id]},
                "state": {"name": {"any_": [AWAITING_CONCURRENCY_SLOT]}},
            }
        }
        count = await self._count(body, deadline)
        oldest = None
        if count:
            oldest = await self._first_run_time(
                body, "EXPECTED_START_TIME_ASC", "expected_start_time", deadline
            )
        return count, oldest

    async def flow_run_events(
        self, since: float, until: float, max_pages: int, deadline: float
    ) -> tuple[list[FlowRunEvent], bool]:
        """Flow-run state events in [since, until], oldest first, at most `max_pages` pages.

        Returns the events and whether more were left unread (the reader is behind).
        """
        payload = await self._call(
            "POST",
            "/events/filter",
            "events/filter",
            {
                "filter": {
                    "occurred": {"since": _iso(since), "until": _iso(until)},
                    "event": {
                        "prefix": [_FLOW_RUN_EVENT_PREFIX],
                        "exclude_name": ["prefect.flow-run.heartbeat"],
                    },
                    "order": "ASC",
                },
                "limit": EVENT_PAGE_SIZE,
            },
            deadline,
        )
        events: list[FlowRunEvent] = []
        for page in range(max_pages):
            if not isinstance(payload, dict):
                raise MalformedResponse("events/filter: expected an object")
            events += [
                e
                for e in map(parse_event, _page(payload.get("events"), "events", EVENT_PAGE_SIZE))
                if e is not None
            ]
            token = _page_token(payload.get("next_page"))
            if token is None:
                return events, False
            if page + 1 == max_pages:
                return events, True
            payload = await self._call(
                "GET",
                "/events/filter/next",
                f"events/filter/next?page-token={token}",
                None,
                deadline,
            )
        return events, True

    async def _by_ids(
        self, endpoint: str, path: str, key: str, ids: Sequence[str], deadline: float
    ) -> list[Mapping[str, Any]]:
        """Objects by id, 200 ids per request."""
        rows: list[Mapping[str, Any]] = []
        for start in range(0, len(ids), PAGE_SIZE):
            chunk = list(ids[start : start + PAGE_SIZE])
            payload = await self._call(
                "POST",
                endpoint,
                path,
                {key: {"id": {"any_": chunk}}, "limit": PAGE_SIZE},
                deadline,
            )
            rows += _page(payload, endpoint, len(chunk))
        return rows

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _state_timestamp(run: Mapping[str, Any]) -> float | None:
        state = run.get("state")
        if not isinstance(state, dict):
            raise MalformedResponse("flow_run.state: expected an object")
        return to_timestamp(state.get("timestamp"), "flow_run.state.timestamp")

    async def _count(self, body: Mapping[str, Any], deadline: float) -> int:
        value = await self._call("POST", "/flow_runs/count", "flow_runs/count", body, deadline)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= MAX_PLAUSIBLE_COUNT
        ):
            raise MalformedResponse("flow_runs/count: expected a non-negative integer")
        return value

    async def _runs(
        self, body: Mapping[str, Any], sort: str, limit: int, deadline: float
    ) -> list[Mapping[str, Any]]:
        payload = await self._call(
            "POST",
            "/flow_runs/filter",
            "flow_runs/filter",
            {**body, "sort": sort, "limit": limit},
            deadline,
        )
        return _page(payload, "flow_runs/filter", limit)

    async def _first_run_time(
        self, body: Mapping[str, Any], sort: str, field: str, deadline: float
    ) -> float | None:
        """The `field` timestamp of the first run in `sort` order, if any run matches."""
        runs = await self._runs(body, sort, 1, deadline)
        return to_timestamp(runs[0].get(field), f"flow_run.{field}") if runs else None

    async def _paged(
        self, endpoint: str, path: str, body: Mapping[str, Any], deadline: float
    ) -> list[Mapping[str, Any]]:
        rows: list[Mapping[str, Any]] = []
        for page in range(MAX_PAGES):
            payload = await self._call(
                "POST",
                endpoint,
                path,
                {**body, "limit": PAGE_SIZE, "offset": page * PAGE_SIZE},
                deadline,
            )
            batch = _page(payload, endpoint, PAGE_SIZE)
            rows.extend(batch)
            if len(batch) < PAGE_SIZE:
                return rows
        raise MalformedResponse(f"{endpoint}: more than {MAX_PAGES * PAGE_SIZE} items")

    async def _call(
        self,
        method: str,
        endpoint: str,
        path: str,
        body: Mapping[str, Any] | None,
        deadline: float,
    ) -> Any:
        """One logical request: budgeted, counted, and repeated once only for a CSRF token.

        Returns the decoded JSON. Raises ApiStatusError for an error status, MalformedResponse
        for a body that is too large, cannot be decoded or is not JSON, and ApiTimeout,
        ApiConnectionError or ApiBudgetExhausted when no answer could be had.
        """
        answer = await self._send(method, endpoint, path, body, deadline)
        if answer.status == 403 and b"CSRF" in answer.content:
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
        deadline: float,
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
        self._observe(endpoint, method, status, started, size)
        return answer

    def _observe(self, endpoint: str, method: str, code: str, started: float, size: int) -> None:
        self._metrics.observe(endpoint, method, code, self._monotonic() - started, size)

    async def _refresh_csrf(self, deadline: float) -> None:
        """Fetch a CSRF token for servers that enable Prefect's CSRF protection.

        The server checks CSRF before authentication, so a wrong password first shows here as
        a 401: error statuses take the same path as on any other endpoint.
        """
        client = str(uuid.uuid4())
        self._csrf = {}
        answer = await self._send(
            "GET", "/csrf-token", f"csrf-token?client={client}", None, deadline
        )
        self._raise_for_status("/csrf-token", answer)
        payload = _decode_json("/csrf-token", answer.content)
        if not isinstance(payload, dict) or not isinstance(payload.get("token"), str):
            raise MalformedResponse("/csrf-token: expected an object with a token")
        self._csrf = {"Prefect-Csrf-Token": payload["token"], "Prefect-Csrf-Client": client}
