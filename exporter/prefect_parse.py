"""Turns the Prefect API's JSON into records, rejecting what cannot be true.

Pure functions: no I/O. Every unexpected shape, type or value raises MalformedResponse, so a
wrong answer fails the poll as `malformed_response` and never passes for data.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from exporter.errors import MalformedResponse
from exporter.records import (
    TAG_LIMIT_PREFIX,
    ConcurrencyLimitRecord,
    DeploymentRecord,
    DueRun,
    EndedRun,
    FlowRunEvent,
    PoolRecord,
    QueueRecord,
    RunRecord,
    RunState,
    StateCount,
    UpcomingRun,
    WorkerRecord,
)

FLOW_RUN_EVENT_PREFIX = "prefect.flow-run."
_LATEST_PLAUSIBLE_TIMESTAMP = datetime(2200, 1, 1, tzinfo=UTC).timestamp()
# Counts, limits and slots above this are not numbers a Prefect database produces.
MAX_PLAUSIBLE_COUNT = 2**53


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


def iso(timestamp: float) -> str:
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


def required(obj: Mapping[str, Any], key: str, kinds: type | tuple[type, ...], where: str) -> Any:
    value = _get(obj, key, kinds, where)
    if value is None:
        raise MalformedResponse(f"{where}.{key}: missing")
    return value


def required_timestamp(obj: Mapping[str, Any], key: str, where: str) -> float:
    """Epoch seconds of `obj[key]`; raises MalformedResponse when it is missing or invalid."""
    timestamp = to_timestamp(obj.get(key), f"{where}.{key}")
    if timestamp is None:
        raise MalformedResponse(f"{where}.{key}: missing")
    return timestamp


def objects(payload: Any, where: str) -> list[Mapping[str, Any]]:
    if not isinstance(payload, list) or not all(isinstance(item, dict) for item in payload):
        raise MalformedResponse(f"{where}: expected a list of objects")
    return payload


def page(payload: Any, where: str, limit: int) -> list[Mapping[str, Any]]:
    """A page of objects that honours the `limit` asked for.

    More rows than asked for cannot be a correct answer, and would otherwise read as "more pages
    follow" and page on without end.
    """
    rows = objects(payload, where)
    if len(rows) > limit:
        raise MalformedResponse(f"{where}: {len(rows)} rows where at most {limit} were asked for")
    return rows


def parse_pool(obj: Mapping[str, Any]) -> PoolRecord:
    where = "work_pool"
    return PoolRecord(
        name=required(obj, "name", str, where),
        type=_get(obj, "type", str, where) or "unknown",
        status=_get(obj, "status", str, where),
        is_paused=bool(_get(obj, "is_paused", bool, where)),
        concurrency_limit=_count_field(obj, "concurrency_limit", where),
    )


def parse_queue(obj: Mapping[str, Any]) -> QueueRecord:
    where = "work_queue"
    return QueueRecord(
        id=required(obj, "id", str, where),
        name=required(obj, "name", str, where),
        pool=required(obj, "work_pool_name", str, where),
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
        name=required(obj, "name", str, where),
        last_heartbeat=to_timestamp(obj.get("last_heartbeat_time"), f"{where}.last_heartbeat_time"),
        heartbeat_interval=float(interval) if interval is not None else None,
    )


def parse_limit(obj: Mapping[str, Any]) -> ConcurrencyLimitRecord:
    where = "concurrency_limit"
    limit = _count_field(obj, "limit", where)
    if limit is None:
        raise MalformedResponse(f"{where}.limit: missing")
    return ConcurrencyLimitRecord(
        id=required(obj, "id", str, where),
        name=required(obj, "name", str, where),
        limit=limit,
        active_slots=_count_field(obj, "active_slots", where) or 0,
        active=_get(obj, "active", bool, where) is not False,
    )


def parse_v1_tag_limit(obj: Mapping[str, Any]) -> ConcurrencyLimitRecord:
    """A row of the v1 tag-limit view (`/concurrency_limits/filter`) as a `tag:<tag>` limit.

    Servers before Prefect's v1-to-v2 adapter (3.4.x) keep tag limits in this table alone,
    with the holders' task-run ids as `active_slots`; v1 limits cannot be switched off.
    """
    where = "concurrency_limit"
    limit = _count_field(obj, "concurrency_limit", where)
    if limit is None:
        raise MalformedResponse(f"{where}.concurrency_limit: missing")
    slots = obj.get("active_slots") or []
    if not isinstance(slots, list) or not all(isinstance(x, str) for x in slots):
        raise MalformedResponse(f"{where}.active_slots: expected a list of ids")
    return ConcurrencyLimitRecord(
        id=required(obj, "id", str, where),
        name=TAG_LIMIT_PREFIX + required(obj, "tag", str, where),
        limit=limit,
        active_slots=len(slots),
        active=True,
    )


def parse_run_state(obj: Mapping[str, Any], where: str) -> RunState:
    state = obj.get("state")
    state_type = obj.get("state_type")
    if state_type is None and isinstance(state, dict):
        state_type = state.get("type")
    if state_type is not None and not isinstance(state_type, str):
        raise MalformedResponse(f"{where}.state_type: unexpected {type(state_type).__name__}")
    return RunState(
        id=required(obj, "id", str, where),
        state_type=state_type,
        flow_run_id=_get(obj, "flow_run_id", str, where),
    )


def parse_run(obj: Mapping[str, Any]) -> RunRecord:
    """A flow run from `/flow_runs/filter`, with its state's type, name and timestamp."""
    where = "flow_run"
    state = obj.get("state")
    if not isinstance(state, dict):
        raise MalformedResponse(f"{where}.state: expected an object")
    return RunRecord(
        id=required(obj, "id", str, where),
        queue_id=_get(obj, "work_queue_id", str, where),
        state_type=required(state, "type", str, f"{where}.state"),
        state_name=required(state, "name", str, f"{where}.state"),
        state_timestamp=to_timestamp(state.get("timestamp"), f"{where}.state.timestamp"),
        expected_start=to_timestamp(obj.get("expected_start_time"), f"{where}.expected_start_time"),
        next_scheduled_start=to_timestamp(
            obj.get("next_scheduled_start_time"), f"{where}.next_scheduled_start_time"
        ),
    )


def parse_event(obj: Mapping[str, Any]) -> FlowRunEvent | None:
    """A flow-run state event, or None for events of another kind."""
    where = "event"
    name = required(obj, "event", str, where)
    resource = obj.get("resource")
    if not name.startswith(FLOW_RUN_EVENT_PREFIX) or not isinstance(resource, dict):
        return None
    state_type = resource.get("prefect.state-type")
    state_name = resource.get("prefect.state-name")
    resource_id = resource.get("prefect.resource.id", "")
    if not isinstance(state_type, str) or not isinstance(state_name, str):
        return None  # not a state change (e.g. a heartbeat from a newer client)
    pool = ""
    names: dict[str, str] = {}
    related = obj.get("related") or []
    if isinstance(related, list):
        for item in related:
            if isinstance(item, dict) and isinstance(item.get("prefect.resource.name"), str):
                names[str(item.get("prefect.resource.role"))] = item["prefect.resource.name"]
        pool = names.get("work-pool", "")
    # Prefect names the run's flow and deployment as related resources (models/events.py in
    # the server): together they are the deployment's `flow/deployment` name.
    deployment = None
    if "deployment" in names and "flow" in names:
        deployment = f"{names['flow']}/{names['deployment']}"
    occurred = required_timestamp(obj, "occurred", "event")
    return FlowRunEvent(
        id=required(obj, "id", str, where),
        occurred=occurred,
        flow_run_id=str(resource_id).removeprefix(FLOW_RUN_EVENT_PREFIX),
        state_type=state_type,
        state_name=state_name,
        work_pool=pool,
        deployment=deployment,
    )


def parse_deployment(obj: Mapping[str, Any], flow_names: Mapping[str, str]) -> DeploymentRecord:
    """A deployment from `/deployments/filter`, named `flow/deployment` by `flow_names`.

    Schedules are read from `schedules` (Prefect 3): an `interval` in seconds, or a `cron` or
    `rrule`; inactive ones are left out. A flow missing from `flow_names` (deleted between two
    requests) leaves its id in the name.
    """
    where = "deployment"
    flow_id = required(obj, "flow_id", str, where)
    interval: float | None = None
    active = calendar = 0
    for item in objects(obj.get("schedules") or [], f"{where}.schedules"):
        if _get(item, "active", bool, f"{where}.schedules") is False:
            continue
        schedule = item.get("schedule")
        if not isinstance(schedule, dict):
            raise MalformedResponse(f"{where}.schedules.schedule: expected an object")
        active += 1
        seconds = _get(schedule, "interval", (int, float), f"{where}.schedule")
        if seconds is None:
            calendar += 1  # cron or rrule: measured from the upcoming runs
            continue
        if not 0 < seconds < MAX_PLAUSIBLE_COUNT:
            raise MalformedResponse(f"{where}.schedule.interval: impossible value")
        interval = float(seconds) if interval is None else min(interval, float(seconds))
    name = required(obj, "name", str, where)
    return DeploymentRecord(
        id=required(obj, "id", str, where),
        name=f"{flow_names.get(flow_id, flow_id)}/{name}",
        paused=bool(_get(obj, "paused", bool, where)),
        active_schedules=active,
        interval=interval,
        calendar_schedules=calendar,
    )


def parse_ended_run(obj: Mapping[str, Any]) -> EndedRun:
    """A terminal flow run of a deployment from `/flow_runs/filter`, with its end time."""
    where = "flow_run"
    end_time = to_timestamp(obj.get("end_time"), f"{where}.end_time")
    state_type = _get(obj, "state_type", str, where)
    if state_type is None:
        state = obj.get("state")
        state_type = (
            required(state, "type", str, f"{where}.state") if isinstance(state, dict) else None
        )
    if end_time is None or state_type is None:
        raise MalformedResponse(f"{where}: a terminal run without end_time or state type")
    return EndedRun(
        id=required(obj, "id", str, where),
        deployment_id=required(obj, "deployment_id", str, where),
        state_type=state_type,
        end_time=end_time,
    )


def parse_due_run(obj: Mapping[str, Any]) -> DueRun:
    """A flow run of a deployment from `/flow_runs/filter`, with its expected start and
    Prefect's `auto_scheduled` flag (absent counts as not auto-scheduled)."""
    where = "flow_run"
    start = required_timestamp(obj, "expected_start_time", where)
    return DueRun(
        id=required(obj, "id", str, where),
        deployment_id=required(obj, "deployment_id", str, where),
        expected_start=start,
        auto_scheduled=bool(_get(obj, "auto_scheduled", bool, where)),
    )


def parse_upcoming_run(obj: Mapping[str, Any]) -> UpcomingRun:
    """A Scheduled flow run of a deployment from `/flow_runs/filter`, with its next start."""
    where = "flow_run"
    start = required_timestamp(obj, "next_scheduled_start_time", where)
    return UpcomingRun(
        id=required(obj, "id", str, where),
        deployment_id=required(obj, "deployment_id", str, where),
        start=start,
    )


def page_token(next_page: object) -> str | None:
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
    for bucket in objects(payload, "history"):
        for state in objects(bucket.get("states", []), "history.states"):
            key = (
                required(state, "state_type", str, "history.state"),
                required(state, "state_name", str, "history.state"),
            )
            count = _count_field(state, "count_runs", "history.state")
            if count is None:
                raise MalformedResponse("history.state.count_runs: missing")
            totals[key] = totals.get(key, 0) + count
    return tuple(StateCount(t, n, c) for (t, n), c in sorted(totals.items()))


# A version string longer than this is not one Prefect writes (`3.9.1`, `3.6.0rc2+12.gabcdef`).
MAX_VERSION_LENGTH = 64


def parse_version(payload: Any) -> str:
    """The server's version from `GET /admin/version`: a JSON string such as "3.9.1".

    Prefect's route (prefect.server.api.admin.read_version) answers `prefect.__version__`.
    Raises MalformedResponse for anything else: not a string, empty, longer than
    MAX_VERSION_LENGTH, or with whitespace or control characters (it becomes a label value).
    """
    if not isinstance(payload, str):
        raise MalformedResponse(f"admin/version: expected a string, got {type(payload).__name__}")
    if not payload or len(payload) > MAX_VERSION_LENGTH:
        raise MalformedResponse("admin/version: implausible version length")
    if not payload.isprintable() or any(c.isspace() for c in payload):
        raise MalformedResponse("admin/version: version with blank or control characters")
    return payload
