"""Tests for `prefect-exporter diagnose`: flags, the read, the golden table and JSON, exit codes."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import structlog
from prometheus_client import CollectorRegistry

from exporter.config import Settings
from exporter.diagnose import (
    EXIT_ERROR,
    EXIT_FINDINGS,
    EXIT_HEALTHY,
    SCHEMA,
    USAGE,
    Options,
    Progress,
    Reader,
    render_table,
    run,
    settings_for,
    split_arguments,
    to_json,
)
from exporter.diagnosis import ApiRead, Cause, Diagnosis, Extras, diagnose
from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_api import PrefectApi
from exporter.prefect_parse import iso
from exporter.records import (
    KNOWN_STATE_NAMES,
    HistogramState,
    LatencyStats,
    LimitKind,
    PoolSelector,
    RunPlace,
)
from exporter.snapshot import LimitState, PoolState, QueueState, Snapshot, WorkerState
from tests.fakes import FakePrefect, make_api, pool_json, queue_json, worker_json

NOW = 1_800_000_000.0
GOLDEN = Path(__file__).resolve().parent / "golden"
API_URL = "http://prefect.test/api"


def check_golden(name: str, text: str) -> None:
    """Compare with tests/golden/<name>; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with UPDATE_GOLDEN=1 if deliberate"


def queue_state(
    pool: str, name: str, due: int = 0, running: int = 0, polled: float | None = NOW - 4
) -> QueueState:
    counts = dict.fromkeys(map(str, KNOWN_STATE_NAMES), 0) | {"Late": due, "Running": running}
    return QueueState(
        pool=pool,
        name=name,
        status="READY" if polled else "NOT_READY",
        priority=1,
        concurrency_limit=None,
        last_polled=polled,
        runs_by_state=tuple(counts.items()),
        backlog=due,
        oldest_due=NOW - 2520 if due else None,
        oldest_pending_since=None,
        in_flight=running,
        oldest_running_since=NOW - 60 if running else None,
    )


def seed_diagnosis() -> Diagnosis:
    """The seed's situation: a burst held by a pool limit, a second queue nobody polls, and a
    leaked tag slot, runs without a queue and a throttled answer for good measure."""
    snapshot = Snapshot(
        observed_at=NOW,
        pools=(PoolState("etl", "kubernetes", "READY", 10, 2, 10),),
        queues=(
            queue_state("etl", "default", due=738, running=10),
            queue_state("etl", "high", due=10, polled=None),
        ),
        workers=(
            WorkerState("etl", "k8s-worker-1", NOW - 8, 30.0, True),
            WorkerState("etl", "k8s-worker-2", NOW - 12, 30.0, True),
        ),
        limits=(LimitState("tag:db", LimitKind.TAG, "", 5, 5, True, 5, "tag:db"),),
        runs_without_work_queue=3,
    )
    extras = Extras(
        latency=LatencyStats(
            pickup={"etl": HistogramState().observe(12).observe(30)},
            start={"etl": HistogramState().observe(20).observe(40)},
        ),
        latency_window=900.0,
        tag_waiters={"db": (RunPlace("f1", "etl", "default"),)},
        orphans=(RunPlace("0c5e", None, "nightly", "d1"),),
        deployment_names={"d1": "reports/nightly"},
        api=ApiRead(requests=31, throttled=1, retry_after=2.0),
    )
    return diagnose(snapshot, extras)


class TestSplitArguments:
    """diagnose's own flags are taken out; the rest goes to the exporter's option table."""

    def test_own_flags_in_both_spellings(self) -> None:
        """`--work-pool X`, `--work-pool=Y`, `--json` and `--slow-start` are diagnose's."""
        options, rest, problems = split_arguments(
            ["--work-pool", "etl-*", "--work-pool=ops", "--json", "--slow-start=2m"]
        )
        assert options == Options(("etl-*", "ops"), True, 120.0)
        assert rest == []
        assert problems == []

    def test_exporter_flags_pass_through(self) -> None:
        """`--work-pool.include` and connection flags belong to the exporter's table."""
        _, rest, _ = split_arguments(
            ["--work-pool.include", "x", "--prefect.api-url=http://a/api", "--json"]
        )
        assert rest == ["--work-pool.include", "x", "--prefect.api-url=http://a/api"]

    def test_missing_values_and_bad_durations_are_listed(self) -> None:
        """Every problem at once, naming the flag."""
        _, _, problems = split_arguments(["--slow-start", "soon", "--work-pool"])
        assert problems[0].startswith("--slow-start: expected a duration")
        assert problems[1] == "--work-pool: expects a value"

    def test_the_read_is_adjusted_for_a_diagnosis(self) -> None:
        """The poller reads no events (the diagnosis reads its own window) and breaks down
        deployment limits; `--work-pool` narrows the pools."""
        adjusted = settings_for(Settings(), Options(work_pools=("etl",)))
        assert not adjusted.events_enabled
        assert adjusted.deployments_breakdown
        assert adjusted.work_pools_include == ("etl",)


class TestGolden:
    """The table and the JSON document, byte for byte (tests/golden)."""

    def test_table(self) -> None:
        """Findings with evidence and fix, then pools, queues, limits and the API line."""
        check_golden("diagnose.txt", render_table(seed_diagnosis(), API_URL, color=False))

    def test_json(self) -> None:
        """The documented schema: findings first, then the per-pool and per-queue report."""
        document = to_json(seed_diagnosis(), API_URL)
        check_golden("diagnose.json", json.dumps(document, indent=2) + "\n")
        assert list(document) == [
            "schema",
            "api_url",
            "observed_at",
            "healthy",
            "findings",
            "work_pools",
            "concurrency_limits",
            "runs_without_work_queue",
            "api",
            "latency_window_seconds",
        ]
        assert document["schema"] == SCHEMA
        for finding in document["findings"]:
            assert list(finding) == [
                "cause",
                "work_pool",
                "work_queue",
                "runs",
                "summary",
                "evidence",
                "fix",
            ]
            assert finding["cause"] in {str(c) for c in Cause}

    def test_causes_are_documented(self) -> None:
        """docs/diagnose.md lists every cause of the closed set."""
        page = (Path(__file__).resolve().parent.parent / "docs" / "diagnose.md").read_text()
        for cause in Cause:
            assert f"`{cause}`" in page, cause

    def test_colour_only_when_asked(self) -> None:
        """ANSI codes on a terminal, none otherwise."""
        diagnosis = seed_diagnosis()
        assert "\x1b[" not in render_table(diagnosis, API_URL, color=False)
        coloured = render_table(diagnosis, API_URL, color=True)
        assert "\x1b[31mpool_concurrency_limit\x1b[0m" in coloured

    def test_healthy_table_says_so(self) -> None:
        """One `none` finding and no fix line."""
        snapshot = Snapshot(NOW, (PoolState("etl", "process", "READY", None, 1),), (), ())
        text = render_table(diagnose(snapshot, Extras()), API_URL, color=False)
        assert ": healthy" in text.splitlines()[0]
        assert " 1. none · workspace" in text
        assert "fix:" not in text


# --- The read against an in-process fake Prefect ----------------------------------------------


def history(*states: tuple[str, str, int]) -> list[dict[str, Any]]:
    return [
        {
            "interval_start": "x",
            "interval_end": "y",
            "states": [{"state_type": t, "state_name": n, "count_runs": c} for t, n, c in states],
        }
    ]


def workspace(
    fake: FakePrefect, paused: bool = False, due: int = 3, orphans: int = 0
) -> FakePrefect:
    """One pool `etl` with its queue `default` holding `due` late runs, one online worker."""
    heartbeat = iso(NOW - 5)
    status = "PAUSED" if paused else "READY"
    fake.on("POST", "work_pools/filter", [pool_json("etl", is_paused=paused, status=status)])
    fake.on(
        "POST",
        "work_queues/filter",
        [queue_json("q1", "default", "etl", last_polled=iso(NOW - 3))],
    )
    fake.on("POST", "work_pools/etl/workers/filter", [worker_json("w1", heartbeat)])
    fake.on("POST", "flow_runs/history", history(("SCHEDULED", "Late", due)) if due else [])

    def count(request: httpx.Request) -> int:
        body = json.loads(request.content)
        if "work_queue_name" in body["flow_runs"]:  # runs naming a queue, with or without one
            return 10 if "work_pool_queues" in body else 10 + orphans
        return due

    def runs(request: httpx.Request) -> list[dict[str, Any]]:
        body = json.loads(request.content)
        if body["limit"] == 1:
            return [{"next_scheduled_start_time": iso(NOW - 600)}]
        return [
            {"id": f"o{i}", "work_queue_id": None, "work_queue_name": "gone", "deployment_id": "d"}
            for i in range(orphans)
        ]

    fake.on("POST", "flow_runs/count", count)
    fake.on("POST", "flow_runs/filter", runs)
    fake.on("POST", "v2/concurrency_limits/filter", [])
    fake.on("POST", "events/filter", {"events": [], "next_page": None})
    fake.on("POST", "deployments/filter", [{"id": "d", "flow_id": "f", "name": "nightly"}])
    fake.on("POST", "flows/filter", [{"id": "f", "name": "reports"}])
    return fake


def reader_for(
    fake: FakePrefect,
    sleep: Callable[[float], Awaitable[None]] | None = None,
    pools: tuple[str, ...] = (),
) -> Reader:
    registry = CollectorRegistry()
    api: PrefectApi = make_api(fake, registry)
    selector = PoolSelector(include=pools)
    poller = Poller(
        api,
        FakeStore(),
        PollSettings(
            interval=30,
            timeout=5,
            concurrency=2,
            heartbeat_multiple=3,
            events_enabled=False,
            deployments_breakdown=True,
            mode="per-queue",
            pools=selector,
        ),
        PollMetrics(registry),
        structlog.get_logger(),
        clock=lambda: NOW,
        orphans=api,
    )

    async def no_wait(seconds: float) -> None:
        await asyncio.sleep(0)

    return Reader(
        poller,
        api,
        registry,
        Settings(),
        selector,
        clock=lambda: NOW,
        sleep=sleep or no_wait,
    )


class FakeStore:
    """The poller's publisher; a diagnosis never publishes."""

    def publish(self, snapshot: Snapshot, duration: float) -> None:
        raise AssertionError("a diagnosis does not publish")

    def record_failure(self, error: str, duration: float) -> None:
        raise AssertionError("a diagnosis does not record failures")

    def loop_waiting(self, until_monotonic: float) -> None:
        raise AssertionError("a diagnosis has no loop")


def diagnose_with(reader: Reader, options: Options | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()

    async def go() -> int:
        try:
            return await run(reader, options or Options(), API_URL, out, err, color=False)
        finally:
            await reader.api.aclose()  # type: ignore[attr-defined]

    code = asyncio.run(go())
    return code, out.getvalue(), err.getvalue()


class TestRead:
    """One read through the exporter's poll, plus the reads only a diagnosis needs."""

    def test_healthy_exits_0(self) -> None:
        """No due run: `none`, exit 0, and no extra read beyond the poll and the events."""
        fake = workspace(FakePrefect(), due=0)
        code, out, err = diagnose_with(reader_for(fake))
        assert (code, err) == (EXIT_HEALTHY, "")
        assert " 1. none" in out
        paths = {r.url.path.removeprefix("/api/") for r in fake.requests}
        assert "deployments/filter" not in paths

    def test_findings_exit_1(self) -> None:
        """A paused pool with due runs: exit 1 and its finding first."""
        code, out, _ = diagnose_with(reader_for(workspace(FakePrefect(), paused=True)))
        assert code == EXIT_FINDINGS
        assert " 1. pool_paused · etl · 3 runs held" in out
        assert "fix: prefect work-pool resume etl" in out

    def test_json_output(self) -> None:
        """`--json` prints the document alone on stdout."""
        options = Options(json=True)
        code, out, _ = diagnose_with(reader_for(workspace(FakePrefect(), paused=True)), options)
        document = json.loads(out)
        assert code == EXIT_FINDINGS
        assert document["findings"][0]["cause"] == "pool_paused"
        assert document["work_pools"][0]["work_queues"][0]["due_runs"] == 3

    def test_runs_without_a_queue_are_sampled_and_named(self) -> None:
        """The count comes from the poll; the sample and deployment names from two reads."""
        fake = workspace(FakePrefect(), due=0, orphans=2)
        code, out, _ = diagnose_with(reader_for(fake), Options(json=True))
        (finding,) = json.loads(out)["findings"]
        assert code == EXIT_FINDINGS
        assert finding["cause"] == "runs_without_work_queue"
        assert finding["evidence"]["deployments"] == ["reports/nightly"]
        assert finding["fix"] == "prefect flow-run delete o0"

    def test_a_throttled_read_is_retried_after_retry_after_and_reported(self) -> None:
        """The first 429 is obeyed (its Retry-After), the read repeated, the 429 a finding."""
        fake = workspace(FakePrefect(), due=0)
        answers = iter([httpx.Response(429, headers={"Retry-After": "2"})])
        healthy = fake.routes[("POST", "work_pools/filter")]
        fake.on("POST", "work_pools/filter", lambda r: next(answers, None) or healthy(r))
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)

        code, out, _ = diagnose_with(reader_for(fake, sleep=sleep), Options(json=True))
        document = json.loads(out)
        assert waits == [2.0]
        assert code == EXIT_FINDINGS
        assert document["findings"][0]["cause"] == "api_rate_limited"
        assert document["findings"][0]["evidence"]["throttled_responses"] == 1
        assert document["api"]["complete"] is True

    def test_throttled_every_time_is_the_finding_alone(self) -> None:
        """Three 429s: no pools could be read; the finding says why, exit 1."""
        fake = workspace(FakePrefect())
        fake.on("POST", "work_pools/filter", {"detail": "slow down"}, status=429)
        code, out, _ = diagnose_with(reader_for(fake), Options(json=True))
        document = json.loads(out)
        assert code == EXIT_FINDINGS
        assert [f["cause"] for f in document["findings"]] == ["api_rate_limited"]
        assert document["api"] == {
            "requests": 6,  # pools (429) and queues, read together, three times
            "throttled_responses": 3,
            "retry_after_seconds": None,
            "complete": False,
        }

    def test_an_unreadable_api_exits_2(self) -> None:
        """A 401 is not retried: exit 2 with the reason on stderr, nothing on stdout."""
        fake = workspace(FakePrefect())
        fake.on("POST", "work_pools/filter", {"detail": "no"}, status=401)
        code, out, err = diagnose_with(reader_for(fake))
        assert (code, out) == (EXIT_ERROR, "")
        assert "cannot read Prefect at http://prefect.test/api" in err
        assert "unauthorized" in err

    def test_a_glob_that_matches_no_pool_exits_2(self) -> None:
        """A typo in --work-pool is a configuration problem, not a healthy workspace."""
        reader = reader_for(workspace(FakePrefect()), pools=("elt",))
        code, _, err = diagnose_with(reader, Options(work_pools=("elt",)))
        assert code == EXIT_ERROR
        assert err == "diagnose: no work pool matches --work-pool elt\n"


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class TestProgress:
    """A progress line on a terminal's stderr while a slow read runs, erased at the end."""

    def test_shown_on_a_terminal_then_erased(self) -> None:
        """After the delay, the line with requests and seconds; `\\r\\x1b[K` clears it."""
        stream = FakeTerminal()
        steps = iter(range(100))
        waits: list[float] = []

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            await asyncio.sleep(0)

        progress = Progress(stream, lambda: 7, lambda: float(next(steps)), sleep=sleep)

        async def body() -> None:
            async with progress.running():
                for _ in range(5):
                    await asyncio.sleep(0)

        asyncio.run(body())
        text = stream.getvalue()
        assert "reading Prefect: 7 requests" in text
        assert text.endswith("\r\x1b[K")
        assert waits[0] == 0.5

    def test_nothing_when_not_a_terminal(self) -> None:
        """Scripts and pipes see no progress line."""
        stream = io.StringIO()
        progress = Progress(stream, lambda: 7)

        async def body() -> None:
            async with progress.running():
                await asyncio.sleep(0)

        asyncio.run(body())
        assert stream.getvalue() == ""


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {"PATH": "/usr/bin:/bin"},
    )


class TestCommandLine:
    """The subcommand as a user runs it: help, configuration problems, an unreachable API."""

    def test_help_exits_0(self) -> None:
        """`diagnose --help` prints its own usage."""
        result = run_cli("diagnose", "--help")
        assert result.returncode == 0
        assert result.stdout == USAGE

    def test_bad_flags_exit_2_listing_each(self) -> None:
        """diagnose's and the exporter's problems are listed together."""
        result = run_cli("diagnose", "--slow-start", "soon", "--poll.intervall", "5s")
        assert result.returncode == 2
        assert "--slow-start" in result.stderr
        assert "--poll.intervall: unknown flag" in result.stderr
        assert result.stdout == ""

    def test_unreachable_prefect_exits_2(self) -> None:
        """Nobody listens: exit 2 naming the URL, in well under the poll timeout."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}/api"
        result = run_cli("diagnose", env={"PATH": "/usr/bin:/bin", "PREFECT_API_URL": url})
        assert result.returncode == 2
        assert f"cannot read Prefect at {url}" in result.stderr
        assert result.stdout == ""

    def test_without_the_api_exits_2(self) -> None:
        """A log-only sidecar configuration cannot be diagnosed."""
        result = run_cli("diagnose", "--no-prefect.enabled", "--worker-log=w1=/tmp/w1.log")
        assert result.returncode == 2
        assert "diagnose reads the Prefect API" in result.stderr
