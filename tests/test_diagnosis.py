"""Tests for the findings engine: one snapshot per cause, the ranking and the pool selection."""

from __future__ import annotations

from dataclasses import replace

import pytest

from exporter.diagnosis import (
    ALWAYS_SHOWN,
    PRIORITY,
    ApiRead,
    Cause,
    Extras,
    Finding,
    Thresholds,
    diagnose,
    duration_text,
    rank,
)
from exporter.records import (
    KNOWN_STATE_NAMES,
    HistogramState,
    LatencyStats,
    LimitKind,
    PoolSelector,
    RunPlace,
)
from exporter.snapshot import LimitState, PoolState, QueueState, Snapshot, WorkerState

NOW = 1_800_000_000.0


def queue(
    pool: str = "etl",
    name: str = "default",
    *,
    due: int = 0,
    awaiting: int = 0,
    pending: int = 0,
    running: int = 0,
    status: str = "READY",
    limit: int | None = None,
    polled_ago: float | None = 5.0,
    due_ago: float = 600.0,
    pending_ago: float | None = None,
) -> QueueState:
    counts = dict.fromkeys(map(str, KNOWN_STATE_NAMES), 0)
    counts |= {
        "Late": due,
        "AwaitingConcurrencySlot": awaiting,
        "Pending": pending,
        "Running": running,
    }
    return QueueState(
        pool=pool,
        name=name,
        status=status,
        priority=1,
        concurrency_limit=limit,
        last_polled=None if polled_ago is None else NOW - polled_ago,
        runs_by_state=tuple(counts.items()),
        backlog=due + awaiting,
        oldest_due=NOW - due_ago if due or awaiting else None,
        oldest_pending_since=(NOW - pending_ago) if pending_ago is not None else None,
        in_flight=pending + running,
        oldest_awaiting_slot=NOW - due_ago if awaiting else None,
    )


def pool(
    name: str = "etl",
    *,
    status: str = "READY",
    limit: int | None = None,
    online: int = 1,
    in_flight: int = 0,
) -> PoolState:
    return PoolState(name, "process", status, limit, online, in_flight)


def worker(pool: str = "etl", name: str = "w1", online: bool = True) -> WorkerState:
    return WorkerState(pool, name, NOW - (5 if online else 900), 30.0, online)


def snap(
    pools: tuple[PoolState, ...] = (),
    queues: tuple[QueueState, ...] = (),
    workers: tuple[WorkerState, ...] = (),
    limits: tuple[LimitState, ...] = (),
    orphans: int | None = 0,
) -> Snapshot:
    return Snapshot(
        NOW,
        pools or (pool(),),
        queues,
        workers if workers or not pools else (),
        limits,
        runs_without_work_queue=orphans,
    )


def first(snapshot: Snapshot, extras: Extras | None = None) -> Finding:
    return diagnose(snapshot, extras or Extras()).findings[0]


def causes(snapshot: Snapshot, extras: Extras | None = None) -> list[Cause]:
    return [f.cause for f in diagnose(snapshot, extras or Extras()).findings]


def tag_limit(tag: str, slots: int, active: int, leaked: int = 0) -> LimitState:
    return LimitState(f"tag:{tag}", LimitKind.TAG, "", slots, active, True, leaked, f"tag:{tag}")


def deployment_limit(
    name: str, deployment_id: str, slots: int, active: int, leaked: int = 0
) -> LimitState:
    return LimitState(
        f"deployment:{name}",
        LimitKind.DEPLOYMENT,
        name,
        slots,
        active,
        True,
        leaked,
        f"deployment:{deployment_id}",
    )


class TestHealthy:
    """Nothing held back: the one finding is `none`."""

    def test_a_flowing_workspace_is_none(self) -> None:
        """Runs running, queue polled, worker online, no backlog: healthy."""
        s = snap((pool(in_flight=2),), (queue(running=2),), (worker(),))
        d = diagnose(s, Extras())
        assert [f.cause for f in d.findings] == [Cause.NONE]
        assert d.healthy
        assert d.findings[0].fix is None

    def test_an_idle_pool_without_workers_is_none(self) -> None:
        """No due run, no finding: a pool nobody uses is not a problem."""
        assert causes(snap((pool(online=0),), (queue(polled_ago=None),))) == [Cause.NONE]

    def test_runs_scheduled_for_later_are_not_due(self) -> None:
        """A future run in a paused queue holds nothing back yet."""
        s = snap((pool(),), (queue(status="PAUSED"),), (worker(),))
        assert causes(s) == [Cause.NONE]


class TestPausedPoolAndQueue:
    """Paused pools and queues with due runs, and the command that resumes them."""

    def test_paused_pool_comes_before_its_missing_workers(self) -> None:
        """Same runs held: the paused pool is the cause named first."""
        s = snap((pool(status="PAUSED", online=0),), (queue(due=3),))
        d = diagnose(s, Extras())
        assert [f.cause for f in d.findings] == [Cause.POOL_PAUSED, Cause.NO_ONLINE_WORKER]
        found = d.findings[0]
        assert (found.work_pool, found.work_queue, found.runs) == ("etl", None, 3)
        assert found.fix == "prefect work-pool resume etl"
        assert found.evidence["due_runs"] == 3
        assert found.evidence["oldest_due_age_seconds"] == 600.0
        assert "paused while 3 runs are due (oldest waiting 10m)" in found.summary

    def test_paused_queue(self) -> None:
        """A paused queue with due runs names the queue and its pool in the command."""
        s = snap((pool(),), (queue(name="high", due=2, status="PAUSED"),), (worker(),))
        found = first(s)
        assert (found.cause, found.work_queue, found.runs) == (Cause.QUEUE_PAUSED, "high", 2)
        assert found.fix == "prefect work-queue resume high --pool etl"

    def test_names_with_spaces_are_quoted_for_the_shell(self) -> None:
        """The command stays one word per name."""
        s = snap((pool("my pool", status="PAUSED"),), (queue("my pool", due=1),))
        assert first(s).fix == "prefect work-pool resume 'my pool'"


class TestWorkers:
    """Nobody to take the runs: no online worker, or workers on other queues."""

    def test_no_online_worker_lists_the_offline_ones(self) -> None:
        """The pool's known workers and when they were last seen are the evidence."""
        s = snap((pool(online=0),), (queue(due=4),), (worker(name="w-old", online=False),))
        found = first(s)
        assert found.cause is Cause.NO_ONLINE_WORKER
        assert found.fix == "prefect worker start --pool etl"
        assert found.evidence["offline_workers"] == ("w-old",)
        assert "w-old last seen 15m ago" in found.summary

    def test_queue_not_polled_while_workers_poll_another(self) -> None:
        """Workers alive, `high` never polled: start one for it."""
        s = snap(
            (pool(),),
            (queue(name="default", polled_ago=3), queue(name="high", due=5, polled_ago=None)),
            (worker(name="w1"),),
        )
        found = first(s)
        assert (found.cause, found.work_queue, found.runs) == (Cause.QUEUE_NOT_POLLED, "high", 5)
        assert found.fix == "prefect worker start --pool etl --work-queue high"
        assert found.evidence["polled_queues"] == ("default",)
        assert found.evidence["last_polled_age_seconds"] is None
        assert "never polled" in found.summary
        assert "polls only default" in found.summary

    def test_a_queue_polled_recently_is_served(self) -> None:
        """Polled within the threshold: its due runs are not a polling problem."""
        s = snap((pool(),), (queue(due=5, polled_ago=30),), (worker(),))
        assert Cause.QUEUE_NOT_POLLED not in causes(s)
        slow = Thresholds(queue_poll_age=10)
        found = diagnose(s, Extras(), slow).findings[0]
        assert found.cause is Cause.QUEUE_NOT_POLLED
        assert found.evidence["last_polled_age_seconds"] == 30.0


class TestPoolAndQueueLimits:
    """In-flight runs at the limit while runs are due; the fix raises the limit."""

    def test_pool_limit(self) -> None:
        """Limit 10 reached with 738 due: the command raises it to admit them all."""
        s = snap((pool(limit=10, in_flight=10),), (queue(due=738, running=10),), (worker(),))
        found = first(s)
        assert (found.cause, found.work_pool, found.runs) == (
            Cause.POOL_CONCURRENCY_LIMIT,
            "etl",
            738,
        )
        assert found.fix == "prefect work-pool set-concurrency-limit etl 748"
        assert found.evidence["concurrency_limit"] == 10
        assert found.evidence["in_flight_runs"] == 10

    def test_a_pool_below_its_limit_is_not_saturated(self) -> None:
        """Room left: the limit is not why runs wait."""
        s = snap((pool(limit=10, in_flight=9),), (queue(due=3, running=9),), (worker(),))
        assert Cause.POOL_CONCURRENCY_LIMIT not in causes(s)

    def test_queue_limit(self) -> None:
        """Queue limit 1 with 4 due."""
        s = snap((pool(in_flight=1),), (queue(due=4, running=1, limit=1),), (worker(),))
        found = first(s)
        assert (found.cause, found.work_queue) == (Cause.QUEUE_CONCURRENCY_LIMIT, "default")
        assert found.fix == "prefect work-queue set-concurrency-limit default 5 --pool etl"


class TestDeploymentLimit:
    """AwaitingConcurrencySlot runs, tied to their deployment's limit by the sample."""

    def test_the_deployment_and_its_limit_are_named(self) -> None:
        """The sample says which deployment holds the queue's runs; the fix raises its limit."""
        s = snap(
            (pool(in_flight=1),),
            (queue(awaiting=3, running=1),),
            (worker(),),
            (deployment_limit("quick/one", "d1", 1, 1),),
        )
        extras = Extras(
            awaiting_slot=tuple(RunPlace(f"r{i}", "etl", "default", "d1") for i in "abc")
        )
        found = first(s, extras)
        assert (found.cause, found.work_queue, found.runs) == (
            Cause.DEPLOYMENT_CONCURRENCY_LIMIT,
            "default",
            3,
        )
        assert found.fix == "prefect gcl update deployment:d1 --limit 4"
        assert found.evidence["deployments"] == ("quick/one",)
        assert "quick/one (3 waiting, 1 of 1 slots taken)" in found.summary

    def test_without_a_sample_the_only_full_limit_is_the_candidate(self) -> None:
        """No sampled run of this queue: one saturated deployment limit still gets the fix."""
        s = snap(
            (pool(),),
            (queue(awaiting=2),),
            (worker(),),
            (deployment_limit("quick/one", "d1", 1, 1), deployment_limit("a/b", "d2", 5, 0)),
        )
        found = first(s)
        assert found.fix == "prefect gcl update deployment:d1 --limit 3"


class TestTagLimitsAndLeaks:
    """Tag limits full of live holders, and slots held by crashed runs."""

    def test_tag_limit_full_of_live_tasks(self) -> None:
        """Every slot taken by running tasks while flow runs wait: raise the limit."""
        s = snap((pool(in_flight=3),), (queue(running=3),), (worker(),), (tag_limit("db", 1, 1),))
        waiters = (RunPlace("f1", "etl", "default"), RunPlace("f2", "etl", "default"))
        found = first(s, Extras(tag_waiters={"db": waiters}))
        assert (found.cause, found.work_pool, found.work_queue, found.runs) == (
            Cause.TAG_CONCURRENCY_LIMIT,
            "etl",
            "default",
            2,
        )
        assert found.fix == "prefect concurrency-limit create db 3"

    def test_leaked_tag_slot_comes_before_the_full_limit(self) -> None:
        """The slot of a crashed run is leaked: reset is the fix, not a bigger limit."""
        s = snap(
            (pool(in_flight=1),), (queue(running=1),), (worker(),), (tag_limit("db", 1, 1, 1),)
        )
        waiters = (RunPlace("f2", "etl", "default"),)
        d = diagnose(s, Extras(tag_waiters={"db": waiters}))
        assert [f.cause for f in d.findings] == [Cause.LEAKED_CONCURRENCY_SLOTS]
        found = d.findings[0]
        assert found.fix == "prefect concurrency-limit reset db"
        assert found.evidence["leaked_slots"] == 1
        assert found.work_pool == "etl"

    def test_a_leak_nobody_waits_for_is_workspace_wide(self) -> None:
        """No waiter: the finding has no pool and holds no run back."""
        s = snap((pool(),), (), (worker(),), (tag_limit("db", 2, 1, 1),))
        found = first(s)
        assert (found.cause, found.work_pool, found.runs) == (
            Cause.LEAKED_CONCURRENCY_SLOTS,
            None,
            0,
        )

    def test_leaked_deployment_slots_reset_the_active_count(self) -> None:
        """A deployment limit holding a slot without a run: set its active slots to the truth."""
        s = snap(
            (pool(),),
            (queue(awaiting=2),),
            (worker(),),
            (deployment_limit("quick/one", "d1", 1, 1, leaked=1),),
        )
        extras = Extras(awaiting_slot=(RunPlace("r1", "etl", "default", "d1"),))
        d = diagnose(s, extras)
        assert d.findings[0].cause is Cause.LEAKED_CONCURRENCY_SLOTS
        assert d.findings[0].fix == "prefect gcl update deployment:d1 --active-slots 0"
        # The runs it holds are not blamed on a full limit as well.
        assert Cause.DEPLOYMENT_CONCURRENCY_LIMIT not in [f.cause for f in d.findings]

    def test_a_disabled_limit_holds_nothing(self) -> None:
        """A switched-off limit is not enforced."""
        off = replace(tag_limit("db", 1, 1, 1), enabled=False)
        assert causes(snap((pool(),), (), (worker(),), (off,))) == [Cause.NONE]


class TestRunsWithoutWorkQueue:
    """Runs whose queue was deleted: counted, named, and the command to remove them."""

    def test_named_by_the_deleted_queue_and_deployment(self) -> None:
        """The sample gives the old queue name, the deployment and run ids."""
        sample = (
            RunPlace("r1", None, "doomed", "d9"),
            RunPlace("r2", None, "doomed", "d9"),
        )
        s = snap((pool(),), (), (worker(),), orphans=30)
        found = first(s, Extras(orphans=sample, deployment_names={"d9": "quick/nightly"}))
        assert (found.cause, found.work_pool, found.work_queue, found.runs) == (
            Cause.RUNS_WITHOUT_WORK_QUEUE,
            None,
            "doomed",
            30,
        )
        assert found.evidence["deployments"] == ("quick/nightly",)
        assert found.evidence["run_ids"] == ("r1", "r2")
        assert found.fix == "prefect flow-run delete r1"

    def test_left_out_when_a_pool_is_selected(self) -> None:
        """They belong to no pool, so `--work-pool etl` does not show them."""
        s = snap((pool(),), (), (worker(),), orphans=3)
        extras = Extras(pools=PoolSelector(include=("etl",)))
        assert causes(s, extras) == [Cause.NONE]


class TestRateLimiting:
    """429s met by the diagnosis' own read."""

    def test_throttled_read_is_a_finding_even_for_one_pool(self) -> None:
        """Shown whatever the pool selection; the fix slows the pool's workers' polling."""
        extras = Extras(
            api=ApiRead(requests=40, throttled=2, retry_after=1.0),
            pools=PoolSelector(include=("etl",)),
        )
        found = first(snap((pool(),), (), (worker(),)), extras)
        assert found.cause is Cause.API_RATE_LIMITED
        assert found.evidence == {
            "throttled_responses": 2,
            "requests": 40,
            "retry_after_seconds": 1.0,
        }
        assert found.fix == "PREFECT_WORKER_QUERY_SECONDS=30 prefect worker start --pool etl"


class TestSlowInfrastructure:
    """Claimed quickly, slow to start."""

    def test_pending_past_the_threshold_with_event_delays(self) -> None:
        """The oldest Pending run waited 7 minutes; events show pickup fast, start slow."""
        latency = LatencyStats(
            pickup={"etl": HistogramState().observe(2).observe(4)},
            start={"etl": HistogramState().observe(400).observe(440)},
        )
        s = snap((pool(in_flight=2),), (queue(pending=2, pending_ago=420),), (worker(),))
        found = first(s, Extras(latency=latency, latency_window=900))
        assert (found.cause, found.runs) == (Cause.SLOW_INFRASTRUCTURE, 2)
        assert found.evidence["mean_pickup_delay_seconds"] == 3.0
        assert found.evidence["mean_start_delay_seconds"] == 420.0
        assert "claimed 3s after their scheduled time and started 7m after that" in found.summary

    def test_pending_under_the_threshold_is_normal(self) -> None:
        """A process worker takes seconds to start a run: not a finding."""
        s = snap((pool(in_flight=1),), (queue(pending=1, pending_ago=20),), (worker(),))
        assert causes(s) == [Cause.NONE]
        tight = diagnose(s, Extras(), Thresholds(slow_start=10)).findings[0]
        assert tight.cause is Cause.SLOW_INFRASTRUCTURE


class TestRanking:
    """Most runs held back first; on a tie the more fundamental cause."""

    def test_the_seed_situation(self) -> None:
        """A burst held by the pool limit comes before a smaller queue that nobody polls."""
        s = snap(
            (pool(limit=10, in_flight=10),),
            (
                queue(name="default", due=738, running=10),
                queue(name="high", due=10, polled_ago=None),
            ),
            (worker(),),
        )
        assert causes(s) == [Cause.POOL_CONCURRENCY_LIMIT, Cause.QUEUE_NOT_POLLED]
        assert first(s).runs == 748

    def test_priority_is_a_permutation_of_the_causes(self) -> None:
        """Every cause has exactly one place in the tie-break order."""
        assert sorted(PRIORITY) == sorted(Cause)
        assert set(Cause) >= ALWAYS_SHOWN

    def test_with_a_selection_other_pools_findings_are_left_out(self) -> None:
        """`--work-pool etl`: a finding of another pool is not shown."""
        other = Finding(Cause.POOL_PAUSED, "ops", None, 9, "", {}, None)
        mine = Finding(Cause.QUEUE_PAUSED, "etl", "q", 1, "", {}, None)
        ranked = rank([other, mine], PoolSelector(include=("etl",)))
        assert [f.work_pool for f in ranked] == ["etl"]
        assert [f.work_pool for f in rank([mine, other], PoolSelector())] == ["ops", "etl"]


class TestReport:
    """The per-pool and per-queue report behind the findings."""

    def test_queue_report_separates_due_from_awaiting(self) -> None:
        """Due counts runs waiting for a worker; awaiting-slot runs are their own column."""
        d = diagnose(snap((pool(),), (queue(due=2, awaiting=3, pending=1),), (worker(),)), Extras())
        (q,) = d.pools[0].queues
        assert (q.backlog, q.due, q.awaiting_slot, q.pending) == (5, 2, 3, 1)
        assert q.last_polled_age == 5.0

    def test_limits_report_waiting_runs_where_known(self) -> None:
        """Tag waiters read for a full limit are counted; an unread limit says unknown."""
        s = snap((pool(),), (), (worker(),), (tag_limit("db", 1, 1), tag_limit("x", 5, 0)))
        d = diagnose(s, Extras(tag_waiters={"db": (RunPlace("f", "etl", "default"),)}))
        assert {x.name: x.waiting for x in d.limits} == {"tag:db": 1, "tag:x": None}


class TestDurationText:
    """Durations read like a person would say them, rounded down."""

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [
            (0, "0s"),
            (59.9, "59s"),
            (60, "1m"),
            (3599, "59m"),
            (3600, "1h"),
            (3660, "1h 1m"),
            (86400, "1d"),
            (90000, "1d 1h"),
            (-5, "0s"),
        ],
    )
    def test_duration_text(self, seconds: float, text: str) -> None:
        """Seconds, minutes, hours and days, two units at most."""
        assert duration_text(seconds) == text
