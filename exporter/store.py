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
    last_success: float | None = None  # Unix time the last successful poll started
    last_duration: float | None = None  # seconds
    last_error: str | None = None
    loop_turned_at: float | None = None  # monotonic seconds, for /healthz
    # Monotonic seconds until which the loop waits on purpose (interval or back-off): a loop
    # that is waiting as planned is alive, however long a Retry-After made the wait.
    loop_waits_until: float | None = None


@dataclass(frozen=True)
class Published(Generic[Rendered]):
    snapshot: Snapshot
    rendered: Rendered
    published_monotonic: float = 0.0  # when it was published, for its age


class Store(Generic[Rendered]):
    """One immutable value swapped under a lock: scrapes never see a half-written poll.

    `render` turns a snapshot into what the server sends (done once per poll, not per scrape).
    A snapshot older than `max_staleness` seconds is no longer served: stale numbers must not
    pass for fresh ones during a long outage. Its age is measured on the monotonic clock, so a
    step of the wall clock can neither keep stale series alive nor drop fresh ones.
    """

    def __init__(
        self,
        render: Callable[[Snapshot], Rendered],
        max_staleness: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._render = render
        self._max_staleness = max_staleness
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._published: Published[Rendered] | None = None
        self._status = PollStatus()

    def publish(self, snapshot: Snapshot, duration: float) -> None:
        rendered = self._render(snapshot)
        with self._lock:
            self._published = Published(snapshot, rendered, self._monotonic())
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

    def loop_waiting(self, until_monotonic: float) -> None:
        """The poll loop sleeps on purpose until `until_monotonic` (monotonic seconds)."""
        with self._lock:
            self._status = replace(self._status, loop_waits_until=until_monotonic)

    def status(self) -> PollStatus:
        with self._lock:
            return self._status

    def current(self) -> Published[Rendered] | None:
        """The latest snapshot while it is fresh enough to serve, else None."""
        with self._lock:
            published = self._published
        if published is None:
            return None
        if self._monotonic() - published.published_monotonic > self._max_staleness:
            return None
        return published
