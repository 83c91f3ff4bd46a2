"""Tests for logging setup: with JSON every line is strict JSON, whoever writes it."""

from __future__ import annotations

import gc
import io
import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from exporter import logs


def strict_json(line: str) -> dict[str, Any]:
    """Parse one line, refusing the Infinity and NaN that Python's json accepts."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    parsed: dict[str, Any] = json.loads(line, parse_constant=refuse)
    return parsed


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [strict_json(line) for line in stream.getvalue().splitlines()]


@pytest.fixture(autouse=True)
def restore_process_hooks() -> Iterator[None]:
    """configure() replaces process-wide hooks; every test gets the originals back."""
    saved = (warnings.showwarning, sys.excepthook, threading.excepthook, sys.unraisablehook)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    warnings.showwarning, sys.excepthook, threading.excepthook, sys.unraisablehook = saved
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


class TestFormats:
    """The format follows the flag, and `auto` follows the stream."""

    def test_auto_is_json_off_a_terminal(self) -> None:
        """A pipe or file (not a TTY) gets JSON lines."""
        stream = io.StringIO()
        logs.configure("info", "auto", stream).info("poll_succeeded", pools=2)
        [line] = json_lines(stream)
        assert (line["event"], line["level"], line["pools"]) == ("poll_succeeded", "info", 2)

    def test_console_is_not_json(self) -> None:
        """The console renderer writes key=value text."""
        stream = io.StringIO()
        logs.configure("info", "console", stream).info("poll_succeeded", pools=2)
        assert "poll_succeeded" in stream.getvalue()
        assert "pools=2" in stream.getvalue()

    def test_levels_below_the_setting_are_dropped(self) -> None:
        """log.level warning drops info lines."""
        stream = io.StringIO()
        log = logs.configure("warning", "json", stream)
        log.info("quiet")
        log.warning("loud")
        assert [line["event"] for line in json_lines(stream)] == ["loud"]


class TestStrictJson:
    """Values JSON cannot hold are rendered so that the line still parses."""

    def test_infinity_and_nan_become_null_at_any_depth(self) -> None:
        """A Retry-After of inf is logged as null, not Infinity."""
        stream = io.StringIO()
        logs.configure("info", "json", stream).warning(
            "poll_failed",
            next_poll_seconds=float("inf"),
            pauses=[float("nan"), 1.5],
            detail={"low": float("-inf"), "pair": (float("inf"), 2)},
        )
        [line] = json_lines(stream)
        assert line["next_poll_seconds"] is None
        assert line["pauses"] == [None, 1.5]
        assert line["detail"] == {"low": None, "pair": [None, 2]}

    def test_tracebacks_are_json_and_show_no_locals(self) -> None:
        """An exception is a structured field; a frame's secret local is not in it."""
        stream = io.StringIO()
        log = logs.configure("info", "json", stream)

        def fails() -> None:
            header = "Bearer pnu_topsecret"
            raise KeyError(header[:6])

        try:
            fails()
        except KeyError:
            log.exception("poll_crashed")
        [line] = json_lines(stream)
        assert line["exception"][0]["exc_type"] == "KeyError"
        assert "pnu_topsecret" not in stream.getvalue()

    def test_console_tracebacks_show_no_locals(self) -> None:
        """The console format prints a plain traceback without locals."""
        stream = io.StringIO()
        log = logs.configure("info", "console", stream)

        def fails() -> None:
            header = "Bearer pnu_topsecret"
            raise KeyError(header[:6])

        try:
            fails()
        except KeyError:
            log.exception("poll_crashed")
        assert "KeyError: 'Bearer'" in stream.getvalue()
        assert "pnu_topsecret" not in stream.getvalue()


class TestOtherWriters:
    """Warnings, stdlib logging and uncaught exceptions come out as the same JSON lines."""

    def test_python_warnings_are_json(self) -> None:
        """A RuntimeWarning (such as a coroutine never awaited) is one JSON line."""
        stream = io.StringIO()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logs.configure("info", "json", stream)
            warnings.warn_explicit(
                "coroutine 'PrefectApi.queue_run_stats' was never awaited",
                RuntimeWarning,
                "exporter/poller.py",
                120,
            )
        [line] = json_lines(stream)
        assert line == {
            "event": "python_warning",
            "level": "warning",
            "category": "RuntimeWarning",
            "message": "coroutine 'PrefectApi.queue_run_stats' was never awaited",
            "file": "exporter/poller.py",
            "line": 120,
            "timestamp": line["timestamp"],
        }

    def test_library_logging_at_warning_and_above_is_json(self) -> None:
        """httpx's per-request INFO lines are dropped; a library's warning is forwarded."""
        stream = io.StringIO()
        logs.configure("debug", "json", stream)
        logging.getLogger("httpx").info("HTTP Request: POST http://x/api 200 OK")
        logging.getLogger("asyncio").warning("Executing %s took %.3f seconds", "<Task>", 0.25)
        [line] = json_lines(stream)
        assert (line["event"], line["level"], line["logger"]) == (
            "library_log",
            "warning",
            "asyncio",
        )
        assert line["message"] == "Executing <Task> took 0.250 seconds"

    def test_a_library_record_with_bad_arguments_is_still_logged(self) -> None:
        """Format arguments that do not fit the message give the raw message, not a crash."""
        stream = io.StringIO()
        logs.configure("info", "json", stream)
        # Only our forwarder: pytest's own capturing handler would fail on this record.
        root = logging.getLogger()
        root.handlers[:] = root.handlers[-1:]
        logging.getLogger("lib").error("needs two: %s %s", "one")
        [line] = json_lines(stream)
        assert line["message"] == "needs two: %s %s"

    def test_a_custom_level_maps_to_the_standard_one_below(self) -> None:
        """Level 35 is logged as a warning."""
        stream = io.StringIO()
        logs.configure("info", "json", stream)
        logging.getLogger("lib").log(35, "between warning and error")
        [line] = json_lines(stream)
        assert line["level"] == "warning"

    def test_configuring_twice_keeps_one_forwarder(self) -> None:
        """Each record is forwarded once however often logging is configured."""
        stream = io.StringIO()
        logs.configure("info", "json", stream)
        logs.configure("info", "json", stream)
        logging.getLogger("lib").warning("once")
        assert len(json_lines(stream)) == 1

    def test_an_uncaught_exception_is_json(self) -> None:
        """The process-wide except hook logs a critical line with the exception."""
        stream = io.StringIO()
        logs.configure("info", "json", stream)
        error = RuntimeError("boom")
        sys.excepthook(RuntimeError, error, None)
        [line] = json_lines(stream)
        assert (line["event"], line["level"]) == ("unhandled_exception", "critical")
        assert line["exception"][0]["exc_value"] == "boom"

    def test_an_exception_in_a_thread_is_json(self) -> None:
        """A thread that dies of an exception leaves one JSON line naming the thread."""
        stream = io.StringIO()
        logs.configure("info", "json", stream)

        def crash() -> None:
            raise ValueError("in thread")

        thread = threading.Thread(target=crash, name="server")
        thread.start()
        thread.join()
        [line] = json_lines(stream)
        assert (line["event"], line["thread"]) == ("unhandled_exception", "server")
        assert line["exception"][0]["exc_value"] == "in thread"

    def test_an_exception_in_a_finalizer_is_json(self) -> None:
        """'Exception ignored in __del__' becomes an unraisable_exception line."""
        stream = io.StringIO()
        logs.configure("info", "json", stream)

        class Fragile:
            def __del__(self) -> None:
                raise OSError("closing failed")

        Fragile()
        gc.collect()
        [line] = json_lines(stream)
        assert line["event"] == "unraisable_exception"
        assert line["exception"][0]["exc_value"] == "closing failed"


class TestReportProblems:
    """Configuration problems are printed before logging exists, in the format asked for."""

    def test_json_gives_one_line_per_problem(self) -> None:
        """Each problem is a config_invalid JSON line at level error."""
        stream = io.StringIO()
        logs.report_problems("config_invalid", ["--a: bad", "--b: worse"], "json", stream)
        lines = json_lines(stream)
        assert [(line["event"], line["level"], line["problem"]) for line in lines] == [
            ("config_invalid", "error", "--a: bad"),
            ("config_invalid", "error", "--b: worse"),
        ]

    def test_console_gives_a_readable_list(self) -> None:
        """A heading and one indented line per problem."""
        stream = io.StringIO()
        logs.report_problems("config_invalid", ["--a: bad", "--b: worse"], "console", stream)
        assert stream.getvalue() == (
            "prefect-exporter: invalid configuration:\n  - --a: bad\n  - --b: worse\n"
        )
