"""Sidecar mode: follows worker log files like `tail -F` and counts the worker's API responses.

A worker's own 429s and retries never reach the Prefect API, only its log. The Prefect client
logs every retry at DEBUG on `prefect.client`; httpx logs every response at INFO on `httpx`.
Prefect's console format (`12:03:48.862 | DEBUG   | prefect.client - Received response ...`) and
JSON lines (Prefect's `JsonFormatter`, or the formatter shipped in deploy/worker-logging/) are
understood. Prefect's own JSON formatter cannot serialise httpx's arguments and writes
`"args": "<non-serializable: tuple>"`, so its `HTTP Request` lines carry no status code: they
are counted as skipped with reason `no_status_code`, never guessed.

Files that cannot be read (missing, a directory, no permission) are reported by the gauge
`prefect_exporter_worker_log_readable` and by one log line when that starts and one when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from structlog.typing import FilteringBoundLogger

from exporter.statefile import StateFile, describe

CHUNK = 64 * 1024
MAX_LINE = 64 * 1024  # longer lines are skipped (counted), so memory stays flat
MAX_BYTES_PER_TICK = 8 * 1024 * 1024  # a huge backlog is read over several ticks
# The first bytes of a file, remembered to notice a copytruncate even when the file has grown
# back past our offset before the next read: new content starts with other bytes (timestamps).
HEAD_BYTES = 4096

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
_HTTPX_ANY = "HTTP Request: "  # httpx's line, with or without its arguments filled in
# httpx's HTTPStatusError text, raised once the client gives up (also inside tracebacks).
_FAILURE = re.compile(r"(?:Client|Server) error '(?P<code>\d{3}) ")

# Closed set: every reason is exported for every worker from the start.
SKIP_REASONS = ("unrecognised", "too_long", "encoding", "no_status_code")
MISSING = "missing"  # LogFollower.problem while the file does not exist


@dataclass(frozen=True)
class Observation:
    """What one log line says about the worker's API traffic.

    `kind` is "response", "retry" or "failure" (with the status `code`), "other" (understood,
    nothing to count) or "skipped" (with a `reason` from SKIP_REASONS).
    """

    kind: str
    code: str = ""
    reason: str = ""


def _json_message(record: Mapping[str, Any]) -> str:
    """The text of a JSON log record, with its %-arguments filled in when the line has them."""
    formatted = record.get("message")
    if isinstance(formatted, str):
        # Set by a formatter that filled in the arguments (deploy/worker-logging/).
        return formatted
    message = str(record["msg"])
    args = record.get("args")
    if "%" in message and isinstance(args, list | dict) and args:
        # Prefect's JsonFormatter writes a placeholder string when the args do not serialise.
        with contextlib.suppress(TypeError, ValueError, KeyError):
            message = message % (tuple(args) if isinstance(args, list) else args)
    return message


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
        message = _json_message(record)
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
    if _HTTPX_ANY in message:
        return Observation("skipped", reason="no_status_code")
    return Observation("other")


@dataclass(frozen=True)
class Position:
    """Where reading stands in one file: its inode, the offset after the last whole line, and
    the SHA-256 of the file's first `head_length` bytes (to recognise the same content)."""

    inode: int
    offset: int
    head_sha256: str = ""
    head_length: int = 0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LogFollower:
    """Follows one path across rename rotation, copytruncate and a file that appears later.

    The old file is read to its end before switching to the new one, so a rename loses no line.
    A copytruncate is noticed before each read, by the file being shorter than our offset or its
    first bytes (up to HEAD_BYTES) having changed, and reading restarts at the top: no line is
    lost even when the file grew back past the old offset in between. (A new file whose first
    bytes equal the old one's cannot be told from a grown one; with timestamped lines that never
    happens.)

    `problem` says why the file is not being read: None while it is open, MISSING, or the
    error ("Permission denied", "is a directory").
    """

    def __init__(
        self, path: Path, position: Position | None = None, start_at_end: bool = True
    ) -> None:
        self.path = path
        # Like `tail -F`: history already in the file at start-up is not counted (unless a saved
        # position says where we stopped); files that appear or rotate in are read from the top.
        self._start_at_end = start_at_end
        self._fd: int | None = None
        self._inode: int | None = None
        self._offset = 0
        self._head = b""
        self._buffer = bytearray()
        self._discarding = False  # inside an over-long line, until its newline
        self._resume = position
        self.too_long = 0
        self.problem: str | None = None
        # The start position is fixed now, not at the first read, so lines written in between
        # are not taken for history; a file that appears later is new, read from the top.
        self._open()
        self._start_at_end = False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> bool:
        try:
            # O_NONBLOCK: opening a FIFO someone pointed us at must not hang the tailer.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        except FileNotFoundError:
            self.problem = MISSING
            return False
        except OSError as exc:
            self.problem = describe(exc)
            return False
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                directory = stat.S_ISDIR(status.st_mode)
                self.problem = "is a directory" if directory else "is not a regular file"
                os.close(fd)
                return False
            offset = self._start_offset(fd, status)
            head = os.pread(fd, min(offset, HEAD_BYTES), 0)
        except OSError as exc:
            self.problem = describe(exc)
            os.close(fd)
            return False
        self._resume = None
        self._start_at_end = False
        self._fd, self._inode, self._offset, self._head = fd, status.st_ino, offset, head
        self._buffer.clear()
        self._discarding = False
        self.problem = None
        return True

    def _start_offset(self, fd: int, status: os.stat_result) -> int:
        saved = self._resume
        if saved is None:
            return status.st_size if self._start_at_end else 0
        # The saved place holds only in the same file, not truncated and refilled while we were
        # away; any other file is read whole.
        if saved.inode != status.st_ino or saved.offset > status.st_size:
            return 0
        if saved.head_length and _sha256(os.pread(fd, saved.head_length, 0)) != saved.head_sha256:
            return 0
        return saved.offset

    def read_lines(self, max_bytes: int = MAX_BYTES_PER_TICK) -> Iterator[bytes]:
        """Whole new lines (without newline), at most about `max_bytes` of them per call.

        Never raises for the file's sake: a read error closes the file, sets `problem`, and the
        next call reopens it where reading stopped.
        """
        if self._fd is None and not self._open():
            return
        budget = max_bytes
        try:
            if self._rewritten():
                self._restart()
            while budget > 0:
                at = self._offset
                assert self._fd is not None
                chunk = os.pread(self._fd, min(CHUNK, budget), at)
                if not chunk:
                    break
                budget -= len(chunk)
                if len(self._head) == at < HEAD_BYTES:
                    self._head += chunk[: HEAD_BYTES - at]
                yield from self._split(chunk)
        except OSError as exc:
            self._lost(exc)
            return
        if budget > 0:
            yield from self._check_rotation()

    def _rewritten(self) -> bool:
        """Truncated in place (copytruncate) since the last read, even if grown back since."""
        assert self._fd is not None
        if os.fstat(self._fd).st_size < self._offset:
            return True
        return bool(self._head) and os.pread(self._fd, len(self._head), 0) != self._head

    def _restart(self) -> None:
        self._offset = 0
        self._head = b""
        self._buffer.clear()
        self._discarding = False

    def _lost(self, error: OSError) -> None:
        """The open file failed to read: close it and resume from the last whole line later."""
        self._resume = self.save_position()
        self.close()
        self._inode = None
        self.problem = describe(error)

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

    def save_position(self) -> Position | None:
        """The position to persist: after the last whole line handed out."""
        if self._inode is None:
            return None
        return Position(self._inode, self._committed_offset(), _sha256(self._head), len(self._head))


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
            "Worker log lines not counted, by reason: unrecognised (neither of Prefect's "
            "formats, e.g. traceback lines), too_long, encoding, no_status_code (an httpx "
            "'HTTP Request' line whose status the log format dropped: Prefect's JSON formatter).",
            ["worker", "reason"],
            registry=registry,
        )
        self.readable = Gauge(
            "prefect_exporter_worker_log_readable",
            "1 while the worker's log file is open and followed; 0 while it is missing or "
            "cannot be read (a directory, no permission): see the log for the reason.",
            ["worker"],
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
        elif observation.kind == "skipped":
            self.skipped.labels(worker, observation.reason).inc()


@dataclass(frozen=True)
class WorkerLog:
    worker: str
    path: Path


def _positions_from_json(data: Any) -> dict[str, Position]:
    """`{path: {inode, offset, head_sha256?, head_length?}}`; ValueError or TypeError if not."""
    if not isinstance(data, dict):
        raise TypeError("expected an object keyed by log path")
    positions = {}
    for path, entry in data.items():
        if not isinstance(entry, dict):
            raise TypeError(f"{path}: expected an object")
        position = Position(
            int(entry["inode"]),
            int(entry["offset"]),
            str(entry.get("head_sha256", "")),
            int(entry.get("head_length", 0)),
        )
        if position.offset < 0 or not 0 <= position.head_length <= HEAD_BYTES:
            raise ValueError(f"{path}: offset or head_length out of range")
        positions[str(path)] = position
    return positions


class PositionStore:
    """Keeps each file's position in a state file so a restart neither re-reads nor skips.

    Without a file, positions live only as long as the process.
    """

    def __init__(self, file: StateFile | None) -> None:
        self.file = file

    def load(self) -> dict[str, Position]:
        """Saved positions by path; empty when there are none or they are unusable (warned)."""
        if self.file is None:
            return {}
        return self.file.load(_positions_from_json) or {}

    def save(self, positions: Mapping[str, Position]) -> bool:
        """Persist `positions`; False when the file system refused (recorded by the file)."""
        if self.file is None:
            return True
        data = {
            path: {
                "inode": p.inode,
                "offset": p.offset,
                "head_sha256": p.head_sha256,
                "head_length": p.head_length,
            }
            for path, p in positions.items()
        }
        return self.file.save(data)


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
        self._saved: dict[str, Position] = {}
        self._log = log
        self._interval = interval
        self._reported_too_long = dict.fromkeys(self._followers, 0)
        # The problem last logged per file; None is "readable", what `following_worker_log` says.
        self._reported_problem: dict[str, str | None] = dict.fromkeys(self._followers)
        self._failed_ticks = 0
        for worker_log in self._logs:
            metrics.prepare(worker_log.worker)
            metrics.readable.labels(worker_log.worker).set(0 if self._problem(worker_log) else 1)

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
            self._show_state(worker_log)
        positions = {key: pos for key, f in self._followers.items() if (pos := f.save_position())}
        # Only changes are written; a failed save is retried next tick (the file logs it once).
        if positions != self._saved and self._positions.save(positions):
            self._saved = positions
        return total

    def _show_state(self, worker_log: WorkerLog) -> None:
        """Set the readable gauge, and log once each time a file's problem starts or ends."""
        key = str(worker_log.path)
        problem = self._problem(worker_log)
        self._metrics.readable.labels(worker_log.worker).set(0 if problem else 1)
        if problem == self._reported_problem[key]:
            return
        self._reported_problem[key] = problem
        fields = {"worker": worker_log.worker, "path": key}
        if problem is None:
            self._log.info("worker_log_readable", **fields)
        elif problem == MISSING:
            self._log.info("worker_log_missing", **fields, hint="waiting for it to appear")
        else:
            self._log.warning("worker_log_unreadable", **fields, error=problem)

    def _problem(self, worker_log: WorkerLog) -> str | None:
        return self._followers[str(worker_log.path)].problem

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
                self._failed_ticks += 1
                if self._failed_ticks == 1:  # once per run of failures, not every second
                    self._log.exception("worker_log_tick_failed")
            else:
                if self._failed_ticks:
                    self._log.info("worker_log_tick_recovered", failed_ticks=self._failed_ticks)
                    self._failed_ticks = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval)
        self.close()

    def close(self) -> None:
        for follower in self._followers.values():
            follower.close()


def check_worker_log(path: str | Path) -> str | None:
    """Why `path` cannot be followed as a worker log, as a sentence; None when it can.

    For start-up. A file that does not exist yet is fine (it is waited for, like `tail -F`);
    a directory, something that is not a regular file, or a file we may not read is not.
    """
    target = Path(path)
    try:
        status = target.stat()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return f"{target} cannot exist: part of its directory path is a file"
    except OSError as exc:
        return f"{target} cannot be examined ({describe(exc)})"
    if stat.S_ISDIR(status.st_mode):
        return f"{target} is a directory; give the path of the worker's log file"
    if not stat.S_ISREG(status.st_mode):
        return f"{target} is not a regular file"
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return f"{target} cannot be read ({describe(exc)})"
    os.close(fd)
    return None
