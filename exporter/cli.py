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
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, disable_created_metrics
from structlog.typing import FilteringBoundLogger

from exporter import __version__, logs
from exporter.budget import BudgetCollector, RequestBudget
from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.config import ConfigError, Settings, read_settings
from exporter.exposition import Exposition, render
from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import ApiMetrics, Connection, PrefectHttp
from exporter.server import App, MetricsServer
from exporter.snapshot import Snapshot
from exporter.statefile import StateFile
from exporter.store import Store
from exporter.worklog import PositionStore, WorkerLog, WorkerLogMetrics, WorkerLogTailer


def render_snapshot(snapshot: Snapshot) -> Exposition:
    return render(SnapshotCollector(snapshot))


def build_poller(
    settings: Settings,
    store: Store[Exposition],
    registry: CollectorRegistry,
    log: FilteringBoundLogger,
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
            events_state_file=(
                Path(settings.events_state_file) if settings.events_state_file else None
            ),
            deployments_breakdown=settings.deployments_breakdown,
        ),
        PollMetrics(registry),
        log,
        budget=budget,
    )
    return poller, api


def build_tailer(
    settings: Settings, registry: CollectorRegistry, log: FilteringBoundLogger
) -> WorkerLogTailer:
    state = settings.worker_log_state_file
    return WorkerLogTailer(
        [WorkerLog(worker, Path(path)) for worker, path in settings.worker_logs],
        WorkerLogMetrics(registry),
        PositionStore(StateFile(Path(state), "worker_log", log) if state else None),
        log,
    )


async def serve(settings: Settings, log: FilteringBoundLogger) -> int:
    """Run the poller, the worker-log tailer and the HTTP server until SIGTERM or SIGINT."""
    # `_created` series double the counters' size and no alert or dashboard reads them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    store: Store[Exposition] = Store(render_snapshot, settings.max_staleness)
    poller, api = None, None
    if settings.prefect_enabled:
        registry.register(ExporterCollector(store.status))
        poller, api = build_poller(settings, store, registry, log)
    tailer = build_tailer(settings, registry, log) if settings.worker_logs else None
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
    try:
        server = MetricsServer(settings.listen_host, settings.listen_port, app)
    except OSError as exc:
        log.error(
            "listen_failed",
            address=f"{settings.listen_host}:{settings.listen_port}",
            error=exc.strerror or str(exc),
        )
        if api is not None:
            await api.aclose()
        return 1
    server.start()
    log.info(
        "exporter_started",
        version=__version__,
        listen=f"{settings.listen_host or '0.0.0.0'}:{server.port}",
        telemetry_path=settings.telemetry_path,
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
    tasks += [tailer.run(stop)] if tailer else []
    try:
        await asyncio.gather(*tasks)
    finally:
        server.stop()
        if api is not None:
            await api.aclose()
        log.info("exporter_stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the exporter until SIGTERM or SIGINT; the exit code (2: invalid configuration).

    `argv` excludes the program name (default: sys.argv[1:]).
    """
    try:
        settings, warnings = read_settings(sys.argv[1:] if argv is None else argv, os.environ)
    except ConfigError as exc:
        # In the format asked for when that part was valid: JSON lines for a log shipper.
        logs.report_problems("config_invalid", exc.problems, exc.log_format or "console")
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
    return asyncio.run(serve(settings, log))
