"""Tests for the deployments reader: what it finds, and how few requests it needs for it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import structlog
import structlog.testing

from exporter.clock import Deadline, UnixTime
from exporter.deployments_reader import (
    END_OVERLAP_SECONDS,
    MAX_PAGES,
    PAGE_SIZE,
    DeploymentsReader,
)
from exporter.errors import ApiStatusError
from exporter.records import (
    DeploymentHealth,
    DeploymentRecord,
    DeploymentSelector,
    DueRun,
    EndedRun,
    StateType,
    UpcomingRun,
)

NOW = 1_800_000_000.0
DEADLINE = Deadline(1e12)
ALL = DeploymentSelector(include=("*",))


@dataclass
class FakeDeploymentsApi:
    """An in-memory Prefect: filters and sorts runs as /flow_runs/filter does, counts requests."""

    listed: list[DeploymentRecord] = field(default_factory=list)
    ended: list[EndedRun] = field(default_factory=list)
    upcoming: list[UpcomingRun] = field(default_factory=list)
    due: list[DueRun] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    fail_on: str | None = None
    fail_status: int = 500
    rows_skipped: dict[str, int] = field(default_factory=dict)

    def _call(self, what: str) -> None:
        self.requests.append(what)
        if what == self.fail_on:
            raise ApiStatusError("/flow_runs/filter", self.fail_status, None)

    async def deployments(self, deadline: Deadline) -> list[DeploymentRecord]:
        self._call("deployments")
        return list(self.listed)

    async def ended_runs_page(
        self,
        deployment_ids: Sequence[str],
        state_types: Sequence[StateType],
        after: UnixTime | None,
        deadline: Deadline,
        exclude_ids: Sequence[str] = (),
    ) -> list[EndedRun]:
        self._call("ended")
        excluded = set(exclude_ids)
        rows = [
            r
            for r in self.ended
            if r.deployment_id in deployment_ids
            and r.state_type in state_types
            and (after is None or r.end_time >= after)
            and r.id not in excluded
        ]
        return sorted(rows, key=lambda r: -r.end_time)[:PAGE_SIZE]

    async def upcoming_runs_page(
        self,
        deployment_ids: Sequence[str],
        after: UnixTime,
        deadline: Deadline,
        exclude_ids: Sequence[str] = (),
    ) -> list[UpcomingRun]:
        self._call("upcoming")
        excluded = set(exclude_ids)
        rows = [
            r
            for r in self.upcoming
            if r.deployment_id in deployment_ids and r.start >= after and r.id not in excluded
        ]
        return sorted(rows, key=lambda r: r.start)[:PAGE_SIZE]

    async def due_runs_page(
        self, deployment_ids: Sequence[str], before: UnixTime, deadline: Deadline
    ) -> list[DueRun]:
        self._call("due")
        rows = [
            r for r in self.due if r.deployment_id in deployment_ids and r.expected_start <= before
        ]
        return sorted(rows, key=lambda r: -r.expected_start)[:PAGE_SIZE]


def deployment(n: int, calendar: bool = False) -> DeploymentRecord:
    return DeploymentRecord(
        id=f"d{n}",
        name=f"etl/job-{n:03}",
        paused=False,
        active_schedules=1,
        interval=None if calendar else 3600.0,
        calendar_schedules=1 if calendar else 0,
    )


def ended(deployment_id: str, state: StateType, end: float, n: int = 0) -> EndedRun:
    return EndedRun(f"{deployment_id}-{state}-{end}-{n}", deployment_id, state, end)


def read(reader: DeploymentsReader, now: float = NOW) -> DeploymentHealth:
    return asyncio.run(reader.read(UnixTime(now), DEADLINE))


def reader_for(api: FakeDeploymentsApi, selector: DeploymentSelector = ALL) -> DeploymentsReader:
    return DeploymentsReader(api, selector, structlog.get_logger())


class TestSelection:
    """Globs on `flow/deployment`, exclusion winning, and a cap that is logged and counted."""

    def test_only_matching_deployments_are_read(self) -> None:
        """Include and exclude globs decide; the rest never reach a run listing."""
        api = FakeDeploymentsApi(listed=[deployment(1), deployment(2), deployment(3)])
        selector = DeploymentSelector(include=("etl/job-00*",), exclude=("*-002",))
        health = read(reader_for(api, selector))
        assert [d.name for d in health.deployments] == ["etl/job-001", "etl/job-003"]
        assert health.matching == 2

    def test_no_include_selects_nothing(self) -> None:
        """The feature is opt-in: without an include glob no deployment is selected."""
        assert not DeploymentSelector().enabled
        assert not DeploymentSelector(exclude=("*",)).selects("etl/a")

    def test_the_cap_keeps_the_first_by_name_and_logs_once(self) -> None:
        """Over the cap, the first N by name are exported; the log says so once, not every poll."""
        api = FakeDeploymentsApi(listed=[deployment(n) for n in (5, 1, 4, 2, 3)])
        reader = reader_for(api, DeploymentSelector(include=("*",), max=2))
        with structlog.testing.capture_logs() as logs:
            health = read(reader)
            read(reader, NOW + 30)
        assert [d.name for d in health.deployments] == ["etl/job-001", "etl/job-002"]
        assert health.matching == 5
        capped = [e for e in logs if e["event"] == "deployments_capped"]
        assert capped == [
            {
                "event": "deployments_capped",
                "log_level": "warning",
                "matching": 5,
                "exported": 2,
                "hint": "narrow --deployments.include or raise --deployments.max",
            }
        ]

    def test_finished_runs_are_counted_only_for_exported_deployments_when_capped(self) -> None:
        """Under the cap any matching name counts (new ones too); over it only exported ones."""
        api = FakeDeploymentsApi(listed=[deployment(1), deployment(2)])
        under = reader_for(api, DeploymentSelector(include=("etl/*",), max=5))
        read(under)
        assert under.counts("etl/job-002")
        assert under.counts("etl/created-since")
        assert not under.counts("other/job")
        over = reader_for(api, DeploymentSelector(include=("etl/*",), max=1))
        read(over)
        assert over.counts("etl/job-001")
        assert not over.counts("etl/job-002")


class TestLastEnds:
    """Last success and failures equal the latest runs' end times, at a cost that stays flat."""

    def test_first_read_finds_each_outcome_latest_end(self) -> None:
        """The latest Completed, Failed and Crashed end of each deployment, none where none."""
        api = FakeDeploymentsApi(
            listed=[deployment(1), deployment(2)],
            ended=[
                ended("d1", StateType.COMPLETED, NOW - 100),
                ended("d1", StateType.COMPLETED, NOW - 5000),
                ended("d1", StateType.FAILED, NOW - 300),
                ended("d2", StateType.CRASHED, NOW - 50),
                ended("d2", StateType.CANCELLED, NOW - 10),
            ],
        )
        health = read(reader_for(api))
        assert health.last_end == {
            "d1": {StateType.COMPLETED: NOW - 100, StateType.FAILED: NOW - 300},
            "d2": {StateType.CRASHED: NOW - 50},
        }

    def test_a_busy_deployment_cannot_hide_a_quiet_one(self) -> None:
        """Each page asks only for deployments not found yet: a busy one cannot hide a quiet one."""
        busy = [ended("d1", StateType.COMPLETED, NOW - i, i) for i in range(1, 1001)]
        quiet = [ended("d2", StateType.COMPLETED, NOW - 86400 * 3)]
        api = FakeDeploymentsApi(listed=[deployment(1), deployment(2)], ended=busy + quiet)
        health = read(reader_for(api))
        assert health.last_end["d2"][StateType.COMPLETED] == NOW - 86400 * 3
        assert health.last_end["d1"][StateType.COMPLETED] == NOW - 1
        # Completed: a full page finds d1, the next (d2 only) finds d2; Failed, Crashed: one each.
        assert api.requests.count("ended") == 4

    def test_later_polls_read_only_what_ended_since_in_one_request(self) -> None:
        """After the first read, one listing of recent ends a poll, with an overlap."""
        api = FakeDeploymentsApi(listed=[deployment(n) for n in range(100)])
        reader = reader_for(api)
        read(reader)
        api.requests.clear()
        api.ended.append(ended("d7", StateType.FAILED, NOW + 20))
        api.ended.append(ended("d7", StateType.COMPLETED, NOW + 25))
        health = read(reader, NOW + 30)
        assert api.requests == ["ended", "upcoming", "due"]
        assert health.last_end["d7"] == {
            StateType.FAILED: NOW + 20,
            StateType.COMPLETED: NOW + 25,
        }

    def test_a_run_stored_late_within_the_overlap_is_still_seen(self) -> None:
        """A run whose end time is before the last read but stored after it is not missed."""
        api = FakeDeploymentsApi(listed=[deployment(1)])
        reader = reader_for(api)
        read(reader)
        api.ended.append(ended("d1", StateType.CRASHED, NOW - END_OVERLAP_SECONDS / 2))
        health = read(reader, NOW + 30)
        assert health.last_end["d1"] == {StateType.CRASHED: NOW - END_OVERLAP_SECONDS / 2}

    def test_a_burst_of_ends_is_read_page_by_page(self) -> None:
        """More than a page of ends between two polls: the listing goes on past the runs
        already read, and still finds each deployment's latest."""
        api = FakeDeploymentsApi(listed=[deployment(1), deployment(2)])
        reader = reader_for(api)
        read(reader)
        api.ended += [ended("d1", StateType.COMPLETED, NOW + 10 + i / 100, i) for i in range(300)]
        api.ended.append(ended("d2", StateType.COMPLETED, NOW + 1))
        api.requests.clear()
        health = read(reader, NOW + 30)
        assert health.last_end["d2"] == {StateType.COMPLETED: NOW + 1}
        assert health.last_end["d1"] == {StateType.COMPLETED: NOW + 10 + 299 / 100}
        assert api.requests.count("ended") == 2

    def test_a_burst_beyond_the_page_limit_falls_back_to_one_search_per_outcome(self) -> None:
        """Over MAX_PAGES pages of ends: each deployment's latest per outcome instead, and the
        next polls go on from the runs already read rather than starting over."""
        api = FakeDeploymentsApi(listed=[deployment(1), deployment(2)])
        reader = reader_for(api)
        read(reader)
        api.ended += [ended("d1", StateType.FAILED, NOW + 1 + i / 1000, i) for i in range(1200)]
        api.ended.append(ended("d2", StateType.CRASHED, NOW + 0.5))
        api.requests.clear()
        health = read(reader, NOW + 30)
        assert health.last_end["d2"] == {StateType.CRASHED: NOW + 0.5}
        assert health.last_end["d1"] == {StateType.FAILED: NOW + 1 + 1199 / 1000}
        # 5 listing pages, then Completed 1, Failed 2 (d1, then d2), Crashed 1
        assert api.requests.count("ended") == 5 + 1 + 2 + 1
        # The next polls go on past the 1,000 runs read: 201 left (two pages), then none.
        api.requests.clear()
        read(reader, NOW + 60)
        assert api.requests.count("ended") == 2
        api.requests.clear()
        read(reader, NOW + 90)
        assert api.requests.count("ended") == 1

    def test_a_burst_costs_once_not_every_poll(self) -> None:
        """After the poll that read a burst, the next poll is back to one listing of ends."""
        api = FakeDeploymentsApi(listed=[deployment(1), deployment(2)])
        reader = reader_for(api)
        read(reader)
        api.ended += [ended("d1", StateType.FAILED, NOW + 10 + i / 100, i) for i in range(500)]
        read(reader, NOW + 30)
        api.requests.clear()
        read(reader, NOW + 60)
        assert api.requests.count("ended") == 1

    def test_a_forced_final_to_final_change_is_seen_at_the_next_list_refresh(self) -> None:
        """Failed forced to Completed keeps its old end_time: the re-search at the refresh
        dates the success and forgets the failure."""
        later = ended("d2", StateType.COMPLETED, NOW - 60)
        api = FakeDeploymentsApi(
            listed=[deployment(1), deployment(2)],
            ended=[ended("d1", StateType.FAILED, NOW - 3600), later],
        )
        reader = reader_for(api)
        assert read(reader).last_end["d1"] == {StateType.FAILED: NOW - 3600}
        api.ended = [ended("d1", StateType.COMPLETED, NOW - 3600), later]
        # A steady poll's window starts at the newest end seen, minus the overlap: not there.
        assert read(reader, NOW + 30).last_end["d1"] == {StateType.FAILED: NOW - 3600}
        health = read(reader, NOW + 300)
        assert health.last_end["d1"] == {StateType.COMPLETED: NOW - 3600}

    def test_the_window_follows_the_servers_end_times_not_the_exporters_clock(self) -> None:
        """An exporter clock an hour ahead of the server still sees a run that just ended."""
        api = FakeDeploymentsApi(
            listed=[deployment(1)], ended=[ended("d1", StateType.COMPLETED, NOW - 7200)]
        )
        reader = reader_for(api)
        read(reader, NOW + 3600)
        api.ended.append(ended("d1", StateType.FAILED, NOW - 30))  # the server's "now"
        health = read(reader, NOW + 3630)
        assert health.last_end["d1"][StateType.FAILED] == NOW - 30

    def test_cost_does_not_grow_with_runs_or_deployments(self) -> None:
        """10 and 100 deployments with 50 runs each: the same requests on a steady poll."""

        def steady_cost(count: int) -> tuple[int, int]:
            runs = [
                ended(f"d{n}", StateType.COMPLETED, NOW - 60 * i - n, i)
                for n in range(count)
                for i in range(50)
            ]
            api = FakeDeploymentsApi(listed=[deployment(n) for n in range(count)], ended=runs)
            reader = reader_for(api)
            read(reader)
            first = len(api.requests)
            api.requests.clear()
            read(reader, NOW + 30)
            return first, len(api.requests)

        # ended, upcoming, due
        assert steady_cost(10)[1] == steady_cost(100)[1] == 3
        assert steady_cost(10)[0] <= 7
        # 100 deployments x 50 runs: 200 runs a page give 4+ deployments a page at first.
        assert steady_cost(100)[0] <= 1 + 5 + 2 + 1 + 1


class TestUpcoming:
    """The next run of every deployment, and three for cron or rrule schedules."""

    def test_next_runs_per_deployment(self) -> None:
        """One upcoming start for interval schedules, three for cron and rrule schedules."""
        api = FakeDeploymentsApi(
            listed=[deployment(1), deployment(2, calendar=True), deployment(3)],
            upcoming=[
                UpcomingRun("a", "d1", NOW + 60),
                UpcomingRun("b", "d1", NOW + 3660),
                UpcomingRun("c", "d2", NOW + 100),
                UpcomingRun("d", "d2", NOW + 86500),
                UpcomingRun("e", "d2", NOW + 172900),
            ],
        )
        health = read(reader_for(api))
        assert health.upcoming == {
            "d1": (NOW + 60,),
            "d2": (NOW + 100, NOW + 86500, NOW + 172900),
        }
        assert api.requests.count("upcoming") == 1

    def test_a_minutely_deployment_cannot_crowd_out_a_daily_one(self) -> None:
        """Hundreds of runs of one deployment come first; the daily one's runs are found."""
        minutely = [UpcomingRun(f"m{i}", "d1", NOW + 60 * i) for i in range(1, 600)]
        daily = [UpcomingRun("x", "d2", NOW + 86400), UpcomingRun("y", "d2", NOW + 172800)]
        api = FakeDeploymentsApi(
            listed=[deployment(1, calendar=True), deployment(2, calendar=True)],
            upcoming=minutely + daily,
        )
        health = read(reader_for(api))
        assert health.upcoming["d2"] == (NOW + 86400, NOW + 172800)
        assert health.upcoming["d1"] == (NOW + 60, NOW + 120, NOW + 180)
        assert api.requests.count("upcoming") == 2


def due(deployment_id: str, start: float, auto: bool = True, n: int = 0) -> DueRun:
    return DueRun(f"{deployment_id}-due-{start}-{n}", deployment_id, start, auto)


class TestLastDue:
    """When each deployment's schedule last expected a run, from auto-scheduled runs only."""

    def test_the_newest_auto_scheduled_run_already_due(self) -> None:
        """Runs still ahead and manual runs do not count; in one request for all."""
        api = FakeDeploymentsApi(
            listed=[deployment(1), deployment(2), deployment(3)],
            due=[
                due("d1", NOW - 7200),
                due("d1", NOW - 3600),
                due("d1", NOW + 3600),  # not due yet
                due("d1", NOW - 60, auto=False),  # run by hand
                due("d2", NOW - 86400),
            ],
        )
        health = read(reader_for(api))
        assert health.last_due == {"d1": NOW - 3600, "d2": NOW - 86400}
        assert api.requests.count("due") == 1

    def test_a_minutely_deployment_cannot_hide_a_daily_one(self) -> None:
        """Hundreds of due runs of one deployment come first; the next page asks for the rest."""
        minutely = [due("d1", NOW - 60 * i) for i in range(600)]
        api = FakeDeploymentsApi(
            listed=[deployment(1), deployment(2)], due=[*minutely, due("d2", NOW - 80000)]
        )
        health = read(reader_for(api))
        assert health.last_due == {"d1": NOW, "d2": NOW - 80000}
        assert api.requests.count("due") == 2

    def test_runs_deleted_by_a_pause_are_forgotten_at_the_next_poll(self) -> None:
        """Prefect deletes a paused deployment's Scheduled runs, due ones too: no memory."""
        api = FakeDeploymentsApi(
            listed=[deployment(1)], due=[due("d1", NOW - 86400), due("d1", NOW - 600)]
        )
        reader = reader_for(api)
        assert read(reader).last_due == {"d1": NOW - 600}
        api.due = [due("d1", NOW - 86400)]  # the Late run was deleted by the pause
        assert read(reader, NOW + 30).last_due == {"d1": NOW - 86400}

    def test_a_full_page_tagged_by_hand_ends_the_search(self) -> None:
        """Runs tagged auto-scheduled by a person are skipped, and cannot loop the search."""
        api = FakeDeploymentsApi(
            listed=[deployment(1)], due=[due("d1", NOW - i, auto=False) for i in range(300)]
        )
        health = read(reader_for(api))
        assert health.last_due == {}
        assert api.requests.count("due") == 1

    def test_an_unfinished_search_progresses_across_polls(self) -> None:
        """A search longer than the page limit goes on at the next poll, not from the start."""
        listed = [deployment(n) for n in range(8)]
        # Each deployment has more due runs than a page, each later one older: one page each.
        runs = [due(f"d{n}", NOW - 1000 * n - i, n=i) for n in range(8) for i in range(PAGE_SIZE)]
        api = FakeDeploymentsApi(listed=listed, due=runs)
        reader = reader_for(api)
        first = read(reader).last_due
        assert set(first) == {f"d{n}" for n in range(5)}
        api.requests.clear()
        # The three not reached go first; d2..d4 keep the values of the first poll.
        second = read(reader, NOW + 30).last_due
        assert second == {f"d{n}": NOW - 1000 * n for n in range(8)}
        assert api.requests.count("due") == 5


class TestUpcomingTies:
    """Many runs at one instant (many schedules, or a backfill) do not stop the search."""

    def test_a_full_page_at_one_instant_moves_on_by_id(self) -> None:
        """250 runs of one deployment at one instant, then a daily one's run: found."""
        burst = [UpcomingRun(f"b{i:03}", "d1", NOW + 60) for i in range(250)]
        api = FakeDeploymentsApi(
            listed=[deployment(1, calendar=True), deployment(2)],
            upcoming=[*burst, UpcomingRun("x", "d2", NOW + 61)],
        )
        health = read(reader_for(api))
        assert health.upcoming["d2"] == (NOW + 61,)
        assert api.requests.count("upcoming") == 2


class TestUpcomingNotCarriedIntoThePast:
    """A next run carried over from an unfinished search never lies in the past."""

    def test_a_carried_start_that_has_passed_is_dropped(self) -> None:
        """The search for a deployment ends unfinished; its old start has passed by now."""
        listed = [deployment(n) for n in range(7)]
        api = FakeDeploymentsApi(
            listed=listed, upcoming=[UpcomingRun(f"u{n}", f"d{n}", NOW + 60) for n in range(7)]
        )
        reader = reader_for(api)
        assert read(reader).upcoming["d6"] == (NOW + 60,)
        # Now five deployments have a full page each before d5 and d6: the search stops
        # after MAX_PAGES pages without reaching d6, whose old start has passed.
        api.upcoming = [
            UpcomingRun(f"x{n}-{i}", f"d{n}", NOW + 100 + 1000 * n + i)
            for n in range(MAX_PAGES)
            for i in range(PAGE_SIZE)
        ]
        api.upcoming.append(UpcomingRun("late", "d6", NOW + 86400))
        api.requests.clear()
        health = read(reader, NOW + 90)
        assert api.requests.count("upcoming") == MAX_PAGES
        assert "d6" not in health.upcoming


class TestFailures:
    """A failed read changes nothing: the next poll reads the same windows again."""

    def test_a_failed_read_raises_and_keeps_the_state(self) -> None:
        """The poll fails as a whole; ends found before the failure are not half-committed."""
        api = FakeDeploymentsApi(listed=[deployment(1)])
        reader = reader_for(api)
        read(reader)
        api.ended.append(ended("d1", StateType.COMPLETED, NOW + 10))
        api.fail_on = "upcoming"
        with pytest.raises(ApiStatusError):
            read(reader, NOW + 30)
        api.fail_on = None
        api.requests.clear()
        health = read(reader, NOW + 60)
        assert health.last_end["d1"] == {StateType.COMPLETED: NOW + 10}
        assert api.requests == ["ended", "upcoming", "due"]

    def test_the_list_is_read_again_only_after_the_refresh_time(self) -> None:
        """Names, pause flags and schedules are read every five minutes, not every poll."""
        api = FakeDeploymentsApi(listed=[deployment(1)])
        reader = reader_for(api)
        for second in range(0, 600, 30):
            read(reader, NOW + second)
        assert api.requests.count("deployments") == 2

    def test_a_wall_clock_stepped_back_reads_the_list_again(self) -> None:
        """The refresh is timed on the poll's wall-clock time; a step back does not delay it."""
        api = FakeDeploymentsApi(listed=[deployment(1)])
        reader = reader_for(api)
        read(reader)
        read(reader, NOW - 3600)
        assert api.requests.count("deployments") == 2
