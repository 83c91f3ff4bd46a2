"""Sidecar mode: follows worker log files like `tail -F` and counts the worker's API responses.

A worker's own 429s and retries never reach the Prefect API, only its log. The Prefect client
logs every retry at DEBUG on `prefect.client`; httpx logs every response at INFO on `httpx`.
Both formats Prefect ships are understood: the console format
(`12:03:48.862 | DEBUG   | prefect.client - Received response ...`) and the JSON formatter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prometheus_client import CollectorRegistry, Counter
from structlog.typing import FilteringBoundLogger

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024  # longer lines are skipped (counted), so memory stays flat
MAX_BYTES_PER_TICK = 8 * 1024 * 1024  # a huge backlog is read over several ticks

_CONSOLE = re.compile(
    r"^(?P<time>[^|]{6,40}?)\s*\|\s*(?P<level>[A-Z]+)\s*\|\s*(?P<logger>\S+) - "
    r"(?P<msg>.*)$"
)
_RETRY = re.compile(
    r"Received response with retryable status code (?P<code>\d{3}|unknown)\. "
    r"Another attempt will be made in"
)
_RETRY_EXCEPTION = re.compile(r"Encountered retryable exception during request\. Another attempt")
_HTTPX = re.compile(r"HTTP Request: [A-Z]+ \S+ \"HTTP/[\d.]+ (?P<code>\d{3})")
# httpx's HTTPStatusError text, raised once the client gives up (also inside tracebacks).
_FAILURE = re.compile(r"(?:Client|Server) error '(?P<code>\d{3}) ")

SKIP_REASONS = ("unrecognised", "too_long", "encoding")


@dataclass(frozen=True)
class Observation:
    """What one log line says about the worker's API traffic."""

    kind: str  # "response", "retry", "failure" or "other"
    code: str = ""


def parse_line(line: str) -> Observation | None:
    """Classify one line; None when it is in neither of Prefect's log formats."""
    failure = _FAILURE.search(line)
    message: str | None = None
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if not isinstance(record, dict) or "msg" not in record:
            return None
        message = str(record["msg"])
        args = record.get("args")
        if args and isinstance(args, list) and "%" in message:
            with contextlib.suppress(TypeError, ValueError):
                message = message % tuple(args)
        exc_text = record.get("exc_text")
        if failure is None and isinstance(exc_text, str):
            failure = _FAILURE.search(exc_text)
    else:
        match = _CONSOLE.match(line)
        if match:
            message = match.group("msg")
    if failure is not None:
        return Observation("failure", failure.group("code"))
    if message is None:
        return None
    if retry := _RETRY.search(message):
        return Observation("retry", retry.group("code"))
    if _RETRY_EXCEPTION.search(message):
        return Observation("retry", "exception")
    if response := _HTTPX.search(message):
        return Observation("response", response.group("code"))
    return Observation("other")


@dataclass
class Position:
    """Where reading stands in one file: its inode and the offset after the last whole line."""

    inode: int
    offset: int


class LogFollower:
    """Follows one path across rename rotation, copytruncate and a file that appears later.

    The old file is read to its end before switching to the new one, so a rename loses no line.
    A truncation (copytruncate) restarts at the beginning of the file.
    """

    def __init__(
        self, path: Path, position: Position | None = None, start_at_end: bool = True
    ) -> None:
        self.path = path
        # Like `tail -F`: history already in the file at start-up is not counted (unless a saved
        # position says where we stopped); files that appear or rotate in are read from the top.
        self._start_at_end = start_at_end
        self._file: IO[bytes] | None = None
        self._inode: int | None = None
        self._offset = 0
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, until its newline
        self._resume = position
        self.too_long = 0
        # The start position is fixed now, not at the first read, so lines written in between
        # are not taken for history; a file that appears later is new, read from the top.
        self._open()
        self._start_at_end = False

    @property
    def position(self) -> Position | None:
        if self._inode is None:
            return None
        return Position(self._inode, self._offset)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> bool:
        try:
            handle = self.path.open("rb")
        except OSError:
            return False
        status = os.fstat(handle.fileno())
        offset = status.st_size if self._start_at_end else 0
        if self._resume is not None:
            same_file = self._resume.inode == status.st_ino
            # A file truncated while we were away starts over; another file is read whole.
            offset = (
                self._resume.offset if same_file and self._resume.offset <= status.st_size else 0
            )
        self._resume = None
        self._start_at_end = False
        inode = status.st_ino
        handle.seek(offset)
        self._file, self._inode, self._offset = handle, inode, offset
        self._buffer.clear()
        self._discarding = False
        return True

    def read_lines(self, max_bytes: int = MAX_BYTES_PER_TICK) -> Iterator[bytes]:
        """Whole new lines (without newline), at most about `max_bytes` of them per call."""
        if self._file is None and not self._open():
            return
        assert self._file is not None
        budget = max_bytes
        while budget > 0:
            chunk = self._file.read(min(CHUNK, budget))
            if not chunk:
                break
            budget -= len(chunk)
            yield from self._split(chunk)
        if budget > 0:
            yield from self._check_rotation()

    def _split(self, chunk: bytes) -> Iterator[bytes]:
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            if newline < 0:
                rest = chunk[start:]
                if self._discarding:
                    pass
                elif len(self._buffer) + len(rest) > MAX_LINE:
                    self._buffer.clear()
                    self._discarding = True
                    self.too_long += 1
                else:
                    self._buffer += rest
                self._offset += len(chunk) - start
                return
            piece = chunk[start:newline]
            self._offset += newline + 1 - start
            start = newline + 1
            if self._discarding:
                self._discarding = False
                continue
            if len(self._buffer) + len(piece) > MAX_LINE:
                self._buffer.clear()
                self.too_long += 1
                continue
            line = bytes(self._buffer + piece) if self._buffer else piece
            self._buffer.clear()
            yield line

    def _committed_offset(self) -> int:
        return self._offset - len(self._buffer)

    def _check_rotation(self) -> Iterator[bytes]:
        try:
            current = os.stat(self.path)
        except OSError:
            return  # renamed away and not recreated yet: keep the old handle, look again later
        if current.st_ino != self._inode:
            # Rotated by rename: the old file was read to its end above; a last line without
            # newline is complete by now.
            if self._buffer and not self._discarding:
                yield bytes(self._buffer)
            self.close()
            self._inode = None
            if self._open():
                yield from self.read_lines()
        elif current.st_size < self._offset:
            # Truncated in place (copytruncate): start over from the beginning.
            assert self._file is not None
            self._file.seek(0)
            self._offset = 0
            self._buffer.clear()
            self._discarding = False

    def save_position(self) -> Position | None:
        """The position to persist: after the last whole line handed out."""
        if self._inode is None:
            return None
        return Position(self._inode, self._committed_offset())


class WorkerLogMetrics:
    """Counters for what the worker logs say; in the exporter's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.responses = Counter(
            "prefect_worker_api_responses",
            "Prefect API responses the worker received, by status code, read from its httpx "
            "'HTTP Request' log lines.",
            ["worker", "code"],
            registry=registry,
        )
        self.retries = Counter(
            "prefect_worker_api_retries",
            "Retries the worker's Prefect client announced, by the status code that caused them "
            "('exception' for network errors), read from its prefect.client DEBUG lines.",
            ["worker", "code"],
            registry=registry,
        )
        self.failures = Counter(
            "prefect_worker_api_failures",
            "Requests the worker's Prefect client gave up on, by status code, read from the "
            "error it logged.",
            ["worker", "code"],
            registry=registry,
        )
        self.lines = Counter(
            "prefect_exporter_log_lines_read",
            "Worker log lines read.",
            ["worker"],
            registry=registry,
        )
        self.skipped = Counter(
            "prefect_exporter_log_lines_skipped",
            "Worker log lines not understood, by reason: unrecognised (neither of Prefect's "
            "formats, e.g. traceback lines), too_long, encoding.",
            ["worker", "reason"],
            registry=registry,
        )

    def prepare(self, worker: str) -> None:
        """Create the series that must exist from the start (rates need a zero)."""
        self.lines.labels(worker)
        for reason in SKIP_REASONS:
            self.skipped.labels(worker, reason)
        for code in ("429",):
            self.responses.labels(worker, code)
            self.retries.labels(worker, code)
            self.failures.labels(worker, code)

    def count(self, worker: str, raw: bytes) -> None:
        self.lines.labels(worker).inc()
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            self.skipped.labels(worker, "encoding").inc()
            return
        observation = parse_line(line)
        if observation is None:
            self.skipped.labels(worker, "unrecognised").inc()
        elif observation.kind == "response":
            self.responses.labels(worker, observation.code).inc()
        elif observation.kind == "retry":
            self.retries.labels(worker, observation.code).inc()
        elif observation.kind == "failure":
            self.failures.labels(worker, observation.code).inc()


@dataclass(frozen=True)
class WorkerLog:
    worker: str
    path: Path


class PositionStore:
    """Keeps each file's position in a small JSON file so a restart neither re-reads nor skips."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> dict[str, Position]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            return {k: Position(int(v["inode"]), int(v["offset"])) for k, v in data.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}

    def save(self, positions: dict[str, Position]) -> None:
        if self.path is None:
            return
        data = {k: {"inode": p.inode, "offset": p.offset} for k, p in positions.items()}
        temporary = self.path.with_suffix(self.path.suffix + ".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(self.path)


class WorkerLogTailer:
    """Reads every configured log on a short interval, counting as it goes."""

    def __init__(
        self,
        logs: Sequence[WorkerLog],
        metrics: WorkerLogMetrics,
        positions: PositionStore,
        log: FilteringBoundLogger,
        interval: float = 1.0,
    ) -> None:
        saved = positions.load()
        self._logs = list(logs)
        self._followers = {
            str(w.path): LogFollower(w.path, saved.get(str(w.path)), start_at_end=not saved)
            for w in self._logs
        }
        self._metrics = metrics
        self._positions = positions
        self._log = log
        self._interval = interval
        self._reported_too_long = dict.fromkeys(self._followers, 0)
        for worker_log in self._logs:
            metrics.prepare(worker_log.worker)

    def tick(self) -> int:
        """Read what is new in every file; returns the number of lines read."""
        total = 0
        for worker_log in self._logs:
            key = str(worker_log.path)
            follower = self._followers[key]
            for raw in follower.read_lines():
                self._metrics.count(worker_log.worker, raw)
                total += 1
            new_too_long = follower.too_long - self._reported_too_long[key]
            if new_too_long:
                self._metrics.skipped.labels(worker_log.worker, "too_long").inc(new_too_long)
                self._reported_too_long[key] = follower.too_long
        positions = {key: pos for key, f in self._followers.items() if (pos := f.save_position())}
        self._positions.save(positions)
        return total

    async def run(self, stop: asyncio.Event) -> None:
        for worker_log in self._logs:
            self._log.info(
                "following_worker_log", worker=worker_log.worker, path=str(worker_log.path)
            )
        while not stop.is_set():
            try:
                # File reads block; keep them off the event loop the poller shares.
                await asyncio.to_thread(self.tick)
            except Exception:  # a bug must not stop the poller: log it and keep following
                self._log.exception("worker_log_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)
        self.close()

    def close(self) -> None:
        for follower in self._followers.values():
            follower.close()
