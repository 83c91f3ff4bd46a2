"""Draws the dashboards from real Prometheus data with matplotlib: the README's pictures.

    python grafana/render.py                      # about 8 minutes; writes docs/images/*.png
    python grafana/render.py --minutes 3 --out /tmp/pictures --save-data /tmp/series.json
    python grafana/render.py --from-data /tmp/series.json   # redraw those series in seconds

Grafana cannot be installed here, so these are not Grafana screenshots. The script starts a real
Prefect server (demo/stack.py), process workers (one behind the tests' fault proxy, which answers
some of its requests with 429, and followed by the exporter in sidecar mode), deployments whose
runs complete, fail, wait for a deployment or tag slot or sit in a queue nobody polls, the
exporter, and a Prometheus that scrapes it and evaluates the shipped alert rules. After a few
minutes it runs every panel's query (variables at "All") over the window through Prometheus's
HTTP API and draws each dashboard's panels where grafana/generate.py places them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from demo.stack import (  # noqa: E402 (the repository root must be importable first)
    ExporterProcess,
    PrefectAdmin,
    PrefectServer,
    Prometheus,
    Worker,
    past,
    wait_for,
)
from tests.faultproxy import EveryNth, Fault, FaultProxy  # noqa: E402
from tests.scripts import load_script  # noqa: E402

GRAFANA = ROOT / "grafana"
SCRAPE_SECONDS = 5
STEP_SECONDS = 5
# Grafana computes $__rate_interval from the scrape interval and the step; a fixed minute keeps
# rates smooth at this scrape interval and is what the image says it used.
RATE_INTERVAL = "1m"
NOTE = (
    "Drawn by grafana/render.py with matplotlib from real Prometheus data (a real Prefect server, "
    "process workers, runs and prefect-exporter; {minutes:g} minutes, variables at All, "
    f"$__rate_interval = {RATE_INTERVAL}, times in UTC). Not a Grafana screenshot."
)
PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
]


# -- the stack ---------------------------------------------------------------------------------


@dataclass
class Stack:
    admin: PrefectAdmin
    prometheus_api: str
    flowing: str
    flaky: str
    limited: str
    tagged: str
    doomed: Worker


def prometheus_config(tmp: Path, exporter: ExporterProcess) -> Path:
    """Shipped alert rules with short thresholds and `for`, so alerts fire within minutes."""
    rules = tmp / "rules.yml"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "alerts" / "generate.py"),
            "--out",
            str(rules),
            "--set",
            "backlog_age_seconds=60",
            "--set",
            "queue_poll_age_seconds=60",
            "--for",
            "30s",
        ],
        check=True,
        timeout=60,
    )
    config = tmp / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": f"{SCRAPE_SECONDS}s",
                    "evaluation_interval": f"{SCRAPE_SECONDS}s",
                },
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "prefect-exporter",
                        "static_configs": [{"targets": [exporter.url.removeprefix("http://")]}],
                    }
                ],
            }
        )
    )
    return config


def seed(admin: PrefectAdmin) -> dict[str, str]:
    """Pools, queues, limits and deployments: some flowing, some held back, one forgotten."""
    admin.create_pool("etl", concurrency_limit=4)
    admin.create_queue("etl", "critical", priority=1, concurrency_limit=2)
    admin.create_queue("etl", "nobody-polls")
    admin.create_pool("ml")
    admin.create_pool("paused", paused=True)
    admin.create_tag_limit("demo-tag", 1)
    admin.create_global_limit("warehouse", 5)
    deployments = {
        "flowing": admin.create_deployment("nightly-load", "etl", "critical"),
        "flaky": admin.create_deployment("flaky-report", "etl", "default"),
        "limited": admin.create_deployment("limited-sync", "etl", "default", concurrency_limit=1),
        "tagged": admin.create_deployment("tagged-export", "ml", "default", flow="tagged"),
        "forgotten": admin.create_deployment("forgotten", "etl", "nobody-polls"),
        "paused": admin.create_deployment("paused-runs", "paused", "default"),
    }
    admin.create_runs(deployments["forgotten"], 8, scheduled=past(240))
    admin.create_runs(deployments["paused"], 3, scheduled=past(120))
    return deployments


def feed(stack: Stack, rng: random.Random) -> None:
    """One round of new work: short runs, a failing one now and then, bursts behind limits."""
    stack.admin.create_runs(stack.flowing, 1, parameters={"seconds": rng.uniform(1, 8)})
    if rng.random() < 0.12:
        # A parameter the flow cannot take: Prefect fails the run when it validates it.
        stack.admin.create_runs(stack.flaky, 1, parameters={"seconds": "not-a-number"})
    elif rng.random() < 0.4:
        stack.admin.create_runs(stack.flaky, 1, parameters={"seconds": 2})
    if rng.random() < 0.35:
        stack.admin.create_runs(stack.limited, 2, parameters={"seconds": 15})
    if rng.random() < 0.3:
        stack.admin.create_runs(stack.tagged, 1, parameters={"seconds": 12})


def run_stack(tmp: Path, minutes: float, exits: ExitStack) -> tuple[str, float, float]:
    """Starts everything, feeds it for `minutes`; returns Prometheus's API URL and the window."""
    server = PrefectServer(tmp / "prefect")
    exits.callback(server.stop)
    print("render: starting the Prefect server", flush=True)
    server.start()
    admin = PrefectAdmin(server.api_url)
    exits.callback(admin.close)
    deployments = seed(admin)
    storm = EveryNth("worker", n=8, limit=1000, fault=Fault(429, {"Retry-After": "1"}))
    proxy = FaultProxy(server.api_url.removesuffix("/api"), storm)
    proxy.start()
    exits.callback(proxy.stop)
    workers = [
        Worker(server, "etl", "etl-1", queues=["critical", "default"], heartbeat_seconds=10),
        Worker(server, "etl", "etl-2", queues=["default"], heartbeat_seconds=10),
        Worker(
            server,
            "ml",
            "ml-throttled",
            heartbeat_seconds=10,
            api_url=proxy.url + "/api",
            extra_env={
                # The README's sidecar set-up: the worker logs its responses and retries.
                "PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL": "DEBUG",
                "PREFECT_LOGGING_ROOT_LEVEL": "INFO",
            },
        ),
    ]
    workers[2].log_path.write_text("")
    exporter = ExporterProcess(
        server.api_url,
        "--poll.interval=5s",
        # Enough for a poll every 5 s of this small workspace (the default suits 30 s).
        "--prefect.requests-per-minute=1200",
        "--deployments.breakdown",
        f"--worker-log=ml-throttled={workers[2].log_path}",
        log_path=tmp / "exporter.log",
    )
    exits.callback(exporter.stop)
    exporter.start()
    for worker in workers:
        exits.callback(worker.stop)
        worker.start()
    prometheus = Prometheus(prometheus_config(tmp, exporter), tmp / "tsdb")
    exits.callback(prometheus.stop)
    prometheus.start()
    api = prometheus.api
    wait_for(
        lambda: httpx.get(f"{api}/query", params={"query": "up"}).json()["data"]["result"],
        60,
        "Prometheus to scrape the exporter",
    )
    stack = Stack(
        admin,
        api,
        deployments["flowing"],
        deployments["flaky"],
        deployments["limited"],
        deployments["tagged"],
        workers[1],
    )
    start = time.time()
    end = start + minutes * 60
    rng = random.Random(14)
    killed = False
    print(f"render: feeding runs for {minutes:g} minutes", flush=True)
    while time.time() < end:
        feed(stack, rng)
        if not killed and time.time() > start + minutes * 60 * 0.55:
            # A worker vanishing without a goodbye, as a crashed node does.
            stack.doomed.kill()
            killed = True
        time.sleep(8)
    # Events are counted once they are --events.settle (30 s) old; let the last ones land.
    time.sleep(35)
    return api, start, time.time()


# -- querying ----------------------------------------------------------------------------------


def concrete(expr: str) -> str:
    """A query as Grafana sends it with every variable at "All"."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    return re.sub(r"\$(job|shard|work_pool|work_queue|deployment)\b", ".*", expr)


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


@dataclass
class Series:
    name: str
    labels: dict[str, str]
    times: list[float]
    values: list[float]


def query_range(api: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{api}/query_range",
        params={"query": concrete(expr), "start": start, "end": end, "step": STEP_SECONDS},
        timeout=30,
    ).json()
    if answer.get("status") != "success":
        raise RuntimeError(f"{expr}: {answer.get('error')}")
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def fetch(api: str, panel: dict[str, Any], start: float, end: float) -> list[Series]:
    found = []
    for target in panel["targets"]:
        for row in query_range(api, target["expr"], start, end):
            points = [(float(t), float(v)) for t, v in row["values"]]
            found.append(
                Series(
                    legend(target["legendFormat"], row["metric"]),
                    row["metric"],
                    [t for t, _ in points],
                    [v for _, v in points],
                )
            )
    return found


def firing(api: str, expr: str, start: float, end: float) -> list[tuple[float, float, str]]:
    """Intervals (start, end, alertname) during which the annotation query had a value."""
    spans = []
    for row in query_range(api, expr, start, end):
        times = [float(t) for t, _ in row["values"]]
        begin = previous = times[0]
        for t in times[1:]:
            if t - previous > STEP_SECONDS * 1.5:
                spans.append((begin, previous, row["metric"]["alertname"]))
                begin = t
            previous = t
        spans.append((begin, previous, row["metric"]["alertname"]))
    return spans


# -- drawing -----------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 1:
        return f"{sign}{s * 1000:.0f}ms" if s else "0"
    for size, suffix in ((86400, "d"), (3600, "h"), (60, "m")):
        if s >= size:
            return f"{sign}{s / size:.3g}{suffix}"
    return f"{sign}{s:.3g}s"


def formatted(value: float, unit: str) -> str:
    """A value as Grafana's unit would show it (the units these dashboards use)."""
    if math.isnan(value):
        return "NaN"
    if unit == "s":
        return duration(value)
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit == "bool_yes_no":
        return "yes" if value else "no"
    if unit == "bool_on_off":
        return "on" if value else "off"
    suffix = {"reqps": " req/s", "ops": "/s"}.get(unit, "")
    return f"{value:.3g}{suffix}"


def per_bucket(series: list[Series]) -> tuple[list[float], list[str], list[list[float]]]:
    """Cumulative `le` buckets to counts per bucket: (times, bucket labels, rows per bucket)."""
    ordered = sorted(series, key=lambda s: float(s.labels["le"]))
    times = sorted({t for s in ordered for t in s.times})
    grid = [[dict(zip(s.times, s.values, strict=True)).get(t, 0.0) for t in times] for s in ordered]
    rows = [grid[0]] + [
        [max(0.0, hi - lo) for hi, lo in zip(grid[i], grid[i - 1], strict=True)]
        for i in range(1, len(grid))
    ]
    labels = [s.labels["le"] for s in ordered]
    return times, labels, rows


def nice_step(top: float, unit: str) -> float | None:
    """A tick step giving at most six ticks up to `top`, in round units of time for seconds."""
    if unit != "s" or top <= 0 or math.isnan(top):
        return None
    steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400]
    return next((step for step in steps if top / step <= 6), 86400.0 * math.ceil(top / 518400))


def onsets(spans: list[tuple[float, float, str]]) -> list[tuple[float, str]]:
    """When each alert first started firing (later re-firings of the same alert left out)."""
    first: dict[str, float] = {}
    for begin, _, name in spans:
        first[name] = min(begin, first.get(name, begin))
    return sorted((begin, name) for name, begin in first.items())


class Painter:
    """Draws one dashboard's panels at their grid positions, in Grafana's dark colours."""

    UNIT_HEIGHT = 0.36  # inches per grid row
    WIDTH = 20.0  # inches for 24 grid columns
    HEADER = 1.2  # inches for the title and the notes

    def __init__(self, dashboard: dict[str, Any], spans: list[tuple[float, float, str]]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.dashboard = dashboard
        self.spans = spans
        rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
        self.height = rows * self.UNIT_HEIGHT + self.HEADER + 0.3
        self.fig = plt.figure(figsize=(self.WIDTH, self.height), dpi=80, facecolor="#111217")

    def header(self, minutes: float) -> None:
        fig, height = self.fig, self.height
        fig.text(
            0.01, 1 - 0.3 / height, self.dashboard["title"], color="white", fontsize=18, va="top"
        )
        fig.text(
            0.01,
            1 - 0.68 / height,
            NOTE.format(minutes=minutes),
            color="#f5b73b",
            fontsize=10,
            va="top",
        )
        started = onsets(self.spans)
        if started:
            names = ", ".join(
                f"{name} {datetime.fromtimestamp(t, UTC):%H:%M:%S}" for t, name in started[:8]
            )
            more = f" and {len(started) - 8} more" if len(started) > 8 else ""
            text = textwrap.fill(
                f"Dotted red lines: alerts starting to fire (ALERTS annotations): {names}{more}.",
                width=230,
            )
            fig.text(0.01, 1 - 0.88 / height, text, color="#ff7383", fontsize=9, va="top")

    def axes(self, panel: dict[str, Any], legend_rows: int = 0) -> Any:
        g = panel["gridPos"]
        inch_w, inch_h = 1 / self.WIDTH, 1 / self.height
        left = g["x"] / 24
        top = 1 - (self.HEADER + g["y"] * self.UNIT_HEIGHT) * inch_h
        h = g["h"] * self.UNIT_HEIGHT * inch_h
        w = g["w"] / 24
        if panel["type"] == "row":
            self.fig.text(
                left + 0.005,
                top - h / 2,
                panel["title"],
                color="white",
                fontsize=13,
                va="center",
                weight="bold",
            )
            return None
        pad_left = {"state-timeline": 2.1, "bargauge": 2.3, "stat": 0.15, "table": 0.15}.get(
            panel["type"], 0.75
        )
        pad_bottom = 0.32 + 0.19 * legend_rows
        ax = self.fig.add_axes(
            (
                left + pad_left * inch_w,
                top - h + pad_bottom * inch_h,
                w - (pad_left + 0.15) * inch_w,
                h - (pad_bottom + 0.38) * inch_h,
            )
        )
        ax.set_facecolor("#181b1f")
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.tick_params(colors="#c7d0d9", labelsize=8)
        ax.set_title(panel["title"], color="white", fontsize=11, loc="left", pad=5)
        return ax

    def time_axis(self, ax: Any) -> None:
        import matplotlib.dates as mdates

        # matplotlib.dates is untyped.
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=3, maxticks=7))  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))  # type: ignore[no-untyped-call]

    def message(self, ax: Any, text: str) -> None:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(
            0.5,
            0.5,
            text,
            color="#8e8e8e",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=10,
        )

    def draw(self, panel: dict[str, Any], series: list[Series] | None, pending: bool) -> None:
        if panel["type"] == "row":
            self.axes(panel)
            return
        if panel["type"] == "timeseries" and series:
            # Series without a single value (a pool with no runs yet) would only crowd the legend.
            series = [s for s in series if any(not math.isnan(v) for v in s.values)]
        if pending or not series:
            ax = self.axes({**panel, "type": "stat"})
            self.message(
                ax,
                "No data yet: this exporter version does not serve\n"
                "the deployment health series (pending, see README)"
                if pending
                else "No data",
            )
            return
        unit = panel["fieldConfig"]["defaults"]["unit"]
        kind = panel["type"]
        if kind == "timeseries":
            self.timeseries(panel, series, unit)
            return
        ax = self.axes(panel)
        getattr(self, kind.replace("-", "_"))(ax, panel, series, unit)

    def timeseries(self, panel: dict[str, Any], series: list[Series], unit: str) -> None:
        from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator

        columns = max(1, int(panel["gridPos"]["w"] / 24 * self.WIDTH / 2.3))
        ax = self.axes(panel, legend_rows=math.ceil(len(series) / columns))
        top = 0.0
        for i, s in enumerate(series):
            dashed = s.name.startswith(("offline after", "limit ", "slots "))
            ax.plot(
                [datetime.fromtimestamp(t, UTC) for t in s.times],
                s.values,
                color=PALETTE[i % len(PALETTE)],
                linewidth=1.5,
                linestyle="--" if dashed else "-",
                label=s.name,
            )
            finite = [v for v in s.values if not math.isnan(v)]
            top = max([top, *finite])
        defaults = panel["fieldConfig"]["defaults"]
        if defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode") == "line":
            for step in defaults["thresholds"]["steps"][1:]:
                ax.axhline(step["value"], color=step["color"], linestyle=":", linewidth=1.2)
                top = max(top, step["value"])
        if "min" in defaults:
            ax.set_ylim(bottom=defaults["min"])
        if (step := nice_step(top, unit)) is not None:
            ax.yaxis.set_major_locator(MultipleLocator(step))
        elif defaults.get("decimals") == 0:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: formatted(v, u)))
        self.time_axis(ax)
        ax.grid(color="#2c3235", linewidth=0.5)
        # Below the time axis, a fixed distance whatever the panel's height (as Grafana's).
        axes_inches = ax.get_position().height * self.height
        ax.legend(
            loc="upper left",
            bbox_to_anchor=(0, -0.3 / axes_inches),
            ncol=columns,
            fontsize=8,
            frameon=False,
            labelcolor="#c7d0d9",
            handlelength=1.5,
            borderaxespad=0,
        )
        for begin, _ in onsets(self.spans):
            ax.axvline(
                datetime.fromtimestamp(begin, UTC),
                color="#e02f44",
                linestyle=":",
                linewidth=1,
                alpha=0.8,
            )

    def stat(self, ax: Any, panel: dict[str, Any], series: list[Series], unit: str) -> None:
        last = next((v for v in reversed(series[0].values) if not math.isnan(v)), math.nan)
        ax.fill_between(
            [datetime.fromtimestamp(t, UTC) for t in series[0].times],
            series[0].values,
            color="#2f6f3e",
            alpha=0.6,
        )
        ax.text(
            0.5,
            0.5,
            formatted(last, unit),
            color="#73bf69",
            fontsize=26,
            ha="center",
            va="center",
            transform=ax.transAxes,
            weight="bold",
        )
        ax.set_xticks([])
        ax.set_yticks([])

    def heatmap(self, ax: Any, panel: dict[str, Any], series: list[Series], unit: str) -> None:
        import numpy
        from matplotlib import colormaps
        from matplotlib.colors import ListedColormap

        times, labels, counts = per_bucket(series)
        # Empty cells stay the panel's dark background, as in Grafana.
        cells = numpy.ma.masked_equal(numpy.array(counts), 0.0)
        shown = ax.pcolormesh(
            [datetime.fromtimestamp(t, UTC) for t in times],
            range(len(labels)),
            cells,
            # Oranges without its white end: a single run must show on the dark background.
            cmap=ListedColormap(colormaps["Oranges"](numpy.linspace(0.3, 1.0, 128))),
            shading="nearest",
        )
        ticks = list(range(0, len(labels), max(1, len(labels) // 8)))
        ax.set_yticks(ticks)
        ax.set_yticklabels(
            ["+Inf" if labels[i] == "+Inf" else "≤ " + duration(float(labels[i])) for i in ticks]
        )
        self.time_axis(ax)
        bar = self.fig.colorbar(shown, ax=ax, pad=0.01, fraction=0.03)
        bar.ax.tick_params(colors="#c7d0d9", labelsize=7)
        ax.text(
            1.0,
            1.02,
            "colour: runs per rate interval in the bucket",
            color="#c7d0d9",
            fontsize=8,
            ha="right",
            transform=ax.transAxes,
        )

    def state_timeline(
        self, ax: Any, panel: dict[str, Any], series: list[Series], unit: str
    ) -> None:
        import matplotlib.dates as mdates

        width = STEP_SECONDS / 86400  # one step, in matplotlib's days
        for i, s in enumerate(series):
            for t, v in zip(s.times, s.values, strict=True):
                ax.barh(
                    i,
                    width,
                    left=mdates.date2num(datetime.fromtimestamp(t, UTC)),  # type: ignore[no-untyped-call]
                    color="#56a64b" if v >= 1 else "#e02f44",
                    height=0.7,
                )
        ax.set_yticks(range(len(series)))
        ax.set_yticklabels([s.name for s in series], fontsize=8)
        ax.xaxis_date()
        self.time_axis(ax)
        mappings = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
        ax.text(
            1.0,
            1.02,
            f"green: {mappings['1']['text']}   red: {mappings['0']['text']}",
            color="#c7d0d9",
            fontsize=8,
            ha="right",
            transform=ax.transAxes,
        )

    def table(self, ax: Any, panel: dict[str, Any], series: list[Series], unit: str) -> None:
        columns = [t["legendFormat"] for t in panel["targets"]]
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for s in series:
            key = (s.labels.get("limit", ""), s.labels.get("kind", ""))
            rows.setdefault(key, {})[s.name] = formatted(s.values[-1], unit)
        ax.axis("off")
        cells = [[k[0], k[1], *(v.get(c, "-") for c in columns)] for k, v in sorted(rows.items())]
        shown = ax.table(
            cellText=cells,
            colLabels=["limit", "kind", *columns],
            loc="upper center",
            cellLoc="left",
            colWidths=[0.4, 0.14, *[0.46 / len(columns)] * len(columns)],
        )
        shown.auto_set_font_size(False)
        shown.set_fontsize(9)
        shown.scale(1, 1.4)
        for cell in shown.get_celld().values():
            cell.set_facecolor("#181b1f")
            cell.set_edgecolor("#2c3235")
            cell.get_text().set_color("#c7d0d9")

    def bargauge(self, ax: Any, panel: dict[str, Any], series: list[Series], unit: str) -> None:
        from matplotlib.ticker import FuncFormatter

        values = [next((v for v in reversed(s.values) if not math.isnan(v)), 0.0) for s in series]
        colors = ["#e02f44" if v >= 1 else "#ff9830" if v >= 0.8 else "#73bf69" for v in values]
        ax.barh(range(len(values)), values, color=colors, height=0.6)
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels([s.name for s in series], fontsize=8)
        ax.set_xlim(0, max(1.0, *values) * 1.15)
        for i, v in enumerate(values):
            ax.text(v, i, " " + formatted(v, unit), color="white", va="center", fontsize=9)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _, u=unit: formatted(v, u)))

    def save(self, out: Path) -> None:
        self.fig.savefig(out, facecolor=self.fig.get_facecolor())
        self.plt.close(self.fig)


def draw_dashboard(
    dashboard: dict[str, Any],
    data: Mapping[int, list[Series] | None],
    spans: list[tuple[float, float, str]],
    pending: set[int],
    minutes: float,
    out: Path,
) -> None:
    """One PNG of the dashboard: each panel's series drawn at its grid position."""
    painter = Painter(dashboard, spans)
    painter.header(minutes)
    for panel in dashboard["panels"]:
        painter.draw(panel, data.get(panel["id"]), panel["id"] in pending)
    painter.save(out)


def collect(
    generator: Any, api: str, start: float, end: float, waiting: set[str]
) -> dict[str, Any]:
    """Every panel's series and every dashboard's alert onsets, as JSON-ready data."""
    found: dict[str, Any] = {}
    for name, build in generator.DASHBOARDS.items():
        dashboard = build()
        data: dict[str, Any] = {}
        pending = []
        for panel in dashboard["panels"]:
            if panel["type"] == "row":
                continue
            if any(m in t["expr"] for t in panel["targets"] for m in waiting):
                pending.append(panel["id"])
                continue
            data[str(panel["id"])] = [vars(s) for s in fetch(api, panel, start, end)]
        spans = [
            span
            for a in dashboard["annotations"]["list"]
            for span in firing(api, a["expr"], start, end)
        ]
        found[name] = {"data": data, "pending": pending, "spans": spans}
    return found


def draw_all(generator: Any, collected: dict[str, Any], minutes: float, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, build in generator.DASHBOARDS.items():
        dashboard = build()
        got = collected[name]
        data = {int(k): [Series(**s) for s in v] for k, v in got["data"].items()}
        spans = [(float(a), float(b), str(c)) for a, b, c in got["spans"]]
        path = out / name.replace(".json", ".png")
        draw_dashboard(dashboard, data, spans, set(got["pending"]), minutes, path)
        empty = [
            p["title"]
            for p in dashboard["panels"]
            if p["type"] != "row" and p["id"] not in got["pending"] and not data.get(p["id"])
        ]
        print(f"render: wrote {path}" + (f" (no data: {empty})" if empty else ""), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python grafana/render.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to feed runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument(
        "--save-data", type=Path, help="also write the queried series to this JSON file"
    )
    parser.add_argument(
        "--from-data",
        type=Path,
        help="draw from series a previous run saved with --save-data, without a stack",
    )
    args = parser.parse_args()
    generator = load_script(GRAFANA / "generate.py")
    if args.from_data:
        saved = json.loads(args.from_data.read_text())
        draw_all(generator, saved["dashboards"], saved["minutes"], args.out)
        return 0
    documented = (ROOT / "docs" / "metrics.md").read_text()
    waiting = {m for m in generator.PENDING_METRICS if f"`{m}`" not in documented}
    with tempfile.TemporaryDirectory(prefix="render-") as scratch, ExitStack() as exits:
        api, start, end = run_stack(Path(scratch), args.minutes, exits)
        collected = collect(generator, api, start, end, waiting)
    if args.save_data:
        args.save_data.write_text(json.dumps({"minutes": args.minutes, "dashboards": collected}))
    draw_all(generator, collected, args.minutes, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
