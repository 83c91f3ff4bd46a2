"""Entry point: reads settings and environment, wires the parts together, runs until signalled."""

from __future__ import annotations

import os

# prefect-client, imported below through prefect_api, prints a telemetry notice on a terminal
# and creates ~/.prefect when it is imported. The exporter sends no telemetry and writes nothing
# under the user's home: DO_NOT_TRACK turns the first off, and a PREFECT_HOME that exists (this
# package's directory, which holds no Prefect files) the second.
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_HOME", os.path.dirname(os.path.abspath(__file__)))

import asyncio
import gc
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, disable_created_metrics
from structlog.typing import FilteringBoundLogger

from exporter import __version__, diagnose, logs
from exporter.budget import BudgetCollector, BudgetExhausted, RequestBudget
from exporter.clock import Deadline
from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.config import ConfigError, Settings, read_settings
from exporter.event_stream import EventStream, StreamMetrics
from exporter.exposition import Exposition, render
from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import USER_AGENT, ApiMetrics, Connection, PrefectHttp
from exporter.records import DeploymentSelector, PoolSelector
from exporter.server import App, MetricsServer
from exporter.server_info import ServerInfoReader
from exporter.snapshot import Snapshot
from exporter.statefile import StateFile, StateFileCollector, check_state_file
from exporter.store import Store
from exporter.webconfig import (
    ActiveWebConfig,
    WebConfigCollector,
    WebConfigError,
    WebConfigLoader,
    load_web_config,
)
from exporter.worklog import (
    PositionStore,
    WorkerLog,
    WorkerLogMetrics,
    WorkerLogTailer,
    check_worker_log,
)


def render_snapshot(snapshot: Snapshot) -> Exposition:
    return render(SnapshotCollector(snapshot))


def build_poller(
    settings: Settings,
    store: Store[Exposition],
    registry: CollectorRegistry,
    log: FilteringBoundLogger,
    cursor_file: StateFile | None,
    event_stream: EventStream | None = None,
) -> tuple[Poller, PrefectApi]:
    budget = RequestBudget(settings.requests_per_minute)
    registry.register(BudgetCollector(budget))
    api = PrefectApi(
        PrefectHttp(
            Connection(
                api_url=settings.api_url,
                api_key=settings.api_key,
                auth_string=settings.auth_string,
                request_timeout=settings.request_timeout,
            ),
            ApiMetrics(registry),
            budget,
        )
    )
    poller = Poller(
        api,
        store,
        PollSettings(
            interval=settings.poll_interval,
            timeout=settings.poll_timeout,
            concurrency=settings.poll_concurrency,
            heartbeat_multiple=settings.heartbeat_multiple,
            events_enabled=settings.events_enabled,
            events_max_pages=settings.events_max_pages,
            events_settle=settings.events_settle,
            deployments_breakdown=settings.deployments_breakdown,
            mode=settings.poll_mode,
            max_backoff=settings.max_backoff,
            pools=PoolSelector(settings.work_pools_include, settings.work_pools_exclude),
            deployments=DeploymentSelector(
                settings.deployments_include, settings.deployments_exclude, settings.deployments_max
            ),
        ),
        PollMetrics(registry),
        log,
        budget=budget,
        cursor_file=cursor_file,
        orphans=api,
        event_stream=event_stream,
        deployments_api=api,
        server_info=ServerInfoReader(api, time.monotonic),
    )
    return poller, api


def build_event_stream(
    settings: Settings, registry: CollectorRegistry, log: FilteringBoundLogger
) -> EventStream | None:
    """Prefect's event stream, when events are read and the stream is not switched off."""
    if not (settings.prefect_enabled and settings.events_enabled and settings.events_stream):
        return None
    return EventStream(
        settings.api_url,
        settings.api_key,
        settings.auth_string,
        StreamMetrics(registry),
        log,
        USER_AGENT,
    )


def stream_gate(poller: Poller, budget: RequestBudget | None) -> Callable[[], Awaitable[None]]:
    """What the event stream awaits before connecting: no throttling, and a budgeted request."""

    async def ready() -> None:
        while (left := poller.throttled_until - time.monotonic()) > 0:
            await asyncio.sleep(left)
        while budget is not None:
            try:
                await budget.acquire(Deadline(time.monotonic() + 60))
                return
            except BudgetExhausted:
                continue

    return ready


def build_tailer(
    settings: Settings,
    registry: CollectorRegistry,
    log: FilteringBoundLogger,
    positions_file: StateFile | None,
) -> WorkerLogTailer:
    return WorkerLogTailer(
        [WorkerLog(worker, Path(path)) for worker, path in settings.worker_logs],
        WorkerLogMetrics(registry),
        PositionStore(positions_file),
        log,
    )


def state_files(
    settings: Settings, log: FilteringBoundLogger
) -> tuple[StateFile | None, StateFile | None]:
    """The events cursor file and the worker-log positions file, where configured and used."""
    cursor = settings.events_state_file
    positions = settings.worker_log_state_file
    events_used = settings.prefect_enabled and settings.events_enabled
    return (
        StateFile(Path(cursor), "events", log) if cursor and events_used else None,
        StateFile(Path(positions), "worker_log", log)
        if positions and settings.worker_logs
        else None,
    )


def startup_problems(settings: Settings) -> list[str]:
    """Files named in the settings that cannot be used, one sentence each naming the flag.

    Checked once at start-up so that a typo or a read-only volume is an exit 2 with a clear
    message, not a silent gap; what goes wrong later is reported by metrics and logs.
    """
    events_used = settings.prefect_enabled and settings.events_enabled
    checks: list[tuple[str, str | None]] = [
        ("--events.state-file", check_state_file(settings.events_state_file))
        if settings.events_state_file and events_used
        else ("", None),
        ("--worker-log.state-file", check_state_file(settings.worker_log_state_file))
        if settings.worker_log_state_file and settings.worker_logs
        else ("", None),
        *((f"--worker-log {w}={p}", check_worker_log(p)) for w, p in settings.worker_logs),
    ]
    problems = [f"{where}: {problem}" for where, problem in checks if problem]
    return problems


def open_web_config(settings: Settings) -> tuple[ActiveWebConfig | None, list[str]]:
    """The web config (`--web.config.file`) loaded with its certificates, or its problems.

    (None, []) without the option; (None, problems) when it cannot be used, each problem naming
    the flag, the file and the key.
    """
    if not settings.web_config_file:
        return None, []
    where = f"--web.config.file {settings.web_config_file}"
    try:
        return load_web_config(Path(settings.web_config_file)), []
    except WebConfigError as exc:
        return None, [f"{where}: {problem}" for problem in exc.problems]


# The GIL switch interval while serving (seconds; CPython's default is 0.005).
SWITCH_INTERVAL_SECONDS = 0.001


def tune_for_scrapes() -> None:
    """Keep `/metrics` answers fast while a poll parses JSON on the other thread.

    The HTTP server runs on its own thread but shares the GIL with the poller. Two stalls made
    the tail: full collections of the cyclic garbage collector walking every object made at
    start-up (about 110,000, mostly prefect-client's and pydantic's modules and classes), and
    the 5 ms GIL switch interval. Both are process-wide, so this runs once, after start-up and
    before serving: the start-up objects are frozen out of the collector (`gc.freeze`; objects
    made later are collected as before) and the switch interval drops to 1 ms.

    Measured with `bench.scrape_load --serve --busy-poller` (1,000 queues, about 25,000 series,
    a thread parsing flow-run pages without pause, wrk on one connection): p99 60-73 ms untuned,
    10-16 ms tuned; gzipped, as Prometheus asks, 58 ms and 9 ms (docs/benchmarks.md). The price:
    under that contention the median answer takes a few ms longer, and the poll hands the GIL
    over more often.
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)


async def serve(
    settings: Settings, log: FilteringBoundLogger, web_config: ActiveWebConfig | None = None
) -> int:
    """Run the poller, the worker-log tailer and the HTTP server until SIGTERM or SIGINT.

    `web_config` is the web config loaded at start-up (see `open_web_config`); it is re-read
    from `settings.web_config_file` when its files change.
    """
    # `_created` series double the counters' size and no alert or dashboard reads them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    store: Store[Exposition] = Store(render_snapshot, settings.max_staleness)
    cursor_file, positions_file = state_files(settings, log)
    registry.register(StateFileCollector([f for f in (cursor_file, positions_file) if f]))
    poller, api, stream = None, None, None
    if settings.prefect_enabled:
        registry.register(ExporterCollector(store.status))
        stream = build_event_stream(settings, registry, log)
        poller, api = build_poller(settings, store, registry, log, cursor_file, stream)
    tailer = build_tailer(settings, registry, log, positions_file) if settings.worker_logs else None
    app = App(
        store,
        registry,
        settings.telemetry_path,
        # Healthy while the loop turns: one interval plus a whole poll, with room for one miss.
        health_window=2 * (settings.poll_interval + settings.poll_timeout)
        if settings.prefect_enabled
        else None,
        api_url=settings.api_url if settings.prefect_enabled else "(not polled: sidecar only)",
        monotonic=time.monotonic,
        started_at=time.monotonic(),
    )
    web = None
    if web_config is not None and settings.web_config_file:
        # The loader starts from the fingerprint the load took before reading the files, so a
        # change made since (during start-up) is picked up.
        web = WebConfigLoader(Path(settings.web_config_file), web_config, log=log)
        registry.register(WebConfigCollector(web))
        for warning in web_config.config.warnings:
            log.warning("web_config_warning", path=settings.web_config_file, warning=warning)
    try:
        server = MetricsServer(settings.listen_host, settings.listen_port, app, log=log, web=web)
    except OSError as exc:
        log.error(
            "listen_failed",
            address=f"{settings.listen_host}:{settings.listen_port}",
            error=exc.strerror or str(exc),
        )
        if api is not None:
            await api.aclose()
        return 1
    tune_for_scrapes()
    server.start()
    log.info(
        "exporter_started",
        version=__version__,
        listen=f"{settings.listen_host or '0.0.0.0'}:{server.port}",
        telemetry_path=settings.telemetry_path,
        tls=web_config is not None and web_config.ssl_context is not None,
        basic_auth=web_config is not None and web_config.auth is not None,
        api_url=settings.api_url if settings.prefect_enabled else None,
        poll_interval_seconds=settings.poll_interval,
        requests_per_minute=settings.requests_per_minute,
        worker_logs=len(settings.worker_logs),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    tasks = [poller.run(stop)] if poller else []
    if poller is not None and stream is not None:
        tasks.append(stream.run(stop, stream_gate(poller, poller.budget)))
    tasks += [tailer.run(stop)] if tailer else []
    try:
        await asyncio.gather(*tasks)
    finally:
        server.stop()
        if api is not None:
            await api.aclose()
        log.info("exporter_stopped")
    return 0


def run_diagnose(argv: Sequence[str]) -> int:
    """`prefect-exporter diagnose ...`: one read, the findings; exit 0 healthy, 1 findings, 2 on
    a configuration problem or an unreachable API. `argv` follows the word `diagnose`.
    """
    options, rest, problems = diagnose.split_arguments(argv)
    if options.help:
        sys.stdout.write(diagnose.USAGE)
        return 0
    try:
        settings, warnings = read_settings(rest, os.environ)
    except ConfigError as exc:
        logs.report_problems("config_invalid", [*problems, *exc.problems], "console")
        return 2
    if not settings.prefect_enabled:
        problems.append("--no-prefect.enabled: diagnose reads the Prefect API")
    if problems:
        logs.report_problems("config_invalid", problems, "console")
        return 2
    events = settings.events_enabled
    settings = diagnose.settings_for(settings, options)
    # Only what goes wrong reaches stderr: the report is the output.
    level = settings.log_level if settings.log_level != "info" else "warning"
    log = logs.configure(level, settings.log_format)
    for warning in warnings:
        log.warning("config_warning", problem=warning)
    registry = CollectorRegistry()
    poller, api = build_poller(
        settings, Store(render_snapshot, settings.max_staleness), registry, log, None
    )
    reader = diagnose.Reader(
        poller,
        api,
        registry,
        settings,
        PoolSelector(settings.work_pools_include, settings.work_pools_exclude),
        events=events,
    )
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")

    async def read_and_close() -> int:
        try:
            return await diagnose.run(
                reader, options, settings.api_url, sys.stdout, sys.stderr, color
            )
        finally:
            await api.aclose()

    return asyncio.run(read_and_close())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter until SIGTERM or SIGINT; the exit code (2: invalid configuration).

    `argv` excludes the program name (default: sys.argv[1:]). A first word `diagnose` runs
    the diagnosis instead (see run_diagnose).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "diagnose":
        return run_diagnose(argv[1:])
    try:
        settings, warnings = read_settings(argv, os.environ)
    except ConfigError as exc:
        # In the format asked for when that part was valid: JSON lines for a log shipper.
        logs.report_problems("config_invalid", exc.problems, exc.log_format or "console")
        return 2
    web_config, web_problems = open_web_config(settings)
    if problems := [*startup_problems(settings), *web_problems]:
        logs.report_problems("config_invalid", problems, settings.log_format)
        return 2
    log = logs.configure(settings.log_level, settings.log_format)
    for warning in warnings:
        log.warning("config_warning", problem=warning)
    if settings.prefect_enabled and settings.api_url_from_default:
        log.warning(
            "api_url_not_configured",
            api_url=settings.api_url,
            hint="set PREFECT_API_URL or --prefect.api-url; using Prefect's default local address",
        )
    return asyncio.run(serve(settings, log, web_config))
