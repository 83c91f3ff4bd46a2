"""Offline checks of deploy/compose/compose.yaml (no container engine here).

The file is validated against the compose specification's JSON schema (vendored in
check-jsonschema); everything it points at is checked against the repository: pinned images,
mounted files that exist, and every address in the mounted configurations (Prometheus targets,
the Alertmanager address, Grafana's datasource, the Prefect API URL) naming a compose service
and a port it listens on.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
SCHEMA = "vendor.compose-spec"  # the compose specification's schema, vendored in check-jsonschema


def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def binds(service: dict[str, Any]) -> dict[str, Path]:
    """Container path to host path of a service's bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts[target] = (COMPOSE_DIR / source).resolve()
    return mounts


def listening_ports(service: dict[str, Any]) -> set[int]:
    """The container ports a service publishes or exposes."""
    ports = {int(str(p).split(":")[-1]) for p in service.get("ports", [])}
    return ports | {int(p) for p in service.get("expose", [])}


def mounted_file(service: str, target: str) -> Path:
    path = binds(services()[service])[target]
    assert path.is_file(), path
    return path


def assert_is_service_address(host: str, port: int | None) -> None:
    assert host in services(), f"{host} is no compose service"
    assert port in listening_ports(services()[host]), f"{host} does not listen on {port}"


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", SCHEMA, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


class TestSpecification:
    """The file is valid compose, and the validation would notice if it were not."""

    def test_valid_against_the_compose_specification(self) -> None:
        """check-jsonschema with its vendored compose-spec schema accepts the file."""
        result = check_jsonschema(COMPOSE)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_a_misspelled_key_is_refused(self, tmp_path: Path) -> None:
        """The schema refuses unknown service keys, so the check above has teeth."""
        broken = compose()
        broken["services"]["prometheus"]["volume"] = broken["services"]["prometheus"].pop("volumes")
        path = tmp_path / "compose.yaml"
        path.write_text(yaml.safe_dump(broken))
        assert check_jsonschema(path).returncode != 0


class TestImagesAndFiles:
    """Images are pinned and every mounted file is the repository's own."""

    @pytest.mark.parametrize("name", sorted(services()))
    def test_image_tag_is_pinned(self, name: str) -> None:
        """Every image names a tag, and never `latest` or a moving major-only tag."""
        image = services()[name]["image"]
        match = re.fullmatch(r"[a-z0-9./-]+:([A-Za-z0-9._-]+)", image)
        assert match, f"{image} has no tag"
        tag = match.group(1)
        assert "latest" not in tag
        assert re.search(r"\d+\.\d+", tag), f"{image}: pin a version, not {tag}"

    def test_built_image_is_tagged_with_the_project_version(self) -> None:
        """The exporter is built from this repository's Dockerfile and tagged with its version."""
        exporter = services()["prefect-exporter"]
        version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
        assert exporter["image"] == f"prefect-exporter:{version}"
        context = (COMPOSE_DIR / exporter["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / exporter["build"]["dockerfile"]).is_file()

    def test_every_mounted_host_path_exists(self) -> None:
        """Bind mounts point at files and folders of the repository."""
        found = [path for service in services().values() for path in binds(service).values()]
        assert found
        for path in found:
            assert path.exists(), path
            assert path.is_relative_to(ROOT), path

    def test_named_volumes_are_declared(self) -> None:
        """Every named volume a service uses is declared at the top level."""
        declared = set(compose()["volumes"])
        for service in services().values():
            for volume in service.get("volumes", []):
                source = volume.split(":")[0]
                if not source.startswith((".", "/")):
                    assert source in declared, source


class TestAddresses:
    """Every address in the mounted configurations is a compose service and its port."""

    def test_prometheus_targets_and_alertmanager(self) -> None:
        """Scrape targets and the Alertmanager address name services and their ports."""
        config = yaml.safe_load(
            mounted_file("prometheus", "/etc/prometheus/prometheus.yml").read_text()
        )
        targets = [
            target
            for job in config["scrape_configs"]
            for static in job["static_configs"]
            for target in static["targets"]
        ] + [
            target
            for manager in config["alerting"]["alertmanagers"]
            for static in manager["static_configs"]
            for target in static["targets"]
        ]
        assert any(t.startswith("alertmanager:") for t in targets)
        for target in targets:
            host, port = target.split(":")
            assert_is_service_address(host, int(port))

    def test_prometheus_loads_the_shipped_rules(self) -> None:
        """The rules file is mounted where the config's rule_files glob looks."""
        config = yaml.safe_load(
            mounted_file("prometheus", "/etc/prometheus/prometheus.yml").read_text()
        )
        mounts = binds(services()["prometheus"])
        loaded = [
            target
            for target in mounts
            for pattern in config["rule_files"]
            if Path(target).match(pattern)
        ]
        assert [mounts[t] for t in loaded] == [ROOT / "alerts" / "prefect-exporter.rules.yml"]

    def test_prometheus_config_passes_promtool(self) -> None:
        """promtool accepts the mounted Prometheus configuration."""
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: install Debian's prometheus package"
        path = mounted_file("prometheus", "/etc/prometheus/prometheus.yml")
        result = subprocess.run(
            [promtool, "check", "config", "--syntax-only", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    def test_alertmanager_gets_the_shipped_routing(self) -> None:
        """Alertmanager mounts deploy/alertmanager's configuration at its --config.file."""
        service = services()["alertmanager"]
        flag = next(a for a in service["command"] if a.startswith("--config.file="))
        path = mounted_file("alertmanager", flag.split("=", 1)[1])
        assert path == ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
        listen = next(a for a in service["command"] if a.startswith("--web.listen-address="))
        assert int(listen.rsplit(":", 1)[1]) in listening_ports(service)

    def test_grafana_datasource_and_dashboards(self) -> None:
        """The datasource is the Prometheus service; the provider's folder holds every dashboard."""
        grafana = binds(services()["grafana"])
        sources = yaml.safe_load(
            mounted_file(
                "grafana", "/etc/grafana/provisioning/datasources/prometheus.yaml"
            ).read_text()
        )
        for source in sources["datasources"]:
            url = urlsplit(source["url"])
            assert url.hostname
            assert_is_service_address(url.hostname, url.port)
        providers = yaml.safe_load(
            mounted_file(
                "grafana", "/etc/grafana/provisioning/dashboards/prefect-exporter.yaml"
            ).read_text()
        )["providers"]
        assert providers
        for provider in providers:
            folder = grafana[provider["options"]["path"]]
            assert {p.name for p in folder.glob("*.json")} == {
                p.name for p in (ROOT / "grafana").glob("*.json")
            }

    def test_prefect_api_url_is_the_server(self) -> None:
        """The worker and the exporter reach the Prefect server service on its port."""
        for name in ("worker", "prefect-exporter"):
            url = urlsplit(services()[name]["environment"]["PREFECT_API_URL"])
            assert url.hostname
            assert_is_service_address(url.hostname, url.port)
            assert url.path == "/api"

    def test_exporter_reads_the_worker_log(self) -> None:
        """The exporter follows the file the worker's logging config writes, named as the worker."""
        worker, exporter = services()["worker"], services()["prefect-exporter"]
        settings_path = worker["environment"]["PREFECT_LOGGING_SETTINGS_PATH"]
        folder, name = settings_path.rsplit("/", 1)
        logging_config = yaml.safe_load((binds(worker)[folder] / name).read_text())
        log_file = logging_config["handlers"]["file"]["filename"]
        worker_name = worker["command"][worker["command"].index("--name") + 1]
        assert f"--worker-log={worker_name}={log_file}" in exporter["command"]
        shared = {v.split(":")[0]: v.split(":")[1] for v in worker["volumes"]}
        read = {v.split(":")[0]: v.split(":")[1] for v in exporter["volumes"]}
        volume = next(v for v, target in shared.items() if log_file.startswith(target + "/"))
        assert read[volume] == shared[volume]
