"""Tests for the poll loop against a fake API adapter."""

from __future__ import annotations

import asyncio
import gc
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
import structlog
import structlog.testing
from prometheus_client import CollectorRegistry

from exporter.budget import PollPlan, RequestBudget
from exporter.clock import Deadline, UnixTime
from exporter.errors import ApiBudgetExhausted, ApiStatusError, MalformedResponse, ObjectGone
from exporter.poller import Poller, PollMetrics, PollMode, PollSettings
from exporter.records import (
    ConcurrencyLimitRecord,
    FlowRunEvent,
    PoolRecord,
    PoolSelector,
    QueueRecord,
    QueueRunStats,
    RunRecord,
    RunState,
    StateCount,
    WorkerRecord,
)
from exporter.run_reader import AheadListing
from exporter.snapshot import Snapshot

NOW = 1_800_000_000.0
SETTINGS = PollSettings(interval=30, timeout=5, concurrency=2, heartbeat_multiple=3)


class FakeApi:
    requests_sent = 0
    counts_reads = False  # count the pool list and scheduled pages as requests sent

    def __init__(self, fail: Exception | None = None, fail_on_queue: str | None = None) -> None:
        self.fail = fail
        self.fail_on_queue = fail_on_queue
        self.stats_calls: list[str] = []
        self.limits_missing = False
        self.events_missing = False
        self.asked_task_runs: list[str] = []
        self.slot_checks: list[str] = []
        self.event_windows: list[tuple[float, float]] = []
        self.events: list[FlowRunEvent] = []

    async def work_pools(self, deadline: float) -> list[PoolRecord]:
        if self.fail:
            raise self.fail
        self.requests_sent += self.counts_reads
        return [PoolRecord("p", "process", "READY", False, None)]

    async def work_queues(self, deadline: float) -> list[QueueRecord]:
        return [QueueRecord(q, q, "p", "READY", False, 1, None, None) for q in ("a", "b", "c")]

    async def workers(self, pool: str, deadline: float) -> list[WorkerRecord]:
        return [WorkerRecord(pool, "w", NOW - 1, 30.0)]

    async def queue_run_stats(self, queue_id: str, now: float, deadline: float) -> QueueRunStats:
        self.stats_calls.append(queue_id)
        if queue_id == self.fail_on_queue:
            raise MalformedResponse("flow_runs/count: expected a non-negative integer")
        return QueueRunStats((), 2, now - 60, None, None)

    async def concurrency_limits(self, deadline: float) -> list[ConcurrencyLimitRecord]:
        if self.limits_missing:
            raise ApiStatusError("/v2/concurrency_limits/filter", 404, None)
        return [
            ConcurrencyLimitRecord("1", "tag:etl", 2, 2, True),
            ConcurrencyLimitRecord("2", "deployment:d1", 1, 1, True),
            ConcurrencyLimitRecord("3", "deployment:d2", 3, 0, True),
            ConcurrencyLimitRecord("4", "nightly", 5, 1, False),
        ]

    async def legacy_tag_limits(self, deadline: float) -> list[ConcurrencyLimitRecord]:
        return []

    async def tag_limit_holders(self, deadline: float) -> dict[str, tuple[str, ...]]:
        return {"etl": ("task-a", "task-b")}

    async def task_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]:
        self.asked_task_runs = list(ids)
        return [RunState("task-a", "RUNNING", "flow-a"), RunState("task-b", "RUNNING", "flow-b")]

    async def flow_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]:
        return [RunState("flow-a", "RUNNING"), RunState("flow-b", "CRASHED")]

    async def deployment_names(self, ids: Sequence[str], deadline: float) -> dict[str, str]:
        return {"d1": "etl/nightly", "d2": "etl/hourly"}

    async def deployment_slot_runs(self, deployment_id: str, deadline: float) -> int:
        self.slot_checks.append(deployment_id)
        return 0

    async def deployment_awaiting_slot(
        self, deployment_id: str, deadline: float
    ) -> tuple[int, float | None]:
        return (4, NOW - 100) if deployment_id == "d1" else (0, None)

    async def flow_run_events(
        self, since: float, until: float, max_pages: int, deadline: float
    ) -> tuple[list[FlowRunEvent], bool]:
        self.event_windows.append((since, until))
        if self.events_missing:
            raise ApiStatusError("/events/filter", 404, None)
        return list(self.events), False

    async def expected_start_times(
        self, ids: Sequence[str], deadline: float
    ) -> dict[str, float | None]:
        return dict.fromkeys(ids, NOW - 100)

    async def active_runs_page(
        self,
        queue_ids: Sequence[str],
        after: float | None,
        deadline: float,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]:
        return []

    async def scheduled_runs_page(
        self,
        until: float,
        queue_ids: Sequence[str],
        after: float | None,
        deadline: float,
        excluded: Sequence[str] = (),
    ) -> list[RunRecord]:
        self.requests_sent += self.counts_reads
        return [RunRecord("r1", "a", "SCHEDULED", "Late", NOW - 70, NOW - 70, NOW - 60)]

    async def scheduled_counts_after(
        self, queue_id: str, after: float, deadline: float
    ) -> tuple[StateCount, ...]:
        return (StateCount("SCHEDULED", "Scheduled", 5),)

    async def scheduled_counts_between(
        self, queue_id: str, after: float | None, before: float, deadline: float
    ) -> tuple[StateCount, ...]:
        return ()


class FakeStore:
    def __init__(self) -> None:
        self.published: list[Snapshot] = []
        self.failures: list[str] = []
        self.waits_until: list[float] = []

    def publish(self, snapshot: Snapshot, duration: float) -> None:
        self.published.append(snapshot)

    def record_failure(self, error: str, duration: float) -> None:
        self.failures.append(error)

    def loop_waiting(self, until_monotonic: float) -> None:
        self.waits_until.append(until_monotonic)


def poller(
    api: Any, store: FakeStore, registry: CollectorRegistry, settings: PollSettings = SETTINGS
) -> Poller:
    return Poller(
        api, store, settings, PollMetrics(registry), structlog.get_logger(), clock=lambda: NOW
    )


class TestPoller:
    """A poll publishes a snapshot or records why it failed."""

    def test_success_publishes_a_snapshot_of_every_queue(self) -> None:
        """All queues are read and one snapshot is published."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi()
        wait = asyncio.run(poller(api, store, registry).poll_and_publish())
        assert len(store.published) == 1
        snapshot = store.published[0]
        assert [q.backlog for q in snapshot.queues] == [2, 2, 2]
        assert snapshot.queues[0].oldest_due == NOW - 60
        assert sorted(api.stats_calls) == ["a", "b", "c"]
        assert registry.get_sample_value("prefect_exporter_polls_total", {"result": "success"}) == 1
        assert 0 < wait <= 30

    def test_a_malformed_answer_fails_the_whole_poll_and_is_counted(self) -> None:
        """No partial snapshot is published; the reason is counted."""
        store, registry = FakeStore(), CollectorRegistry()
        asyncio.run(poller(FakeApi(fail_on_queue="b"), store, registry).poll_and_publish())
        assert store.published == []
        assert "non-negative" in store.failures[0]
        assert (
            registry.get_sample_value(
                "prefect_exporter_poll_errors_total", {"reason": "malformed_response"}
            )
            == 1
        )
        assert registry.get_sample_value("prefect_exporter_polls_total", {"result": "failure"}) == 1

    def test_retry_after_delays_the_next_poll(self) -> None:
        """A 429 asking for 120 s pushes the next poll past the 30 s interval."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi(fail=ApiStatusError("/work_pools/filter", 429, retry_after=120))
        wait = asyncio.run(poller(api, store, registry).poll_and_publish())
        assert wait > 100
        assert (
            registry.get_sample_value(
                "prefect_exporter_poll_errors_total", {"reason": "http_status"}
            )
            == 1
        )

    def test_a_bug_is_caught_counted_and_survived(self) -> None:
        """An unexpected exception is counted as internal, not raised."""
        store, registry = FakeStore(), CollectorRegistry()
        asyncio.run(
            poller(FakeApi(fail=ZeroDivisionError("oops")), store, registry).poll_and_publish()
        )
        assert store.failures == ["ZeroDivisionError: oops"]
        assert (
            registry.get_sample_value("prefect_exporter_poll_errors_total", {"reason": "internal"})
            == 1
        )

    def test_every_failure_reason_exists_from_the_start(self) -> None:
        """The reason set is closed, so rate() works before the first failure."""
        registry = CollectorRegistry()
        PollMetrics(registry)
        for reason in (
            "timeout",
            "connection",
            "http_status",
            "malformed_response",
            "budget",
            "internal",
        ):
            assert (
                registry.get_sample_value("prefect_exporter_poll_errors_total", {"reason": reason})
                == 0
            )

    def test_run_stops_when_asked(self) -> None:
        """The loop polls at once and returns promptly when the stop event is set."""
        store = FakeStore()
        p = poller(FakeApi(), store, CollectorRegistry())

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(p.run(stop))
            while not store.published:
                await asyncio.sleep(0)
            stop.set()
            await asyncio.wait_for(task, timeout=5)

        asyncio.run(scenario())
        assert len(store.published) == 1


class TestLimits:
    """Concurrency limits, their holders and leaked slots."""

    def snapshot(self, api: FakeApi, breakdown: bool = False) -> Snapshot:
        store = FakeStore()
        settings = PollSettings(30, 5, 2, 3, deployments_breakdown=breakdown)
        asyncio.run(poller(api, store, CollectorRegistry(), settings).poll_and_publish())
        return store.published[0]

    def test_limits_are_named_by_kind_and_deployment_name(self) -> None:
        """Deployment limits carry flow/deployment names, not ids."""
        limits = {x.name: x for x in self.snapshot(FakeApi()).limits}
        assert set(limits) == {
            "tag:etl",
            "deployment:etl/nightly",
            "deployment:etl/hourly",
            "nightly",
        }
        assert limits["deployment:etl/nightly"].deployment == "etl/nightly"
        assert limits["deployment:etl/nightly"].kind == "deployment"
        assert limits["nightly"].kind == "global"
        assert not limits["nightly"].enabled

    def test_leaked_slots_from_finished_holders(self) -> None:
        """A task of a crashed flow run leaks its tag slot; so does a deployment slot, no runs."""
        api = FakeApi()
        limits = {x.name: x for x in self.snapshot(api).limits}
        assert limits["tag:etl"].leaked == 1
        assert limits["deployment:etl/nightly"].leaked == 1
        assert limits["deployment:etl/hourly"].leaked == 0
        assert limits["nightly"].leaked is None
        assert api.slot_checks == ["d1"]  # a limit with no taken slot needs no request
        assert api.asked_task_runs == ["task-a", "task-b"]

    def test_a_holder_not_listed_yet_is_not_a_leak(self) -> None:
        """Prefect lists task runs seconds after they take a slot: unknown is not leaked."""

        class Unlisted(FakeApi):
            async def task_run_states(self, ids: Sequence[str], deadline: float) -> list[RunState]:
                return [RunState("task-a", "RUNNING", "flow-a")]  # task-b not written yet

        limits = {x.name: x for x in self.snapshot(Unlisted()).limits}
        assert limits["tag:etl"].leaked == 0

    def test_deployment_breakdown_is_opt_in(self) -> None:
        """Per-deployment AwaitingConcurrencySlot counts appear only when asked for."""
        assert self.snapshot(FakeApi()).deployments == ()
        deployments = {d.name: d for d in self.snapshot(FakeApi(), breakdown=True).deployments}
        assert deployments["etl/nightly"].awaiting_slot == 4
        assert deployments["etl/nightly"].oldest_awaiting_slot == NOW - 100

    def test_a_server_without_v2_limits_degrades(self) -> None:
        """A 404 turns the feature off (reported), the poll still succeeds."""
        api = FakeApi()
        api.limits_missing = True
        snapshot = self.snapshot(api)
        assert snapshot.limits == ()
        assert dict(snapshot.features)["concurrency_limits"] is False


class TestEvents:
    """Transitions read from events feed the latency histograms."""

    def test_pickup_and_start_delays_and_the_window_read(self) -> None:
        """A run scheduled 100 s ago, Pending 40 s later, Running 5 s after that."""
        api = FakeApi()
        api.events = [
            FlowRunEvent("e1", NOW - 60, "r1", "PENDING", "Pending", "p"),
            FlowRunEvent("e2", NOW - 55, "r1", "RUNNING", "Running", "p"),
        ]
        store = FakeStore()
        times = [NOW - 100, NOW]  # start-up, then the poll

        def clock() -> float:
            return times.pop(0) if len(times) > 1 else times[0]

        p = Poller(
            api,
            store,
            PollSettings(30, 5, 2, 3, events_settle=10),
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=clock,
        )
        asyncio.run(p.poll_and_publish())
        latency = store.published[0].latency
        assert latency is not None
        assert latency.pickup["p"].count == 1
        assert latency.pickup["p"].total == 40
        assert latency.start["p"].total == 5
        assert latency.transitions[("p", "Running")] == 1
        assert api.event_windows == [(NOW - 110, NOW - 10)]

    def test_a_server_without_events_degrades(self) -> None:
        """A 404 from /events/filter switches the latency part off, the poll succeeds."""
        api = FakeApi()
        api.events_missing = True
        store = FakeStore()
        times = [NOW - 100, NOW]  # start-up, then the poll: a window to read

        def clock() -> float:
            return times.pop(0) if len(times) > 1 else times[0]

        p = Poller(
            api,
            store,
            PollSettings(30, 5, 2, 3),
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=clock,
        )
        asyncio.run(p.poll_and_publish())
        assert store.published[0].latency is None
        assert dict(store.published[0].features)["events"] is False


class TestThrottling:
    """A 429 or 503 pauses the whole poller; gauges say until when."""

    def test_429_with_retry_after_sets_the_backoff_deadline(self) -> None:
        """The back-off gauge holds the deadline; a good poll clears it."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi(fail=ApiStatusError("/work_pools/filter", 429, retry_after=90))
        p = poller(api, store, registry)
        assert asyncio.run(p.poll_and_publish()) == 90
        assert (
            registry.get_sample_value("prefect_exporter_backoff_until_timestamp_seconds")
            == NOW + 90
        )
        api.fail = None
        asyncio.run(p.poll_and_publish())
        assert registry.get_sample_value("prefect_exporter_backoff_until_timestamp_seconds") == 0

    def test_maintenance_is_reported(self) -> None:
        """Prefect-Maintenance: true on a 503 sets the maintenance gauge."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi(fail=ApiStatusError("/work_pools/filter", 503, 30, maintenance=True))
        asyncio.run(poller(api, store, registry).poll_and_publish())
        assert registry.get_sample_value("prefect_exporter_api_maintenance") == 1

    def test_other_errors_do_not_back_off(self) -> None:
        """A 500 is retried at the normal interval."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi(fail=ApiStatusError("/work_pools/filter", 500, None))
        wait = asyncio.run(poller(api, store, registry).poll_and_publish())
        assert wait <= 30
        assert registry.get_sample_value("prefect_exporter_backoff_until_timestamp_seconds") == 0


class CountingApi(FakeApi):
    """Counts calls as requests, as the real adapter does."""

    async def work_pools(self, deadline: float) -> list[PoolRecord]:
        self.requests_sent += 1
        return await super().work_pools(deadline)

    async def concurrency_limits(self, deadline: float) -> list[ConcurrencyLimitRecord]:
        self.requests_sent += 5
        return await super().concurrency_limits(deadline)


def budget_outcomes(registry: CollectorRegistry) -> dict[str, float | None]:
    """prefect_exporter_request_budget_polls_total by outcome."""
    get = registry.get_sample_value
    return {
        outcome: get("prefect_exporter_request_budget_polls_total", {"outcome": outcome})
        for outcome in ("delayed", "shortened", "skipped")
    }


def token_budget(tokens: dict[str, float], wait: float) -> Any:
    """A budget with `tokens["now"]` requests free; more are free `wait` seconds from now."""

    class Budget:
        per_minute = 1000

        @property
        def available(self) -> float:
            return tokens["now"]

        def seconds_until(self, requests: int) -> float:
            return wait if requests > tokens["now"] else 0.0

    return Budget()


class TestBudgetPlan:
    """When the budget cannot afford a full poll, the optional parts wait, then whole polls."""

    def test_full_then_shortened_then_skipped(self) -> None:
        """Limits are carried over in a shortened poll; a skipped poll publishes nothing."""
        tokens = {"now": 1000.0}
        store, registry = FakeStore(), CollectorRegistry()
        api = CountingApi()
        # 17 s: beyond the patience (half of the 30 s interval), no waiting for the full cost.
        p = Poller(
            api,
            store,
            SETTINGS,
            PollMetrics(registry),
            structlog.get_logger(),
            clock=lambda: NOW,
            budget=token_budget(tokens, 17.0),
        )
        asyncio.run(p.poll_and_publish())  # full: core costs 1, full 6
        tokens["now"] = 3
        asyncio.run(p.poll_and_publish())
        assert len(store.published) == 2
        assert store.published[1].limits == store.published[0].limits
        assert api.requests_sent == 6 + 1
        tokens["now"] = 0
        # The next try comes as soon as the budget affords a poll's core, not an interval later.
        assert asyncio.run(p.poll_and_publish()) == 17.0
        assert len(store.published) == 2
        get = registry.get_sample_value
        assert get("prefect_exporter_request_budget_polls_total", {"outcome": "shortened"}) == 1
        assert get("prefect_exporter_request_budget_polls_total", {"outcome": "skipped"}) == 1
        # After a shortened poll the next waits to be full: 3 afford the core (1), not the 6.
        tokens["now"] = 3
        assert asyncio.run(p.poll_and_publish()) == 17.0  # seconds_until(6), not until(1)
        assert len(store.published) == 2
        tokens["now"] = 6
        asyncio.run(p.poll_and_publish())
        assert len(store.published) == 3
        assert api.requests_sent == 6 + 1 + 6
        assert get("prefect_exporter_request_budget_polls_total", {"outcome": "shortened"}) == 1


class TestBudgetPacing:
    """A full cost a moment away is waited for (pacing), not met by shortening the poll."""

    @staticmethod
    def poller(budget: Any, store: FakeStore, registry: CollectorRegistry) -> Poller:
        return Poller(
            CountingApi(),
            store,
            SETTINGS,
            PollMetrics(registry),
            structlog.get_logger(),
            clock=lambda: NOW,
            budget=budget,
        )

    def test_the_poll_waits_for_its_full_cost_and_stays_whole(self) -> None:
        """Two waits of 2 s, one count of `delayed`, no warning, then a full poll that says
        how long it waited."""
        tokens = {"now": 1000.0}
        store, registry = FakeStore(), CollectorRegistry()
        p = self.poller(token_budget(tokens, 2.0), store, registry)
        asyncio.run(p.poll_and_publish())  # full: 6 requests
        tokens["now"] = 3
        with structlog.testing.capture_logs() as logs:
            assert asyncio.run(p.poll_and_publish()) == 2.0
            assert asyncio.run(p.poll_and_publish()) == 2.0
            tokens["now"] = 6
            asyncio.run(p.poll_and_publish())
        assert len(store.published) == 2
        assert p._api.requests_sent == 6 + 6
        assert budget_outcomes(registry) == {"delayed": 1, "shortened": 0, "skipped": 0}
        assert not [e for e in logs if e["event"] == "request_budget_short"]
        [succeeded] = [e for e in logs if e["event"] == "poll_succeeded"]
        assert succeeded["budget_wait_seconds"] == 4.0

    def test_after_half_an_interval_of_waiting_the_poll_is_shortened(self) -> None:
        """Patience is half the 30 s interval in all: 6 + 6 s waited, 6 more would exceed it."""
        tokens = {"now": 1000.0}
        store, registry = FakeStore(), CollectorRegistry()
        p = self.poller(token_budget(tokens, 6.0), store, registry)
        asyncio.run(p.poll_and_publish())
        tokens["now"] = 3
        assert asyncio.run(p.poll_and_publish()) == 6.0
        assert asyncio.run(p.poll_and_publish()) == 6.0
        asyncio.run(p.poll_and_publish())
        assert len(store.published) == 2
        assert p._api.requests_sent == 6 + 1
        # One poll, one outcome: it ended shortened.
        assert budget_outcomes(registry) == {"delayed": 0, "shortened": 1, "skipped": 0}

    def test_each_poll_gets_its_own_patience_on_a_real_budget(self) -> None:
        """Budget 10, polls of 6 (CountingApi): at 50 s the last poll's slots free in 11 s, so
        the poll waits 11 s, runs in full, and the next one waits again just as long."""
        clock = [0.0]
        budget = RequestBudget(10, clock=lambda: clock[0])
        store, registry = FakeStore(), CollectorRegistry()
        p = self.poller(budget, store, registry)

        def poll_and_spend() -> float:
            sent = p._api.requests_sent
            wait = asyncio.run(p.poll_and_publish())
            for _ in range(p._api.requests_sent - sent):  # what the real adapter acquires
                asyncio.run(budget.acquire(Deadline(clock[0])))
            return wait

        poll_and_spend()  # at 0: full, 6 slots held until 61
        for start in (50.0, 111.0):
            clock[0] = start
            assert poll_and_spend() == pytest.approx(11.0)
            clock[0] += 11.0
            with structlog.testing.capture_logs() as logs:
                poll_and_spend()
            [succeeded] = [e for e in logs if e["event"] == "poll_succeeded"]
            assert succeeded["budget_wait_seconds"] == pytest.approx(11.0)
        assert len(store.published) == 3
        assert p._api.requests_sent == 3 * 6
        assert budget_outcomes(registry) == {"delayed": 2, "shortened": 0, "skipped": 0}

    def test_a_learned_cost_plus_the_listing_never_exceeds_the_budget(self) -> None:
        """After a budget failure the core is learned as the whole budget at most; the listing
        of runs ahead, still due, must not lift it beyond: that would poll at once, hopelessly."""
        clock = [0.0]
        budget = RequestBudget(125, clock=lambda: clock[0])
        for _ in range(70):
            asyncio.run(budget.acquire(Deadline(0)))
        p = self.poller(budget, FakeStore(), CollectorRegistry())
        p._mode = PollMode.RUN_CENTRIC
        p._runs._ahead_listing_pages = 16  # no kept listing: the next poll lists again
        p._full_cost, p._core_cost = 47, 45
        p._learn_from_budget_failure(70)
        full, core = p._next_costs(UnixTime(NOW))
        assert (full, core) == (127, 125)
        assert p._plan(full, core)[0] is PollPlan.SKIP


class TestBudgetFailure:
    """A poll that ran out of budget costs more than measured: the next one waits for more."""

    def test_the_next_attempt_waits_for_twice_what_the_failed_one_spent(self) -> None:
        """A burst makes polls dearer: no series of attempts planned on the old cost."""
        asked: list[int] = []

        class Budget:
            per_minute = 125
            available = 40.0

            def seconds_until(self, requests: int) -> float:
                asked.append(requests)
                return 20.0  # beyond the patience: not worth waiting for in full

        class DearApi(CountingApi):
            async def work_queues(self, deadline: float) -> list[QueueRecord]:
                self.requests_sent += 30
                raise ApiBudgetExhausted("request budget of 125/min is spent")

        store = FakeStore()
        p = Poller(
            DearApi(),
            store,
            SETTINGS,
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=lambda: NOW,
            budget=Budget(),  # type: ignore[arg-type]
        )
        p._full_cost, p._core_cost = 12, 10  # as measured before the burst
        asyncio.run(p.poll_and_publish())  # planned full (40 >= 12), fails after 31 requests
        assert store.failures
        assert asyncio.run(p.poll_and_publish()) == 20.0  # skipped: 40 < 62
        assert asked[-1] == 62
        assert (p._core_cost, p._full_cost) == (62, 64)


class TestRetryAfterBounds:
    """A Retry-After that is too long or not a number is capped, logged once and counted."""

    @pytest.mark.parametrize(
        ("retry_after", "header"),
        [(999_999.0, "999999"), (2.3e9, "Wed, 21 Oct 2099 07:28:00 GMT"), (None, "inf")],
    )
    def test_the_pause_never_exceeds_the_cap(self, retry_after: float | None, header: str) -> None:
        """Polling resumes within ten minutes whatever the header says; the clamp is counted."""
        store, registry = FakeStore(), CollectorRegistry()
        error = ApiStatusError("/work_pools/filter", 429, retry_after, retry_after_header=header)
        with structlog.testing.capture_logs() as logs:
            wait = asyncio.run(poller(FakeApi(fail=error), store, registry).poll_and_publish())
        assert wait <= 600
        assert registry.get_sample_value("prefect_exporter_retry_after_clamped_total") == 1
        clamped = [e for e in logs if e["event"] == "retry_after_clamped"]
        assert [e["retry_after"] for e in clamped] == [header]
        assert registry.get_sample_value(
            "prefect_exporter_backoff_until_timestamp_seconds"
        ) == pytest.approx(NOW + wait)

    def test_a_sane_retry_after_is_obeyed_and_not_counted(self) -> None:
        """120 s is obeyed exactly and nothing is said about it."""
        store, registry = FakeStore(), CollectorRegistry()
        error = ApiStatusError("/work_pools/filter", 429, 120.0, retry_after_header="120")
        wait = asyncio.run(poller(FakeApi(fail=error), store, registry).poll_and_publish())
        assert wait == 120
        assert registry.get_sample_value("prefect_exporter_retry_after_clamped_total") == 0


class GoneApi(FakeApi):
    """Two pools listed; one is deleted before its workers are asked for."""

    async def work_pools(self, deadline: float) -> list[PoolRecord]:
        return [
            PoolRecord("stays", "process", "READY", False, None),
            PoolRecord("doomed", "process", "READY", False, None),
        ]

    async def work_queues(self, deadline: float) -> list[QueueRecord]:
        return [
            QueueRecord("a", "default", "stays", "READY", False, 1, None, None),
            QueueRecord("b", "default", "doomed", "READY", False, 1, None, None),
        ]

    async def workers(self, pool: str, deadline: float) -> list[WorkerRecord]:
        if pool == "doomed":
            raise ObjectGone("/work_pools/{name}/workers/filter", pool)
        return await super().workers(pool, deadline)


class TestVanishedObjects:
    """An object deleted between two requests of a poll is left out; the rest is published."""

    def test_a_pool_deleted_after_the_list_is_left_out(self) -> None:
        """The other pool, its queue and its workers are published; the poll succeeds."""
        store, registry = FakeStore(), CollectorRegistry()
        api = GoneApi()
        asyncio.run(poller(api, store, registry).poll_and_publish())
        assert store.failures == []
        (snapshot,) = store.published
        assert [p.name for p in snapshot.pools] == ["stays"]
        assert [(q.pool, q.name) for q in snapshot.queues] == [("stays", "default")]
        assert [w.pool for w in snapshot.workers] == ["stays"]
        assert api.stats_calls == ["a"]
        get = registry.get_sample_value
        assert get("prefect_exporter_objects_gone_total", {"kind": "work_pool"}) == 1
        assert get("prefect_exporter_polls_total", {"result": "success"}) == 1


class SlowApi(FakeApi):
    """A poll that never finishes on its own: every queue read hangs."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = 0

    async def queue_run_stats(self, queue_id: str, now: float, deadline: float) -> QueueRunStats:
        self.stats_calls.append(queue_id)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("unreachable")


class TestShutdown:
    """Stopping cancels a poll in flight at once, whatever the poll timeout."""

    def test_stop_during_a_poll_cancels_it_cleanly(self) -> None:
        """The loop returns without waiting for the hour-long poll; nothing is published."""
        store = FakeStore()
        api = SlowApi()
        settings = PollSettings(interval=3600, timeout=3600, concurrency=2, heartbeat_multiple=3)
        p = poller(api, store, CollectorRegistry(), settings)

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(p.run(stop))
            while len(api.stats_calls) < 2:
                await asyncio.sleep(0)
            stop.set()
            await asyncio.wait_for(task, timeout=5)

        with structlog.testing.capture_logs() as logs:
            asyncio.run(scenario())
        assert store.published == []
        assert store.failures == []
        assert api.cancelled == 2
        assert [e["event"] for e in logs if e["event"] == "poll_cancelled"] == ["poll_cancelled"]

    def test_the_loop_says_until_when_it_waits(self) -> None:
        """After a poll the store learns the planned wait, so /healthz can tell it from a stall."""
        store = FakeStore()
        p = poller(FakeApi(), store, CollectorRegistry())

        async def scenario() -> None:
            stop = asyncio.Event()
            task = asyncio.create_task(p.run(stop))
            while not store.waits_until:
                await asyncio.sleep(0)
            stop.set()
            await asyncio.wait_for(task, timeout=5)

        asyncio.run(scenario())
        assert len(store.waits_until) == 1


class TestNoStrayWarnings:
    """A failing poll leaves no never-awaited coroutine behind (it would print plain text)."""

    def test_a_failure_among_many_queued_reads_warns_about_nothing(self) -> None:
        """With one request in flight at a time, the queued reads are closed, not leaked."""
        store, registry = FakeStore(), CollectorRegistry()
        settings = PollSettings(interval=30, timeout=5, concurrency=1, heartbeat_multiple=3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            asyncio.run(
                poller(FakeApi(fail_on_queue="a"), store, registry, settings).poll_and_publish()
            )
            gc.collect()
        assert [str(w.message) for w in caught] == []
        assert store.failures


class TestPollModes:
    """Per-queue or run-centric, as configured or by measured cost under `auto`."""

    def test_run_centric_reads_listings_and_no_queue_one_by_one(self) -> None:
        """Three queues, no per-queue read; the listed due run is queue a's backlog."""
        store, registry = FakeStore(), CollectorRegistry()
        api = FakeApi()
        settings = PollSettings(
            interval=30, timeout=5, concurrency=2, heartbeat_multiple=3, mode="run-centric"
        )
        p = poller(api, store, registry, settings)
        asyncio.run(p.poll_and_publish())
        asyncio.run(p.poll_and_publish())  # the first poll's slow round read far-ahead counts
        first, second = store.published
        assert api.stats_calls == []
        backlog = {q.name: q.backlog for q in second.queues}
        assert backlog == {"a": 1, "b": 0, "c": 0}
        scheduled = {q.name: dict(q.runs_by_state)["Scheduled"] for q in second.queues}
        assert scheduled == {"a": 5, "b": 5, "c": 5}
        assert {q.name: dict(q.runs_by_state)["Scheduled"] for q in first.queues} == {
            "a": 0,
            "b": 0,
            "c": 0,
        }
        assert registry.get_sample_value("prefect_exporter_poll_mode", {"mode": "run-centric"}) == 1
        assert registry.get_sample_value("prefect_exporter_poll_mode", {"mode": "per-queue"}) == 0

    def test_the_slow_round_is_told_what_this_poll_spent_so_far(self) -> None:
        """The requests of this poll before the slow round, its listing of runs ahead aside."""

        api = FakeApi()
        api.counts_reads = True
        api.requests_sent = 100  # before this poll
        settings = PollSettings(
            interval=30, timeout=5, concurrency=2, heartbeat_multiple=3, mode="run-centric"
        )
        p = poller(api, FakeStore(), CollectorRegistry(), settings)
        told: list[tuple[int | None, int, int]] = []
        limit = p._refresh_limit

        def spy(queue_ids: Sequence[str], next_poll: UnixTime, spent: int | None = None) -> int:
            told.append((spent, api.requests_sent, p._ahead_listing_requests))
            return limit(queue_ids, next_poll, spent)

        p._refresh_limit = spy  # type: ignore[method-assign]
        asyncio.run(p.poll_and_publish())
        ((spent, sent, ahead),) = told
        assert ahead == 1  # the first poll lists the runs ahead: one page here
        assert spent == sent - 100 - ahead == 2  # the pool list and the due listing's page
        assert p._spent_before_slow_round == 2  # what the next poll is compared with

    def test_auto_moves_to_run_centric_when_queues_cost_more_than_listings(self) -> None:
        """Measured per-queue cost of 6 a queue makes listings (about 3 requests) the choice."""

        class Expensive(FakeApi):
            async def queue_run_stats(
                self, queue_id: str, now: float, deadline: float
            ) -> QueueRunStats:
                self.requests_sent += 6
                return await super().queue_run_stats(queue_id, now, deadline)

        store, registry = FakeStore(), CollectorRegistry()
        api = Expensive()
        p = poller(api, store, registry)
        asyncio.run(p.poll_and_publish())
        asyncio.run(p.poll_and_publish())
        assert registry.get_sample_value("prefect_exporter_poll_mode", {"mode": "per-queue"}) == 0
        assert len(api.stats_calls) == 3  # the first poll only

    def test_auto_stays_per_queue_for_idle_queues(self) -> None:
        """Idle queues at one request each are no dearer than listings: no switch."""

        class Idle(FakeApi):
            async def queue_run_stats(
                self, queue_id: str, now: float, deadline: float
            ) -> QueueRunStats:
                self.requests_sent += 1
                return await super().queue_run_stats(queue_id, now, deadline)

        store, registry = FakeStore(), CollectorRegistry()
        api = Idle()
        p = poller(api, store, registry)
        for _ in range(3):
            asyncio.run(p.poll_and_publish())
        assert registry.get_sample_value("prefect_exporter_poll_mode", {"mode": "per-queue"}) == 1
        assert len(api.stats_calls) == 9


class TestPoolSelection:
    """A shard watches only its pools: their queues, workers and runs, nothing of the others."""

    def test_a_shard_reads_and_publishes_only_its_pools(self) -> None:
        """With `stays` selected, `doomed`'s queue and workers are neither read nor published."""
        store, registry = FakeStore(), CollectorRegistry()
        api = GoneApi()
        settings = PollSettings(
            interval=30,
            timeout=5,
            concurrency=2,
            heartbeat_multiple=3,
            pools=PoolSelector(include=("st*",)),
        )
        asyncio.run(poller(api, store, registry, settings).poll_and_publish())
        (snapshot,) = store.published
        assert [p.name for p in snapshot.pools] == ["stays"]
        assert {q.pool for q in snapshot.queues} == {"stays"}
        assert api.stats_calls == ["a"]
        # doomed's workers were not asked for: no 404, nothing gone.
        assert (
            registry.get_sample_value("prefect_exporter_objects_gone_total", {"kind": "work_pool"})
            == 0
        )


class TestCancellation:
    """Cancelling the loop itself is not swallowed as if it were a shutdown."""

    def test_cancelling_run_propagates(self) -> None:
        """A task running `run()` that is cancelled ends cancelled."""
        store = FakeStore()
        api = SlowApi()
        settings = PollSettings(interval=3600, timeout=3600, concurrency=2, heartbeat_multiple=3)
        p = poller(api, store, CollectorRegistry(), settings)

        async def scenario() -> bool:
            task = asyncio.create_task(p.run(asyncio.Event()))
            while len(api.stats_calls) < 2:
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        assert asyncio.run(scenario())
        assert api.cancelled == 2  # the poll in flight was cancelled too, not left running


class TestRunsWithoutWorkQueue:
    """The count of runs whose queue was deleted is read when its reader is wired."""

    def test_counted_at_the_poll_start_when_wired(self) -> None:
        """The orphans reader is asked with the poll's start time; the snapshot holds its count."""
        asked: list[float] = []

        class Orphans:
            async def runs_without_work_queue(self, now: float, deadline: float) -> int:
                asked.append(now)
                return 4

        store, registry = FakeStore(), CollectorRegistry()
        p = Poller(
            FakeApi(),
            store,
            SETTINGS,
            PollMetrics(registry),
            structlog.get_logger(),
            clock=lambda: NOW,
            orphans=Orphans(),
        )
        asyncio.run(p.poll_and_publish())
        assert store.published[0].runs_without_work_queue == 4
        assert asked == [NOW]

    def test_unknown_without_a_reader(self) -> None:
        """Not read is None (no series), never a made-up 0."""
        store = FakeStore()
        asyncio.run(poller(FakeApi(), store, CollectorRegistry()).poll_and_publish())
        assert store.published[0].runs_without_work_queue is None


class TestSlowRoundBudget:
    """The slow round spends only budget that neither this poll nor the next one needs."""

    @staticmethod
    def setup(interval: float) -> tuple[Poller, RequestBudget, list[float]]:
        now = [0.0]
        budget = RequestBudget(125, clock=lambda: now[0])
        settings = PollSettings(
            interval=interval, timeout=5, concurrency=2, heartbeat_multiple=3, mode="run-centric"
        )
        p = Poller(
            FakeApi(),
            FakeStore(),
            settings,
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=lambda: NOW + now[0],
            monotonic=lambda: now[0],
            budget=budget,
        )
        return p, budget, now

    @staticmethod
    def spend(budget: RequestBudget, now: list[float], requests: int, start: float) -> None:
        """`requests` sent from `start` at 10 a second, as a poll sends them."""
        for i in range(requests):
            now[0] = start + i / 10
            asyncio.run(budget.acquire(Deadline(now[0])))
        now[0] = start + requests / 10

    def test_nothing_before_a_full_poll_was_measured(self) -> None:
        """The rest of this poll's cost is unknown: no slow round."""
        p, _, _ = self.setup(30)
        assert p._refresh_limit([f"q{i}" for i in range(1000)], next_poll=UnixTime(NOW + 30)) == 0

    def test_at_30_s_the_polls_share_of_the_minute_less_the_next_poll(self) -> None:
        """125 a minute at 30 s is 62 a poll; the next poll's 45 and a reserve of 4 leave 13,
        however much is free right now; 16 fewer (none) when the next poll lists the runs
        ahead (every 5 minutes)."""
        p, _, _ = self.setup(30)
        p._full_cost, p._core_cost = 45, 43
        ids = [f"q{i}" for i in range(1000)]
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 30)) == 62 - 45 - 4
        p._mode = PollMode.RUN_CENTRIC
        p._runs._ahead_listing_pages = 16  # and no kept listing: the next poll lists again
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 30)) == 0

    def test_a_poll_dearer_than_the_last_expects_the_next_as_dear(self) -> None:
        """A backlog fell due: the listings of this poll cost 63 where the last core was 43, so
        the next poll is planned at 45 + 20 and the share leaves nothing; as cheap as the last
        (or cheaper), the plan is the last cost's."""
        p, _, _ = self.setup(30)
        p._full_cost, p._core_cost = 45, 43
        ids = [f"q{i}" for i in range(1000)]
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 30), spent=63) == 0
        # Compared with the last poll's requests before its slow round, once measured.
        p._spent_before_slow_round = 41
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 30), spent=43) == 62 - 47 - 4
        p._spent_before_slow_round = None
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 30), spent=50) == 62 - 52 - 4
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 30), spent=41) == 62 - 45 - 4

    def test_at_60_s_the_share_is_twice_as_large(self) -> None:
        """125 at 60 s: the whole 125 a poll, less the next poll's 45 and the reserve."""
        p, _, _ = self.setup(60)
        p._full_cost, p._core_cost = 45, 43
        assert (
            p._refresh_limit([f"q{i}" for i in range(1000)], next_poll=UnixTime(NOW + 60))
            == 125 - 45 - 4
        )

    def test_the_next_poll_pays_for_the_listing_of_runs_ahead_only_when_it_makes_it(
        self,
    ) -> None:
        """A listing kept from Unix time NOW is made again 300 s later: a next poll due
        before then costs 45, one due after 45 + 16."""
        p, _, _ = self.setup(60)
        p._full_cost, p._core_cost = 45, 43
        p._mode = PollMode.RUN_CENTRIC
        p._runs._ahead = AheadListing(NOW, frozenset(), {}, frozenset())
        p._runs._ahead_listing_pages = 16
        ids = [f"q{i}" for i in range(1000)]
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 299.0)) == 125 - 45 - 4
        assert p._refresh_limit(ids, next_poll=UnixTime(NOW + 301.0)) == 125 - 45 - 16 - 4

    def test_never_more_than_is_free_now(self) -> None:
        """What is free now, less this poll's rest, caps the round too."""
        p, budget, now = self.setup(60)
        p._full_cost, p._core_cost = 45, 43
        self.spend(budget, now, 115, start=0.0)
        assert (
            p._refresh_limit([f"q{i}" for i in range(1000)], next_poll=UnixTime(NOW + 1000))
            == 10 - 6
        )
