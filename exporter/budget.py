"""A token bucket that keeps the exporter's API requests within a per-minute budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


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
