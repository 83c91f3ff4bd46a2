"""Runs a batch of API reads with bounded concurrency, all or nothing."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_bounded(coroutines: Sequence[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """Results in input order, with at most `limit` coroutines running at once.

    The first failure cancels the rest and is raised as itself (not as an exception group).
    """
    semaphore = asyncio.Semaphore(limit)

    async def limited(coroutine: Awaitable[T]) -> T:
        async with semaphore:
            return await coroutine

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(limited(c)) for c in coroutines]
    except BaseExceptionGroup as group_error:
        # Report the first real cause, not the group wrapper.
        raise group_error.exceptions[0] from None
    finally:
        # A task cancelled before it started never awaited its coroutine; close those so that
        # no "coroutine was never awaited" warning escapes into the log (a no-op for the rest).
        for coroutine in coroutines:
            coroutine.close()
    return [task.result() for task in tasks]
