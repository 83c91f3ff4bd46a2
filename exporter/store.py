"""Holds the latest published snapshot and poll status behind one lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from exporter.snapshot import Snapshot

Rendered = TypeVar("Rendered")


@dataclass(frozen=True)
class PollStatus:
    """What the last polls did; read at scrape time for the exporter's own metrics."""

    up: bool = False
    last_success: float | None = None
    last_duration: float | None = None
    last_error: str | None = None
    loop_turned_at: float | None = None  # monotonic seconds, for /healthz


@dataclass(frozen=True)
class Published(Generic[Rendered]):
    snapshot: Snapshot
    rendered: Rendered


class Store(Generic[Rendered]):
    """One immutable value swapped under a lock: scrapes never see a half-written poll.

    `render` turns a snapshot into what the server sends (done once per poll, not per scrape).
    A snapshot older than `max_staleness` is no longer served: stale numbers must not pass for
    fresh ones during a long outage.
    """

    def __init__(
        self,
        render: Callable[[Snapshot], Rendered],
        max_staleness: float,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._render = render
        self._max_staleness = max_staleness
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._published: Published[Rendered] | None = None
        self._status = PollStatus()

    def publish(self, snapshot: Snapshot, duration: float) -> None:
        rendered = self._render(snapshot)
        with self._lock:
            self._published = Published(snapshot, rendered)
            self._status = PollStatus(
                up=True,
                last_success=snapshot.observed_at,
                last_duration=duration,
                loop_turned_at=self._monotonic(),
            )

    def record_failure(self, error: str, duration: float) -> None:
        with self._lock:
            self._status = replace(
                self._status,
                up=False,
                last_duration=duration,
                last_error=error,
                loop_turned_at=self._monotonic(),
            )

    def status(self) -> PollStatus:
        with self._lock:
            return self._status

    def current(self) -> Published[Rendered] | None:
        """The latest snapshot while it is fresh enough to serve, else None."""
        with self._lock:
            published = self._published
        if published is None:
            return None
        if self._clock() - published.snapshot.observed_at > self._max_staleness:
            return None
        return published
