"""A sliding one-minute log of send times that keeps the exporter's API requests within a
per-minute budget, and the plan of each poll from what that budget affords."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from enum import StrEnum

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from exporter.clock import Deadline


class BudgetExhausted(Exception):
    """No request could be afforded before the caller's deadline."""


class RequestBudget:
    """At most `per_minute` requests in any 60-second window, a ceiling that is never exceeded.

    Prefect Cloud counts every request against an account-wide bucket shared with the workers,
    so the exporter waits for a slot rather than ever exceeding its share. A token bucket that
    starts full and refills at the full rate lets about twice the budget through the first
    minute (and the first minute after any pause); a log of the last minute's send times
    (monotonic seconds, at most `per_minute` of them) cannot.
    """

    WINDOW_SECONDS = 60.0
    # A slot is held this much longer than the window: a request reaches the server a little
    # after its slot was granted (the event loop, the connection), and unevenly, so two
    # requests granted exactly a window apart can arrive within one. Measured at the bench's
    # counting proxy: 126 requests in a 60 s window for a budget of 125 without it.
    ARRIVAL_MARGIN_SECONDS = 1.0
    HOLD_SECONDS = WINDOW_SECONDS + ARRIVAL_MARGIN_SECONDS

    def __init__(
        self,
        per_minute: int,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._sleep = sleep
        self._sent: deque[float] = deque()

    @property
    def available(self) -> float:
        """Requests that may be sent right now without waiting."""
        self._forget(self._clock())
        return float(self.per_minute - len(self._sent))

    def seconds_until(self, requests: int) -> float:
        """Seconds until `requests` may be sent without waiting (0.0: now).

        More than the whole budget is never affordable: then a full window (60.0), after which
        every slot is free again.
        """
        now = self._clock()
        self._forget(now)
        excess = len(self._sent) - (self.per_minute - min(requests, self.per_minute))
        if excess <= 0:
            return 0.0
        return max(0.0, self._sent[excess - 1] + self.HOLD_SECONDS - now)

    def _forget(self, now: float) -> None:
        while self._sent and self._sent[0] + self.HOLD_SECONDS <= now:
            self._sent.popleft()

    async def acquire(self, deadline: Deadline) -> float:
        """Take one slot, waiting if needed; returns seconds waited.

        Raises BudgetExhausted, without waiting, when no slot frees up before `deadline`.
        """
        waited = 0.0
        while True:
            now = self._clock()
            self._forget(now)
            if len(self._sent) < self.per_minute:
                self._sent.append(now)
                return waited
            wait = self._sent[0] + self.HOLD_SECONDS - now
            if now + wait > deadline:
                raise BudgetExhausted(f"request budget of {self.per_minute}/min is spent")
            await self._sleep(wait)
            waited += wait


class PollPlan(StrEnum):
    """How much of a poll the budget affords."""

    FULL = "full"
    WAIT = "wait"  # the full cost is affordable in a moment: wait for it, then poll in full
    SHORTENED = "shortened"  # pools, queues, workers and runs; limits and events wait
    SKIP = "skip"


def plan_poll(
    available: float,
    per_minute: int,
    full_cost: int | None,
    core_cost: int | None,
    last_shortened: bool = False,
    full_wait: float = math.inf,
    patience: float = 0.0,
) -> PollPlan:
    """The plan for the next poll from the requests available now and the last polls' costs.

    `full_cost` and `core_cost` are the requests the poll is expected to take in all and
    without its optional parts (as the last full poll measured them); None before the first
    poll (then: full). `full_wait` is the seconds until
    the full cost is affordable and `patience` the seconds a poll may still wait for it: within
    that, the poll waits and stays whole (measured at 1,000 queues with polls of 45 requests
    every 30 s on a budget of 125: a poll's slots are held 61 s, so a window holds parts of
    three polls and every other poll found its full cost a second or two away; planned on what
    was available at once, those polls were shortened, without limits or events, to save two
    requests). After a shortened poll the next one waits to be full (`last_shortened`):
    measured at 1,000 queues under a 5,000-run burst, polls that waited only for their core
    cost were shortened every time, 20 minutes without concurrency limits or events.
    """
    if full_cost is None or core_cost is None:
        # Before any cost is known: poll, unless not even one request is free (right after
        # a first poll that spent the budget and failed).
        return PollPlan.FULL if available >= 1 else PollPlan.SKIP
    if available >= full_cost:
        return PollPlan.FULL
    if full_cost <= per_minute and full_wait <= patience:
        return PollPlan.WAIT
    if available < 1:
        return PollPlan.SKIP
    if core_cost > per_minute:
        return PollPlan.FULL  # never affordable: try anyway; the poll fails with reason budget
    if _must_be_full(full_cost, per_minute, last_shortened):
        return PollPlan.SKIP
    return PollPlan.SHORTENED if available >= core_cost else PollPlan.SKIP


def _must_be_full(full_cost: int | None, per_minute: int, last_shortened: bool) -> bool:
    """After a shortened poll the next one is full, if a full poll is affordable at all."""
    return last_shortened and full_cost is not None and full_cost <= per_minute


def requests_to_wait_for(
    full_cost: int | None, core_cost: int | None, per_minute: int, last_shortened: bool
) -> int:
    """What a skipped poll waits to afford: its core, or in full after a shortened poll."""
    if _must_be_full(full_cost, per_minute, last_shortened):
        assert full_cost is not None
        return full_cost
    return core_cost or 1


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
    """When to poll again after the API throttled us (429 or 503), in seconds from now.

    With Retry-After, then (never sooner than the interval, never later than `cap`: one bad
    header must not stop polling for days). Without it, the interval doubles with each
    consecutive throttled poll up to `cap`, with jitter so that several exporters do not
    return in step.
    """

    def __init__(
        self, interval: float, cap: float = 600.0, jitter: Callable[[], float] = random.random
    ) -> None:
        self._interval = interval
        self.cap = max(cap, interval)
        self._jitter = jitter
        self.consecutive = 0

    def throttled(self, retry_after: float | None) -> float:
        """The wait after one more throttled poll; `retry_after` is finite seconds or None."""
        self.consecutive += 1
        if retry_after is not None:
            return min(self.cap, max(self._interval, retry_after))
        # The exponent is bounded: 2.0 ** 1024 overflows, after days of throttling.
        delay = min(self.cap, self._interval * 2.0 ** min(self.consecutive - 1, 32))
        return max(self._interval, delay * (0.5 + self._jitter() / 2))

    def reset(self) -> None:
        self.consecutive = 0
