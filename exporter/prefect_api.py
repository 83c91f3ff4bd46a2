"""Prefect reads: what the exporter asks the API, in as few requests as the answers allow.

Read-only: never an endpoint that changes state or records a worker poll
(`get_scheduled_flow_runs`, `work_queues/{id}/get_runs`). Every request goes through the
transport (prefect_http), which budgets, bounds and counts it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from exporter.clock import Deadline, UnixTime
from exporter.errors import ApiStatusError, MalformedResponse, ObjectGone
from exporter.prefect_parse import (
    FLOW_RUN_EVENT_PREFIX,
    MAX_PLAUSIBLE_COUNT,
    iso,
    page,
    page_token,
    parse_deployment,
    parse_due_run,
    parse_ended_run,
    parse_event,
    parse_history,
    parse_limit,
    parse_pool,
    parse_queue,
    parse_run,
    parse_run_state,
    parse_upcoming_run,
    parse_v1_tag_limit,
    parse_version,
    parse_worker,
    required,
    to_timestamp,
)
from exporter.records import (
    AUTO_SCHEDULED_TAG,
    AWAITING_CONCURRENCY_SLOT,
    DEPLOYMENT_RUN_LISTINGS,
    SLOT_HOLDING_STATE_TYPES,
    TERMINAL_STATE_TYPES,
    ConcurrencyLimitRecord,
    DeploymentRecord,
    DueRun,
    EndedRun,
    FlowRunEvent,
    PoolRecord,
    QueueRecord,
    QueueRunStats,
    RunPlace,
    RunRecord,
    RunState,
    StateCount,
    StateName,
    StateType,
    UpcomingRun,
    WorkerRecord,
)

PAGE_SIZE = 200  # the server's maximum page size
T = TypeVar("T")
MAX_PAGES = 100  # a list this long is a misbehaving server, not a Prefect installation
# Pending runs sampled per queue to find the one waiting longest: the API cannot sort by state
# timestamp, so we take the earliest-due few (claim order follows due order) and compare.
PENDING_SAMPLE = 10
_HISTORY_START = "2000-01-01T00:00:00Z"
_HISTORY_END = "2100-01-01T00:00:00Z"
_HISTORY_SECONDS = (datetime(2100, 1, 1) - datetime(2000, 1, 1)).total_seconds()
_TERMINAL = sorted(TERMINAL_STATE_TYPES)
# A deployment slot is held from Pending until the run leaves these types (Prefect's
# ReleaseFlowConcurrencySlots rule).
SLOT_HOLDING_TYPES = tuple(sorted(SLOT_HOLDING_STATE_TYPES))
EVENT_PAGE_SIZE = 50  # the events API's maximum
# Runs of these types hold a pool, queue or deployment slot, or wait on something else than a
# worker; the active listing reads them all.
ACTIVE_STATE_TYPES = frozenset(
    {StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED}
)


class Transport(Protocol):
    """What the reads need from the transport (prefect_http.PrefectHttp)."""

    @property
    def requests_sent(self) -> int: ...

    async def call(
        self,
        method: str,
        endpoint: str,
        path: str,
        body: Mapping[str, Any] | None,
        deadline: Deadline,
    ) -> Any: ...

    async def aclose(self) -> None: ...


def _scheduled_between(after: UnixTime | None, before: UnixTime | None) -> dict[str, Any]:
    """The `flow_runs` filter of SCHEDULED-type runs other than AwaitingConcurrencySlot (whose
    next start a deployment limit keeps pushing ahead) due from `after` up to `before`, each
    end included when given (the API's time filters include both ends)."""
    window: dict[str, str] = {}
    if before is not None:
        window["before_"] = iso(before)
    if after is not None:
        window["after_"] = iso(after)
    return {
        "state": {
            "type": {"any_": [StateType.SCHEDULED.value]},
            "name": {"not_any_": [AWAITING_CONCURRENCY_SLOT]},
        },
        "next_scheduled_start_time": window,
    }


class PrefectApi:
    """Read-only client for the Prefect 3 REST API, returning records (see records.py).

    `deadline` arguments are monotonic seconds by which the whole poll must be done; `now`
    arguments are Unix time. Every method raises PrefectApiError (see errors.py) on failure.
    """

    def __init__(self, http: Transport) -> None:
        self._http = http
        self._rows_skipped: dict[str, int] = {listing: 0 for listing in DEPLOYMENT_RUN_LISTINGS}

    @property
    def rows_skipped(self) -> Mapping[str, int]:
        """Rows of the deployment-health run listings left out as malformed since the start,
        by listing (`ended`, `upcoming`, `due`): one bad run must not blind the whole read."""
        return dict(self._rows_skipped)

    def _parse_rows(
        self, listing: str, rows: Sequence[Mapping[str, Any]], parse: Callable[[Any], T]
    ) -> list[T]:
        parsed = []
        for row in rows:
            try:
                parsed.append(parse(row))
            except MalformedResponse:
                self._rows_skipped[listing] += 1
        return parsed

    @property
    def requests_sent(self) -> int:
        """Requests sent so far, every attempt counted."""
        return self._http.requests_sent

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- reads -------------------------------------------------------------------------------

    async def server_version(self, deadline: Deadline) -> str:
        """The server's Prefect version as `GET /admin/version` answers it ("3.9.1"). One request.

        Raises ApiStatusError 404 where the API does not offer the route.
        """
        payload = await self._http.call("GET", "/admin/version", "admin/version", None, deadline)
        return parse_version(payload)

    async def work_pools(self, deadline: Deadline) -> list[PoolRecord]:
        rows = await self._paged("/work_pools/filter", "work_pools/filter", {}, deadline)
        return [parse_pool(row) for row in rows]

    async def work_queues(self, deadline: Deadline) -> list[QueueRecord]:
        rows = await self._paged("/work_queues/filter", "work_queues/filter", {}, deadline)
        return [parse_queue(row) for row in rows]

    async def workers(self, pool: str, deadline: Deadline) -> list[WorkerRecord]:
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

    async def queue_run_stats(
        self, queue_id: str, now: UnixTime, deadline: Deadline
    ) -> QueueRunStats:
        """Counts by state, backlog and oldest waits of one queue in 1 to 6 requests.

        The follow-up requests are made only when the counts say there is something to find,
        so an idle queue costs one request and the cost never grows with the number of runs.
        """
        counts = await self._history(
            queue_id, {"state": {"type": {"not_any_": _TERMINAL}}}, deadline
        )
        in_queue = {"work_pool_queues": {"id": {"any_": [queue_id]}}}
        due_filter = {
            **in_queue,
            "flow_runs": {
                "state": {
                    "type": {"any_": [StateType.SCHEDULED.value]},
                    "name": {"not_any_": [AWAITING_CONCURRENCY_SLOT]},
                },
                "next_scheduled_start_time": {"before_": iso(now)},
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

    async def active_runs_page(
        self,
        queue_ids: Sequence[str],
        after: UnixTime | None,
        deadline: Deadline,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]:
        """The first page (oldest expected start first) of runs that hold or wait for a slot.

        Pending, Running, Cancelling and Paused runs, and AwaitingConcurrencySlot runs, in the
        queues `queue_ids` (runs without a queue are left out), expected to start at `after` or
        later when given, other than the runs whose ids are `excluded`. One request; raises
        MalformedResponse when the answer shows the queue filter was not applied.
        """
        runs_filter: dict[str, Any] = {
            "state": {
                "operator": "or_",
                "type": {"any_": sorted(ACTIVE_STATE_TYPES)},
                "name": {"any_": [AWAITING_CONCURRENCY_SLOT]},
            },
        }
        if after is not None:
            runs_filter["expected_start_time"] = {"after_": iso(after)}
        body = {"flow_runs": runs_filter}
        return await self._run_page(body, "EXPECTED_START_TIME_ASC", queue_ids, excluded, deadline)

    async def scheduled_runs_page(
        self,
        until: UnixTime,
        queue_ids: Sequence[str],
        after: UnixTime | None,
        deadline: Deadline,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]:
        """The first page (earliest first) of runs scheduled to start by `until`.

        SCHEDULED-type runs other than AwaitingConcurrencySlot (whose next start the deployment
        limit keeps pushing ahead), in the queues `queue_ids`, due at `after` or later when
        given, other than the runs whose ids are `excluded`. One request.
        """
        body = {"flow_runs": _scheduled_between(after, until)}
        return await self._run_page(
            body, "NEXT_SCHEDULED_START_TIME_ASC", queue_ids, excluded, deadline
        )

    async def scheduled_counts_after(
        self, queue_id: str, after: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]:
        """One queue's SCHEDULED-type runs due at `after` or later, by state name. One request.

        AwaitingConcurrencySlot runs are left out (the active listing has them).
        """
        return await self._history(queue_id, _scheduled_between(after, None), deadline)

    async def scheduled_counts_between(
        self, queue_id: str, after: UnixTime | None, before: UnixTime, deadline: Deadline
    ) -> tuple[StateCount, ...]:
        """One queue's SCHEDULED-type runs due from `after` (or any time) up to `before`, by
        state name (both ends included, as the API's time filters are).

        One request; AwaitingConcurrencySlot runs are left out (the active listing has them).
        """
        return await self._history(queue_id, _scheduled_between(after, before), deadline)

    async def _history(
        self, queue_id: str, runs_filter: Mapping[str, Any], deadline: Deadline
    ) -> tuple[StateCount, ...]:
        """One queue's runs matching `runs_filter`, counted by state type and name."""
        history = await self._http.call(
            "POST",
            "/flow_runs/history",
            "flow_runs/history",
            {
                # One bucket spanning all time: counts, not a history.
                "history_start": _HISTORY_START,
                "history_end": _HISTORY_END,
                "history_interval_seconds": _HISTORY_SECONDS,
                # Body-key trap: /history names the queue filter `work_queues`.
                "work_queues": {"id": {"any_": [queue_id]}},
                "flow_runs": runs_filter,
            },
            deadline,
        )
        return parse_history(history)

    async def _run_page(
        self,
        body: Mapping[str, Any],
        sort: str,
        queue_ids: Sequence[str],
        excluded: Sequence[str],
        deadline: Deadline,
    ) -> list[RunRecord]:
        # The queue filter takes ids to include only (no exclusion); a thousand ids make a
        # 37 KB body, which is still one cheap request. Run ids are left out with
        # `flow_runs.id.not_any_` (`FlowRunFilterId`, Prefect 3.0 on).
        body = {**body, "work_pool_queues": {"id": {"any_": list(queue_ids)}}}
        if excluded:
            body["flow_runs"] = {**body["flow_runs"], "id": {"not_any_": list(excluded)}}
        rows = await self._runs(body, sort, PAGE_SIZE, deadline)
        runs = [parse_run(row) for row in rows]
        asked = set(queue_ids)
        if any(run.queue_id not in asked for run in runs):
            # A filter key the server does not know is ignored silently (see prefect-api.md
            # section 4); answering the same runs again would page on without end.
            raise MalformedResponse("flow_runs/filter: the queue filter was not applied")
        return runs

    async def _oldest_entry(
        self,
        scope: Mapping[str, Any],
        state_type: StateType,
        sort: str,
        count: int,
        deadline: Deadline,
    ) -> float | None:
        """When the longest-waiting run of `state_type` entered it (sampled, see PENDING_SAMPLE)."""
        if not count:
            return None
        body = {**scope, "flow_runs": {"state": {"type": {"any_": [state_type.value]}}}}
        runs = await self._runs(body, sort, PENDING_SAMPLE, deadline)
        entered = [self._state_timestamp(run) for run in runs]
        return min((t for t in entered if t is not None), default=None)

    async def runs_without_work_queue(self, now: UnixTime, deadline: Deadline) -> int:
        """Scheduled runs due before `now` that name a work queue which no longer exists.

        Deleting a queue leaves its runs with its name but no queue id and no pool: no worker
        will ever take them. The API can only filter runs whose queue exists, so this is the
        count of runs naming a queue minus those whose queue exists: two requests, whatever
        the number of runs. The second count is read last and both are cut at `now` (the
        poll's start), so runs picked up in between can only make the difference smaller;
        only a run rescheduled into the past in those milliseconds could make it larger.
        Served deployments' runs (no queue name at all) are not counted.
        """
        body = self._naming_a_queue(now)
        with_queue = await self._count({**body, "work_pool_queues": {}}, deadline)
        total = await self._count(body, deadline)
        return max(0, total - with_queue)

    async def runs_without_work_queue_sample(
        self, now: UnixTime, deadline: Deadline
    ) -> list[RunPlace]:
        """Up to 200 of the runs `runs_without_work_queue` counts, longest due first.

        One request: the earliest-due runs naming a queue, of which those without a queue id
        are kept, so a large healthy backlog due earlier can hide them (the count cannot).
        """
        rows = await self._runs(
            self._naming_a_queue(now), "NEXT_SCHEDULED_START_TIME_ASC", PAGE_SIZE, deadline
        )
        return [place for place in map(self._run_place, rows) if place.work_pool is None]

    async def tag_waiting_runs(self, tag: str, deadline: Deadline) -> list[RunPlace]:
        """Running flow runs with a task run tagged `tag` in Pending: waiting for its slot.

        One request, at most 200 runs (a task waiting for a tag slot stays Pending inside its
        Running flow run, observed on 3.9.1).
        """
        body = {
            "flow_runs": {"state": {"type": {"any_": [StateType.RUNNING.value]}}},
            "task_runs": {
                "tags": {"all_": [tag]},
                "state": {"type": {"any_": [StateType.PENDING.value]}},
            },
        }
        rows = await self._runs(body, "EXPECTED_START_TIME_ASC", PAGE_SIZE, deadline)
        return [self._run_place(row) for row in rows]

    async def awaiting_slot_runs(self, deadline: Deadline) -> list[RunPlace]:
        """Up to 200 AwaitingConcurrencySlot runs, longest waiting first, with their deployment.

        One request: which deployment's limit holds the runs of which queue.
        """
        body = {"flow_runs": {"state": {"name": {"any_": [AWAITING_CONCURRENCY_SLOT]}}}}
        rows = await self._runs(body, "EXPECTED_START_TIME_ASC", PAGE_SIZE, deadline)
        return [self._run_place(row) for row in rows]

    @staticmethod
    def _naming_a_queue(now: UnixTime) -> dict[str, Any]:
        return {
            "flow_runs": {
                "state": {"type": {"any_": [StateType.SCHEDULED.value]}},
                "work_queue_name": {"is_null_": False},
                "next_scheduled_start_time": {"before_": iso(now)},
            }
        }

    @staticmethod
    def _run_place(row: Mapping[str, Any]) -> RunPlace:
        where = "flow_run"
        names = {}
        for key in ("work_pool_name", "work_queue_name", "deployment_id", "work_queue_id"):
            value = row.get(key)
            if value is not None and not isinstance(value, str):
                raise MalformedResponse(f"{where}.{key}: unexpected {type(value).__name__}")
            names[key] = value
        # The pool name is derived from the queue: a run without a queue id has no pool.
        pool = names["work_pool_name"] if names["work_queue_id"] is not None else None
        return RunPlace(
            id=required(row, "id", str, where),
            work_pool=pool,
            work_queue=names["work_queue_name"],
            deployment_id=names["deployment_id"],
        )

    async def concurrency_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]:
        """Every row of the v2 table: global, tag and deployment limits alike."""
        rows = await self._paged(
            "/v2/concurrency_limits/filter", "v2/concurrency_limits/filter", {}, deadline
        )
        return [parse_limit(row) for row in rows]

    async def legacy_tag_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]:
        """Tag limits as the v1 view lists them, as `tag:<tag>` records (see parse_v1_tag_limit)."""
        rows = await self._paged(
            "/concurrency_limits/filter", "concurrency_limits/filter", {}, deadline
        )
        return [parse_v1_tag_limit(row) for row in rows]

    async def tag_limit_holders(self, deadline: Deadline) -> dict[str, tuple[str, ...]]:
        """Task-run ids holding each tag limit (the v1 view of the `tag:` limits)."""
        rows = await self._paged(
            "/concurrency_limits/filter", "concurrency_limits/filter", {}, deadline
        )
        holders: dict[str, tuple[str, ...]] = {}
        for row in rows:
            tag = required(row, "tag", str, "concurrency_limit")
            slots = row.get("active_slots") or []
            if not isinstance(slots, list) or not all(isinstance(x, str) for x in slots):
                raise MalformedResponse("concurrency_limit.active_slots: expected a list of ids")
            holders[tag] = tuple(slots)
        return holders

    async def task_run_states(self, ids: Sequence[str], deadline: Deadline) -> list[RunState]:
        rows = await self._by_ids(
            "/task_runs/filter", "task_runs/filter", "task_runs", ids, deadline
        )
        return [parse_run_state(row, "task_run") for row in rows]

    async def flow_run_states(self, ids: Sequence[str], deadline: Deadline) -> list[RunState]:
        rows = await self._by_ids(
            "/flow_runs/filter", "flow_runs/filter", "flow_runs", ids, deadline
        )
        return [parse_run_state(row, "flow_run") for row in rows]

    async def expected_start_times(
        self, ids: Sequence[str], deadline: Deadline
    ) -> dict[str, float | None]:
        rows = await self._by_ids(
            "/flow_runs/filter", "flow_runs/filter", "flow_runs", ids, deadline
        )
        return {
            required(row, "id", str, "flow_run"): to_timestamp(
                row.get("expected_start_time"), "flow_run.expected_start_time"
            )
            for row in rows
        }

    async def deployment_names(self, ids: Sequence[str], deadline: Deadline) -> dict[str, str]:
        """`flow/deployment` names by deployment id: deployment names repeat across flows."""
        rows = await self._by_ids(
            "/deployments/filter", "deployments/filter", "deployments", ids, deadline
        )
        deployments = {
            required(row, "id", str, "deployment"): (
                required(row, "flow_id", str, "deployment"),
                required(row, "name", str, "deployment"),
            )
            for row in rows
        }
        flow_ids = sorted({flow_id for flow_id, _ in deployments.values()})
        flows = await self._by_ids("/flows/filter", "flows/filter", "flows", flow_ids, deadline)
        flow_names = {
            required(row, "id", str, "flow"): required(row, "name", str, "flow") for row in flows
        }
        return {
            deployment_id: f"{flow_names.get(flow_id, flow_id)}/{name}"
            for deployment_id, (flow_id, name) in deployments.items()
        }

    async def deployments(self, deadline: Deadline) -> list[DeploymentRecord]:
        """Every deployment, named `flow/deployment`, with its pause flag and schedules.

        Pages of 200 sorted by name, then the flows' names by id (200 a request): a few
        requests for hundreds of deployments.
        """
        rows = await self._paged(
            "/deployments/filter", "deployments/filter", {"sort": "NAME_ASC"}, deadline
        )
        by_id = {required(row, "id", str, "deployment"): row for row in rows}
        if len(rows) >= PAGE_SIZE:
            # Names repeat across flows and the server sorts by name alone
            # (server/schemas/sorting.py DeploymentSort), so offset pages may repeat or skip a
            # deployment between two requests: dedupe by id, and fetch what the count says is
            # missing by excluding the ids already read.
            total = await self._count_of("/deployments/count", "deployments/count", deadline)
            for _ in range(MAX_PAGES):
                if len(by_id) >= total:
                    break
                payload = await self._http.call(
                    "POST",
                    "/deployments/filter",
                    "deployments/filter",
                    {
                        "deployments": {"id": {"not_any_": sorted(by_id)}},
                        "sort": "NAME_ASC",
                        "limit": PAGE_SIZE,
                    },
                    deadline,
                )
                missing = page(payload, "/deployments/filter", PAGE_SIZE)
                if not missing:
                    break  # deleted since the count
                by_id.update((required(row, "id", str, "deployment"), row) for row in missing)
        rows = list(by_id.values())
        flow_ids = sorted({required(row, "flow_id", str, "deployment") for row in rows})
        flows = await self._by_ids("/flows/filter", "flows/filter", "flows", flow_ids, deadline)
        flow_names = {
            required(row, "id", str, "flow"): required(row, "name", str, "flow") for row in flows
        }
        return [parse_deployment(row, flow_names) for row in rows]

    async def ended_runs_page(
        self,
        deployment_ids: Sequence[str],
        state_types: Sequence[StateType],
        after: UnixTime | None,
        deadline: Deadline,
        exclude_ids: Sequence[str] = (),
    ) -> list[EndedRun]:
        """The first page (latest end first) of the deployments' runs that ended in one of
        `state_types`, at `after` or later when given, leaving out the runs `exclude_ids`
        (already read). One request, 200 runs at most."""
        runs_filter: dict[str, Any] = {
            "deployment_id": {"any_": list(deployment_ids)},
            "state": {"type": {"any_": sorted(state_types)}},
        }
        # A terminal run without an end time (a forced state, an old server) cannot date an
        # outcome; Prefect's END_TIME_DESC sort would also put such rows first.
        runs_filter["end_time"] = {"is_null_": False}
        if after is not None:
            runs_filter["end_time"]["after_"] = iso(after)
        if exclude_ids:
            runs_filter["id"] = {"not_any_": list(exclude_ids)}
        rows = await self._runs({"flow_runs": runs_filter}, "END_TIME_DESC", PAGE_SIZE, deadline)
        runs = self._parse_rows("ended", rows, parse_ended_run)
        self._check_deployments("ended", runs, deployment_ids)
        return runs

    async def upcoming_runs_page(
        self,
        deployment_ids: Sequence[str],
        after: UnixTime,
        deadline: Deadline,
        exclude_ids: Sequence[str] = (),
    ) -> list[UpcomingRun]:
        """The first page (earliest first) of the deployments' Scheduled runs due at `after` or
        later, leaving out the runs `exclude_ids` (already read). One request, 200 runs at most;
        Late, AwaitingRetry and AwaitingConcurrencySlot runs are not upcoming runs of a
        schedule."""
        runs_filter: dict[str, Any] = {
            "deployment_id": {"any_": list(deployment_ids)},
            "state": {
                "type": {"any_": [StateType.SCHEDULED.value]},
                "name": {"any_": [StateName.SCHEDULED.value]},
            },
            "next_scheduled_start_time": {"after_": iso(after)},
        }
        if exclude_ids:
            runs_filter["id"] = {"not_any_": list(exclude_ids)}
        rows = await self._runs(
            {"flow_runs": runs_filter}, "NEXT_SCHEDULED_START_TIME_ASC", PAGE_SIZE, deadline
        )
        runs = self._parse_rows("upcoming", rows, parse_upcoming_run)
        self._check_deployments("upcoming", runs, deployment_ids)
        return runs

    async def due_runs_page(
        self, deployment_ids: Sequence[str], before: UnixTime, deadline: Deadline
    ) -> list[DueRun]:
        """The first page (latest expected start first) of the deployments' runs tagged
        auto-scheduled whose expected start is at `before` or earlier, in any state. One
        request, 200 runs at most; the caller keeps only those Prefect flags `auto_scheduled`
        (a person may tag a manual run so)."""
        runs_filter = {
            "deployment_id": {"any_": list(deployment_ids)},
            "tags": {"all_": [AUTO_SCHEDULED_TAG]},
            "expected_start_time": {"before_": iso(before)},
        }
        rows = await self._runs(
            {"flow_runs": runs_filter}, "EXPECTED_START_TIME_DESC", PAGE_SIZE, deadline
        )
        runs = self._parse_rows("due", rows, parse_due_run)
        self._check_deployments("due", runs, deployment_ids)
        return runs

    @staticmethod
    def _check_deployments(
        what: str, runs: Sequence[EndedRun | UpcomingRun | DueRun], deployment_ids: Sequence[str]
    ) -> None:
        # A filter the server ignored would answer other deployments' runs, and the reader
        # would page on without end.
        asked = set(deployment_ids)
        if any(run.deployment_id not in asked for run in runs):
            raise MalformedResponse(f"flow_runs/filter ({what}): the deployment filter failed")

    async def deployment_slot_runs(self, deployment_id: str, deadline: Deadline) -> int:
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
        self, deployment_id: str, deadline: Deadline
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
        self, since: UnixTime, until: UnixTime, max_pages: int, deadline: Deadline
    ) -> tuple[list[FlowRunEvent], bool]:
        """Flow-run state events in [since, until], oldest first, at most `max_pages` pages.

        Returns the events and whether more were left unread (the reader is behind).
        """
        payload = await self._http.call(
            "POST",
            "/events/filter",
            "events/filter",
            {
                "filter": {
                    "occurred": {"since": iso(since), "until": iso(until)},
                    "event": {
                        "prefix": [FLOW_RUN_EVENT_PREFIX],
                        "exclude_name": ["prefect.flow-run.heartbeat"],
                    },
                    "order": "ASC",
                },
                "limit": EVENT_PAGE_SIZE,
            },
            deadline,
        )
        events: list[FlowRunEvent] = []
        for page_number in range(max_pages):
            if not isinstance(payload, dict):
                raise MalformedResponse("events/filter: expected an object")
            events += [
                e
                for e in map(parse_event, page(payload.get("events"), "events", EVENT_PAGE_SIZE))
                if e is not None
            ]
            token = page_token(payload.get("next_page"))
            if token is None:
                return events, False
            if page_number + 1 == max_pages:
                return events, True
            payload = await self._http.call(
                "GET",
                "/events/filter/next",
                f"events/filter/next?page-token={token}",
                None,
                deadline,
            )
        return events, True

    async def _by_ids(
        self, endpoint: str, path: str, key: str, ids: Sequence[str], deadline: Deadline
    ) -> list[Mapping[str, Any]]:
        """Objects by id, 200 ids per request."""
        rows: list[Mapping[str, Any]] = []
        for start in range(0, len(ids), PAGE_SIZE):
            chunk = list(ids[start : start + PAGE_SIZE])
            payload = await self._http.call(
                "POST",
                endpoint,
                path,
                {key: {"id": {"any_": chunk}}, "limit": PAGE_SIZE},
                deadline,
            )
            rows += page(payload, endpoint, len(chunk))
        return rows

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _state_timestamp(run: Mapping[str, Any]) -> float | None:
        state = run.get("state")
        if not isinstance(state, dict):
            raise MalformedResponse("flow_run.state: expected an object")
        return to_timestamp(state.get("timestamp"), "flow_run.state.timestamp")

    async def _count(self, body: Mapping[str, Any], deadline: Deadline) -> int:
        return await self._count_of("/flow_runs/count", "flow_runs/count", deadline, body)

    async def _count_of(
        self,
        endpoint: str,
        path: str,
        deadline: Deadline,
        body: Mapping[str, Any] | None = None,
    ) -> int:
        """A `/count` endpoint's answer; raises MalformedResponse unless a plausible integer."""
        value = await self._http.call("POST", endpoint, path, dict(body or {}), deadline)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= MAX_PLAUSIBLE_COUNT
        ):
            raise MalformedResponse(f"{path}: expected a non-negative integer")
        return value

    async def _runs(
        self, body: Mapping[str, Any], sort: str, limit: int, deadline: Deadline
    ) -> list[Mapping[str, Any]]:
        payload = await self._http.call(
            "POST",
            "/flow_runs/filter",
            "flow_runs/filter",
            {**body, "sort": sort, "limit": limit},
            deadline,
        )
        return page(payload, "flow_runs/filter", limit)

    async def _first_run_time(
        self, body: Mapping[str, Any], sort: str, field: str, deadline: Deadline
    ) -> float | None:
        """The `field` timestamp of the first run in `sort` order, if any run matches."""
        runs = await self._runs(body, sort, 1, deadline)
        return to_timestamp(runs[0].get(field), f"flow_run.{field}") if runs else None

    async def _paged(
        self, endpoint: str, path: str, body: Mapping[str, Any], deadline: Deadline
    ) -> list[Mapping[str, Any]]:
        rows: list[Mapping[str, Any]] = []
        for page_number in range(MAX_PAGES):
            payload = await self._http.call(
                "POST",
                endpoint,
                path,
                {**body, "limit": PAGE_SIZE, "offset": page_number * PAGE_SIZE},
                deadline,
            )
            batch = page(payload, endpoint, PAGE_SIZE)
            rows.extend(batch)
            if len(batch) < PAGE_SIZE:
                return rows
        raise MalformedResponse(f"{endpoint}: more than {MAX_PAGES * PAGE_SIZE} items")
