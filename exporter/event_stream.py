"""Follows Prefect's event stream (the `events/out` WebSocket) for flow-run state changes.

The stream delivers every state change within moments and costs no request budget, where paging
`/events/filter` costs one request per 50 events (10,000 pages of them in a burst of 5,000 runs).
It speaks the protocol prefect-client's `PrefectEventSubscriber` speaks: the `prefect`
subprotocol, an `auth` message (the API key or auth string, or null), then a `filter` whose
`occurred.since` asks the server to replay what happened since then (at most 15 minutes back,
`PREFECT_SERVER_EVENTS_MAXIMUM_WEBSOCKET_BACKFILL`), then one `event` message per event.

Events wait in a bounded buffer until the poller takes them. `covered_from` says since when the
buffer holds every event: the moment the subscription was made. Replayed events are not relied
on, because the server replays from its database, which it writes in batches (seconds late):
events of the last moments before a reconnect were measured missing from the replay. So the
events reader uses the stream only once its cursor has reached `covered_from`, and pages
`/events/filter` (with its settle time) until then: after a start with a saved cursor, and
over the gap of a dropped socket. Events seen by both are counted once (the cursor).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from structlog.typing import FilteringBoundLogger
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import InvalidHandshake, WebSocketException
from websockets.typing import Subprotocol

from exporter.errors import MalformedResponse
from exporter.prefect_parse import FLOW_RUN_EVENT_PREFIX, parse_event
from exporter.records import FlowRunEvent
from exporter.secret import Secret

# Ask for a short replay so an event racing the subscription is not missed (duplicates are
# removed by the cursor); nothing older is relied on.
BACKFILL_OVERLAP_SECONDS = 5.0
# A stream that is more than this many events ahead of the poller drops its oldest ones (and
# says so through `covered_from`): memory stays flat however busy the workspace.
BUFFER_LIMIT = 100_000
# Waits between attempts to (re)connect, doubling up to the last one.
RECONNECT_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# A frame larger than this is not a flow-run event; the connection is dropped and retried.
MAX_MESSAGE_BYTES = 1024 * 1024
OPEN_TIMEOUT_SECONDS = 10.0


class StreamMetrics:
    """The stream's own series: connected or not, events received, connection attempts."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.connected = Gauge(
            "prefect_exporter_event_stream_connected",
            "1 while the exporter follows Prefect's event stream (events/out); 0 while it "
            "pages /events/filter instead (stream refused, dropped or disabled).",
            registry=registry,
        )
        self.events = Counter(
            "prefect_exporter_event_stream_events",
            "Flow-run state events received from Prefect's event stream.",
            registry=registry,
        )
        self.connects = Counter(
            "prefect_exporter_event_stream_connects",
            "Attempts to open Prefect's event stream, by result.",
            ["result"],
            registry=registry,
        )
        for result in ("success", "failure"):
            self.connects.labels(result)


class Socket(Protocol):
    """The part of a websockets connection the stream uses."""

    async def send(self, message: str) -> None: ...
    async def recv(self) -> str | bytes: ...


def socket_url(api_url: str) -> str:
    """`ws(s)://.../api/events/out` from the API URL."""
    if api_url.startswith("https://"):
        return "wss://" + api_url.removeprefix("https://") + "/events/out"
    return "ws://" + api_url.removeprefix("http://") + "/events/out"


async def _until_stopped(waiting: Awaitable[None], stop: asyncio.Event) -> bool:
    """Await `waiting` unless `stop` is set first; True when it completed."""
    waited = asyncio.ensure_future(waiting)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waited, stopping):
            task.cancel()
    return waited.done() and not waited.cancelled() and waited.exception() is None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


class EventStream:
    """Keeps a buffer of flow-run state events from the stream; `run()` until stopped.

    `clock` is wall-clock Unix time (the stream's times are the API's).
    """

    def __init__(
        self,
        api_url: str,
        api_key: Secret | None,
        auth_string: Secret | None,
        metrics: StreamMetrics,
        log: FilteringBoundLogger,
        user_agent: str,
        clock: Callable[[], float] = time.time,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self._url = socket_url(api_url)
        # As prefect-client's subscriber: the auth string (self-hosted) or the API key (Cloud).
        credential = auth_string or api_key
        self._token = credential.reveal() if credential is not None else None
        headers = {"User-Agent": user_agent}
        if auth_string is not None:
            encoded = base64.b64encode(auth_string.reveal().encode()).decode()
            headers["Authorization"] = f"Basic {encoded}"
        elif api_key is not None:
            headers["Authorization"] = f"Bearer {api_key.reveal()}"
        self._headers = headers
        self._metrics = metrics
        self._log = log
        self._clock = clock
        self._buffer: deque[FlowRunEvent] = deque()
        self._buffer_limit = buffer_limit
        self.covered_from: float | None = None  # Unix time; None while not connected

    def covers(self, since: float) -> bool:
        """True when the buffer holds every event that occurred after `since` (Unix time)."""
        return self.covered_from is not None and self.covered_from <= since

    def peek(self, until: float) -> list[FlowRunEvent]:
        """The buffered events that occurred up to `until` (Unix time), oldest first."""
        return sorted((e for e in self._buffer if e.occurred <= until), key=lambda e: e.occurred)

    def discard(self, until: float) -> None:
        """Forget the buffered events that occurred up to `until`: they have been counted."""
        self._buffer = deque(e for e in self._buffer if e.occurred > until)

    async def run(
        self, stop: asyncio.Event, ready: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Follow the stream until `stop` is set, reconnecting with growing pauses.

        `ready()` is awaited before every attempt to connect: it waits out a throttling back-off
        and takes one request from the budget, since opening the stream is a request too.
        """
        failures = 0
        while not stop.is_set():
            if ready is not None and not await _until_stopped(ready(), stop):
                break
            try:
                async with websocket_connect(
                    self._url,
                    subprotocols=[Subprotocol("prefect")],
                    additional_headers=self._headers,
                    max_size=MAX_MESSAGE_BYTES,
                    open_timeout=OPEN_TIMEOUT_SECONDS,
                ) as socket:
                    await self._follow(socket, stop)
                    failures = 0
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, WebSocketException, MalformedResponse) as exc:
                self._disconnected(exc, failures)
                failures += 1
            delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay if failures else 0.1)
        self._set_connected(False)

    async def _follow(self, socket: Socket, stop: asyncio.Event) -> None:
        await socket.send(json.dumps({"type": "auth", "token": self._token}))
        answer = self._decode(await socket.recv())
        if answer.get("type") != "auth_success":
            raise MalformedResponse(f"events/out: authentication refused ({answer.get('reason')})")
        now = self._clock()
        start = now - BACKFILL_OVERLAP_SECONDS
        await socket.send(
            json.dumps(
                {
                    "type": "filter",
                    "filter": {
                        "occurred": {"since": _iso(start), "until": _iso(now + 365 * 86400)},
                        "event": {
                            "prefix": [FLOW_RUN_EVENT_PREFIX],
                            "exclude_name": ["prefect.flow-run.heartbeat"],
                        },
                        "order": "ASC",
                    },
                }
            )
        )
        self._metrics.connects.labels("success").inc()
        self.covered_from = now
        self._set_connected(True)
        receiving = asyncio.ensure_future(socket.recv())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while True:
                await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if stopping.done():
                    return
                self._receive(receiving.result())
                receiving = asyncio.ensure_future(socket.recv())
        finally:
            for task in (receiving, stopping):
                task.cancel()
            self.covered_from = None
            self._set_connected(False)

    def _receive(self, message: str | bytes) -> None:
        decoded = self._decode(message)
        if decoded.get("type") != "event" or not isinstance(decoded.get("event"), dict):
            return
        event = parse_event(decoded["event"])
        if event is None:
            return
        self._metrics.events.inc()
        self._buffer.append(event)
        if len(self._buffer) > self._buffer_limit:
            dropped = self._buffer.popleft()
            # The buffer no longer holds everything since it was connected.
            self.covered_from = max(self.covered_from or 0.0, dropped.occurred)

    @staticmethod
    def _decode(message: str | bytes) -> dict[str, Any]:
        try:
            decoded = json.loads(message)
        except (ValueError, RecursionError):
            raise MalformedResponse("events/out: a message that is not JSON") from None
        if not isinstance(decoded, dict):
            raise MalformedResponse("events/out: a message that is not an object")
        return decoded

    def _disconnected(self, error: Exception, failures: int) -> None:
        self._metrics.connects.labels("failure").inc()
        refused = isinstance(error, InvalidHandshake)
        # One line when the stream is lost, then quiet retries (the gauge says it is down).
        log = self._log.warning if failures == 0 else self._log.debug
        log(
            "event_stream_unavailable",
            error=f"{type(error).__name__}: {error}",
            refused=refused,
            fallback="paging /events/filter",
        )

    def _set_connected(self, connected: bool) -> None:
        self._metrics.connected.set(1 if connected else 0)
