"""Reads the health of selected deployments: last success and failure, next run, schedule.

Cost follows neither the number of runs nor (up to 200) the number of deployments:

- the deployment list (names, pause flag, schedules) is slow-changing and read every
  LIST_REFRESH_SECONDS: one page of 200 deployments and one request for their flows' names;
- the last end per deployment and outcome is found by listing ended runs latest first, for
  the deployments not yet found only (each page finds at least one), at the first poll and
  again at each list refresh (a run forced from one final state to another keeps its end time);
  in between by one listing of the runs that ended since the newest end seen (server clock),
  leaving out by id the runs already read in its overlap: one request a poll while fewer than
  200 runs of the selected deployments end between two polls, and a burst read once;
- the next upcoming run of every selected deployment (the next three for cron and rrule
  schedules, whose largest gap is shown as their informational interval) comes from one listing
  of Scheduled runs, earliest first, dropping deployments as they are found (one request a poll,
  a few more while some deployments schedule far more often than others);
- the latest due run of every selected deployment (the expected start of its newest
  auto-scheduled run whose expected start has passed, in any state) comes from one listing of
  auto-scheduled runs, latest expected start first, asking each further page only for the
  deployments not found yet (one request a poll, one more per deployment that schedules far
  less often than the others). It is read afresh every poll: Prefect deletes a paused
  deployment's Scheduled runs, due ones included, so a remembered value could be a run that no
  longer exists.

Every listing stops after MAX_PAGES pages a poll; a search that did not finish goes on at the
next poll. State changes only once every request of the read succeeded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from exporter.clock import Deadline, UnixTime
from exporter.records import (
    FAILURE_STATE_TYPES,
    DeploymentHealth,
    DeploymentRecord,
    DeploymentSelector,
    DueRun,
    EndedRun,
    StateType,
    UpcomingRun,
)

PAGE_SIZE = 200  # the API's page size, as prefect_api.PAGE_SIZE
# Names, pause flags and schedules change rarely; re-read them every five minutes.
LIST_REFRESH_SECONDS = 300.0
# Pages one search may read in one poll; an unfinished search goes on at the next poll.
MAX_PAGES = 5
# A run's end time is its terminal state's timestamp, taken by the process that proposed the
# state (the flow-run process, or the worker for Crashed) and stored a moment later: each read
# looks this far back before the previous one, so a run stored late is not missed.
END_OVERLAP_SECONDS = 120.0
# Runs already read that a listing of ends leaves out by id, at most (about 75 KB of request).
MAX_SEEN_ENDS = 2 * MAX_PAGES * PAGE_SIZE
# Upcoming runs read for a cron or rrule deployment (Prefect's scheduler keeps at least three
# ahead: PREFECT_API_SERVICES_SCHEDULER_MIN_RUNS): their largest gap is the shown interval.
CALENDAR_UPCOMING = 3
# The outcomes a deployment's last end is kept for.
OUTCOMES = (StateType.COMPLETED, *FAILURE_STATE_TYPES)


class DeploymentsApi(Protocol):
    """The reads the deployments reader needs (prefect_api.PrefectApi has them).

    `rows_skipped` counts malformed rows of the run listings left out, by listing, since the
    start (the poller exports and logs it).
    """

    @property
    def rows_skipped(self) -> Mapping[str, int]: ...

    async def deployments(self, deadline: Deadline) -> list[DeploymentRecord]: ...
    async def ended_runs_page(
        self,
        deployment_ids: Sequence[str],
        state_types: Sequence[StateType],
        after: UnixTime | None,
        deadline: Deadline,
        exclude_ids: Sequence[str] = (),
    ) -> list[EndedRun]: ...
    async def upcoming_runs_page(
        self,
        deployment_ids: Sequence[str],
        after: UnixTime,
        deadline: Deadline,
        exclude_ids: Sequence[str] = (),
    ) -> list[UpcomingRun]: ...
    async def due_runs_page(
        self, deployment_ids: Sequence[str], before: UnixTime, deadline: Deadline
    ) -> list[DueRun]: ...


class DeploymentsReader:
    """Health of the deployments `selector` selects, read within a few requests per poll.

    `counts(name)` says whether the events tracker should count a deployment's finished runs:
    the selected deployments that are exported (all matching ones until the cap is hit).
    """

    def __init__(
        self,
        api: DeploymentsApi,
        selector: DeploymentSelector,
        log: FilteringBoundLogger,
        refresh_seconds: float = LIST_REFRESH_SECONDS,
    ) -> None:
        self._api = api
        self._selector = selector
        self._log = log
        self._refresh_seconds = refresh_seconds
        self._listed_at: float | None = None
        self._deployments: tuple[DeploymentRecord, ...] = ()
        self._matching = 0
        self._exported: frozenset[str] = frozenset()
        # Latest end (Unix seconds) by deployment id and outcome, and the deployments whose
        # first search (all their history) is finished, per outcome.
        self._last_end: dict[str, dict[str, float]] = {}
        self._searched: dict[StateType, frozenset[str]] = {t: frozenset() for t in OUTCOMES}
        # The newest end time seen (Unix seconds, server clock): later listings of ends start
        # END_OVERLAP_SECONDS before it. None while no end was seen.
        self._ends_since: float | None = None
        self._read_once = False
        # Ids and end times of the runs read within the overlap of the window (at most
        # MAX_PAGES pages of them): left out of the next listing.
        self._seen_ends: dict[str, float] = {}
        self._seen_ends_next: dict[str, float] = {}
        self._upcoming: dict[str, tuple[float, ...]] = {}
        self._last_due: dict[str, float] = {}
        # Deployments whose latest due run the last poll's search did not reach.
        self._due_pending: frozenset[str] = frozenset()
        self._due_pending_next: frozenset[str] = frozenset()

    def counts(self, deployment: str) -> bool:
        """True when finished runs of `deployment` (`flow/deployment`) are to be counted."""
        if not self._selector.selects(deployment):
            return False
        capped = self._matching > len(self._deployments)
        return not capped or deployment in self._exported

    async def read(self, now: UnixTime, deadline: Deadline) -> DeploymentHealth:
        """The selected deployments' health as of `now`; raises PrefectApiError."""
        listed_at, deployments, matching = self._listed_at, self._deployments, self._matching
        # Wall-clock time (the poll's `now`): a clock stepped back re-reads the list at once.
        refresh = listed_at is None or not 0 <= now - listed_at < self._refresh_seconds
        if refresh:
            everything = await self._api.deployments(deadline)
            chosen = sorted(
                (d for d in everything if self._selector.selects(d.name)), key=lambda d: d.name
            )
            listed_at, matching = now, len(chosen)
            deployments = tuple(chosen[: self._selector.max])
        ids = [d.id for d in deployments]
        last_end = {i: dict(self._last_end.get(i, {})) for i in ids}
        # At each list refresh the history searches run again: a run forced from one final
        # state to another keeps its old end_time (Prefect's SetEndTime rule), so the
        # incremental listing by end time never sees it; a few requests every 5 minutes do.
        searched = {t: frozenset() if refresh else self._searched[t] & set(ids) for t in OUTCOMES}
        for outcome in OUTCOMES:
            # The whole history, latest first, for deployments not searched yet.
            todo = [i for i in ids if i not in searched[outcome]]
            found, finished = await self._latest(todo, (outcome,), None, deadline)
            for deployment_id in finished:  # the search's answer replaces what was known
                if deployment_id in found:
                    last_end[deployment_id][outcome] = found[deployment_id].end_time
                else:
                    last_end[deployment_id].pop(outcome, None)
            searched[outcome] = searched[outcome] | finished
        ends_since = await self._recent_ends(searched, last_end, now, deadline)
        upcoming = await self._next_runs(deployments, now, deadline)
        last_due = await self._last_due_runs(ids, now, deadline)
        # Every request succeeded: only now does the reader's state move.
        if matching > len(deployments) and (
            matching != self._matching or len(deployments) != len(self._deployments)
        ):
            self._log.warning(
                "deployments_capped",
                matching=matching,
                exported=len(deployments),
                hint="narrow --deployments.include or raise --deployments.max",
            )
        self._listed_at, self._deployments, self._matching = listed_at, deployments, matching
        self._exported = frozenset(d.name for d in deployments)
        self._last_end, self._searched, self._ends_since = last_end, searched, ends_since
        self._read_once = True
        self._seen_ends = self._seen_ends_next
        self._upcoming, self._last_due = upcoming, last_due
        self._due_pending = self._due_pending_next
        return DeploymentHealth(
            deployments=deployments,
            matching=matching,
            last_end={i: dict(ends) for i, ends in last_end.items()},
            upcoming=dict(upcoming),
            last_due=dict(last_due),
        )

    async def _last_due_runs(
        self, deployment_ids: Sequence[str], now: UnixTime, deadline: Deadline
    ) -> dict[str, float]:
        """Each deployment's latest due run: the expected start (Unix seconds) of its newest
        auto-scheduled run whose expected start is at `now` or earlier, whatever its state.

        Manual and triggered runs are left out (Prefect's `auto_scheduled` flag): they do not
        say when the schedule expected a run. Each page asks only for the deployments not found
        yet, so a deployment scheduled every minute cannot hide a daily one. A deployment whose
        search does not finish within MAX_PAGES keeps its last known value.
        """
        found: dict[str, float] = {}
        unresolved: set[str] = set()
        pages = 0
        # Those the last poll did not reach go first, so a search longer than MAX_PAGES
        # progresses from poll to poll instead of starting over.
        pending = self._due_pending & set(deployment_ids)
        for group in (pending, set(deployment_ids) - pending):
            remaining = set(group)
            while remaining and pages < MAX_PAGES:
                pages += 1
                runs = await self._api.due_runs_page(sorted(remaining), now, deadline)
                for run in runs:  # latest first: a deployment's first flagged run is its latest
                    if run.auto_scheduled and run.deployment_id in remaining:
                        found[run.deployment_id] = run.expected_start
                        remaining.discard(run.deployment_id)
                if len(runs) < PAGE_SIZE:
                    remaining.clear()  # the rest have no due run
                elif not any(r.auto_scheduled for r in runs):
                    break  # a full page of runs tagged by hand: the same page would come back
            unresolved |= remaining
        for deployment_id in unresolved:
            if deployment_id in self._last_due:
                found[deployment_id] = self._last_due[deployment_id]
        self._due_pending_next = frozenset(unresolved)
        return found

    async def _recent_ends(
        self,
        searched: Mapping[StateType, frozenset[str]],
        last_end: dict[str, dict[str, float]],
        now: UnixTime,
        deadline: Deadline,
    ) -> float | None:
        """Runs of searched deployments that ended since the last read; returns the new anchor.

        The window starts END_OVERLAP_SECONDS before the anchor: the newest end time seen
        (the server's clock, not the exporter's, so a skewed exporter clock misses nothing);
        None while no run has been seen to end (then the listing has no lower bound, and holds
        only runs that ended since). One listing of every outcome while it fits a page;
        otherwise one search per outcome (latest first, deployments dropped as found). The
        anchor moves only when every such search finished.
        """
        anchor = self._ends_since
        if not self._read_once:
            return self._newest(anchor, last_end)  # the first searches covered every end
        after = None if anchor is None else UnixTime(anchor - END_OVERLAP_SECONDS)
        ids = sorted(set().union(*searched.values()))
        if not ids:
            return self._newest(anchor, last_end)
        # Runs already read within the overlap are left out (by id), so a burst of ends is
        # read once, page by page, and not again at every poll while it lies in the overlap.
        seen = {i: e for i, e in self._seen_ends.items() if after is None or e >= after}
        for _ in range(MAX_PAGES):
            runs = await self._api.ended_runs_page(
                ids, OUTCOMES, after, deadline, exclude_ids=sorted(seen)
            )
            for run in runs:
                self._keep(last_end, run)
                seen[run.id] = run.end_time
            if len(runs) < PAGE_SIZE:
                newest = self._newest(anchor, last_end)
                self._seen_ends_next = self._within_overlap(seen, newest)
                return newest
        # More than MAX_PAGES pages ended since: each deployment's latest per outcome instead.
        # The runs read so far stay left out, so the next poll's listing goes on past them.
        complete = True
        for outcome in OUTCOMES:
            todo = sorted(searched[outcome])
            found, finished = await self._latest(todo, (outcome,), after, deadline)
            for run in found.values():
                self._keep(last_end, run)
            complete = complete and finished == set(todo)
        newest = self._newest(anchor, last_end) if complete else anchor
        self._seen_ends_next = self._within_overlap(seen, newest)
        return newest

    @staticmethod
    def _within_overlap(seen: Mapping[str, float], newest: float | None) -> dict[str, float]:
        """The runs read whose end lies in the next window's overlap, at most MAX_SEEN_ENDS
        (the latest ends): what the next listing leaves out."""
        floor = None if newest is None else newest - END_OVERLAP_SECONDS
        kept = sorted(
            ((e, i) for i, e in seen.items() if floor is None or e >= floor), reverse=True
        )
        return {i: e for e, i in kept[:MAX_SEEN_ENDS]}

    @staticmethod
    def _newest(anchor: float | None, last_end: Mapping[str, Mapping[str, float]]) -> float | None:
        """The newest end time known: never earlier than the previous anchor."""
        ends = [e for by_outcome in last_end.values() for e in by_outcome.values()]
        if anchor is not None:
            ends.append(anchor)
        return max(ends, default=None)

    @staticmethod
    def _keep(last_end: dict[str, dict[str, float]], run: EndedRun) -> None:
        ends = last_end.get(run.deployment_id)
        if ends is not None and run.end_time > ends.get(run.state_type, float("-inf")):
            ends[run.state_type] = run.end_time

    async def _latest(
        self,
        deployment_ids: Sequence[str],
        state_types: Sequence[StateType],
        after: UnixTime | None,
        deadline: Deadline,
    ) -> tuple[dict[str, EndedRun], frozenset[str]]:
        """Each deployment's latest run ending in `state_types` (at `after` or later).

        Returns those found, and the deployments whose search finished (found, or known to
        have no such run). Each page asks only for deployments not found yet, so its first run
        is a new find: at most one page per deployment, usually one for all.
        """
        remaining = set(deployment_ids)
        found: dict[str, EndedRun] = {}
        for _ in range(MAX_PAGES):
            if not remaining:
                break
            runs = await self._api.ended_runs_page(sorted(remaining), state_types, after, deadline)
            for run in runs:  # latest first: a deployment's first run is its latest
                if run.deployment_id in remaining and run.deployment_id not in found:
                    found[run.deployment_id] = run
            remaining -= set(found)
            if len(runs) < PAGE_SIZE:
                remaining.clear()  # the rest have no such run
        return found, frozenset(set(deployment_ids) - remaining)

    async def _next_runs(
        self, deployments: Sequence[DeploymentRecord], now: UnixTime, deadline: Deadline
    ) -> dict[str, tuple[float, ...]]:
        """The next scheduled starts of each deployment: CALENDAR_UPCOMING for those with a cron
        or rrule schedule (their largest gap is shown as an interval), one for the others.

        Earliest first; a deployment leaves the listing once it has what it needs, and the
        listing moves on from the last start read, so a deployment that schedules every minute
        cannot crowd out one that runs daily. A search that does not finish within MAX_PAGES
        keeps the starts already known (carried over from the last poll when none).
        """
        wanted = {d.id: CALENDAR_UPCOMING if d.calendar_schedules else 1 for d in deployments}
        starts: dict[str, list[UpcomingRun]] = {i: [] for i in wanted}
        remaining = set(wanted)
        after = now
        at_after: list[str] = []  # runs already read whose start is `after` (ties)
        for _ in range(MAX_PAGES):
            if not remaining:
                break
            runs = await self._api.upcoming_runs_page(
                sorted(remaining), after, deadline, exclude_ids=at_after
            )
            for run in runs:
                known = starts[run.deployment_id]
                if run.deployment_id in remaining and all(r.id != run.id for r in known):
                    known.append(run)
                    if len(known) >= wanted[run.deployment_id]:
                        remaining.discard(run.deployment_id)
            if len(runs) < PAGE_SIZE:
                remaining.clear()  # no more upcoming runs for the others
            else:
                # Keyset on (start, id): the next page starts at the last start read (the
                # filter is inclusive) and leaves out the runs already read at that instant, so
                # a full page at one instant moves on instead of coming back.
                last = runs[-1].start
                ties = [r.id for r in runs if r.start == last]
                at_after = [*at_after, *ties] if last == after else ties
                after = UnixTime(last)
        result = {i: tuple(r.start for r in runs) for i, runs in starts.items() if runs}
        for deployment_id in remaining:
            # A start already passed is no longer upcoming: never carry it over.
            carried = tuple(t for t in self._upcoming.get(deployment_id, ()) if t >= now)
            result.setdefault(deployment_id, carried)
        return {i: s for i, s in result.items() if s}
