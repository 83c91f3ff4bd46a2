"""`prefect-exporter diagnose`: one read of the workspace, then findings as a table or JSON.

The read is the exporter's own poll (same adapter, request budget and snapshot code, wired by
cli), plus the few reads only a diagnosis needs: which deployment and tag limits hold which
runs, a sample of the runs without a work queue, and the recent flow-run events for pickup and
start delays. The findings come from the pure engine in `diagnosis`; this module reads, shows
progress and renders. Exit codes: 0 healthy, 1 findings, 2 Prefect unreachable or bad
configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from prometheus_client import CollectorRegistry

from exporter.clock import Deadline, UnixTime
from exporter.config import Settings, parse_duration
from exporter.diagnosis import (
    ApiRead,
    Cause,
    DelayReport,
    Diagnosis,
    Extras,
    Finding,
    PoolReport,
    QueueReport,
    Thresholds,
    diagnose,
    duration_text,
    runs_text,
)
from exporter.errors import ApiStatusError, PrefectApiError
from exporter.events_reader import EventsApi, EventsReader
from exporter.records import (
    AWAITING_CONCURRENCY_SLOT,
    DEPLOYMENT_LIMIT_PREFIX,
    TAG_LIMIT_PREFIX,
    LimitKind,
    PoolSelector,
    RunPlace,
)
from exporter.snapshot import Snapshot

SCHEMA = "prefect-exporter/diagnose/v1"
EXIT_HEALTHY, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2
# Pickup and start delays come from the flow-run events of this many seconds before the read.
LATENCY_WINDOW = 900.0
# A throttled read is tried this many times in all, waiting as the API asks, at most MAX_WAIT.
ATTEMPTS = 3
MAX_WAIT = 30.0
# The progress line appears only for a read slower than this (seconds), and on a terminal.
PROGRESS_AFTER = 0.5

USAGE = """\
usage: prefect-exporter diagnose [--work-pool GLOB]... [--json] [--slow-start DURATION] [flags]

Reads the Prefect workspace once and names why runs are not starting, most likely cause first,
each with its evidence and the command that fixes or confirms it; then a report per pool and
queue.

  --work-pool GLOB       only these work pools (shell-style glob, repeatable); findings outside
                         them (runs without a work queue) are left out
  --json                 print JSON (schema prefect-exporter/diagnose/v1, see docs/diagnose.md)
  --slow-start DURATION  a run claimed (Pending) for longer is slow_infrastructure (default 5m)
  -h, --help             this help

The exporter's connection flags, environment variables and --config.file apply as they do to
the exporter (PREFECT_API_URL, PREFECT_API_KEY, PREFECT_API_AUTH_STRING,
--prefect.requests-per-minute, --poll.timeout, ...): see `prefect-exporter --help`.

Exit status: 0 healthy, 1 findings, 2 Prefect unreachable or bad configuration.
"""


@dataclass(frozen=True)
class Options:
    """diagnose's own flags: pool globs, JSON output, the slow-start threshold in seconds."""

    work_pools: tuple[str, ...] = ()
    json: bool = False
    slow_start: float = 300.0
    help: bool = False


def split_arguments(argv: Sequence[str]) -> tuple[Options, list[str], list[str]]:
    """diagnose's flags out of `argv`: (options, the rest for the exporter's options, problems).

    `--work-pool` alone is diagnose's; `--work-pool.include` and every other flag go on to the
    exporter's option table, which reports what it does not know.
    """
    pools: list[str] = []
    as_json, show_help, slow_start = False, False, Options.slow_start
    rest: list[str] = []
    problems: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        name, equals, value = token.partition("=")
        if token in ("-h", "--help"):
            show_help = True
        elif token == "--json":
            as_json = True
        elif name in ("--work-pool", "--slow-start"):
            if not equals:
                if index >= len(argv) or argv[index].startswith("--"):
                    problems.append(f"{name}: expects a value")
                    continue
                value = argv[index]
                index += 1
            if name == "--work-pool":
                if value.strip():
                    pools.append(value.strip())
                else:
                    problems.append("--work-pool: expects a glob such as etl-*")
            else:
                try:
                    slow_start = parse_duration(value)
                except ValueError as exc:
                    problems.append(f"--slow-start: {exc}")
        else:
            rest.append(token)
    return Options(tuple(pools), as_json, slow_start, show_help), rest, problems


def settings_for(settings: Settings, options: Options) -> Settings:
    """The exporter's settings adjusted for one diagnosis read.

    Deployment limits are broken down by deployment; the poller reads no events (the diagnosis
    reads its own window of them); `--work-pool` narrows the pools watched.
    """
    return replace(
        settings,
        events_enabled=False,
        deployments_breakdown=True,
        work_pools_include=options.work_pools or settings.work_pools_include,
    )


class Poll(Protocol):
    """The exporter's poll (poller.Poller)."""

    async def poll_once(self, full: bool = True) -> Snapshot: ...


class DiagnosisApi(EventsApi, Protocol):
    """The reads only a diagnosis needs (prefect_api.PrefectApi has them)."""

    @property
    def requests_sent(self) -> int: ...

    async def awaiting_slot_runs(self, deadline: Deadline) -> list[RunPlace]: ...
    async def tag_waiting_runs(self, tag: str, deadline: Deadline) -> list[RunPlace]: ...
    async def runs_without_work_queue_sample(
        self, now: UnixTime, deadline: Deadline
    ) -> list[RunPlace]: ...
    async def deployment_names(self, ids: Sequence[str], deadline: Deadline) -> dict[str, str]: ...


def throttled_responses(registry: CollectorRegistry) -> int:
    """429 answers counted by the adapter's `prefect_exporter_api_requests_total`."""
    return int(
        sum(
            sample.value
            for metric in registry.collect()
            if metric.name == "prefect_exporter_api_requests"
            for sample in metric.samples
            if sample.name.endswith("_total") and sample.labels.get("code") == "429"
        )
    )


@dataclass(frozen=True)
class Reader:
    """One diagnosis read: the poll, then the extra reads, retried when throttled.

    `clock` is Unix time, `monotonic` for deadlines, `sleep` waits in seconds.
    """

    poller: Poll
    api: DiagnosisApi
    registry: CollectorRegistry
    settings: Settings
    selector: PoolSelector
    events: bool = True
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    async def read(self) -> tuple[Snapshot, Extras]:
        """The snapshot and extras; raises PrefectApiError or TimeoutError when it cannot.

        A throttled read (429 or 503) is tried again after its Retry-After (at most MAX_WAIT
        seconds), ATTEMPTS times in all. When every attempt was throttled, the result is an
        empty snapshot whose extras say so (`api.complete` False): being throttled is the
        finding then.
        """
        retry_after: float | None = None
        for attempt in range(1, ATTEMPTS + 1):
            try:
                snapshot, extras = await self._read_once()
            except ApiStatusError as exc:
                if not exc.throttled:
                    raise
                if exc.retry_after is not None:
                    retry_after = max(retry_after or 0.0, exc.retry_after)
                if attempt == ATTEMPTS:
                    now = UnixTime(self.clock())
                    return Snapshot(now, (), (), ()), Extras(
                        api=self._api_read(retry_after, complete=False), pools=self.selector
                    )
                await self.sleep(min(MAX_WAIT, exc.retry_after or float(2**attempt)))
                continue
            return snapshot, replace(extras, api=self._api_read(retry_after, complete=True))
        raise AssertionError("unreachable")  # pragma: no cover

    def _api_read(self, retry_after: float | None, complete: bool) -> ApiRead:
        return ApiRead(
            requests=self.api.requests_sent,
            throttled=throttled_responses(self.registry),
            retry_after=retry_after,
            complete=complete,
        )

    async def _read_once(self) -> tuple[Snapshot, Extras]:
        snapshot = await self.poller.poll_once()
        now = UnixTime(snapshot.observed_at)
        deadline = Deadline(self.monotonic() + self.settings.poll_timeout)
        api = self.api
        awaiting: list[RunPlace] = []
        if any(dict(q.runs_by_state).get(AWAITING_CONCURRENCY_SLOT) for q in snapshot.queues):
            awaiting = await api.awaiting_slot_runs(deadline)
        tag_waiters = {}
        for limit in snapshot.limits:
            if limit.kind is LimitKind.TAG and limit.enabled and limit.active_slots >= limit.slots:
                tag = limit.prefect_name.removeprefix(TAG_LIMIT_PREFIX)
                tag_waiters[tag] = tuple(await api.tag_waiting_runs(tag, deadline))
        orphans: list[RunPlace] = []
        if snapshot.runs_without_work_queue:
            orphans = await api.runs_without_work_queue_sample(now, deadline)
        known = {
            x.prefect_name.removeprefix(DEPLOYMENT_LIMIT_PREFIX)
            for x in snapshot.limits
            if x.kind is LimitKind.DEPLOYMENT
        }
        unnamed = sorted(
            {r.deployment_id for r in (*orphans, *awaiting) if r.deployment_id} - known
        )
        names = await api.deployment_names(unnamed, deadline) if unnamed else {}
        latency = None
        if self.events:
            events = EventsReader(
                api,
                self.settings.events_max_pages,
                0.0,  # recent events matter here, stored or not yet
                UnixTime(now - LATENCY_WINDOW),
                None,
                self.selector,
            )
            try:
                latency = await events.read(now, deadline)
            except ApiStatusError as exc:
                if exc.status != 404:  # an older server without the events API
                    raise
        return snapshot, Extras(
            latency=latency,
            latency_window=LATENCY_WINDOW if latency is not None else 0.0,
            tag_waiters=tag_waiters,
            awaiting_slot=tuple(awaiting),
            orphans=tuple(orphans),
            deployment_names=names,
            pools=self.selector,
        )


class Progress:
    """A line on a terminal's stderr saying the read goes on: requests sent and seconds.

    Shown only on a terminal and only for a read slower than PROGRESS_AFTER, so that scripts
    and quick reads see nothing; erased when the read ends.
    """

    def __init__(
        self,
        stream: TextIO,
        requests: Callable[[], int],
        monotonic: Callable[[], float] = time.monotonic,
        interval: float = 0.25,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._stream = stream
        self._requests = requests
        self._monotonic = monotonic
        self._interval = interval
        self._sleep = sleep
        self.shown = False

    def line(self, elapsed: float) -> str:
        """The text shown after `elapsed` seconds."""
        return f"reading Prefect: {self._requests()} requests, {elapsed:.1f}s"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Shows the line while the body runs (on a terminal)."""
        if not self._stream.isatty():
            yield
            return
        task = asyncio.create_task(self._show(self._monotonic()))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.shown:
                self._stream.write("\r\x1b[K")
                self._stream.flush()

    async def _show(self, started: float) -> None:
        await self._sleep(PROGRESS_AFTER)
        while True:
            self._stream.write("\r\x1b[K" + self.line(self._monotonic() - started))
            self._stream.flush()
            self.shown = True
            await self._sleep(self._interval)


# --- Rendering ------------------------------------------------------------------------------


def _iso(timestamp: float) -> str:
    return (
        datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _delay_json(delay: DelayReport | None) -> dict[str, Any] | None:
    return None if delay is None else {"runs": delay.runs, "mean_seconds": delay.mean_seconds}


def _queue_json(q: QueueReport) -> dict[str, Any]:
    return {
        "name": q.work_queue,
        "status": q.status,
        "priority": q.priority,
        "concurrency_limit": q.concurrency_limit,
        "in_flight_runs": q.in_flight,
        "backlog_runs": q.backlog,
        "due_runs": q.due,
        "awaiting_slot_runs": q.awaiting_slot,
        "pending_runs": q.pending,
        "running_runs": q.running,
        "oldest_due_age_seconds": q.oldest_due_age,
        "oldest_awaiting_age_seconds": q.oldest_awaiting_age,
        "oldest_pending_age_seconds": q.oldest_pending_age,
        "oldest_running_age_seconds": q.oldest_running_age,
        "last_polled_age_seconds": q.last_polled_age,
    }


def _finding_json(f: Finding) -> dict[str, Any]:
    return {
        "cause": str(f.cause),
        "work_pool": f.work_pool,
        "work_queue": f.work_queue,
        "runs": f.runs,
        "summary": f.summary,
        "evidence": {k: _json_value(v) for k, v in f.evidence.items()},
        "fix": f.fix,
    }


def _pool_json(p: PoolReport) -> dict[str, Any]:
    return {
        "name": p.name,
        "type": p.type,
        "status": p.status,
        "concurrency_limit": p.concurrency_limit,
        "in_flight_runs": p.in_flight,
        "online_workers": p.online_workers,
        "workers": [
            {
                "name": w.name,
                "online": w.online,
                "last_heartbeat_age_seconds": w.last_heartbeat_age,
            }
            for w in p.workers
        ],
        "pickup_delay": _delay_json(p.pickup),
        "start_delay": _delay_json(p.start),
        "work_queues": [_queue_json(q) for q in p.queues],
    }


def to_json(diagnosis: Diagnosis, api_url: str) -> dict[str, Any]:
    """The documented `--json` document (docs/diagnose.md): findings first, then the report."""
    return {
        "schema": SCHEMA,
        "api_url": api_url,
        "observed_at": _iso(diagnosis.observed_at),
        "healthy": diagnosis.healthy,
        "findings": [_finding_json(f) for f in diagnosis.findings],
        "work_pools": [_pool_json(p) for p in diagnosis.pools],
        "concurrency_limits": [
            {
                "name": x.name,
                "kind": x.kind,
                "slots": x.slots,
                "active_slots": x.active_slots,
                "enabled": x.enabled,
                "leaked_slots": x.leaked,
                "waiting_runs": x.waiting,
            }
            for x in diagnosis.limits
        ],
        "runs_without_work_queue": diagnosis.runs_without_work_queue,
        "api": {
            "requests": diagnosis.api.requests,
            "throttled_responses": diagnosis.api.throttled,
            "retry_after_seconds": diagnosis.api.retry_after,
            "complete": diagnosis.api.complete,
        },
        "latency_window_seconds": diagnosis.latency_window,
    }


_RED, _YELLOW, _GREEN, _BOLD, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[32m", "\x1b[1m", "\x1b[0m"


class _Style:
    def __init__(self, color: bool) -> None:
        self.color = color

    def __call__(self, text: str, code: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], style: _Style) -> list[str]:
    """Left-aligned columns two spaces apart; the header in bold on a terminal."""
    body = [list(row) for row in rows]
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *body, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [style(line(headers), _BOLD), *(line(row) for row in body)]


def _opt(value: float | int | None, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _ago(age: float | None, never: str = "never") -> str:
    return never if age is None else f"{duration_text(age)} ago"


def _delay_text(delay: DelayReport | None) -> str:
    return "-" if delay is None else f"{duration_text(delay.mean_seconds)} ({delay.runs} runs)"


def _where(f: Finding) -> str:
    if f.work_pool and f.work_queue:
        return f"{f.work_pool}/{f.work_queue}"
    if f.work_queue:
        return f"no pool, queue {f.work_queue}"
    return f.work_pool or "workspace"


def render_table(diagnosis: Diagnosis, api_url: str, color: bool) -> str:
    """The human report: findings with their fix, then pools, queues and limits.

    ANSI colours only when `color` (stdout is a terminal and NO_COLOR is not set).
    """
    style = _Style(color)
    findings = diagnosis.findings
    count = "healthy" if diagnosis.healthy else f"{len(findings)} findings"
    if len(findings) == 1 and not diagnosis.healthy:
        count = "1 finding"
    lines = [
        f"Prefect at {api_url}, {_iso(diagnosis.observed_at)}: {style(count, _BOLD)}",
        "",
        style("FINDINGS, most likely first", _BOLD),
    ]
    for number, f in enumerate(findings, start=1):
        colour = _GREEN if f.cause is Cause.NONE else _RED if f.runs else _YELLOW
        held = f" · {runs_text(f.runs)} held" if f.runs else ""
        lines.append(f"{number:>2}. {style(str(f.cause), colour)} · {_where(f)}{held}")
        lines.append(f"    {f.summary}")
        if f.fix:
            lines.append(f"    fix: {style(f.fix, _BOLD)}")
    if not diagnosis.api.complete:
        lines += ["", "The API throttled every attempt: pools and queues could not be read."]
    if diagnosis.pools:
        lines += ["", style("WORK POOLS", _BOLD)]
        lines += _table(
            ["POOL", "TYPE", "STATUS", "IN FLIGHT", "LIMIT", "ONLINE WORKERS", "PICKUP", "START"],
            (
                [
                    p.name,
                    p.type,
                    p.status or "-",
                    str(p.in_flight),
                    _opt(p.concurrency_limit),
                    f"{p.online_workers} of {len(p.workers)}"
                    + (
                        f": {', '.join(w.name for w in p.workers if w.online)}"
                        if p.online_workers
                        else ""
                    ),
                    _delay_text(p.pickup),
                    _delay_text(p.start),
                ]
                for p in diagnosis.pools
            ),
            style,
        )
        lines += ["", style("WORK QUEUES", _BOLD)]
        lines += _table(
            [
                "POOL",
                "QUEUE",
                "STATUS",
                "DUE",
                "OLDEST DUE",
                "AWAITING SLOT",
                "PENDING",
                "RUNNING",
                "IN FLIGHT",
                "LIMIT",
                "LAST POLLED",
            ],
            (
                [
                    q.work_pool,
                    q.work_queue,
                    q.status or "-",
                    str(q.due),
                    "-" if q.oldest_due_age is None else duration_text(q.oldest_due_age),
                    str(q.awaiting_slot),
                    str(q.pending),
                    str(q.running),
                    str(q.in_flight),
                    _opt(q.concurrency_limit),
                    _ago(q.last_polled_age),
                ]
                for p in diagnosis.pools
                for q in p.queues
            ),
            style,
        )
    if diagnosis.limits:
        lines += ["", style("CONCURRENCY LIMITS", _BOLD)]
        lines += _table(
            ["LIMIT", "KIND", "SLOTS", "TAKEN", "LEAKED", "WAITING", "ENABLED"],
            (
                [
                    x.name,
                    x.kind,
                    str(x.slots),
                    str(x.active_slots),
                    _opt(x.leaked),
                    _opt(x.waiting),
                    "yes" if x.enabled else "no",
                ]
                for x in diagnosis.limits
            ),
            style,
        )
    orphans = diagnosis.runs_without_work_queue
    window = (
        f"delays from the flow-run events of the last {duration_text(diagnosis.latency_window)}"
        if diagnosis.latency_window
        else "no flow-run events read"
    )
    lines += [
        "",
        f"Runs without a work queue: {_opt(orphans)}. API: {diagnosis.api.requests} requests, "
        f"{diagnosis.api.throttled} answered 429; {window}.",
    ]
    return "\n".join(lines) + "\n"


def exit_code(diagnosis: Diagnosis) -> int:
    """0 when healthy, 1 when something holds runs back."""
    return EXIT_HEALTHY if diagnosis.healthy else EXIT_FINDINGS


async def run(
    reader: Reader,
    options: Options,
    api_url: str,
    out: TextIO,
    err: TextIO,
    color: bool,
) -> int:
    """Read, diagnose, print to `out`; problems to `err`. Returns the exit code."""
    progress = Progress(err, lambda: reader.api.requests_sent, reader.monotonic, sleep=reader.sleep)
    try:
        async with progress.running():
            snapshot, extras = await reader.read()
    except (PrefectApiError, TimeoutError) as exc:
        error = str(exc) or f"no complete read within {reader.settings.poll_timeout:g}s"
        err.write(f"diagnose: cannot read Prefect at {api_url}: {error}\n")
        return EXIT_ERROR
    if options.work_pools and extras.api.complete and not snapshot.pools:
        globs = " ".join(f"--work-pool {g}" for g in options.work_pools)
        err.write(f"diagnose: no work pool matches {globs}\n")
        return EXIT_ERROR
    diagnosis = diagnose(snapshot, extras, Thresholds(slow_start=options.slow_start))
    if options.json:
        out.write(json.dumps(to_json(diagnosis, api_url), indent=2) + "\n")
    else:
        out.write(render_table(diagnosis, api_url, color))
    return exit_code(diagnosis)
