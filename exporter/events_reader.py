"""Reads flow-run state events incrementally and turns them into latency and transition counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from exporter.clock import Deadline, UnixTime
from exporter.records import FlowRunEvent, LatencyStats, PoolSelector
from exporter.statefile import StateFile
from exporter.transitions import Cursor, TransitionTracker


class EventsApi(Protocol):
    """The reads the events reader needs (prefect_api.PrefectApi has them)."""

    async def flow_run_events(
        self, since: UnixTime, until: UnixTime, max_pages: int, deadline: Deadline
    ) -> tuple[list[FlowRunEvent], bool]: ...
    async def expected_start_times(
        self, ids: Sequence[str], deadline: Deadline
    ) -> dict[str, float | None]: ...


class EventsReader:
    """Events since the cursor, read only once `settle` seconds old (Prefect stores in batches).

    The tracker, and the cursor saved in `cursor_file`, change only after every request of the
    read succeeded, so a failed poll reads the same window again and counts nothing twice. A
    cursor that cannot be saved is recorded by the file; reading goes on.
    """

    def __init__(
        self,
        api: EventsApi,
        max_pages: int,
        settle: float,
        start: UnixTime,
        cursor_file: StateFile | None = None,
        pools: PoolSelector | None = None,
    ) -> None:
        self._api = api
        self._max_pages = max_pages
        self._settle = settle
        self._cursor_file = cursor_file
        self._pools = pools or PoolSelector()
        saved = Cursor.load(cursor_file) if cursor_file else None
        self._tracker = TransitionTracker(saved or Cursor(start - settle))

    @property
    def events_read(self) -> int:
        """Flow-run state events consumed since start-up."""
        return self._tracker.events_read

    def stats(self, now: UnixTime, behind: bool) -> LatencyStats:
        """The cumulative statistics without reading anything."""
        return self._tracker.stats(now, behind)

    async def read(self, now: UnixTime, deadline: Deadline) -> LatencyStats:
        """Consume the settled events since the cursor; raises PrefectApiError."""
        until = UnixTime(now - self._settle)
        since = UnixTime(self._tracker.cursor.occurred)
        behind = False
        if until > since:
            events, behind = await self._api.flow_run_events(
                since, until, self._max_pages, deadline
            )
            selects = self._pools.selects
            pendings = [e for e in self._tracker.first_pendings(events) if selects(e.work_pool)]
            pending_ids = sorted({e.flow_run_id for e in pendings})
            expected = (
                await self._api.expected_start_times(pending_ids, deadline) if pending_ids else {}
            )
            self._tracker.consume(events, expected, selects)
            if self._cursor_file is not None:
                self._tracker.cursor.save(self._cursor_file)
        return self._tracker.stats(now, behind)
