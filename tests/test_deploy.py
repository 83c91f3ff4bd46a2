"""Offline checks of the Dockerfile and the deployment manifests (no Docker or cluster here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def containers(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["spec"]["template"]["spec"]["containers"]}


class TestManifests:
    """The Kubernetes examples parse, and their exporter arguments are valid settings."""

    @pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
    def test_every_document_has_kind_and_name(self, path: Path) -> None:
        """Each YAML document is a named Kubernetes object."""
        for doc in documents(path):
            assert doc["apiVersion"]
            assert doc["kind"]
            assert doc["metadata"]["name"]

    def test_exporter_arguments_are_accepted(self) -> None:
        """The args in both manifests pass the exporter's own validation."""
        for path in K8S.glob("*.yaml"):
            for doc in documents(path):
                if doc["kind"] != "Deployment":
                    continue
                for container in containers(doc).values():
                    if "prefect-exporter" in container["image"]:
                        args = [a.replace("$(POD_NAME)", "pod-1") for a in container["args"]]
                        load_settings(args, {})


class TestWorkerSidecar:
    """The sidecar reads the very file the worker's logging config writes, in a format it parses."""

    def manifest(self) -> tuple[dict[str, Any], dict[str, Any]]:
        docs = {d["kind"]: d for d in documents(K8S / "worker-with-sidecar.yaml")}
        return docs["ConfigMap"], docs["Deployment"]

    def test_shared_volume_and_path(self) -> None:
        """Worker and sidecar mount the same volume; the sidecar follows the handler's file."""
        config_map, deployment = self.manifest()
        logging_config = yaml.safe_load(config_map["data"]["logging.yml"])
        filename = logging_config["handlers"]["file"]["filename"]
        pods = containers(deployment)
        sidecar_arg = next(
            a for a in pods["exporter-sidecar"]["args"] if a.startswith("--worker-log=")
        )
        assert sidecar_arg.endswith("=" + filename)
        mounts = {c: {m["name"]: m["mountPath"] for m in pods[c]["volumeMounts"]} for c in pods}
        assert mounts["worker"]["logs"] == mounts["exporter-sidecar"]["logs"]
        assert filename.startswith(mounts["worker"]["logs"] + "/")


class TestDockerfile:
    """The image installs the exporter with prefect-client only and runs unprivileged."""

    def test_structure(self) -> None:
        """Non-root user, the metrics port, a health check, the console script as entrypoint."""
        text = (ROOT / "Dockerfile").read_text()
        assert re.search(r"^FROM python:3\.1[1-9]", text, re.M)
        assert re.search(r"^USER (?!0\b|root\b)\S+", text, re.M)
        assert re.search(r"^EXPOSE 9716$", text, re.M)
        assert "HEALTHCHECK" in text
        assert "/healthz" in text
        assert 'ENTRYPOINT ["prefect-exporter"]' in text
        assert re.search(r"pip install .*\s\.$", text, re.M), "installs the project itself"
        assert "pip install prefect" not in text, "the image must not carry the Prefect server"
