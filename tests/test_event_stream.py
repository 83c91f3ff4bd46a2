"""Tests for the event stream client against an in-process WebSocket server, and its reader."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from websockets.asyncio.server import ServerConnection, serve

from exporter.clock import Deadline, UnixTime
from exporter.event_stream import EventStream, StreamMetrics, socket_url
from exporter.events_reader import EventsReader
from exporter.records import FlowRunEvent, StateName
from exporter.secret import Secret

NOW = 1_800_000_000.0


def wire_event(eid: str, at: float, name: str = "Pending") -> dict[str, Any]:
    from datetime import UTC, datetime

    occurred = datetime.fromtimestamp(at, UTC).isoformat()
    return {
        "id": eid,
        "occurred": occurred,
        "event": f"prefect.flow-run.{name}",
        "resource": {
            "prefect.resource.id": f"prefect.flow-run.run-{eid}",
            "prefect.state-type": StateName(name).state_type.value,
            "prefect.state-name": name,
        },
        "related": [{"prefect.resource.role": "work-pool", "prefect.resource.name": "p"}],
    }


async def with_server(
    handler: Callable[[ServerConnection], Awaitable[None]],
    scenario: Callable[[str], Awaitable[None]],
) -> None:
    async with serve(handler, "127.0.0.1", 0, subprotocols=["prefect"]) as server:  # type: ignore[list-item]
        port = next(iter(server.sockets)).getsockname()[1]
        await scenario(f"http://127.0.0.1:{port}/api")


def stream_for(url: str, registry: CollectorRegistry, **kwargs: Any) -> EventStream:
    return EventStream(
        url,
        kwargs.pop("api_key", None),
        kwargs.pop("auth_string", None),
        StreamMetrics(registry),
        structlog.get_logger(),
        "test",
        clock=lambda: NOW,
        **kwargs,
    )


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.01)


class TestSocketUrl:
    """The stream lives at /events/out, over ws or wss like the API."""

    def test_http_and_https(self) -> None:
        """http becomes ws, https wss."""
        assert socket_url("http://h:4200/api") == "ws://h:4200/api/events/out"
        assert socket_url("https://api.prefect.cloud/api/accounts/a/workspaces/w") == (
            "wss://api.prefect.cloud/api/accounts/a/workspaces/w/events/out"
        )


class TestEventStream:
    """Authenticates, subscribes from now, buffers flow-run events, and says what it covers."""

    def test_auth_filter_and_events(self) -> None:
        """The key is sent as the token; the filter starts just before now; events are kept."""
        seen: list[dict[str, Any]] = []

        async def handler(socket: ServerConnection) -> None:
            seen.append(json.loads(await socket.recv()))
            await socket.send(json.dumps({"type": "auth_success"}))
            seen.append(json.loads(await socket.recv()))
            await socket.send(json.dumps({"type": "event", "event": wire_event("a", NOW - 1)}))
            await socket.send(json.dumps({"type": "event", "event": wire_event("b", NOW + 1)}))
            await socket.wait_closed()

        registry = CollectorRegistry()

        async def scenario(url: str) -> None:
            stream = stream_for(url, registry, api_key=Secret("pnu_k"))
            stop = asyncio.Event()
            task = asyncio.create_task(stream.run(stop))
            await until(lambda: len(stream.peek(NOW + 10)) == 2)
            assert stream.covers(NOW)
            assert not stream.covers(NOW - 1)
            assert [e.id for e in stream.peek(NOW)] == ["a"]
            stream.discard(NOW)
            assert [e.id for e in stream.peek(NOW + 10)] == ["b"]
            stop.set()
            await task

        asyncio.run(with_server(handler, scenario))
        assert seen[0] == {"type": "auth", "token": "pnu_k"}
        assert seen[1]["type"] == "filter"
        assert seen[1]["filter"]["event"]["prefix"] == ["prefect.flow-run."]
        assert registry.get_sample_value("prefect_exporter_event_stream_events_total") == 2
        assert registry.get_sample_value("prefect_exporter_event_stream_connected") == 0

    def test_a_refused_authentication_is_a_failed_connect_and_is_retried(self) -> None:
        """auth_failure is not data: counted as a failure, nothing buffered, nothing covered."""
        attempts: list[int] = []

        async def handler(socket: ServerConnection) -> None:
            attempts.append(1)
            await socket.recv()
            await socket.send(json.dumps({"type": "auth_failure", "reason": "bad token"}))

        registry = CollectorRegistry()

        async def scenario(url: str) -> None:
            stream = stream_for(url, registry)
            stop = asyncio.Event()
            task = asyncio.create_task(stream.run(stop))
            await until(lambda: len(attempts) >= 1)
            await until(
                lambda: (
                    (
                        registry.get_sample_value(
                            "prefect_exporter_event_stream_connects_total", {"result": "failure"}
                        )
                        or 0
                    )
                    >= 1
                )
            )
            assert not stream.covers(NOW)
            stop.set()
            await task

        asyncio.run(with_server(handler, scenario))

    def test_no_connection_before_the_gate_opens(self) -> None:
        """While the poller backs off (or the budget is spent) the stream does not connect."""
        connections: list[int] = []

        async def handler(socket: ServerConnection) -> None:
            connections.append(1)
            await socket.recv()
            await socket.send(json.dumps({"type": "auth_success"}))
            await socket.wait_closed()

        async def scenario(url: str) -> None:
            stream = stream_for(url, CollectorRegistry())
            gate = asyncio.Event()
            stop = asyncio.Event()

            async def ready() -> None:
                await gate.wait()

            task = asyncio.create_task(stream.run(stop, ready))
            await asyncio.sleep(0.3)
            assert connections == []
            gate.set()
            await until(lambda: connections == [1])
            stop.set()
            await task

        asyncio.run(with_server(handler, scenario))

    def test_a_full_buffer_drops_its_oldest_and_no_longer_covers_them(self) -> None:
        """Memory stays bounded; the reader then pages the part the stream lost."""

        async def handler(socket: ServerConnection) -> None:
            await socket.recv()
            await socket.send(json.dumps({"type": "auth_success"}))
            await socket.recv()
            for i in range(5):
                await socket.send(
                    json.dumps({"type": "event", "event": wire_event(f"e{i}", NOW + i)})
                )
            await socket.wait_closed()

        async def scenario(url: str) -> None:
            stream = stream_for(url, CollectorRegistry(), buffer_limit=3)
            stop = asyncio.Event()
            task = asyncio.create_task(stream.run(stop))
            await until(lambda: [e.id for e in stream.peek(NOW + 10)] == ["e2", "e3", "e4"])
            assert not stream.covers(NOW + 0.5)
            assert stream.covers(NOW + 1)
            stop.set()
            await task

        asyncio.run(with_server(handler, scenario))


class FakeStream:
    def __init__(self, covered_from: float | None, events: list[FlowRunEvent]) -> None:
        self.covered_from = covered_from
        self.events = events
        self.discarded: list[float] = []

    def covers(self, since: float) -> bool:
        return self.covered_from is not None and self.covered_from <= since

    def peek(self, until: float) -> list[FlowRunEvent]:
        return [e for e in self.events if e.occurred <= until]

    def discard(self, until: float) -> None:
        self.discarded.append(until)
        self.events = [e for e in self.events if e.occurred > until]


class PagingApi:
    def __init__(self, events: list[FlowRunEvent], fail_lookup: bool = False) -> None:
        self.events = events
        self.pages: list[tuple[float, float]] = []
        self.fail_lookup = fail_lookup

    async def flow_run_events(
        self, since: UnixTime, until: UnixTime, max_pages: int, deadline: Deadline
    ) -> tuple[list[FlowRunEvent], bool]:
        self.pages.append((since, until))
        return [e for e in self.events if since <= e.occurred <= until], False

    async def expected_start_times(
        self, ids: Sequence[str], deadline: Deadline
    ) -> dict[str, float | None]:
        if self.fail_lookup:
            raise TimeoutError("lookup")
        return dict.fromkeys(ids, NOW - 100)


def pending(eid: str, at: float) -> FlowRunEvent:
    return FlowRunEvent(eid, at, f"run-{eid}", "PENDING", "Pending", "p")


class TestReaderWithStream:
    """The reader takes the stream's events while it covers the cursor, and pages otherwise."""

    def test_a_fresh_start_follows_the_stream_without_paging(self) -> None:
        """No request for events; the stream's settled events are counted once."""
        stream = FakeStream(NOW - 50, [pending("a", NOW - 20), pending("b", NOW - 1)])
        api = PagingApi([])
        reader = EventsReader(api, 10, 30.0, UnixTime(NOW - 60), stream=stream)
        stats = asyncio.run(reader.read(UnixTime(NOW), Deadline(1e12)))
        assert api.pages == []
        assert stats.transitions == {("p", "Pending"): 1}  # b is within the 5 s settle
        assert stream.discarded == [NOW - 5]

    def test_a_gap_is_paged_then_the_stream_takes_over(self) -> None:
        """A stream that (re)connected after the cursor: page up to now - settle first."""
        live, later = pending("live", NOW - 50), pending("later", NOW - 10)
        stream = FakeStream(NOW - 100, [live, later])
        api = PagingApi([pending("gap", NOW - 200), live])  # the database has them all
        reader = EventsReader(api, 10, 30.0, UnixTime(NOW - 300), stream=stream)
        reader._may_skip_to_stream = False  # a cursor saved before this start
        first = asyncio.run(reader.read(UnixTime(NOW), Deadline(1e12)))
        # Only the gap is paged: from NOW - 100 on, the stream has every event.
        assert api.pages == [(NOW - 330, NOW - 100)]
        assert first.transitions == {("p", "Pending"): 1}
        second = asyncio.run(reader.read(UnixTime(NOW + 1), Deadline(1e12)))
        assert len(api.pages) == 1  # the cursor reached the stream's start: no more paging
        assert second.transitions == {("p", "Pending"): 3}  # live and later, from the stream

    def test_a_failed_poll_leaves_the_events_in_the_stream(self) -> None:
        """Events leave the buffer only once counted."""
        stream = FakeStream(NOW - 50, [pending("a", NOW - 20)])
        reader = EventsReader(
            PagingApi([], fail_lookup=True), 10, 30.0, UnixTime(NOW - 60), stream=stream
        )
        with contextlib.suppress(TimeoutError):
            asyncio.run(reader.read(UnixTime(NOW), Deadline(1e12)))
        assert [e.id for e in stream.events] == ["a"]
        assert stream.discarded == []

    def test_without_a_stream_an_event_stored_late_is_still_counted(self) -> None:
        """The cursor stays at the last event read, so one the database stored late is not lost."""
        api = PagingApi([pending("first", NOW - 100)])
        reader = EventsReader(api, 10, 30.0, UnixTime(NOW - 200))
        asyncio.run(reader.read(UnixTime(NOW), Deadline(1e12)))
        # Occurred before the last read's end (NOW - 30), stored only after that read.
        api.events.append(pending("late", NOW - 40))
        stats = asyncio.run(reader.read(UnixTime(NOW + 5), Deadline(1e12)))
        assert stats.transitions == {("p", "Pending"): 2}
        assert api.pages[1][0] == NOW - 100  # read again from the last event counted
