"""Reads flow-run state events incrementally and turns them into latency and throughput counts.

The cursor is a timestamp plus the ids of the events already counted at exactly that timestamp:
the events API's `since` is inclusive, so a page boundary or a restart that lands inside a burst
of same-instant events neither skips nor double counts any of them. It is plain data and can be
saved to a file to survive restarts of the exporter.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from exporter.records import (
    FINISHED_STATE_LABELS,
    FlowRunEvent,
    HistogramState,
    LatencyStats,
    StateName,
    StateType,
)
from exporter.statefile import StateFile

_REMEMBERED_RUNS = 50_000  # bounds memory: runs whose Pending time or observation we keep


@dataclass(frozen=True)
class Cursor:
    """Where the event reader stands: the last timestamp read and the ids counted at it."""

    occurred: float
    ids_at_occurred: frozenset[str] = frozenset()

    def unseen(self, events: Iterable[FlowRunEvent]) -> list[FlowRunEvent]:
        """Events after the cursor, in order, without those already counted."""
        return [
            e
            for e in events
            if e.occurred > self.occurred
            or (e.occurred == self.occurred and e.id not in self.ids_at_occurred)
        ]

    def advance(self, events: Iterable[FlowRunEvent]) -> Cursor:
        cursor = self
        for event in events:
            if event.occurred > cursor.occurred:
                cursor = Cursor(event.occurred, frozenset({event.id}))
            elif event.occurred == cursor.occurred:
                cursor = Cursor(cursor.occurred, cursor.ids_at_occurred | {event.id})
        return cursor

    def save(self, file: StateFile) -> bool:
        """Write the cursor to `file`; False when that failed (recorded by the file, never raised).

        The poll goes on either way: only a restart would lose the place.
        """
        return file.save(
            {"occurred": self.occurred, "ids_at_occurred": sorted(self.ids_at_occurred)}
        )

    @classmethod
    def load(cls, file: StateFile) -> Cursor | None:
        """The saved cursor; None when there is none, or when it is unusable (the file warns)."""
        return file.load(cls._from_json)

    @classmethod
    def _from_json(cls, data: Any) -> Cursor:
        """`{"occurred": Unix seconds, "ids_at_occurred": [event id, ...]}`; ValueError if not."""
        if not isinstance(data, dict) or not isinstance(data.get("ids_at_occurred"), list):
            raise ValueError("expected {occurred, ids_at_occurred: [...]}")
        occurred = float(data["occurred"])
        if not math.isfinite(occurred):
            raise ValueError(f"occurred is {occurred}")
        return cls(occurred, frozenset(map(str, data["ids_at_occurred"])))


class _BoundedSet:
    def __init__(self, size: int) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._size = size

    def add(self, key: str) -> None:
        self._items[key] = None
        if len(self._items) > self._size:
            self._items.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._items


class TransitionTracker:
    """Accumulates counts from events; each run's pickup and start delay is observed once.

    Pickup delay: from the run's scheduled time (expected start) to its first Pending state;
    negative values (workers prefetch runs up to 10 s early) are observed as 0.
    Start delay: from that Pending state to the first Running state.
    """

    def __init__(self, cursor: Cursor) -> None:
        self.cursor = cursor
        self._pending_at: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._picked_up = _BoundedSet(_REMEMBERED_RUNS)
        self._started = _BoundedSet(_REMEMBERED_RUNS)
        self._pickup: dict[str, HistogramState] = {}
        self._start: dict[str, HistogramState] = {}
        self._transitions: dict[tuple[str, str], int] = {}
        self._finished: dict[tuple[str, str], int] = {}
        self._events_read = 0

    def first_pendings(self, events: Iterable[FlowRunEvent]) -> list[FlowRunEvent]:
        """The Pending events whose pickup delay is still to be observed."""
        return [
            e
            for e in self.cursor.unseen(events)
            if e.state_name == StateName.PENDING and e.flow_run_id not in self._picked_up
        ]

    def consume(
        self,
        events: Iterable[FlowRunEvent],
        expected_starts: Mapping[str, float | None],
        counted: Callable[[str], bool] = lambda pool: True,
        deployments: Callable[[str], bool] = lambda deployment: False,
    ) -> None:
        """Count events past the cursor; `expected_starts` dates the runs' Pending events.

        Only events of pools for which `counted(pool)` holds are counted; the cursor moves past
        all of them, so events of other pools are not read again. Runs of deployments for which
        `deployments(flow/deployment)` holds are counted as they finish, whatever their pool
        (the deployment was selected by name).
        """
        fresh = self.cursor.unseen(events)
        for event in fresh:
            outcome = FINISHED_STATE_LABELS.get(event.state_type)
            if outcome and event.deployment is not None and deployments(event.deployment):
                finished = (event.deployment, outcome)
                self._finished[finished] = self._finished.get(finished, 0) + 1
            if not counted(event.work_pool):
                continue
            self._events_read += 1
            key = (event.work_pool, event.state_name)
            self._transitions[key] = self._transitions.get(key, 0) + 1
            run = event.flow_run_id
            if event.state_name == StateName.PENDING and run not in self._picked_up:
                self._picked_up.add(run)
                self._pending_at[run] = (event.work_pool, event.occurred)
                if len(self._pending_at) > _REMEMBERED_RUNS:
                    self._pending_at.popitem(last=False)
                expected = expected_starts.get(run)
                if expected is not None:
                    delay = max(0.0, event.occurred - expected)
                    self._observe(self._pickup, event.work_pool, delay)
            elif event.state_type == StateType.RUNNING and run not in self._started:
                pending = self._pending_at.pop(run, None)
                if pending is not None:
                    self._started.add(run)
                    self._observe(self._start, pending[0], max(0.0, event.occurred - pending[1]))
        # Deployments no longer exported (deselected, or pushed out by the cap when the list
        # was re-read) lose their counters: memory stays bounded by the exported set.
        self._finished = {k: v for k, v in self._finished.items() if deployments(k[0])}
        self.cursor = self.cursor.advance(fresh)

    @staticmethod
    def _observe(target: dict[str, HistogramState], pool: str, value: float) -> None:
        target[pool] = target.get(pool, HistogramState()).observe(value)

    @property
    def events_read(self) -> int:
        return self._events_read

    def stats(self, now: float, behind: bool) -> LatencyStats:
        return LatencyStats(
            pickup=dict(self._pickup),
            start=dict(self._start),
            transitions=dict(self._transitions),
            finished=dict(self._finished),
            lag_seconds=max(0.0, now - self.cursor.occurred),
            behind=behind,
            events_read=self._events_read,
        )
