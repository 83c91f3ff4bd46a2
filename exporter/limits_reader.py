"""Reads concurrency limits and who holds their slots, in a few requests per poll."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from exporter.clock import Deadline
from exporter.errors import ApiStatusError
from exporter.gather import gather_bounded
from exporter.records import ConcurrencyLimitRecord, LimitHolders, LimitKind, RunState

# How often to ask whether the server keeps tag limits in the v1 table alone (servers before
# Prefect's v1-to-v2 adapter, 3.4.x): a tag limit made there later shows within this time.
LEGACY_TAGS_CHECK_SECONDS = 3600.0


class LimitsApi(Protocol):
    """The reads the limits reader needs (prefect_api.PrefectApi has them)."""

    async def concurrency_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]: ...
    async def legacy_tag_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]: ...
    async def tag_limit_holders(self, deadline: Deadline) -> dict[str, tuple[str, ...]]: ...
    async def task_run_states(self, ids: Sequence[str], deadline: Deadline) -> list[RunState]: ...
    async def flow_run_states(self, ids: Sequence[str], deadline: Deadline) -> list[RunState]: ...
    async def deployment_names(self, ids: Sequence[str], deadline: Deadline) -> dict[str, str]: ...
    async def deployment_slot_runs(self, deployment_id: str, deadline: Deadline) -> int: ...
    async def deployment_awaiting_slot(
        self, deployment_id: str, deadline: Deadline
    ) -> tuple[int, float | None]: ...


class LimitsReader:
    """The v2 limit table, then only the holders worth checking.

    Tag holders are asked for only when a tag limit exists, their task and flow runs only when
    a slot is taken, and deployment runs only for deployments whose limit has taken slots.
    `deployments_breakdown` adds two requests per limited deployment (opt-in).

    Servers before Prefect's v1-to-v2 adapter (3.0 to 3.4.x, measured on 3.0.11: not in 3.4.25)
    keep tag limits in the v1 table alone. The v1 view is asked for such limits at the first read
    and hourly (`monotonic` seconds); while it has some, at every read.
    """

    def __init__(
        self,
        api: LimitsApi,
        concurrency: int,
        deployments_breakdown: bool,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._concurrency = concurrency
        self._deployments_breakdown = deployments_breakdown
        self._monotonic = monotonic
        self._legacy_tags = False
        self._legacy_checked: float | None = None  # monotonic seconds of the last check

    async def _with_legacy_tags(
        self, limits: list[ConcurrencyLimitRecord], deadline: Deadline
    ) -> list[ConcurrencyLimitRecord]:
        """`limits` plus the tag limits only the v1 view knows, when a check is due."""
        now = self._monotonic()
        due = (
            self._legacy_checked is None or now - self._legacy_checked >= LEGACY_TAGS_CHECK_SECONDS
        )
        if not (self._legacy_tags or due):
            return limits
        known = {r.tag for r in limits if r.tag is not None}
        try:
            listed = await self._api.legacy_tag_limits(deadline)
        except ApiStatusError as exc:
            if exc.status != 404:
                raise
            listed = []  # no v1 view at all: the v2 table is the whole truth
        legacy = [r for r in listed if r.tag not in known]
        self._legacy_tags, self._legacy_checked = bool(legacy), now
        return limits + legacy

    async def _tag_holders(self, deadline: Deadline) -> dict[str, tuple[str, ...]]:
        """Holders of the tag limits from the v1 view; none known where it is missing (404).

        Without the view, leaks of tag limits cannot be checked (`leaked` is then unknown), but
        the limits themselves, read from the v2 table, stay served: a 404 here must not take
        the whole limits feature, global limits included, down with it.
        """
        try:
            return await self._api.tag_limit_holders(deadline)
        except ApiStatusError as exc:
            if exc.status != 404:
                raise
            return {}

    async def read(
        self, deadline: Deadline
    ) -> tuple[tuple[ConcurrencyLimitRecord, ...], LimitHolders]:
        """Every limit and what is known about its holders; raises PrefectApiError."""
        api, concurrency = self._api, self._concurrency
        limits = tuple(
            await self._with_legacy_tags(await api.concurrency_limits(deadline), deadline)
        )
        has_tags = any(r.kind == LimitKind.TAG for r in limits)
        tag_holders = await self._tag_holders(deadline) if has_tags else {}
        holder_ids = sorted({run for runs in tag_holders.values() for run in runs})
        task_states = await api.task_run_states(holder_ids, deadline) if holder_ids else []
        parent_ids = sorted({s.flow_run_id for s in task_states if s.flow_run_id})
        flow_states = await api.flow_run_states(parent_ids, deadline) if parent_ids else []
        deployment_limits = [r for r in limits if r.kind == LimitKind.DEPLOYMENT]
        deployment_ids = [r.deployment_id for r in deployment_limits if r.deployment_id]
        names = await api.deployment_names(deployment_ids, deadline) if deployment_ids else {}
        # Only limits with taken slots can leak; the others need no request.
        busy = [r.deployment_id for r in deployment_limits if r.deployment_id and r.active_slots]
        holding = await gather_bounded(
            [api.deployment_slot_runs(d, deadline) for d in busy], concurrency
        )
        slot_runs = dict.fromkeys(deployment_ids, 0) | dict(zip(busy, holding, strict=True))
        awaiting: dict[str, tuple[int, float | None]] = {}
        if self._deployments_breakdown:
            answers = await gather_bounded(
                [api.deployment_awaiting_slot(d, deadline) for d in deployment_ids], concurrency
            )
            awaiting = dict(zip(deployment_ids, answers, strict=True))
        holders = LimitHolders(
            tag_holders=tag_holders,
            holder_states={s.id: s for s in (*task_states, *flow_states)},
            deployment_names=names,
            deployment_slot_runs=slot_runs,
            deployment_awaiting=awaiting,
        )
        return limits, holders
