"""Tests for deployment health outside the reader: parsing, events, snapshot, exposition, config."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from exporter.collector import SnapshotCollector
from exporter.config import ConfigError, load_settings
from exporter.errors import MalformedResponse
from exporter.prefect_parse import (
    parse_deployment,
    parse_ended_run,
    parse_event,
    parse_upcoming_run,
)
from exporter.records import (
    DeploymentHealth,
    DeploymentRecord,
    LatencyStats,
    PollRecords,
    StateType,
)
from exporter.snapshot import build_snapshot, schedule_interval
from exporter.transitions import Cursor, TransitionTracker

NOW = 1_800_000_000.0
DAY = 86400.0


def deployment_json(schedules: list[dict[str, Any]], paused: bool = False) -> dict[str, Any]:
    return {
        "id": "d1",
        "name": "nightly",
        "flow_id": "f1",
        "paused": paused,
        "schedules": schedules,
    }


def event_json(state_type: str, state_name: str, related: list[dict[str, str]]) -> dict[str, Any]:
    return {
        "id": f"e-{state_name}",
        "event": f"prefect.flow-run.{state_name}",
        "occurred": "2027-01-15T08:00:00Z",
        "resource": {
            "prefect.resource.id": "prefect.flow-run.r1",
            "prefect.state-type": state_type,
            "prefect.state-name": state_name,
        },
        "related": related,
    }


RELATED = [
    {"prefect.resource.id": "prefect.flow.f1", "prefect.resource.role": "flow",
     "prefect.resource.name": "etl"},
    {"prefect.resource.id": "prefect.deployment.d1", "prefect.resource.role": "deployment",
     "prefect.resource.name": "nightly"},
    {"prefect.resource.id": "prefect.work-pool.p1", "prefect.resource.role": "work-pool",
     "prefect.resource.name": "k8s"},
]  # fmt: skip


class TestParsing:
    """The API's deployments, ended and upcoming runs, and events' deployments."""

    def test_a_deployment_with_interval_and_cron_schedules(self) -> None:
        """Named flow/deployment; inactive schedules left out; intervals in seconds."""
        record = parse_deployment(
            deployment_json(
                [
                    {"active": True, "schedule": {"interval": 7200.0, "timezone": "UTC"}},
                    {"active": True, "schedule": {"interval": 3600, "timezone": "UTC"}},
                    {"active": True, "schedule": {"cron": "0 2 * * *", "timezone": "UTC"}},
                    {"active": False, "schedule": {"interval": 60.0}},
                ],
                paused=True,
            ),
            {"f1": "etl"},
        )
        assert record == DeploymentRecord("d1", "etl/nightly", True, 3, 3600.0, 1)

    def test_a_deployment_without_schedules_or_a_known_flow(self) -> None:
        """No schedules is 0 active schedules; a flow deleted meanwhile leaves its id."""
        record = parse_deployment(deployment_json([]), {})
        assert record == DeploymentRecord("d1", "f1/nightly", False, 0, None, 0)

    @pytest.mark.parametrize(
        "schedules",
        [
            [{"active": True, "schedule": {"interval": -5}}],
            [{"active": True, "schedule": {"interval": "PT1H"}}],
            [{"active": True, "schedule": "0 2 * * *"}],
            "every day",
        ],
    )
    def test_impossible_schedules_are_malformed(self, schedules: Any) -> None:
        """A negative or non-numeric interval, or a schedule that is no object, fails the poll."""
        with pytest.raises(MalformedResponse):
            parse_deployment(deployment_json(schedules), {"f1": "etl"})

    def test_ended_and_upcoming_runs(self) -> None:
        """End time and next start in Unix seconds; a terminal run without an end is refused."""
        row = {"id": "r1", "deployment_id": "d1", "end_time": "2027-01-15T08:00:00Z"}
        run = parse_ended_run({**row, "state_type": "CRASHED"})
        assert (run.state_type, run.end_time) == ("CRASHED", NOW)
        assert parse_ended_run({**row, "state": {"type": "FAILED"}}).state_type == "FAILED"
        with pytest.raises(MalformedResponse):
            parse_ended_run({**row, "end_time": None, "state_type": "COMPLETED"})
        upcoming = parse_upcoming_run(
            {"id": "r2", "deployment_id": "d1", "next_scheduled_start_time": "2027-01-15T08:00:00Z"}
        )
        assert upcoming.start == run.end_time

    def test_an_event_names_its_deployment_flow_slash_deployment(self) -> None:
        """The related flow and deployment give the name; without a deployment there is none."""
        event = parse_event(event_json("COMPLETED", "Completed", RELATED))
        assert event is not None
        assert (event.deployment, event.work_pool) == ("etl/nightly", "k8s")
        bare = parse_event(event_json("COMPLETED", "Completed", RELATED[:1]))
        assert bare is not None
        assert bare.deployment is None


class TestFinishedCounter:
    """The tracker counts terminal states per selected deployment from the events."""

    def test_terminal_states_of_selected_deployments_are_counted_once(self) -> None:
        """Each finished run counts under its state type's name; replays are not counted again."""
        events = [
            parse_event(event_json(t, n, RELATED))
            for t, n in [
                ("RUNNING", "Running"),
                ("COMPLETED", "Completed"),
                ("FAILED", "Failed"),
                ("CRASHED", "Crashed"),
                ("FAILED", "TimedOut"),  # a custom name of a FAILED-type state
            ]
        ]
        seen = [e for e in events if e is not None]
        tracker = TransitionTracker(Cursor(0))
        tracker.consume(seen, {}, lambda pool: False, lambda d: d == "etl/nightly")
        tracker.consume(seen, {}, lambda pool: False, lambda d: d == "etl/nightly")
        assert tracker.stats(NOW, False).finished == {
            ("etl/nightly", "Completed"): 1,
            ("etl/nightly", "Failed"): 2,
            ("etl/nightly", "Crashed"): 1,
        }

    def test_unselected_deployments_are_not_counted(self) -> None:
        """Counting is opt-in: nothing is kept for a deployment the selection leaves out."""
        event = parse_event(event_json("COMPLETED", "Completed", RELATED))
        assert event is not None
        tracker = TransitionTracker(Cursor(0))
        tracker.consume([event], {})
        assert tracker.stats(NOW, False).finished == {}


def calendar(active: int = 1, interval: float | None = None) -> DeploymentRecord:
    return DeploymentRecord("d1", "etl/nightly", False, active, interval, 1)


class TestSnapshot:
    """The view of each deployment, its interval, and how many the cap left out."""

    def test_interval_schedule_gives_its_interval(self) -> None:
        """An interval schedule needs no upcoming run to know its interval."""
        record = DeploymentRecord("d1", "etl/nightly", False, 1, 3600.0, 0)
        assert schedule_interval(record, ()) == 3600.0

    def test_cron_interval_is_the_gap_between_the_next_two_runs(self) -> None:
        """A weekday cron on Friday gives three days; one upcoming run is not enough."""
        assert schedule_interval(calendar(), (NOW, NOW + 3 * DAY)) == 3 * DAY
        assert schedule_interval(calendar(), (NOW,)) is None
        assert schedule_interval(calendar(2, 3600.0), (NOW, NOW + DAY)) == 3600.0
        assert schedule_interval(DeploymentRecord("d1", "x/y", False, 0, None, 0), ()) is None

    def test_snapshot_rows_and_cap(self) -> None:
        """Last success, failures by state, next run; capped = matching minus exported."""
        health = DeploymentHealth(
            deployments=(calendar(),),
            matching=3,
            last_end={"d1": {StateType.COMPLETED: NOW - 10, StateType.CRASHED: NOW - 5}},
            upcoming={"d1": (NOW + 100, NOW + DAY + 100)},
        )
        view = build_snapshot(PollRecords(NOW, (), (), (), deployment_health=health))
        assert view.deployment_health is not None
        assert view.deployment_health.capped == 2
        (row,) = view.deployment_health.deployments
        assert (row.last_success, row.last_failures) == (NOW - 10, (("Crashed", NOW - 5),))
        assert (row.next_run, row.schedule_interval) == (NOW + 100, DAY)


class TestExposition:
    """The series as Prometheus sees them; absent without the opt-in."""

    def scrape(self, records: PollRecords, latency: LatencyStats | None) -> str:
        registry = CollectorRegistry()
        registry.register(SnapshotCollector(build_snapshot(records, latency=latency)))
        return generate_latest(registry).decode()

    def test_golden_lines(self) -> None:
        """Every series of one deployment, with every terminal state of the counter."""
        health = DeploymentHealth(
            deployments=(DeploymentRecord("d1", "etl/nightly", True, 1, 3600.0, 0),),
            matching=1,
            last_end={"d1": {StateType.COMPLETED: 1e9, StateType.FAILED: 2e9}},
            upcoming={"d1": (1.5e9,)},
        )
        latency = LatencyStats(finished={("etl/nightly", "Failed"): 2, ("other/x", "Failed"): 9})
        text = self.scrape(PollRecords(NOW, (), (), (), deployment_health=health), latency)
        for line in (
            'prefect_deployment_last_success_timestamp_seconds{deployment="etl/nightly"} 1e+09',
            'prefect_deployment_last_failure_timestamp_seconds{deployment="etl/nightly",'
            'state="Failed"} 2e+09',
            'prefect_deployment_next_scheduled_run_timestamp_seconds{deployment="etl/nightly"}'
            " 1.5e+09",
            'prefect_deployment_paused{deployment="etl/nightly"} 1.0',
            'prefect_deployment_active_schedules{deployment="etl/nightly"} 1.0',
            'prefect_deployment_schedule_interval_seconds{deployment="etl/nightly"} 3600.0',
            "prefect_exporter_deployments_capped 0.0",
            'prefect_deployment_flow_runs_finished_total{deployment="etl/nightly",'
            'state="Failed"} 2.0',
            'prefect_deployment_flow_runs_finished_total{deployment="etl/nightly",'
            'state="Cancelled"} 0.0',
        ):
            assert line in text, line
        assert "other/x" not in text  # only exported deployments
        assert 'state="Crashed"} ' not in text.split("prefect_deployment_flow_runs")[0]

    def test_absent_without_the_opt_in(self) -> None:
        """No selection: no deployment health family at all, HELP included."""
        text = self.scrape(PollRecords(NOW, (), (), ()), LatencyStats())
        assert "prefect_deployment_" not in text
        assert "prefect_exporter_deployments_capped" not in text


class TestConfig:
    """The options are validated like the others."""

    def test_max_out_of_range_is_a_problem(self) -> None:
        """0 deployments is not a cap; the message names the flag."""
        with pytest.raises(ConfigError) as error:
            load_settings(["--deployments.include=*", "--deployments.max=0"], {})
        assert any("--deployments.max" in p for p in error.value.problems)

    def test_globs_repeat(self) -> None:
        """Include and exclude are repeatable flags."""
        settings = load_settings(
            [
                "--deployments.include=etl/*",
                "--deployments.include=ml/*",
                "--deployments.exclude=*-dev",
            ],
            {},
        )
        assert settings.deployments_include == ("etl/*", "ml/*")
        assert settings.deployments_exclude == ("*-dev",)
