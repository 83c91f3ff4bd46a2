"""Tests for the generated Grafana dashboards: up to date, well formed, every query valid.

Grafana itself cannot be installed here; the end-to-end run of every panel query against a real
Prometheus is in tests/test_integration.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
FILES = sorted(GRAFANA.glob("*.json"))


def generator() -> ModuleType:
    return load_script(GRAFANA / "generate.py")


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p["targets"]]


def concrete(expr: str) -> str:
    """A panel query with Grafana's variables replaced, as Grafana would send it."""
    expr = expr.replace("$__rate_interval", "1m")
    return re.sub(r"\$(job|work_pool|work_queue)\b", ".*", expr)


def all_queries() -> list[str]:
    return [concrete(q) for path in FILES for q in queries(load(path))]


class TestGenerated:
    """The committed JSON is the generator's output."""

    def test_up_to_date(self) -> None:
        """Regenerating changes nothing."""
        gen = generator()
        assert [p.name for p in FILES] == sorted(gen.DASHBOARDS)
        for name, build in gen.DASHBOARDS.items():
            assert (GRAFANA / name).read_text() == gen.render(build), "run grafana/generate.py"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
class TestConventions:
    """The dashboard conventions of docs ALERTING.md."""

    def test_identity_and_variables(self, path: Path) -> None:
        """Stable uid from the file name, shared tag, read-only, cascading variables."""
        d = load(path)
        assert d["uid"] == path.stem
        assert "prefect-exporter" in d["tags"]
        assert d["editable"] is False
        names = [v["name"] for v in d["templating"]["list"]]
        assert names[:3] == ["datasource", "job", "work_pool"]
        assert d["templating"]["list"][0]["type"] == "datasource"
        assert d["templating"]["list"][0]["query"] == "prometheus"
        assert "$job" in d["templating"]["list"][2]["definition"]

    def test_panels(self, path: Path) -> None:
        """Every panel has a description, a unit, the datasource variable and queries."""
        ids = set()
        for panel in panels(load(path)):
            assert panel["description"], panel["title"]
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"], panel["title"]
            ids.add(panel["id"])
            for target in panel["targets"]:
                expr = target["expr"]
                assert "$job" in expr, f"{panel['title']}: every query uses the variables"
                for call in re.findall(r"\b(?:rate|increase)\([^\[]*\[([^\]]+)\]", expr):
                    assert call == "$__rate_interval", f"{panel['title']}: {expr}"
                for counter in re.findall(r"\b(prefect_\w+_total)\b", expr):
                    assert re.search(rf"(rate|increase)\({counter}\b", expr), expr
        assert len(ids) == len(panels(load(path)))


class TestQueriesParse:
    """Every panel query is valid PromQL (promtool parses it inside a throw-away rule file)."""

    def test_promtool_parses_every_query(self, tmp_path: Path) -> None:
        """Wrapped as recording rules, all queries pass `promtool check rules`."""
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: install Debian's prometheus package"
        rules = {
            "groups": [
                {
                    "name": "dashboard-queries",
                    "rules": [
                        {"record": f"dashboard:query_{i}", "expr": q}
                        for i, q in enumerate(all_queries())
                    ],
                }
            ]
        }
        path = tmp_path / "queries.yml"
        path.write_text(yaml.safe_dump(rules))
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_queries_use_only_documented_metrics(self) -> None:
        """Panels cannot refer to a metric the exporter does not document (and so serve)."""
        documented = set(
            re.findall(r"^\| `(prefect_[a-z_]+)`", (ROOT / "docs" / "metrics.md").read_text(), re.M)
        )
        used = {
            re.sub(r"_(bucket|sum|count)$", "", n)
            for q in all_queries()
            for n in re.findall(r"\b(prefect_[a-z_]+)\b", q)
        }
        assert used <= documented, used - documented
