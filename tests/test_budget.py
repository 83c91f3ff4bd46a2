"""Tests for the per-minute request budget."""

from __future__ import annotations

import asyncio

import pytest

from exporter.budget import (
    Backoff,
    BudgetExhausted,
    PollPlan,
    RequestBudget,
    plan_poll,
    requests_to_wait_for,
)
from exporter.clock import Deadline


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def spent_every_ten_seconds(requests: int, per_minute: int = 3) -> tuple[RequestBudget, FakeTime]:
    """A budget of `per_minute` after `requests` requests sent at 0, 10, 20... s; the clock
    stands 10 s after the last."""
    fake = FakeTime()
    budget = RequestBudget(per_minute, clock=fake.clock, sleep=fake.sleep)
    for _ in range(requests):
        asyncio.run(budget.acquire(Deadline(0)))
        fake.now += 10
    return budget, fake


class TestRequestBudget:
    """The budget never allows more than `per_minute` requests in a minute."""

    def test_a_full_minute_can_be_spent_at_once(self) -> None:
        """Up to the whole budget is available as a burst."""
        fake = FakeTime()
        budget = RequestBudget(60, clock=fake.clock, sleep=fake.sleep)
        for _ in range(60):
            assert asyncio.run(budget.acquire(Deadline(10))) == 0
        assert fake.slept == []

    def test_beyond_the_budget_the_caller_waits_until_the_first_request_is_a_minute_old(
        self,
    ) -> None:
        """The 61st request of a 60/min budget spent at once waits the minute (and the margin)."""
        fake = FakeTime()
        budget = RequestBudget(60, clock=fake.clock, sleep=fake.sleep)
        for _ in range(60):
            asyncio.run(budget.acquire(Deadline(10)))
        assert asyncio.run(budget.acquire(Deadline(100))) == pytest.approx(
            RequestBudget.HOLD_SECONDS
        )

    def test_a_wait_past_the_deadline_is_refused(self) -> None:
        """When no token arrives before the deadline, BudgetExhausted is raised."""
        fake = FakeTime()
        budget = RequestBudget(1, clock=fake.clock, sleep=fake.sleep)
        asyncio.run(budget.acquire(Deadline(10)))
        with pytest.raises(BudgetExhausted):
            asyncio.run(budget.acquire(Deadline(10)))

    def test_over_two_minutes_no_more_than_the_budget_plus_burst_is_spent(self) -> None:
        """Sustained demand is held to the per-minute rate."""
        fake = FakeTime()
        budget = RequestBudget(30, clock=fake.clock, sleep=fake.sleep)
        spent = 0
        while fake.now < 120:
            asyncio.run(budget.acquire(Deadline(fake.now + 120)))
            spent += 1
        assert spent <= 30 + 30 * 2 + 1

    @pytest.mark.parametrize("pause", [0.0, 5.0, 59.0, 61.0, 600.0])
    def test_no_sixty_second_window_ever_holds_more_than_the_budget(self, pause: float) -> None:
        """Greedy demand with pauses of any length: every 60 s window holds at most N sends."""
        fake = FakeTime()
        budget = RequestBudget(30, clock=fake.clock, sleep=fake.sleep)
        sent: list[float] = []
        for burst in range(4):
            for _ in range(45):  # a poll costing more than the budget, as in the reproduction
                asyncio.run(budget.acquire(Deadline(fake.now + 1e6)))
                sent.append(fake.now)
                fake.now += 0.01
            fake.now += pause * burst
        for start in sent:
            assert sum(start <= t < start + 60 for t in sent) <= 30

    def test_the_ceiling_holds_where_the_server_counts_despite_uneven_arrival(self) -> None:
        """Requests reach the server up to 0.9 s after their slot, unevenly: still <= N."""
        fake = FakeTime()
        budget = RequestBudget(30, clock=fake.clock, sleep=fake.sleep)
        delays = [0.9 if i % 2 == 0 else 0.0 for i in range(200)]  # the worst alternation
        arrived: list[float] = []
        for delay in delays:
            asyncio.run(budget.acquire(Deadline(fake.now + 1e6)))
            arrived.append(fake.now + delay)
            fake.now += 0.5
        arrived.sort()
        for start in arrived:
            assert sum(start <= t <= start + 60 for t in arrived) <= 30

    def test_what_is_available_follows_the_last_minute(self) -> None:
        """Slots come back one by one as the requests that used them turn a minute old."""
        budget, fake = spent_every_ten_seconds(3)
        assert budget.available == 0
        fake.now = RequestBudget.HOLD_SECONDS
        assert budget.available == 1
        fake.now = 20 + RequestBudget.HOLD_SECONDS
        assert budget.available == 3

    def test_seconds_until_a_number_of_requests_is_affordable(self) -> None:
        """The wait for N requests ends when enough of the oldest turn a minute old."""
        budget, _ = spent_every_ten_seconds(3)
        margin = RequestBudget.ARRIVAL_MARGIN_SECONDS
        assert budget.seconds_until(1) == pytest.approx(30.0 + margin)  # the first, sent at 0
        assert budget.seconds_until(2) == pytest.approx(40.0 + margin)
        assert budget.seconds_until(99) == pytest.approx(50.0 + margin)  # at most the budget
        assert budget.seconds_until(0) == 0.0


class TestPlan:
    """What the budget affords decides between a full, a shortened and a skipped poll."""

    @pytest.mark.parametrize(
        ("available", "full", "core", "plan"),
        [
            (100.0, None, None, PollPlan.FULL),  # nothing measured yet: try in full
            (0.0, None, None, PollPlan.SKIP),  # but not with nothing to spend
            (10.0, 10, 4, PollPlan.FULL),
            (5.0, 10, 4, PollPlan.SHORTENED),
            (3.0, 10, 4, PollPlan.SKIP),
            (3.0, 300, 200, PollPlan.FULL),  # never affordable: try, fail for budget, say so
        ],
    )
    def test_plans(self, available: float, full: int | None, core: int | None, plan: str) -> None:
        """Each combination of what is left and what the last polls cost."""
        assert plan_poll(available, 100, full, core) is plan

    @pytest.mark.parametrize(
        ("available", "full", "full_wait", "patience", "plan"),
        [
            (5.0, 10, 2.0, 15.0, PollPlan.WAIT),  # a moment away: wait, then poll whole
            (0.0, 10, 2.0, 15.0, PollPlan.WAIT),  # even with nothing free right now
            (5.0, 10, 20.0, 15.0, PollPlan.SHORTENED),  # too far off: shortened now
            (5.0, 10, 2.0, 0.0, PollPlan.SHORTENED),  # patience spent on earlier waits
            (3.0, 10, 20.0, 15.0, PollPlan.SKIP),
            (10.0, 10, 0.0, 15.0, PollPlan.FULL),
            (5.0, 150, 2.0, 15.0, PollPlan.SHORTENED),  # never affordable in full
        ],
    )
    def test_a_full_cost_a_moment_away_is_waited_for(
        self, available: float, full: int, full_wait: float, patience: float, plan: PollPlan
    ) -> None:
        """Pacing, not shortening: slots held 61 s free up while a poll of 45 waits a second."""
        got = plan_poll(available, 100, full, 4, full_wait=full_wait, patience=patience)
        assert got is plan

    @pytest.mark.parametrize(
        ("available", "full", "core", "plan", "waits_for"),
        [
            (5.0, 10, 4, PollPlan.SKIP, 10),  # affords the core, but the last was shortened
            (10.0, 10, 4, PollPlan.FULL, 10),
            (5.0, 150, 4, PollPlan.SHORTENED, 4),  # full never affordable: shortened it is
        ],
    )
    def test_after_a_shortened_poll_the_next_waits_to_be_full(
        self, available: float, full: int, core: int, plan: str, waits_for: int
    ) -> None:
        """Limits and events must not starve behind polls that only ever afford their core."""
        assert plan_poll(available, 100, full, core, last_shortened=True) is plan
        assert requests_to_wait_for(full, core, 100, last_shortened=True) == waits_for
        assert requests_to_wait_for(full, core, 100, last_shortened=False) == core


class TestBackoff:
    """Throttled polls wait for Retry-After, or back off exponentially with jitter."""

    def test_retry_after_is_obeyed_but_never_shorter_than_the_interval(self) -> None:
        """Retry-After 120 s means 120 s; 5 s still means the 30 s interval."""
        backoff = Backoff(30)
        assert backoff.throttled(120) == 120
        assert backoff.throttled(5) == 30

    def test_without_retry_after_the_wait_doubles_with_jitter_up_to_the_cap(self) -> None:
        """Waits grow 30, 60, 120, ... within [half, full] of the doubled value, capped."""
        backoff = Backoff(30, cap=200, jitter=lambda: 1.0)
        assert [backoff.throttled(None) for _ in range(5)] == [30, 60, 120, 200, 200]
        low = Backoff(30, cap=200, jitter=lambda: 0.0)
        assert [low.throttled(None) for _ in range(3)] == [30, 30, 60]

    @pytest.mark.parametrize("retry_after", [601.0, 999_999.0, 2.3e9])
    def test_a_huge_retry_after_is_capped(self, retry_after: float) -> None:
        """Retry-After beyond the cap waits the cap (10 minutes), as the doubling does."""
        assert Backoff(30).throttled(retry_after) == 600

    def test_the_cap_is_never_below_the_interval(self) -> None:
        """With an interval above 10 minutes the cap follows the interval."""
        assert Backoff(900).throttled(5000) == 900

    def test_days_of_throttling_never_overflow(self) -> None:
        """A 503 every poll for days (thousands in a row) keeps waiting the cap, no crash."""
        backoff = Backoff(30, jitter=lambda: 1.0)
        waits = [backoff.throttled(None) for _ in range(5000)]
        assert waits[-1] == 600

    def test_success_resets(self) -> None:
        """After a good poll the next throttling starts from the interval again."""
        backoff = Backoff(10, jitter=lambda: 1.0)
        backoff.throttled(None)
        backoff.throttled(None)
        backoff.reset()
        assert backoff.throttled(None) == 10
