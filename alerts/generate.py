"""Generates prefect-exporter's Prometheus rules from one table of alerts and one of settings.

    python alerts/generate.py                         # rewrite alerts/prefect-exporter.rules.yml
    python alerts/generate.py --selector 'job="prefect",env="prod"' \\
        --set backlog_age_seconds=1800 --out my-rules.yml   # a variant with your own knobs
    python alerts/generate.py --for 2s --out test-rules.yml  # every `for:` 2s: tests and demos only

The committed rules file is this script's output with the defaults below; a test regenerates it
and fails on any difference, and promtool unit tests run against it. Every alert aggregates with
`max by (job, ...)`, so two exporter replicas (identical series, different `instance`) never page
twice, and the alert keeps the labels its description needs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "prefect-exporter.rules.yml"

# The knobs, in one place (documented in alerts/README.md).
DEFAULTS: dict[str, Any] = {
    "selector": 'job="prefect-exporter"',
    "runbook_base": "https://github.com/prefect-exporter/prefect-exporter/blob/main/docs/runbooks",
    "dashboard_base": "https://grafana.example.com/d",  # where grafana/*.json are imported
    "stale_data_seconds": 300,  # about ten polls at the default 30 s interval
    "backlog_age_seconds": 900,  # the oldest due run has waited 15 minutes
    "backlog_growing_min_runs": 50,
    "pending_age_seconds": 900,  # claimed but infrastructure not running for 15 minutes
    "running_age_seconds": 21600,  # 6 hours: set it above your longest normal run
    "cancelling_age_seconds": 900,  # Prefect itself gives up after 300 s
    "queue_poll_age_seconds": 300,  # Prefect marks a queue NOT_READY after 60 s
    "worker_429_per_second": 0.05,  # 3 throttled responses a minute
    # A scheduled deployment pages when its latest due run fell due longer ago than this and
    # no run succeeded since: set it above your slowest deployment's normal start plus run time.
    "deployment_due_grace_seconds": 3600,
}

POOL = "job, work_pool"
QUEUE = "job, work_pool, work_queue"
DEPLOYMENT = "job, deployment"


def alerts(s: dict[str, Any]) -> list[dict[str, Any]]:
    sel = s["selector"]

    def m(name: str, extra: str = "") -> str:
        """A metric with the job selector (and extra matchers)."""
        return f"{name}{{{sel}{', ' + extra if extra else ''}}}"

    is_paused, throttled, too_many = 'status="PAUSED"', 'code=~"429|503"', 'code="429"'
    short = 'outcome!="delayed"'
    backlog = f"max by ({QUEUE}) ({m('prefect_work_queue_backlog_runs')})"
    paused_pool = f"max by ({POOL}) ({m('prefect_work_pool_status', is_paused)}) == 1"

    def per_deployment(name: str) -> str:
        return f"max by ({DEPLOYMENT}) ({m(name)})"

    last_success = per_deployment("prefect_deployment_last_success_timestamp_seconds")
    last_failure = per_deployment("prefect_deployment_last_failure_timestamp_seconds")
    paused_deployment = f"{per_deployment('prefect_deployment_paused')} == 1"
    last_due = per_deployment("prefect_deployment_last_due_run_timestamp_seconds")
    next_run = per_deployment("prefect_deployment_next_scheduled_run_timestamp_seconds")
    active = per_deployment("prefect_deployment_active_schedules")
    grace = s["deployment_due_grace_seconds"]
    return [
        # -- blind spots -------------------------------------------------------------------
        {
            "alert": "PrefectExporterDown",
            "expr": f"max by (job) ({m('up')}) == 0 or absent({m('up')})",
            "for": "5m",  # a target down is already several failed scrapes
            "severity": "critical",
            "summary": "prefect-exporter cannot be scraped: nothing about Prefect is known.",
            "description": "No prefect-exporter target of job {{ $labels.job }} has answered a "
            "scrape for 5 minutes. Stuck runs would not page.",
        },
        {
            "alert": "PrefectApiDown",
            "expr": f"max by (job) ({m('prefect_up')}) == 0",
            "for": "5m",
            "severity": "critical",
            "summary": "prefect-exporter cannot read the Prefect API.",
            "description": "The last polls of job {{ $labels.job }} failed; Prefect data is "
            "stale or gone. See prefect_exporter_poll_errors_total for the reason.",
        },
        {
            "alert": "PrefectExporterDataStale",
            "expr": f"time() - max by (job) "
            f"({m('prefect_exporter_last_success_timestamp_seconds')}) "
            f"> {s['stale_data_seconds']}",
            "for": "5m",
            "severity": "warning",
            "summary": "prefect-exporter has not completed a poll for several intervals.",
            "description": "The last successful poll of job {{ $labels.job }} was "
            "{{ $value | humanizeDuration }} ago.",
        },
        {
            "alert": "PrefectExporterRateLimited",
            "expr": f"sum by (job) (rate({m('prefect_exporter_api_requests_total', throttled)}"
            f"[5m])) > 0",
            "for": "15m",
            "severity": "warning",
            "summary": "The Prefect API is throttling prefect-exporter.",
            "description": 'Job {{ $labels.job }} receives {{ printf "%.3g" $value }} throttled '
            "(429/503) responses per second; polling pauses as the API asks.",
        },
        {
            "alert": "PrefectExporterRequestBudgetExhausted",
            # Delayed polls waited a moment for their full cost: pacing, not a shortage.
            "expr": f"sum by (job) (rate({m('prefect_exporter_request_budget_polls_total', short)}"
            f"[15m])) > 0",
            "for": "15m",
            "severity": "warning",
            "summary": "prefect-exporter's request budget cannot afford its polls.",
            "description": "Polls of job {{ $labels.job }} are being shortened or skipped to stay "
            "within --prefect.requests-per-minute.",
        },
        # -- runs not flowing -----------------------------------------------------------------
        {
            "alert": "PrefectWorkQueueBacklogStuck",
            "expr": f"max by ({QUEUE}) (time() - "
            f"{m('prefect_work_queue_oldest_due_run_timestamp_seconds')}) "
            f"> {s['backlog_age_seconds']} and on ({QUEUE}) {backlog} > 0",
            # The age threshold already measures how long runs wait; `for` only rides out a poll.
            "for": "2m",
            "severity": "critical",
            "summary": "Runs are due but nobody picks them up.",
            "description": "The oldest due run in {{ $labels.work_pool }}/{{ $labels.work_queue }}"
            " has waited {{ $value | humanizeDuration }}.",
        },
        {
            "alert": "PrefectWorkQueueBacklogGrowing",
            "expr": f"max by ({QUEUE}) (deriv({m('prefect_work_queue_backlog_runs')}[30m])) > 0 "
            f"and on ({QUEUE}) {backlog} > {s['backlog_growing_min_runs']}",
            "for": "30m",
            "severity": "warning",
            "summary": "A work queue's backlog keeps growing.",
            "description": "The backlog of {{ $labels.work_pool }}/{{ $labels.work_queue }} has "
            'grown for 30 minutes ({{ printf "%.3g" $value }} runs a second).',
        },
        {
            "alert": "PrefectRunsPendingTooLong",
            "expr": f"max by ({QUEUE}) (time() - "
            f"{m('prefect_work_queue_oldest_pending_run_timestamp_seconds')}) "
            f"> {s['pending_age_seconds']}",
            "for": "5m",  # the age itself is the duration; `for` rides out one poll
            "severity": "warning",
            "summary": "Runs were claimed by a worker but their infrastructure does not start.",
            "description": "A run in {{ $labels.work_pool }}/{{ $labels.work_queue }} has been "
            "Pending for {{ $value | humanizeDuration }}.",
        },
        {
            "alert": "PrefectRunsRunningTooLong",
            "expr": f"max by ({QUEUE}) (time() - "
            f"{m('prefect_work_queue_oldest_running_run_timestamp_seconds')}) "
            f"> {s['running_age_seconds']}",
            "for": "15m",
            "severity": "warning",
            "summary": "A run has been Running far longer than usual.",
            "description": "A run in {{ $labels.work_pool }}/{{ $labels.work_queue }} has been "
            "Running for {{ $value | humanizeDuration }}; it may be a zombie.",
        },
        {
            "alert": "PrefectRunsCancellingTooLong",
            "expr": f"max by ({QUEUE}) (time() - "
            f"{m('prefect_work_queue_oldest_cancelling_run_timestamp_seconds')}) "
            f"> {s['cancelling_age_seconds']}",
            "for": "5m",
            "severity": "warning",
            "summary": "A run is stuck in Cancelling.",
            "description": "A run in {{ $labels.work_pool }}/{{ $labels.work_queue }} has been "
            "Cancelling for {{ $value | humanizeDuration }}.",
        },
        # -- nobody to do the work -------------------------------------------------------------
        {
            "alert": "PrefectNoOnlineWorkers",
            "expr": f"max by ({POOL}) ({m('prefect_work_pool_online_workers')}) == 0 "
            f"and on ({POOL}) sum by ({POOL}) ({backlog}) > 0 "
            f"unless on ({POOL}) {paused_pool}",
            "for": "5m",
            "severity": "critical",
            "summary": "A work pool has runs waiting and no online worker.",
            "description": "Work pool {{ $labels.work_pool }} has a backlog and no worker has "
            "sent a heartbeat recently.",
        },
        {
            "alert": "PrefectWorkQueueNotPolled",
            "expr": f"{backlog} > 0 unless on ({QUEUE}) (time() - max by ({QUEUE}) "
            f"({m('prefect_work_queue_last_polled_timestamp_seconds')}) "
            f"< {s['queue_poll_age_seconds']}) unless on ({POOL}) "
            f"max by ({POOL}) ({m('prefect_work_pool_online_workers')}) == 0 "
            f"unless on ({QUEUE}) max by ({QUEUE}) "
            f"({m('prefect_work_queue_status', is_paused)}) == 1",
            "for": "10m",
            "severity": "warning",
            "summary": "Runs wait in a queue that no worker polls.",
            "description": "{{ $labels.work_pool }}/{{ $labels.work_queue }} has a backlog and "
            "no worker polled it recently, although the pool has online workers: they are "
            "probably started with --work-queue for other queues.",
        },
        {
            "alert": "PrefectWorkerHeartbeatLost",
            "expr": f"max by (job, work_pool, worker) ({m('prefect_worker_online')}) == 0 "
            f"and on (job, work_pool, worker) max by (job, work_pool, worker) "
            f"(max_over_time({m('prefect_worker_online')}[1h])) == 1",
            "for": "2m",  # offline already means three missed heartbeats
            "severity": "warning",
            "summary": "A worker stopped sending heartbeats.",
            "description": "Worker {{ $labels.worker }} of pool {{ $labels.work_pool }} was "
            "online within the last hour and is offline now.",
        },
        {
            "alert": "PrefectWorkPoolPausedWithBacklog",
            "expr": f"{paused_pool} and on ({POOL}) sum by ({POOL}) ({backlog}) > 0",
            "for": "15m",
            "severity": "warning",
            "summary": "A paused work pool has runs waiting.",
            "description": "Work pool {{ $labels.work_pool }} is paused while runs are due.",
        },
        {
            "alert": "PrefectWorkQueuePausedWithBacklog",
            "expr": f"max by ({QUEUE}) "
            f"({m('prefect_work_queue_status', is_paused)}) == 1 "
            f"and on ({QUEUE}) {backlog} > 0",
            "for": "15m",
            "severity": "warning",
            "summary": "A paused work queue has runs waiting.",
            "description": "Work queue {{ $labels.work_pool }}/{{ $labels.work_queue }} is paused "
            "while runs are due.",
        },
        # -- limits ---------------------------------------------------------------------------
        {
            "alert": "PrefectWorkPoolConcurrencySaturated",
            "expr": f"max by ({POOL}) ({m('prefect_work_pool_in_flight_runs')}) "
            f">= on ({POOL}) max by ({POOL}) ({m('prefect_work_pool_concurrency_limit')}) "
            f"and on ({POOL}) sum by ({POOL}) ({backlog}) > 0",
            "for": "15m",
            "severity": "warning",
            "summary": "A work pool's concurrency limit holds runs back.",
            "description": "Work pool {{ $labels.work_pool }} runs {{ $value }} runs, its limit, "
            "while runs wait.",
        },
        {
            "alert": "PrefectWorkQueueConcurrencySaturated",
            "expr": f"max by ({QUEUE}) ({m('prefect_work_queue_in_flight_runs')}) "
            f">= on ({QUEUE}) max by ({QUEUE}) ({m('prefect_work_queue_concurrency_limit')}) "
            f"and on ({QUEUE}) {backlog} > 0",
            "for": "15m",
            "severity": "warning",
            "summary": "A work queue's concurrency limit holds runs back.",
            "description": "{{ $labels.work_pool }}/{{ $labels.work_queue }} runs {{ $value }} "
            "runs, its limit, while runs wait.",
        },
        {
            "alert": "PrefectConcurrencyLimitSaturated",
            "expr": f"max by (job, limit, kind) ({m('prefect_concurrency_limit_active_slots')}) "
            f">= on (job, limit, kind) max by (job, limit, kind) "
            f"({m('prefect_concurrency_limit_slots')}) "
            f"and on (job, limit, kind) max by (job, limit, kind) "
            f"({m('prefect_concurrency_limit_enabled')}) == 1",
            "for": "15m",
            "severity": "warning",
            "summary": "A concurrency limit has had every slot taken for 15 minutes.",
            "description": "The {{ $labels.kind }} limit {{ $labels.limit }} has all "
            "{{ $value }} slots taken; runs or tasks needing it wait.",
        },
        {
            "alert": "PrefectConcurrencySlotsLeaked",
            "expr": f"max by (job, limit, kind) "
            f"({m('prefect_concurrency_limit_leaked_slots')}) > 0",
            "for": "10m",  # a crashed task's lease expires by itself within minutes
            "severity": "warning",
            "summary": "Concurrency slots are held by runs that already finished.",
            "description": "The {{ $labels.kind }} limit {{ $labels.limit }} has {{ $value }} "
            "slots held by finished or crashed runs; reset the limit.",
        },
        {
            "alert": "PrefectFlowRunsWithoutWorkQueue",
            "expr": f"max by (job) ({m('prefect_flow_runs_without_work_queue')}) > 0",
            # Such runs never leave by themselves: 15m only rides out a queue deleted and
            # re-created with its runs moved within minutes.
            "for": "15m",
            "severity": "warning",
            "summary": "Runs wait in a work queue that was deleted: no worker will ever take them.",
            "description": "{{ $value }} scheduled runs of job {{ $labels.job }} name a work "
            "queue that no longer exists; they belong to no pool and will never start.",
        },
        # -- deployments (opt-in series: --deployments.include) ------------------------------
        {
            "alert": "PrefectDeploymentNoRecentSuccess",
            # The latest due run fell due more than the grace ago, and since then no run
            # succeeded (never succeeded counts as not since), or no run is scheduled any more
            # (the scheduler stopped). Judged on due runs, not on an interval: a weekday cron
            # is quiet over the weekend, and a failed run is judged again by the next one.
            # Spelled as "past the grace, unless a success ended since and runs are still
            # scheduled": each series once or twice, so the rule stays one line under any
            # selector (deploy/kubernetes compares the overlays' text with this file's).
            "expr": f"time() - {last_due} > {grace} "
            f"unless on ({DEPLOYMENT}) ({last_success} >= on ({DEPLOYMENT}) {last_due} "
            f"unless on ({DEPLOYMENT}) ({active} > 0 unless on ({DEPLOYMENT}) {next_run})) "
            f"unless on ({DEPLOYMENT}) {paused_deployment}",
            # The grace already waits for the run; `for` rides out a poll and a success that
            # is being read.
            "for": "10m",
            # The dead man's switch: the scheduled work is not getting done.
            "severity": "critical",
            "summary": "A scheduled run of a deployment fell due and no run has succeeded since.",
            "description": "The latest scheduled run of deployment {{ $labels.deployment }} "
            "fell due {{ $value | humanizeDuration }} ago (grace "
            f"{grace} s) and no run has completed since, or no further run is scheduled; "
            "it is not paused.",
        },
        {
            "alert": "PrefectDeploymentLastRunFailed",
            "expr": f"{last_failure} > on ({DEPLOYMENT}) {last_success} "
            f"or ({last_failure} unless on ({DEPLOYMENT}) {last_success})",
            # A failed or crashed run is final (retries happen inside the run); `for` only
            # rides out a success that is being read in the next poll.
            "for": "5m",
            "severity": "warning",
            "summary": "A deployment's latest finished run failed or crashed, and none succeeded "
            "since.",
            "description": "Deployment {{ $labels.deployment }} has a run that failed or crashed "
            "at {{ $value | humanizeTimestamp }} and no successful run after it.",
        },
        {
            "alert": "PrefectDeploymentNoUpcomingRuns",
            "expr": f"{per_deployment('prefect_deployment_active_schedules')} > 0 "
            f"unless on ({DEPLOYMENT}) {paused_deployment} "
            f"unless on ({DEPLOYMENT}) "
            f"{per_deployment('prefect_deployment_next_scheduled_run_timestamp_seconds')}",
            # Prefect's scheduler creates runs every minute; the pause flag is read every 5.
            "for": "15m",
            "severity": "warning",
            "summary": "A deployment with an active schedule has no upcoming run.",
            "description": "Deployment {{ $labels.deployment }} has {{ $value }} active "
            "schedule(s), is not paused, and no Scheduled run ahead: it will not run.",
        },
        {
            "alert": "PrefectExporterDeploymentsCapped",
            "expr": f"max by (job) ({m('prefect_exporter_deployments_capped')}) > 0",
            # The selection is read every 5 minutes; a deployment created and deleted within
            # that time is not worth a ticket.
            "for": "15m",
            # Capped deployments have no series, so their dead man's switches are off.
            "severity": "warning",
            "summary": "Deployments selected for health series are left out by the cap.",
            "description": "{{ $value }} deployments matching --deployments.include of job "
            "{{ $labels.job }} get no health series (--deployments.max): their alerts "
            "cannot fire.",
        },
        # -- rate limiting --------------------------------------------------------------------
        {
            "alert": "PrefectWorkerRateLimited",
            "expr": f"sum by (job, worker) (rate("
            f"{m('prefect_worker_api_responses_total', too_many)}[5m])) "
            f"> {s['worker_429_per_second']}",
            "for": "10m",
            "severity": "warning",
            "summary": "A worker is being rate limited by the Prefect API.",
            "description": 'Worker {{ $labels.worker }} receives {{ printf "%.3g" $value }} 429 '
            "responses per second; it backs off and picks up runs late.",
        },
    ]


def recording_rules(s: dict[str, Any]) -> list[dict[str, str]]:
    sel = s["selector"]
    return [
        {
            "record": "prefect:work_queue_oldest_due_age_seconds:max",
            "expr": f"max by ({QUEUE}) (time() - "
            f"prefect_work_queue_oldest_due_run_timestamp_seconds{{{sel}}})",
        },
        {
            "record": "prefect:work_queue_backlog_runs:max",
            "expr": f"max by ({QUEUE}) (prefect_work_queue_backlog_runs{{{sel}}})",
        },
        {
            "record": "prefect:work_pool_saturation:ratio",
            "expr": f"max by ({POOL}) (prefect_work_pool_in_flight_runs{{{sel}}}) / on ({POOL}) "
            f"max by ({POOL}) (prefect_work_pool_concurrency_limit{{{sel}}} > 0)",
        },
        {
            "record": "prefect:worker_api_429:rate5m",
            "expr": f"sum by (job, worker) (rate(prefect_worker_api_responses_total"
            f'{{{sel}, code="429"}}[5m]))',
        },
    ]


QUEUE_ALERTS = {
    "PrefectWorkQueueBacklogStuck",
    "PrefectWorkQueueBacklogGrowing",
    "PrefectRunsPendingTooLong",
    "PrefectRunsRunningTooLong",
    "PrefectRunsCancellingTooLong",
    "PrefectWorkQueueNotPolled",
    "PrefectWorkQueuePausedWithBacklog",
    "PrefectWorkQueueConcurrencySaturated",
}
POOL_ALERTS = {
    "PrefectNoOnlineWorkers",
    "PrefectWorkerHeartbeatLost",
    "PrefectWorkPoolPausedWithBacklog",
    "PrefectWorkPoolConcurrencySaturated",
}


DEPLOYMENT_ALERTS = {
    "PrefectDeploymentNoRecentSuccess",
    "PrefectDeploymentLastRunFailed",
    "PrefectDeploymentNoUpcomingRuns",
}

# The exporter's own health: `diagnose` reads Prefect, it cannot say why the exporter is not
# scraped or short of budget. Nor does it look at deployments' outcomes and schedules: their
# runbooks give the Prefect commands instead.
WITHOUT_DIAGNOSE = {
    "PrefectExporterDown",
    "PrefectExporterDeploymentsCapped",
    "PrefectExporterDataStale",
    "PrefectExporterRequestBudgetExhausted",
    *DEPLOYMENT_ALERTS,
}


def diagnose_command(name: str) -> str | None:
    """The `diagnose` command for an alert: narrowed to its pool where it has one."""
    if name in WITHOUT_DIAGNOSE:
        return None
    if name in QUEUE_ALERTS or name in POOL_ALERTS:
        return "prefect-exporter diagnose --work-pool '{{ $labels.work_pool }}'"
    return "prefect-exporter diagnose"


def dashboard_url(name: str, base: str) -> str:
    """The dashboard that shows the cause, narrowed to the alert's job, pool and queue."""
    if name in QUEUE_ALERTS:
        return (
            f"{base}/prefect-queues?var-job={{{{ $labels.job }}}}"
            "&var-work_pool={{ $labels.work_pool }}&var-work_queue={{ $labels.work_queue }}"
        )
    if name in POOL_ALERTS:
        return (
            f"{base}/prefect-queues?var-job={{{{ $labels.job }}}}"
            "&var-work_pool={{ $labels.work_pool }}"
        )
    if name in DEPLOYMENT_ALERTS:
        # grafana/prefect-deployments.json (the dashboards branch), narrowed to the deployment.
        return (
            f"{base}/prefect-deployments?var-job={{{{ $labels.job }}}}"
            "&var-deployment={{ $labels.deployment }}"
        )
    return f"{base}/prefect-overview?var-job={{{{ $labels.job }}}}"


def rules(settings: dict[str, Any]) -> dict[str, Any]:
    def alert_rule(a: dict[str, Any]) -> dict[str, Any]:
        name = a["alert"]
        annotations = {
            "summary": a["summary"],
            "description": a["description"],
            "runbook_url": f"{settings['runbook_base']}/{name}.md",
            "dashboard_url": dashboard_url(name, settings["dashboard_base"]),
        }
        if (command := diagnose_command(name)) is not None:
            annotations["diagnose"] = command
        return {
            "alert": name,
            "expr": a["expr"],
            "for": a["for"],
            "labels": {"severity": a["severity"]},
            "annotations": annotations,
        }

    return {
        "groups": [
            {"name": "prefect-exporter.rules", "rules": recording_rules(settings)},
            {"name": "prefect-exporter.alerts", "rules": [alert_rule(a) for a in alerts(settings)]},
        ]
    }


def render(settings: dict[str, Any], for_override: str | None = None) -> str:
    """The rule file's text; `for_override` replaces every alert's `for:` (tests and demos)."""
    header = (
        "# Generated by alerts/generate.py: edit the generator, not this file.\n"
        f"# selector: {settings['selector']}\n"
    )
    document = rules(settings)
    if for_override is not None:
        # An end-to-end test cannot wait 5 minutes per alert; the expressions stay the shipped ones.
        header += f"# every alert's for: set to {for_override} (--for): not for production\n"
        for group in document["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    rule["for"] = for_override
    return header + yaml.safe_dump(document, sort_keys=False, width=1000)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--selector",
        default=DEFAULTS["selector"],
        help="label matchers that select the exporter's series",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a threshold (see DEFAULTS)",
    )
    parser.add_argument("--out", type=Path, default=RULES)
    parser.add_argument(
        "--for",
        dest="for_",
        metavar="DURATION",
        help="output for tests and demos only: every alert's `for:` becomes DURATION "
        "(a Prometheus duration such as 5s), expressions unchanged",
    )
    args = parser.parse_args()
    settings = dict(DEFAULTS, selector=args.selector)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            parser.error(f"unknown setting {key!r}; known: {', '.join(DEFAULTS)}")
        settings[key] = type(DEFAULTS[key])(value)
    if args.for_ is not None and not re.fullmatch(r"([0-9]+(ms|s|m|h))+", args.for_):
        parser.error(f"--for {args.for_!r} is not a Prometheus duration such as 5s or 1m30s")
    args.out.write_text(render(settings, for_override=args.for_))


if __name__ == "__main__":
    main()
