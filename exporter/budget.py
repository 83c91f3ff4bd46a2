"""A token bucket that keeps the exporter's API requests within a per-minute budget."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class BudgetExhausted(Exception):
    """No request could be afforded before the caller's deadline."""


class RequestBudget:
    """At most `per_minute` requests in any minute; bursts up to the full minute's worth.

    Prefect Cloud counts every request against an account-wide bucket shared with the workers,
    so the exporter waits for a token rather than ever exceeding its share.
    """

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(per_minute)
        self._updated = clock()

    @property
    def available(self) -> float:
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(
            float(self.per_minute), self._tokens + (now - self._updated) * self.per_minute / 60
        )
        self._updated = now

    async def acquire(self, deadline: float) -> float:
        """Take one token, waiting if needed; returns seconds waited. Raises BudgetExhausted."""
        waited = 0.0
        while True:
            self._refill()
            if self._tokens >= 1:
                self._tokens -= 1
                return waited
            wait = (1 - self._tokens) * 60 / self.per_minute
            if self._clock() + wait > deadline:
                raise BudgetExhausted(f"request budget of {self.per_minute}/min is spent")
            await self._sleep(wait)
            waited += wait


class BudgetCollector(Collector):
    """Exposes the budget's size and what is left of it, read at scrape time."""

    def __init__(self, budget: RequestBudget) -> None:
        self._budget = budget

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "prefect_exporter_request_budget_requests_per_minute",
            "The configured request budget towards the Prefect API, requests per minute.",
            value=self._budget.per_minute,
        )
        yield GaugeMetricFamily(
            "prefect_exporter_request_budget_available_requests",
            "Requests the exporter may make right now without exceeding its budget.",
            value=self._budget.available,
        )


class Backoff:
    """When to poll again after the API throttled us (429 or 503).

    With Retry-After, exactly then (never sooner than the interval). Without it, the interval
    doubles with each consecutive throttled poll up to `cap`, with jitter so that several
    exporters do not return in step.
    """

    def __init__(
        self, interval: float, cap: float = 600.0, jitter: Callable[[], float] = random.random
    ) -> None:
        self._interval = interval
        self._cap = cap
        self._jitter = jitter
        self.consecutive = 0

    def throttled(self, retry_after: float | None) -> float:
        self.consecutive += 1
        if retry_after is not None:
            return max(self._interval, retry_after)
        delay = min(self._cap, self._interval * 2.0 ** (self.consecutive - 1))
        return max(self._interval, delay * (0.5 + self._jitter() / 2))

    def reset(self) -> None:
        self.consecutive = 0
