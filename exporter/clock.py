"""The exporter's two clocks, as distinct types so that one is never passed for the other.

`UnixTime` is wall-clock seconds since the epoch (`time.time()`): the only clock that compares
with the API's timestamps, and the one exported in `*_timestamp_seconds` series. `Deadline` is a
point on the monotonic clock (`time.monotonic()`): the only clock for waits, ages and deadlines,
because a step of the wall clock must neither stretch nor cut them.
"""

from __future__ import annotations

from typing import NewType

UnixTime = NewType("UnixTime", float)
Deadline = NewType("Deadline", float)
