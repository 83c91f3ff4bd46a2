"""Configures structlog: JSON lines when not on a terminal, readable lines on one.

Everything the process writes to its log stream goes through the one structlog logger, so that
with JSON every line is JSON: Python warnings, other libraries' stdlib logging, uncaught
exceptions (main thread, other threads, "exception ignored" in finalizers) included. Numbers
that JSON cannot hold (infinity, NaN) become null.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import warnings
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, TextIO

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# Nested values deeper than this are left as they are: log fields are flat in practice, and a
# bound keeps a self-referencing value from recursing without end.
_MAX_DEPTH = 8


def wants_json(fmt: str, stream: TextIO) -> bool:
    """Whether `fmt` ('json', 'console' or 'auto') means JSON lines on `stream`."""
    return fmt == "json" or (fmt == "auto" and not stream.isatty())


def configure(level: str, fmt: str, stream: TextIO = sys.stderr) -> FilteringBoundLogger:
    """Set up structlog once, in `cli`; everything else receives the logger it returns.

    `level` is one of debug, info, warning, error; `fmt` one of json, console, auto. Also
    routes warnings, stdlib logging and uncaught exceptions into the same logger (process-wide
    hooks, replaced on each call).
    """
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if wants_json(fmt, stream):
        processors += [
            # Without locals: a frame's locals can hold a request's Authorization header.
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            ),
            null_non_finite_floats,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors.append(
            # Plain tracebacks: the rich formatter shows locals, which can hold credentials.
            structlog.dev.ConsoleRenderer(
                colors=False, exception_formatter=structlog.dev.plain_traceback
            )
        )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    logger: FilteringBoundLogger = structlog.get_logger()
    _route_python_output(logger, _LEVELS[level])
    return logger


def report_problems(
    event: str, problems: Sequence[str], fmt: str, stream: TextIO = sys.stderr
) -> None:
    """Write configuration problems before logging is set up: JSON lines or a plain list.

    With JSON (`fmt` 'json', or 'auto' off a terminal) each problem is one `event` line at
    level error; otherwise a heading and one indented line per problem.
    """
    if wants_json(fmt, stream):
        log = configure("error", "json", stream)
        for problem in problems:
            log.error(event, problem=problem)
        return
    print("prefect-exporter: invalid configuration:", file=stream)
    for problem in problems:
        print(f"  - {problem}", file=stream)


def null_non_finite_floats(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """Replace infinity and NaN, which are not JSON, by null (at any depth up to a bound).

    Null rather than a string, so that a field stays numeric for typed log stores.
    """
    return {key: _finite(value, 0) for key, value in event.items()}


def _finite(value: Any, depth: int) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {key: _finite(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_finite(item, depth + 1) for item in value)
    return value


class _ForwardHandler(logging.Handler):
    """Sends other libraries' stdlib log records to the structlog logger as `library_log`."""

    def __init__(self, log: FilteringBoundLogger, level: int) -> None:
        super().__init__(level)
        self._log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format arguments must not break logging
            message = str(record.msg)
        fields: dict[str, Any] = {"logger": record.name, "message": message}
        if record.exc_info and record.exc_info[1] is not None:
            fields["exc_info"] = record.exc_info
        # structlog knows the standard levels only; a custom level maps to the one below it.
        level = max(
            (standard for standard in (10, 20, 30, 40, 50) if standard <= record.levelno),
            default=logging.DEBUG,
        )
        self._log.log(level, "library_log", **fields)


def _route_python_output(log: FilteringBoundLogger, level: int) -> None:
    def show_warning(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        log.warning(
            "python_warning",
            category=category.__name__,
            message=str(message),
            file=filename,
            line=lineno,
        )

    def except_hook(
        kind: type[BaseException], value: BaseException, traceback: TracebackType | None
    ) -> None:
        log.critical("unhandled_exception", exc_info=(kind, value, traceback))

    def thread_except_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return  # as Python's own hook: a thread ending with SystemExit is not an error
        log.error(
            "unhandled_exception",
            thread=args.thread.name if args.thread is not None else None,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def unraisable_hook(unraisable: Any) -> None:
        fields: dict[str, Any] = {"message": unraisable.err_msg or "Exception ignored"}
        try:
            fields["object"] = repr(unraisable.object)
        except Exception:  # the object is half torn down; its repr may fail too
            fields["object"] = object.__repr__(unraisable.object)
        if unraisable.exc_value is not None:
            fields["exc_info"] = (
                unraisable.exc_type,
                unraisable.exc_value,
                unraisable.exc_traceback,
            )
        log.error("unraisable_exception", **fields)

    warnings.showwarning = show_warning
    sys.excepthook = except_hook
    threading.excepthook = thread_except_hook
    sys.unraisablehook = unraisable_hook

    root = logging.getLogger()
    for handler in root.handlers[:]:
        if isinstance(handler, _ForwardHandler):
            root.removeHandler(handler)
    # Other libraries speak at WARNING and above only: httpx logs every request at INFO, and
    # the exporter's own events already say one line per poll.
    floor = max(level, logging.WARNING)
    root.addHandler(_ForwardHandler(log, floor))
    root.setLevel(floor)
