"""Reads flow-run state events incrementally and turns them into latency and transition counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


class Stream(Protocol):
    """A live source of events (event_stream.EventStream), used while it covers the cursor."""

    covered_from: float | None

    def covers(self, since: float) -> bool: ...
    def peek(self, until: float) -> list[FlowRunEvent]: ...
    def discard(self, until: float) -> None: ...


# Stream events are taken once this old, so that one delivered a moment late still sorts in.
STREAM_SETTLE_SECONDS = 5.0


class EventsReader:
    """Events since the cursor, read only once `settle` seconds old (Prefect stores in batches).

    The tracker, and the cursor saved in `cursor_file`, change only after every request of the
    read succeeded, so a failed poll reads the same window again and counts nothing twice. A
    cursor that cannot be saved is recorded by the file; reading goes on. `deployments` says
    whose finished runs are counted, by `flow/deployment` name (none when not given).
    """

    def __init__(
        self,
        api: EventsApi,
        max_pages: int,
        settle: float,
        start: UnixTime,
        cursor_file: StateFile | None = None,
        pools: PoolSelector | None = None,
        stream: Stream | None = None,
        deployments: Callable[[str], bool] | None = None,
    ) -> None:
        self._api = api
        self._max_pages = max_pages
        self._settle = settle
        self._cursor_file = cursor_file
        self._pools = pools or PoolSelector()
        self._stream = stream
        # Whose finished runs to count, by `flow/deployment` (deployments_reader decides).
        self._deployments = deployments or (lambda deployment: False)
        saved = Cursor.load(cursor_file) if cursor_file else None
        self._tracker = TransitionTracker(saved or Cursor(start - settle))
        # Without a saved cursor the exporter starts from now: it may start where the stream
        # does, rather than page up to it.
        self._may_skip_to_stream = saved is None

    @property
    def since(self) -> float:
        """Unix time up to which events have been counted (the cursor)."""
        return self._tracker.cursor.occurred

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
        events: list[FlowRunEvent] = []
        if self._may_skip_to_stream and self._stream is not None:
            # Only on the first read: later, the events between cursor and stream are owed.
            self._may_skip_to_stream = False
            covered_from = self._stream.covered_from
            if covered_from is not None and self._tracker.events_read == 0:
                self._tracker = TransitionTracker(Cursor(max(since, covered_from)))
                since = UnixTime(self._tracker.cursor.occurred)
        streamed = self._stream is not None and self._stream.covers(since)
        if self._stream is not None and streamed:
            # No request: the stream holds every event since the cursor. They leave its buffer
            # only once counted, so a poll that fails reads them again.
            until = UnixTime(now - STREAM_SETTLE_SECONDS)
            events = self._stream.peek(until)
        elif until > since:
            # Page only the gap the stream does not cover: from where the stream starts it has
            # every event, even those the database stores late (paging would miss those).
            covered_from = self._stream.covered_from if self._stream is not None else None
            if covered_from is not None and covered_from > since:
                until = UnixTime(min(until, covered_from))
            events, behind = await self._api.flow_run_events(
                since, until, self._max_pages, deadline
            )
        if events:
            selects = self._pools.selects
            pendings = [e for e in self._tracker.first_pendings(events) if selects(e.work_pool)]
            pending_ids = sorted({e.flow_run_id for e in pendings})
            expected = (
                await self._api.expected_start_times(pending_ids, deadline) if pending_ids else {}
            )
            self._tracker.consume(events, expected, selects, self._deployments)
        handover = self._stream is not None and self._stream.covered_from is not None
        if handover and not streamed and not behind and until > self._tracker.cursor.occurred:
            # Every event up to `until` was read: the cursor may stand there even if the last
            # one is older, so that the stream that connected meanwhile can take over. Only
            # then: without a stream, a cursor left at the last event read lets an event that
            # the database stored later than the settle time still be counted.
            at_until = frozenset(e.id for e in events if e.occurred == until)
            self._tracker.cursor = Cursor(until, at_until)
        if (events or not streamed) and self._cursor_file is not None:
            self._tracker.cursor.save(self._cursor_file)
        if self._stream is not None and streamed:
            self._stream.discard(until)
        return self._tracker.stats(now, behind)
