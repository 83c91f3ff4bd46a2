"""Tests for the per-minute request budget."""

from __future__ import annotations

import asyncio

import pytest

from exporter.budget import BudgetExhausted, RequestBudget


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class TestRequestBudget:
    """The budget never allows more than `per_minute` requests in a minute."""

    def test_a_full_minute_can_be_spent_at_once(self) -> None:
        """Up to the whole budget is available as a burst."""
        fake = FakeTime()
        budget = RequestBudget(60, clock=fake.clock, sleep=fake.sleep)
        for _ in range(60):
            assert asyncio.run(budget.acquire(deadline=10)) == 0
        assert fake.slept == []

    def test_beyond_the_budget_the_caller_waits_for_a_token(self) -> None:
        """The 61st request of a 60/min budget waits one second."""
        fake = FakeTime()
        budget = RequestBudget(60, clock=fake.clock, sleep=fake.sleep)
        for _ in range(60):
            asyncio.run(budget.acquire(deadline=10))
        assert asyncio.run(budget.acquire(deadline=10)) == pytest.approx(1.0)

    def test_a_wait_past_the_deadline_is_refused(self) -> None:
        """When no token arrives before the deadline, BudgetExhausted is raised."""
        fake = FakeTime()
        budget = RequestBudget(1, clock=fake.clock, sleep=fake.sleep)
        asyncio.run(budget.acquire(deadline=10))
        with pytest.raises(BudgetExhausted):
            asyncio.run(budget.acquire(deadline=10))

    def test_over_two_minutes_no_more_than_the_budget_plus_burst_is_spent(self) -> None:
        """Sustained demand is held to the per-minute rate."""
        fake = FakeTime()
        budget = RequestBudget(30, clock=fake.clock, sleep=fake.sleep)
        spent = 0
        while fake.now < 120:
            asyncio.run(budget.acquire(deadline=fake.now + 60))
            spent += 1
        assert spent <= 30 + 30 * 2 + 1
