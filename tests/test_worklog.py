"""Tests for sidecar mode: parsing worker log lines and following files across rotation."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import logging.handlers
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from prometheus_client import CollectorRegistry

from demo.stack import SERVER_VENV
from exporter.statefile import StateFile
from exporter.worklog import (
    MAX_LINE,
    MISSING,
    LogFollower,
    Observation,
    PositionStore,
    WorkerLog,
    WorkerLogMetrics,
    WorkerLogTailer,
    check_worker_log,
    parse_line,
)

RETRY = (
    "12:03:48.862 | DEBUG   | prefect.client - Received response with retryable status "
    "code 429. Another attempt will be made in 1.1990918883500994s. This is attempt 1/4."
)
ROOT = Path(__file__).resolve().parent.parent
LOG = structlog.get_logger()
HTTPX = (
    "12:03:48.856 | INFO    | httpx - HTTP Request: POST http://127.0.0.1:4391/api/"
    'work_pools/p/get_scheduled_flow_runs "HTTP/1.1 429 Too Many Requests"'
)


class TestParseLine:
    """Both of Prefect's log formats are understood."""

    def test_console_retry_line(self) -> None:
        """The client's retry line gives the status code."""
        observation = parse_line(RETRY)
        assert observation is not None
        assert (observation.kind, observation.code) == ("retry", "429")

    def test_console_httpx_line(self) -> None:
        """httpx's request line gives the response code."""
        observation = parse_line(HTTPX)
        assert observation is not None
        assert (observation.kind, observation.code) == ("response", "429")

    def test_json_formatter_lines(self) -> None:
        """Prefect's JsonFormatter puts the message in `msg`, with `args` for %-style calls."""
        retry = json.dumps(
            {
                "name": "prefect.client",
                "levelname": "DEBUG",
                "msg": RETRY.split(" - ", 1)[1],
                "args": [],
            }
        )
        httpx = json.dumps(
            {
                "name": "httpx",
                "levelname": "INFO",
                "msg": 'HTTP Request: %s %s "%s %d %s"',
                "args": ["GET", "http://x/api/health", "HTTP/1.1", 503, "Service Unavailable"],
            }
        )
        assert parse_line(retry) == parse_line(RETRY)
        observation = parse_line(httpx)
        assert observation is not None
        assert (observation.kind, observation.code) == ("response", "503")

    def test_network_retries_and_final_failures(self) -> None:
        """Retryable exceptions and the final HTTPStatusError are recognised."""
        exception = (
            "12:00:00.000 | DEBUG   | prefect.client - Encountered retryable exception "
            "during request. Another attempt will be made in 2s. This is attempt 1/6."
        )
        final = (
            "prefect.exceptions.PrefectHTTPStatusError: Client error '429 Too Many "
            "Requests' for url 'http://x/api/work_pools/p/get_scheduled_flow_runs'"
        )
        retry = parse_line(exception)
        assert retry is not None
        assert (retry.kind, retry.code) == ("retry", "exception")
        failure = parse_line(final)
        assert failure is not None
        assert (failure.kind, failure.code) == ("failure", "429")

    @pytest.mark.parametrize(
        "line", ["Traceback (most recent call last):", "   at foo", "{not json", "[1, 2]", ""]
    )
    def test_other_lines_are_unrecognised(self, line: str) -> None:
        """Lines in neither format give None (counted as skipped, never fatal)."""
        assert parse_line(line) is None

    def test_ordinary_lines_are_recognised_but_not_counted(self) -> None:
        """A normal worker line is understood and is neither a response nor a retry."""
        observation = parse_line(
            "12:00:00.000 | INFO    | prefect.flow_runs.worker - "
            "Worker 'w' submitting flow run 'abc'"
        )
        assert observation is not None
        assert observation.kind == "other"

    def test_prefect_json_httpx_line_without_its_arguments_is_skipped(self) -> None:
        """Prefect's JsonFormatter drops httpx's args: not a response, a no_status_code skip."""
        line = json.dumps(
            {
                "name": "httpx",
                "msg": 'HTTP Request: %s %s "%s %d %s"',
                "args": "<non-serializable: tuple>",
                "levelname": "INFO",
            }
        )
        assert parse_line(line) == Observation("skipped", reason="no_status_code")

    def test_json_message_field_is_read_first(self) -> None:
        """The shipped formatter's `message` (arguments filled in) gives the status code."""
        line = json.dumps(
            {
                "name": "httpx",
                "msg": 'HTTP Request: %s %s "%s %d %s"',
                "args": "<non-serializable: tuple>",
                "message": HTTPX.split(" - ", 1)[1],
            }
        )
        assert parse_line(line) == Observation("response", "429")

    def test_json_mapping_arguments_are_filled_in(self) -> None:
        """A %(name)s-style call serialises its args as an object; they are applied."""
        line = json.dumps(
            {
                "name": "httpx",
                "msg": 'HTTP Request: %(m)s %(u)s "HTTP/1.1 %(c)d Too Many Requests"',
                "args": {"m": "GET", "u": "http://x/api/health", "c": 429},
            }
        )
        assert parse_line(line) == Observation("response", "429")

    def test_json_arguments_that_do_not_fit_leave_the_template(self) -> None:
        """Too few args is no crash: the template stays, which has no status code to count."""
        line = json.dumps({"msg": 'HTTP Request: %s %s "%s %d %s"', "args": ["GET"]})
        assert parse_line(line) == Observation("skipped", reason="no_status_code")

    def test_a_json_failure_inside_exception_info(self) -> None:
        """The give-up error in Prefect's `exc_info` object is found in the line."""
        line = json.dumps(
            {
                "msg": "Failed to get scheduled flow runs",
                "exc_info": {
                    "type": "PrefectHTTPStatusError",
                    "message": "Client error '429 Too Many Requests' for url 'http://x/api/y'",
                },
            }
        )
        assert parse_line(line) == Observation("failure", "429")


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def lines_of(follower: LogFollower) -> list[str]:
    return [raw.decode() for raw in follower.read_lines()]


def deny_open(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Make opening `denied` fail as for a file of mode 000 (the tests run as root)."""
    real_open = os.open

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if Path(path) == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)


@pytest.fixture
def follow() -> Iterator[Callable[[Path], LogFollower]]:
    """Makes followers and closes their files after the test."""
    made: list[LogFollower] = []

    def make(path: Path) -> LogFollower:
        made.append(LogFollower(path))
        return made[-1]

    yield make
    for follower in made:
        follower.close()


class TestLogFollower:
    """Following a file like `tail -F`."""

    def test_history_is_skipped_and_new_lines_are_read_whole(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """Existing content is skipped at start; a partial line waits for its newline."""
        path = tmp_path / "worker.log"
        path.write_text("old 1\nold 2\n")
        follower = follow(path)
        assert lines_of(follower) == []
        append(path, "new 1\nnew 2 part")
        assert lines_of(follower) == ["new 1"]
        append(path, "ial\n")
        assert lines_of(follower) == ["new 2 partial"]

    def test_a_file_that_appears_later_is_read_from_the_top(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """A missing file is waited for, then read whole."""
        path = tmp_path / "later.log"
        follower = follow(path)
        assert lines_of(follower) == []
        path.write_text("a\nb\n")
        assert lines_of(follower) == ["a", "b"]

    def test_rename_rotation_loses_no_line(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """Lines written to the old file before the rename are read, then the new file's."""
        path = tmp_path / "worker.log"
        path.write_text("")
        follower = follow(path)
        append(path, "1\n2\n")
        assert lines_of(follower) == ["1", "2"]
        append(path, "3\n")  # written, not yet read, when the file is rotated away
        os.rename(path, tmp_path / "worker.log.1")
        path.write_text("4\n")
        assert lines_of(follower) == ["3", "4"]

    def test_copytruncate_starts_over(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """A truncated file is read again from its beginning."""
        path = tmp_path / "worker.log"
        path.write_text("")
        follower = follow(path)
        append(path, "1\n2\n")
        assert lines_of(follower) == ["1", "2"]
        shutil.copy(path, tmp_path / "worker.log.1")
        with path.open("r+") as f:
            f.truncate(0)
        assert lines_of(follower) == []
        append(path, "3\n")
        assert lines_of(follower) == ["3"]

    def test_rotating_file_handler_while_writing(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """Python's RotatingFileHandler rotating many times: every line is read exactly once."""
        path = tmp_path / "worker.log"
        handler = logging.handlers.RotatingFileHandler(path, maxBytes=2_000, backupCount=50)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.getLogger("rotation-test")
        logger.propagate = False
        logger.addHandler(handler)
        follower = follow(path)
        seen: list[str] = []
        try:
            for i in range(1_000):
                logger.warning("line %05d", i)
                if i % 37 == 0:  # read now and then, as the tailer's ticks do
                    seen += lines_of(follower)
            seen += lines_of(follower)
        finally:
            logger.removeHandler(handler)
            handler.close()
        assert seen == [f"line {i:05d}" for i in range(1_000)]

    def test_over_long_lines_are_dropped_and_counted(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """A line beyond the cap is skipped whole; the next one is read."""
        path = tmp_path / "worker.log"
        path.write_text("")
        follower = follow(path)
        append(path, "x" * (MAX_LINE + 10) + "\nshort\n")
        assert lines_of(follower) == ["short"]
        assert follower.too_long == 1

    @pytest.mark.parametrize("new_lines", [5, 20, 25], ids=["shorter", "same-size", "longer"])
    def test_copytruncate_then_regrowth_before_the_next_read_loses_nothing(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower], new_lines: int
    ) -> None:
        """Truncated and refilled between two reads (even past the old offset): all new lines."""
        path = tmp_path / "worker.log"
        path.write_text("")
        follower = follow(path)
        append(path, "".join(f"12:00:{i:02d}.000 | old line {i:02d}\n" for i in range(20)))
        assert len(lines_of(follower)) == 20
        shutil.copy(path, tmp_path / "worker.log.1")
        with path.open("r+") as f:  # copytruncate, then a fast writer, before our next read
            f.truncate(0)
        new = [f"12:01:{i:02d}.000 | new line {i:02d}" for i in range(new_lines)]
        append(path, "".join(line + "\n" for line in new))
        assert lines_of(follower) == new
        append(path, "after\n")
        assert lines_of(follower) == ["after"]

    def test_a_directory_at_the_path_is_reported_then_a_file_is_read(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """No lines and a problem while it is a directory; a file in its place is read whole."""
        path = tmp_path / "worker.log"
        path.mkdir()
        follower = follow(path)
        assert lines_of(follower) == []
        assert follower.problem == "is a directory"
        path.rmdir()
        path.write_text("a\n")
        assert lines_of(follower) == ["a"]
        assert follower.problem is None

    def test_a_fifo_is_refused_without_blocking(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """Opening a named pipe would wait for a writer; it is refused as not a regular file."""
        path = tmp_path / "worker.log"
        os.mkfifo(path)
        follower = follow(path)
        assert lines_of(follower) == []
        assert follower.problem == "is not a regular file"

    def test_a_missing_file_is_reported_as_missing(
        self, tmp_path: Path, follow: Callable[[Path], LogFollower]
    ) -> None:
        """Waiting for a file is a state of its own, not an error."""
        follower = follow(tmp_path / "later.log")
        assert lines_of(follower) == []
        assert follower.problem == MISSING

    def test_permission_denied_then_granted(
        self,
        tmp_path: Path,
        follow: Callable[[Path], LogFollower],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A log recreated unreadable by rotation: the old file is finished, the new one read
        from the top once it may be read."""
        path = tmp_path / "worker.log"
        path.write_text("")
        follower = follow(path)
        append(path, "1\n")
        assert lines_of(follower) == ["1"]
        append(path, "2\n")
        os.rename(path, tmp_path / "worker.log.1")
        path.write_text("3\n")
        deny_open(monkeypatch, path)
        assert lines_of(follower) == ["2"]
        assert follower.problem == "Permission denied"
        assert lines_of(follower) == []
        monkeypatch.undo()
        assert lines_of(follower) == ["3"]
        assert follower.problem is None

    def test_a_read_error_resumes_at_the_last_whole_line(
        self,
        tmp_path: Path,
        follow: Callable[[Path], LogFollower],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """EIO while reading: no exception, the problem is named, then nothing lost or doubled."""
        path = tmp_path / "worker.log"
        path.write_text("")
        follower = follow(path)
        append(path, "1\n2 part")
        assert lines_of(follower) == ["1"]
        real_pread = os.pread

        def failing_pread(fd: int, size: int, offset: int) -> bytes:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "pread", failing_pread)
        append(path, "ial\n3\n")
        assert lines_of(follower) == []
        assert follower.problem == "Input/output error"
        monkeypatch.setattr(os, "pread", real_pread)
        assert lines_of(follower) == ["2 partial", "3"]
        assert follower.problem is None


class TestTailer:
    """Counting, and resuming after a restart without double counting."""

    def test_counts_and_restart_resume(self, tmp_path: Path) -> None:
        """A restart mid-file continues after the last line counted, even after a rotation."""
        path = tmp_path / "worker.log"
        path.write_text("")
        state = PositionStore(StateFile(tmp_path / "positions.json", "worker_log", LOG))

        def tailer(registry: CollectorRegistry) -> WorkerLogTailer:
            return WorkerLogTailer([WorkerLog("w1", path)], WorkerLogMetrics(registry), state, LOG)

        first_registry = CollectorRegistry()
        first = tailer(first_registry)
        append(path, f"{RETRY}\n{HTTPX}\nTraceback (most recent call last):\n")
        assert first.tick() == 3
        get = first_registry.get_sample_value
        assert get("prefect_worker_api_retries_total", {"worker": "w1", "code": "429"}) == 1
        assert get("prefect_worker_api_responses_total", {"worker": "w1", "code": "429"}) == 1
        assert (
            get(
                "prefect_exporter_log_lines_skipped_total",
                {"worker": "w1", "reason": "unrecognised"},
            )
            == 1
        )

        # The exporter stops; the worker goes on writing and the file rotates meanwhile.
        append(path, f"{HTTPX}\n")
        os.rename(path, tmp_path / "worker.log.1")
        path.write_text(f"{HTTPX}\n{HTTPX}\n")

        second_registry = CollectorRegistry()
        second = tailer(second_registry)
        second.tick()
        second.tick()
        first.close()
        second.close()
        responses = second_registry.get_sample_value(
            "prefect_worker_api_responses_total", {"worker": "w1", "code": "429"}
        )
        # The saved position pointed into the rotated file, which is gone from the path:
        # the new file is read whole (2 lines); the one line left in the old file is the
        # documented loss of a rotation that happens while the exporter is down.
        assert responses == 2

    def test_invalid_utf8_is_skipped_and_counted(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are a counted skip, not a crash."""
        path = tmp_path / "worker.log"
        path.write_text("")
        registry = CollectorRegistry()
        tail = WorkerLogTailer(
            [WorkerLog("w", path)],
            WorkerLogMetrics(registry),
            PositionStore(None),
            LOG,
        )
        with path.open("ab") as f:
            f.write(b"\xff\xfe broken\n")
        tail.tick()
        tail.close()
        assert (
            registry.get_sample_value(
                "prefect_exporter_log_lines_skipped_total", {"worker": "w", "reason": "encoding"}
            )
            == 1
        )


def positions_file(path: Path) -> PositionStore:
    return PositionStore(StateFile(path, "worker_log", LOG))


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


class TestUnreadableLogs:
    """A log that cannot be read shows in a gauge and one log line per change, never silence."""

    def test_a_directory_then_a_file(self, tmp_path: Path) -> None:
        """Gauge 0 and one warning over many ticks; then gauge 1, one info line, lines counted."""
        path = tmp_path / "worker.log"
        path.mkdir()
        registry = CollectorRegistry()
        with structlog.testing.capture_logs() as logs:
            tail = WorkerLogTailer(
                [WorkerLog("w", path)], WorkerLogMetrics(registry), PositionStore(None), LOG
            )
            for _ in range(3):
                tail.tick()
            assert sample(registry, "prefect_exporter_worker_log_readable", worker="w") == 0
            path.rmdir()
            path.write_text(f"{HTTPX}\n")
            tail.tick()
            tail.tick()
        tail.close()
        assert [(e["event"], e["log_level"]) for e in logs] == [
            ("worker_log_unreadable", "warning"),
            ("worker_log_readable", "info"),
        ]
        assert logs[0]["error"] == "is a directory"
        assert logs[0]["worker"] == "w"
        assert sample(registry, "prefect_exporter_worker_log_readable", worker="w") == 1
        assert sample(registry, "prefect_worker_api_responses_total", worker="w", code="429") == 1

    def test_a_missing_file_is_waited_for(self, tmp_path: Path) -> None:
        """Gauge 0 with one info line while missing; the file that appears is read whole."""
        path = tmp_path / "worker.log"
        registry = CollectorRegistry()
        with structlog.testing.capture_logs() as logs:
            tail = WorkerLogTailer(
                [WorkerLog("w", path)], WorkerLogMetrics(registry), PositionStore(None), LOG
            )
            assert sample(registry, "prefect_exporter_worker_log_readable", worker="w") == 0
            tail.tick()
            tail.tick()
            path.write_text(f"{RETRY}\n")
            tail.tick()
        tail.close()
        assert [e["event"] for e in logs] == ["worker_log_missing", "worker_log_readable"]
        assert sample(registry, "prefect_worker_api_retries_total", worker="w", code="429") == 1

    def test_no_permission(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file we may not open: gauge 0 and the system's reason in one warning."""
        path = tmp_path / "worker.log"
        path.write_text("")
        deny_open(monkeypatch, path)
        registry = CollectorRegistry()
        with structlog.testing.capture_logs() as logs:
            tail = WorkerLogTailer(
                [WorkerLog("w", path)], WorkerLogMetrics(registry), PositionStore(None), LOG
            )
            tail.tick()
            tail.tick()
        tail.close()
        assert [(e["event"], e.get("error")) for e in logs] == [
            ("worker_log_unreadable", "Permission denied")
        ]
        assert sample(registry, "prefect_exporter_worker_log_readable", worker="w") == 0


class TestPositionFile:
    """The positions state file: failures do not stop counting or flood the log."""

    def test_an_unwritable_state_file_logs_once_and_counting_goes_on(self, tmp_path: Path) -> None:
        """The reported flood: ten ticks, one warning, no traceback, every line counted."""
        path = tmp_path / "worker.log"
        path.write_text("")
        registry = CollectorRegistry()
        state = StateFile(tmp_path / "ro" / "positions.json", "worker_log", LOG)
        with structlog.testing.capture_logs() as logs:
            tail = WorkerLogTailer(
                [WorkerLog("w", path)], WorkerLogMetrics(registry), PositionStore(state), LOG
            )
            for _ in range(10):
                append(path, f"{HTTPX}\n")
                tail.tick()
            (tmp_path / "ro").mkdir()
            tail.tick()  # nothing new, but the unsaved positions are saved now
        tail.close()
        assert [e["event"] for e in logs] == [
            "state_file_write_failed",
            "state_file_write_recovered",
        ]
        assert logs[1]["failed_saves"] == 10
        assert "exc_info" not in logs[0]
        assert sample(registry, "prefect_worker_api_responses_total", worker="w", code="429") == 10
        saved = json.loads((tmp_path / "ro" / "positions.json").read_text())
        assert saved[str(path)]["offset"] == path.stat().st_size

    def test_only_changed_positions_are_written(self, tmp_path: Path) -> None:
        """Idle ticks write nothing; a tick that read lines writes once."""
        path = tmp_path / "worker.log"
        path.write_text("")
        writes: list[object] = []

        class CountingFile(StateFile):
            def save(self, data: Any) -> bool:
                writes.append(data)
                return super().save(data)

        state = PositionStore(CountingFile(tmp_path / "positions.json", "worker_log", LOG))
        tail = WorkerLogTailer(
            [WorkerLog("w", path)], WorkerLogMetrics(CollectorRegistry()), state, LOG
        )
        tail.tick()
        tail.tick()
        append(path, "line\n")
        tail.tick()
        tail.tick()
        tail.close()
        assert len(writes) == 2  # the first position, then the one after "line"

    def test_a_corrupt_state_file_is_warned_about_and_replaced(self, tmp_path: Path) -> None:
        """A warning (not silence); reading starts at the end as without positions; rewritten."""
        path = tmp_path / "worker.log"
        path.write_text(f"{HTTPX}\n")
        state_path = tmp_path / "positions.json"
        state_path.write_text('{"worker.log": {"inode": "x"')
        registry = CollectorRegistry()
        with structlog.testing.capture_logs() as logs:
            tail = WorkerLogTailer(
                [WorkerLog("w", path)],
                WorkerLogMetrics(registry),
                positions_file(state_path),
                LOG,
            )
            tail.tick()
        tail.close()
        assert [(e["event"], e["log_level"]) for e in logs] == [("state_file_unusable", "warning")]
        assert sample(registry, "prefect_exporter_log_lines_read_total", worker="w") == 0
        saved = json.loads(state_path.read_text())
        assert saved[str(path)]["offset"] == path.stat().st_size

    @pytest.mark.parametrize(
        "entry",
        [
            {"inode": 1, "offset": -5},
            {"inode": 1},
            [1, 2],
            {"inode": 1, "offset": 0, "head_length": 10**9},
        ],
        ids=["negative", "no-offset", "list", "huge-head"],
    )
    def test_positions_of_the_wrong_shape_are_unusable(self, tmp_path: Path, entry: object) -> None:
        """Valid JSON that is not a position table: no positions, one warning."""
        state_path = tmp_path / "positions.json"
        state_path.write_text(json.dumps({"worker.log": entry}))
        with structlog.testing.capture_logs() as logs:
            assert positions_file(state_path).load() == {}
        assert [e["event"] for e in logs] == ["state_file_unusable"]

    def test_a_copytruncate_while_stopped_is_noticed_at_restart(self, tmp_path: Path) -> None:
        """Truncated and refilled past the saved offset while down: the new content is read
        whole instead of from the stale offset."""
        path = tmp_path / "worker.log"
        path.write_text("")
        state = positions_file(tmp_path / "positions.json")
        first = WorkerLogTailer(
            [WorkerLog("w", path)], WorkerLogMetrics(CollectorRegistry()), state, LOG
        )
        append(path, "".join(f"12:00:{i:02d}.000 | old line\n" for i in range(5)))
        first.tick()
        first.close()
        with path.open("r+") as f:
            f.truncate(0)
        path.write_text("".join(f"12:05:{i:02d}.000 | {HTTPX}\n" for i in range(8)))
        registry = CollectorRegistry()
        second = WorkerLogTailer([WorkerLog("w", path)], WorkerLogMetrics(registry), state, LOG)
        second.tick()
        second.close()
        assert sample(registry, "prefect_exporter_log_lines_read_total", worker="w") == 8

    def test_a_state_file_without_fingerprints_still_resumes(self, tmp_path: Path) -> None:
        """Positions written by 0.1.0 (inode and offset only) are honoured."""
        path = tmp_path / "worker.log"
        path.write_text(f"{HTTPX}\n{HTTPX}\n")
        first_line = len(HTTPX) + 1
        state_path = tmp_path / "positions.json"
        state_path.write_text(
            json.dumps({str(path): {"inode": path.stat().st_ino, "offset": first_line}})
        )
        registry = CollectorRegistry()
        tail = WorkerLogTailer(
            [WorkerLog("w", path)], WorkerLogMetrics(registry), positions_file(state_path), LOG
        )
        tail.tick()
        tail.close()
        assert sample(registry, "prefect_exporter_log_lines_read_total", worker="w") == 1


class TestRunLoop:
    """A failing tick (a bug) is logged once per run of failures, not every second."""

    def test_three_failures_one_traceback_one_recovery_line(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Ticks fail three times, then succeed: two log lines in all."""
        tail = WorkerLogTailer(
            [], WorkerLogMetrics(CollectorRegistry()), PositionStore(None), LOG, interval=0
        )
        stop = asyncio.Event()
        calls = 0

        def tick() -> int:
            nonlocal calls
            calls += 1
            if calls <= 3:
                raise RuntimeError("a bug")
            if calls == 5:
                stop.set()
            return 0

        monkeypatch.setattr(tail, "tick", tick)
        with structlog.testing.capture_logs() as logs:
            asyncio.run(tail.run(stop))
        assert [e["event"] for e in logs] == ["worker_log_tick_failed", "worker_log_tick_recovered"]
        assert logs[1]["failed_ticks"] == 3


class TestCheckWorkerLog:
    """The start-up check of --worker-log paths."""

    def test_a_readable_file_and_a_file_still_to_come_pass(self, tmp_path: Path) -> None:
        """An existing readable file, or one not there yet (waited for), is fine."""
        (tmp_path / "worker.log").write_text("")
        assert check_worker_log(tmp_path / "worker.log") is None
        assert check_worker_log(str(tmp_path / "later.log")) is None

    def test_a_directory(self, tmp_path: Path) -> None:
        """The reported case: a directory is refused with a clear sentence."""
        problem = check_worker_log(tmp_path)
        assert problem == f"{tmp_path} is a directory; give the path of the worker's log file"

    def test_not_a_regular_file(self, tmp_path: Path) -> None:
        """A named pipe is refused (and the check does not block on it)."""
        os.mkfifo(tmp_path / "pipe")
        assert check_worker_log(tmp_path / "pipe") == f"{tmp_path / 'pipe'} is not a regular file"

    def test_unreadable(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file we may not open is refused with the system's reason."""
        path = tmp_path / "worker.log"
        path.write_text("")
        deny_open(monkeypatch, path)
        assert check_worker_log(path) == f"{path} cannot be read (Permission denied)"

    def test_a_parent_that_is_a_file(self, tmp_path: Path) -> None:
        """A log below a regular file can never appear."""
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "worker.log"
        problem = check_worker_log(path)
        assert problem == f"{path} cannot exist: part of its directory path is a file"


WORKER_LOGGING = ROOT / "deploy" / "worker-logging"
# Runs in the Prefect server's environment: Prefect's own logging set-up loads the shipped
# config; a real Prefect HTTP client gets 429 from a mock transport until it gives up.
PROBE = """
import logging
import httpx
from prefect.client.base import PrefectHttpxSyncClient
from prefect.logging.configuration import setup_logging

setup_logging()
answer = httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "slow down"})
transport = httpx.MockTransport(lambda request: answer)
with PrefectHttpxSyncClient(transport=transport, base_url="http://prefect.test:4200/api/") as c:
    try:
        c.post("work_pools/my-pool/get_scheduled_flow_runs", json={})
    except httpx.HTTPStatusError:
        logging.getLogger("prefect.workers.probe").exception("Failed to get scheduled flow runs")
logging.shutdown()
"""


class TestShippedLoggingConfig:
    """deploy/worker-logging/ is what the manifest ships, and real Prefect logs through it
    lines the sidecar counts (and the README's table of formats is true)."""

    def manifest(self) -> tuple[dict[str, Any], dict[str, Any]]:
        docs = {
            d["kind"]: d
            for d in yaml.safe_load_all(
                (ROOT / "deploy/kubernetes/overlays/sidecar/worker-with-sidecar.yaml").read_text()
            )
            if d
        }
        return docs["ConfigMap"], docs["Deployment"]

    def test_the_manifest_ships_these_files(self) -> None:
        """The ConfigMap holds both files unchanged, mounted where both env vars point."""
        config_map, deployment = self.manifest()
        assert config_map["data"] == {
            name: (WORKER_LOGGING / name).read_text()
            for name in ("logging.yml", "prefect_exporter_logging.py")
        }
        worker = next(
            c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "worker"
        )
        env = {e["name"]: e["value"] for e in worker["env"] if "value" in e}
        mount = next(
            m["mountPath"] for m in worker["volumeMounts"] if m["name"] == "logging-config"
        )
        assert env["PREFECT_LOGGING_SETTINGS_PATH"] == f"{mount}/logging.yml"
        assert env["PYTHONPATH"] == mount

    @pytest.mark.parametrize(
        ("formatter", "counted"),
        [
            ("message_json", {"responses": 3, "retries": 3, "failures": 1, "no_status_code": 0}),
            ("standard", {"responses": 3, "retries": 3, "failures": 1, "no_status_code": 0}),
            ("json", {"responses": 0, "retries": 3, "failures": 1, "no_status_code": 3}),
        ],
    )
    def test_real_prefect_logging_through_the_shipped_config(
        self, tmp_path: Path, formatter: str, counted: dict[str, int]
    ) -> None:
        """Three 429 answers (two retries allowed), each formatter: what the sidecar counts."""
        python = SERVER_VENV / "bin" / "python"
        if not python.exists():
            pytest.fail(f"no Prefect at {SERVER_VENV}; run scripts/setup.sh first")
        log_file = tmp_path / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        env.update(
            PREFECT_HOME=str(tmp_path / "prefect-home"),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_CLIENT_MAX_RETRIES="2",
            PREFECT_LOGGING_SETTINGS_PATH=str(WORKER_LOGGING / "logging.yml"),
            PYTHONPATH=str(WORKER_LOGGING),
            # Prefect's own override mechanism, as a deployment would use it.
            PREFECT_LOGGING_HANDLERS_FILE_FILENAME=str(log_file),
            PREFECT_LOGGING_HANDLERS_FILE_FORMATTER=formatter,
        )
        result = subprocess.run(
            [str(python), "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        registry = CollectorRegistry()
        metrics = WorkerLogMetrics(registry)
        metrics.prepare("w")
        for raw in log_file.read_bytes().splitlines():
            metrics.count("w", raw)
        found = {
            kind: sample(registry, f"prefect_worker_api_{kind}_total", worker="w", code="429")
            for kind in ("responses", "retries", "failures")
        }
        found["no_status_code"] = sample(
            registry,
            "prefect_exporter_log_lines_skipped_total",
            worker="w",
            reason="no_status_code",
        )
        assert found == counted
