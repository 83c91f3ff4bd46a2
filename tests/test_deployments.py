"""Tests for deployment health outside the reader: parsing, events, snapshot, exposition, config."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import structlog
import structlog.testing
from prometheus_client import CollectorRegistry, generate_latest

from exporter.clock import Deadline, UnixTime
from exporter.collector import SnapshotCollector
from exporter.config import ConfigError, load_settings
from exporter.errors import ApiStatusError, MalformedResponse
from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.prefect_parse import (
    iso,
    parse_deployment,
    parse_ended_run,
    parse_event,
    parse_upcoming_run,
)
from exporter.records import (
    DeploymentHealth,
    DeploymentRecord,
    DeploymentSelector,
    FlowRunEvent,
    LatencyStats,
    PollRecords,
    StateType,
)
from exporter.snapshot import build_snapshot, schedule_interval
from exporter.transitions import Cursor, TransitionTracker
from tests.fakes import FakePrefect, make_api
from tests.test_deployments_reader import FakeDeploymentsApi
from tests.test_poller import FakeApi, FakeStore

NOW = 1_800_000_000.0
DAY = 86400.0
FAR = Deadline(1e12)


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

    def test_a_deployment_no_longer_exported_loses_its_counters(self) -> None:
        """Deselected (or capped out at a list refresh): its counters are dropped, not kept."""
        event = parse_event(event_json("COMPLETED", "Completed", RELATED))
        assert event is not None
        tracker = TransitionTracker(Cursor(0))
        tracker.consume([event], {}, lambda pool: False, lambda d: d == "etl/nightly")
        assert tracker.stats(NOW, False).finished == {("etl/nightly", "Completed"): 1}
        tracker.consume([], {}, lambda pool: False, lambda d: False)
        assert tracker.stats(NOW, False).finished == {}

    def test_a_forced_final_to_final_change_counts_both_transitions(self) -> None:
        """Failed forced to Completed by hand: two terminal transitions of one run, as
        documented (the counter counts transitions, not runs)."""
        failed = parse_event(event_json("FAILED", "Failed", RELATED))
        completed = parse_event(
            {**event_json("COMPLETED", "Completed", RELATED), "occurred": "2027-01-15T08:01:00Z"}
        )
        assert failed is not None
        assert completed is not None
        tracker = TransitionTracker(Cursor(0))
        tracker.consume([failed, completed], {}, lambda pool: False, lambda d: True)
        assert tracker.stats(NOW, False).finished == {
            ("etl/nightly", "Failed"): 1,
            ("etl/nightly", "Completed"): 1,
        }


def calendar(active: int = 1, interval: float | None = None) -> DeploymentRecord:
    return DeploymentRecord("d1", "etl/nightly", False, active, interval, 1)


class TestSnapshot:
    """The view of each deployment, its interval, and how many the cap left out."""

    def test_interval_schedule_gives_its_interval(self) -> None:
        """An interval schedule needs no upcoming run to know its interval."""
        record = DeploymentRecord("d1", "etl/nightly", False, 1, 3600.0, 0)
        assert schedule_interval(record, ()) == 3600.0

    def test_cron_interval_is_the_largest_gap_between_upcoming_runs(self) -> None:
        """A weekday cron's largest gap is the weekend; one upcoming run is not enough."""
        assert schedule_interval(calendar(), (NOW, NOW + DAY, NOW + 4 * DAY)) == 3 * DAY
        assert schedule_interval(calendar(), (NOW,)) is None
        assert schedule_interval(calendar(2, 3600.0), (NOW, NOW + DAY)) == 3600.0
        assert schedule_interval(DeploymentRecord("d1", "x/y", False, 0, None, 0), ()) is None

    def test_zero_gaps_and_uneven_crons_do_not_shrink_the_interval(self) -> None:
        """Two schedules at one instant give a day, not 0; `0 2,3 * * *` gives 23 hours."""
        assert schedule_interval(calendar(2), (NOW, NOW, NOW + DAY)) == DAY
        assert schedule_interval(calendar(2), (NOW, NOW)) is None
        assert schedule_interval(calendar(), (NOW, NOW + 3600, NOW + DAY)) == DAY - 3600

    def test_snapshot_rows_and_cap(self) -> None:
        """Last success, failures by state, next run; capped = matching minus exported."""
        health = DeploymentHealth(
            deployments=(calendar(),),
            matching=3,
            last_end={"d1": {StateType.COMPLETED: NOW - 10, StateType.CRASHED: NOW - 5}},
            upcoming={"d1": (NOW + 100, NOW + DAY + 100)},
            last_due={"d1": NOW - 50},
        )
        view = build_snapshot(PollRecords(NOW, (), (), (), deployment_health=health))
        assert view.deployment_health is not None
        assert view.deployment_health.capped == 2
        (row,) = view.deployment_health.deployments
        assert (row.last_success, row.last_failures) == (NOW - 10, (("Crashed", NOW - 5),))
        assert (row.next_run, row.schedule_interval) == (NOW + 100, DAY)
        assert row.last_due == NOW - 50


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
            last_due={"d1": 1.2e9},
        )
        latency = LatencyStats(finished={("etl/nightly", "Failed"): 2, ("other/x", "Failed"): 9})
        text = self.scrape(PollRecords(NOW, (), (), (), deployment_health=health), latency)
        for line in (
            'prefect_deployment_last_success_timestamp_seconds{deployment="etl/nightly"} 1e+09',
            'prefect_deployment_last_failure_timestamp_seconds{deployment="etl/nightly",'
            'state="Failed"} 2e+09',
            'prefect_deployment_next_scheduled_run_timestamp_seconds{deployment="etl/nightly"}'
            " 1.5e+09",
            'prefect_deployment_last_due_run_timestamp_seconds{deployment="etl/nightly"} 1.2e+09',
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


class TestAdapter:
    """The requests the adapter sends for deployment health, and the answers it refuses."""

    def test_deployments_are_listed_by_name_with_their_flows_names(self) -> None:
        """One page of deployments sorted by name, one request for the flows' names."""
        fake = FakePrefect()
        fake.on("POST", "deployments/filter", [deployment_json([])])
        fake.on("POST", "flows/filter", [{"id": "f1", "name": "etl"}])
        records = asyncio.run(make_api(fake).deployments(FAR))
        assert [r.name for r in records] == ["etl/nightly"]
        (listing,) = fake.bodies("deployments/filter")
        assert (listing["sort"], listing["limit"], listing["offset"]) == ("NAME_ASC", 200, 0)
        assert fake.bodies("flows/filter")[0]["flows"] == {"id": {"any_": ["f1"]}}

    def test_offset_pages_that_repeat_and_skip_on_tied_names_are_completed(self) -> None:
        """250 deployments all named `default`: the second page repeats ten of the first and
        skips ten; the count and an id-excluding request fill the gap, each deployment once."""
        rows = [{**deployment_json([]), "id": f"d{n:03}", "name": "default"} for n in range(250)]
        served = [*rows[:200], *rows[190:200], *rows[210:250]]  # d200..d209 never offset-served

        def listing(request: httpx.Request) -> list[dict[str, Any]]:
            body = json.loads(request.content)
            excluded = body.get("deployments", {}).get("id", {}).get("not_any_")
            if excluded is not None:
                return [r for r in rows if r["id"] not in excluded][: body["limit"]]
            return served[body["offset"] : body["offset"] + body["limit"]]

        fake = FakePrefect()
        fake.on("POST", "deployments/filter", listing)
        fake.on("POST", "deployments/count", 250)
        fake.on("POST", "flows/filter", [{"id": "f1", "name": "etl"}])
        records = asyncio.run(make_api(fake).deployments(FAR))
        assert sorted(r.id for r in records) == [r["id"] for r in rows]
        assert len(fake.bodies("deployments/filter")) == 3

    def test_one_page_needs_no_count(self) -> None:
        """Under 200 deployments the single page is complete: no count request."""
        fake = FakePrefect()
        fake.on("POST", "deployments/filter", [deployment_json([])])
        fake.on("POST", "flows/filter", [{"id": "f1", "name": "etl"}])
        asyncio.run(make_api(fake).deployments(FAR))
        assert not fake.bodies("deployments/count")
        assert all("count" not in r.url.path for r in fake.requests)

    def test_ended_and_upcoming_listings_filter_by_deployment_state_and_time(self) -> None:
        """Latest end first since a time (rows without an end left out); earliest Scheduled
        start first after a time; latest auto-scheduled expected start first before a time."""
        fake = FakePrefect()
        fake.on("POST", "flow_runs/filter", [])
        api = make_api(fake)
        types = (StateType.COMPLETED, StateType.FAILED)
        asyncio.run(api.ended_runs_page(["d1"], types, UnixTime(NOW), FAR))
        asyncio.run(api.upcoming_runs_page(["d1"], UnixTime(NOW), FAR))
        asyncio.run(api.due_runs_page(["d1"], UnixTime(NOW), FAR))
        ended_body, upcoming_body, due_body = fake.bodies("flow_runs/filter")
        assert due_body == {
            "flow_runs": {
                "deployment_id": {"any_": ["d1"]},
                "tags": {"all_": ["auto-scheduled"]},
                "expected_start_time": {"before_": "2027-01-15T08:00:00Z"},
            },
            "sort": "EXPECTED_START_TIME_DESC",
            "limit": 200,
        }
        assert ended_body == {
            "flow_runs": {
                "deployment_id": {"any_": ["d1"]},
                "state": {"type": {"any_": ["COMPLETED", "FAILED"]}},
                "end_time": {"is_null_": False, "after_": "2027-01-15T08:00:00Z"},
            },
            "sort": "END_TIME_DESC",
            "limit": 200,
        }
        assert upcoming_body["sort"] == "NEXT_SCHEDULED_START_TIME_ASC"
        assert upcoming_body["flow_runs"]["state"] == {
            "type": {"any_": ["SCHEDULED"]},
            "name": {"any_": ["Scheduled"]},
        }
        assert upcoming_body["flow_runs"]["next_scheduled_start_time"] == {
            "after_": "2027-01-15T08:00:00Z"
        }

    def test_a_malformed_run_is_skipped_and_counted_not_fatal(self) -> None:
        """A run without an end time (or an id) is left out of its listing and counted."""
        fake = FakePrefect()
        good = {
            "id": "r1",
            "deployment_id": "d1",
            "end_time": "2027-01-15T08:00:00Z",
            "state_type": "COMPLETED",
        }
        fake.on(
            "POST", "flow_runs/filter", [good, {**good, "id": None}, {**good, "end_time": None}]
        )
        api = make_api(fake)
        runs = asyncio.run(api.ended_runs_page(["d1"], (StateType.COMPLETED,), None, FAR))
        assert [r.id for r in runs] == ["r1"]
        assert api.rows_skipped == {"ended": 2, "upcoming": 0, "due": 0}

    def test_a_run_of_another_deployment_means_the_filter_failed(self) -> None:
        """An ignored filter would page on without end: the answer is malformed."""
        fake = FakePrefect()
        fake.on(
            "POST",
            "flow_runs/filter",
            [{"id": "r", "deployment_id": "d9", "end_time": "2027-01-15T08:00:00Z",
              "state_type": "COMPLETED"}],
        )  # fmt: skip
        with pytest.raises(MalformedResponse):
            asyncio.run(make_api(fake).ended_runs_page(["d1"], (StateType.COMPLETED,), None, FAR))


class TestPoller:
    """The poller reads deployment health on full polls and carries it over on short ones."""

    def make(
        self, events: list[FlowRunEvent], registry: CollectorRegistry | None = None
    ) -> tuple[Poller, FakeDeploymentsApi]:
        api = FakeApi()
        api.events = events
        health_api = FakeDeploymentsApi(listed=[DeploymentRecord("d1", "etl/nightly", False)])
        settings = PollSettings(
            interval=30,
            timeout=5,
            concurrency=2,
            heartbeat_multiple=3,
            deployments=DeploymentSelector(("etl/*",)),
        )
        # The exporter started a minute ago: the events since are settled by now.
        clock = [NOW - 60]
        poller = Poller(
            api,
            FakeStore(),
            settings,
            PollMetrics(registry or CollectorRegistry()),
            structlog.get_logger(),
            clock=lambda: clock[0],
            deployments_api=health_api,
        )
        clock[0] = NOW
        return poller, health_api

    def test_full_then_shortened_poll(self) -> None:
        """The shortened poll sends no deployment request and serves the last values."""
        poller, health_api = self.make([])
        full = asyncio.run(poller.poll_once(full=True))
        sent = len(health_api.requests)
        short = asyncio.run(poller.poll_once(full=False))
        assert len(health_api.requests) == sent
        assert full.deployment_health is not None
        assert short.deployment_health == full.deployment_health
        assert [d.name for d in full.deployment_health.deployments] == ["etl/nightly"]

    def test_a_failed_deployment_read_keeps_the_poll_and_the_last_values(self) -> None:
        """The rest of the poll is published; the error is counted by reason and logged once."""
        registry = CollectorRegistry()
        poller, health_api = self.make([], registry)
        first = asyncio.run(poller.poll_once(full=True))
        health_api.fail_on = "ended"
        with structlog.testing.capture_logs() as logs:
            second = asyncio.run(poller.poll_once(full=True))
            third = asyncio.run(poller.poll_once(full=True))
        assert second.deployment_health == third.deployment_health == first.deployment_health
        errors = "prefect_exporter_deployments_read_errors_total"
        assert registry.get_sample_value(errors, {"reason": "http_status"}) == 2
        assert registry.get_sample_value(errors, {"reason": "timeout"}) == 0
        assert [e["event"] for e in logs if e["event"].startswith("deployments_")] == [
            "deployments_read_failed"
        ]
        health_api.fail_on = None
        with structlog.testing.capture_logs() as logs:
            asyncio.run(poller.poll_once(full=True))
        assert [e["event"] for e in logs if e["event"].startswith("deployments_")] == [
            "deployments_read_recovered"
        ]

    def test_skipped_rows_are_counted_and_logged_by_the_poller(self) -> None:
        """The adapter's skips since the last poll become the counter and one log line."""
        registry = CollectorRegistry()
        poller, health_api = self.make([], registry)
        health_api.rows_skipped = {"ended": 0, "upcoming": 0, "due": 0}
        asyncio.run(poller.poll_once(full=True))
        health_api.rows_skipped = {"ended": 3, "upcoming": 0, "due": 1}
        with structlog.testing.capture_logs() as logs:
            asyncio.run(poller.poll_once(full=True))
            asyncio.run(poller.poll_once(full=True))
        skipped = "prefect_exporter_deployment_runs_skipped_total"
        assert registry.get_sample_value(skipped, {"listing": "ended"}) == 3
        assert registry.get_sample_value(skipped, {"listing": "due"}) == 1
        assert registry.get_sample_value(skipped, {"listing": "upcoming"}) == 0
        warnings = [e for e in logs if e["event"] == "deployment_runs_skipped"]
        assert [w["malformed_rows"] for w in warnings] == [{"ended": 3, "due": 1}]

    def test_throttling_of_the_deployment_read_still_fails_the_poll(self) -> None:
        """A 429 must reach the poller's back-off: it is not swallowed."""
        poller, health_api = self.make([])
        health_api.fail_on = "ended"
        health_api.fail_status = 429
        with pytest.raises(ApiStatusError):
            asyncio.run(poller.poll_once(full=True))

    def test_finished_runs_of_selected_deployments_are_counted_from_events(self) -> None:
        """Selected by name through the reader; other deployments' events are not counted."""
        other = [{**RELATED[0], "prefect.resource.name": "ml"}, RELATED[1], RELATED[2]]
        events = [
            parse_event({**event_json("FAILED", "Failed", RELATED), "occurred": iso(NOW - 50)}),
            parse_event({**event_json("COMPLETED", "Completed", other), "occurred": iso(NOW - 49)}),
        ]
        poller, _ = self.make([e for e in events if e is not None])
        snapshot = asyncio.run(poller.poll_once(full=True))
        assert snapshot.latency is not None
        assert snapshot.latency.finished == {("etl/nightly", "Failed"): 1}

    def test_no_reader_without_the_opt_in(self) -> None:
        """Without an include glob the snapshot has no deployment health and no request is sent."""
        health_api = FakeDeploymentsApi()
        poller = Poller(
            FakeApi(),
            FakeStore(),
            PollSettings(interval=30, timeout=5, concurrency=2, heartbeat_multiple=3),
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=lambda: NOW,
            deployments_api=health_api,
        )
        assert asyncio.run(poller.poll_once()).deployment_health is None
        assert health_api.requests == []
