"""Tests for the alert rules, their runbooks and the Alertmanager example (promtool, amtool, and
a real Alertmanager for inhibition)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import yaml

from demo.stack import free_port, wait_for
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "alerts"
RULES = ALERTS / "prefect-exporter.rules.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: install Debian's prometheus and prometheus-alertmanager"
    return path


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=ROOT)


def generator() -> ModuleType:
    return load_script(ALERTS / "generate.py")


def alert_rules(text: str) -> list[dict[str, Any]]:
    groups = yaml.safe_load(text)["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


class TestRulesFile:
    """The committed rules are the generator's output and pass promtool."""

    def test_committed_file_is_up_to_date(self) -> None:
        """Regenerating with the defaults changes nothing."""
        gen = generator()
        assert RULES.read_text() == gen.render(gen.DEFAULTS), "run: python alerts/generate.py"

    def test_promtool_check_rules_with_fatal_lint(self) -> None:
        """Syntax, PromQL and lint (duplicate rules) are clean."""
        result = run(tool("promtool"), "check", "rules", "--lint=all", "--lint-fatal", str(RULES))
        assert result.returncode == 0, result.stdout + result.stderr

    def test_promtool_unit_tests(self) -> None:
        """Every alert fires as specified and stays quiet on healthy input."""
        result = run(
            tool("promtool"), "test", "rules", str(ALERTS / "tests" / "prefect-exporter.test.yml")
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_every_alert_is_tested_firing_and_silent(self) -> None:
        """The unit tests hold a firing and a silent case for each alert."""
        tests = yaml.safe_load((ALERTS / "tests" / "prefect-exporter.test.yml").read_text())
        firing: set[str] = set()
        silent: set[str] = set()
        for group in tests["tests"]:
            for case in group.get("alert_rule_test", []):
                (firing if case["exp_alerts"] else silent).add(case["alertname"])
        names = {rule["alert"] for rule in alert_rules(RULES.read_text())}
        assert firing == names
        assert silent == names

    def test_conventions(self) -> None:
        """Severity, `for`, annotations and a runbook page for every alert."""
        for rule in alert_rules(RULES.read_text()):
            name = rule["alert"]
            assert name.startswith("Prefect")
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert re.fullmatch(r"\d+[smh]", rule["for"]), name
            annotations = rule["annotations"]
            assert annotations["summary"]
            assert annotations["description"]
            assert annotations["runbook_url"].endswith(f"/docs/runbooks/{name}.md")
            runbook = (ROOT / "docs" / "runbooks" / f"{name}.md").read_text()
            for section in ("## What it means", "## Confirm it", "## Likely causes", "## Fix"):
                assert section in runbook, f"{name}: {section}"
            assert "max by (" in rule["expr"] or "sum by (" in rule["expr"], name

    def test_a_variant_keeps_the_alerts_and_changes_only_the_knobs(self, tmp_path: Path) -> None:
        """Another selector and threshold give the same alerts, still valid for promtool."""
        out = tmp_path / "variant.yml"
        result = run(
            "python3",
            str(ALERTS / "generate.py"),
            "--selector",
            'job="prefect",cluster="prod"',
            "--set",
            "backlog_age_seconds=1800",
            "--out",
            str(out),
        )
        assert result.returncode == 0, result.stderr
        variant, original = alert_rules(out.read_text()), alert_rules(RULES.read_text())
        assert [(r["alert"], r["for"], r["labels"]) for r in variant] == [
            (r["alert"], r["for"], r["labels"]) for r in original
        ]
        assert 'job="prefect-exporter"' not in out.read_text()
        assert "> 1800" in next(
            r["expr"] for r in variant if r["alert"] == "PrefectWorkQueueBacklogStuck"
        )
        check = run(tool("promtool"), "check", "rules", str(out))
        assert check.returncode == 0, check.stdout + check.stderr


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(prefect_[a-z_]+)\b", expr))
    return {n for n in names if not n.startswith("prefect:")}


class TestMetricNames:
    """Every metric the rules use is documented (and docs/metrics.md equals a real scrape)."""

    def test_rules_use_only_documented_metrics(self) -> None:
        """A renamed metric can never silently orphan an alert."""
        documented = set(
            re.findall(r"^\| `(prefect_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M)
        )
        groups = yaml.safe_load(RULES.read_text())["groups"]
        used = {n for g in groups for r in g["rules"] for n in metric_names(r["expr"])}
        assert used, "no metric names found"
        assert used <= documented, used - documented


class TestAlertmanagerExample:
    """amtool validates the config and proves the routing; a real Alertmanager the inhibition."""

    def test_check_config(self) -> None:
        """amtool accepts the example configuration."""
        result = run(tool("amtool"), "check-config", str(ALERTMANAGER))
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.parametrize(
        ("labels", "receiver"),
        [
            (
                ["alertname=PrefectWorkQueueBacklogStuck", "severity=critical", "work_pool=p"],
                "prefect-pager",
            ),
            (["alertname=PrefectNoOnlineWorkers", "severity=critical"], "prefect-pager"),
            (["alertname=PrefectWorkerRateLimited", "severity=warning"], "prefect-chat"),
            (["alertname=SomethingElse", "severity=critical"], "default"),
        ],
    )
    def test_routes(self, labels: list[str], receiver: str) -> None:
        """Critical Prefect alerts page, warnings go to chat, others are left alone."""
        result = run(
            tool("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER}",
            f"--verify.receivers={receiver}",
            *labels,
        )
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [
            tool("prometheus-alertmanager"),
            f"--config.file={ALERTMANAGER}",
            f"--storage.path={tmp_path}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200,
            30,
            "Alertmanager to be ready",
        )
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)


class TestInhibition:
    """No stuck-backlog page while "no online workers" fires for the same pool."""

    def test_backlog_page_is_suppressed_only_in_the_pool_without_workers(
        self, alertmanager: str
    ) -> None:
        """The same alert for another pool still pages."""
        now = datetime.now(UTC)
        ends = (now + timedelta(hours=1)).isoformat()

        def alert(name: str, severity: str, **labels: str) -> dict[str, Any]:
            return {
                "labels": {
                    "alertname": name,
                    "severity": severity,
                    "job": "prefect-exporter",
                    **labels,
                },
                "startsAt": now.isoformat(),
                "endsAt": ends,
            }

        httpx.post(
            f"{alertmanager}/api/v2/alerts",
            json=[
                alert("PrefectNoOnlineWorkers", "critical", work_pool="k8s"),
                alert(
                    "PrefectWorkQueueBacklogStuck",
                    "critical",
                    work_pool="k8s",
                    work_queue="default",
                ),
                alert(
                    "PrefectWorkQueueBacklogStuck",
                    "critical",
                    work_pool="ecs",
                    work_queue="default",
                ),
            ],
        ).raise_for_status()

        def states() -> dict[tuple[str, str], str]:
            answer = httpx.get(f"{alertmanager}/api/v2/alerts").json()
            return {
                (a["labels"]["alertname"], a["labels"]["work_pool"]): a["status"]["state"]
                for a in answer
            }

        wait_for(lambda: len(states()) == 3, 30, "the alerts to be received")
        wait_for(
            lambda: states()[("PrefectWorkQueueBacklogStuck", "k8s")] == "suppressed",
            30,
            "inhibition",
        )
        assert states()[("PrefectWorkQueueBacklogStuck", "ecs")] == "active"
        assert states()[("PrefectNoOnlineWorkers", "k8s")] == "active"
