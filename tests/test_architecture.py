"""Tests that keep the design's boundaries: import direction and the client-only runtime."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "exporter"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


class TestBoundaries:
    """Only the API adapter speaks HTTP to Prefect; only cli reads the environment."""

    @pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
    def test_only_prefect_api_imports_httpx_or_prefect(self, path: Path) -> None:
        """httpx and prefect stay behind the adapter."""
        if path.name != "prefect_api.py":
            assert not imports_of(path) & {"httpx", "prefect"}

    @pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
    def test_only_cli_reads_the_environment(self, path: Path) -> None:
        """Everything else receives its settings through constructors."""
        if path.name != "cli.py":
            assert "os.environ" not in path.read_text()
            assert "getenv" not in path.read_text()

    def test_snapshot_is_pure(self) -> None:
        """The snapshot module has no I/O, clock or network imports."""
        assert not imports_of(PACKAGE / "snapshot.py") & {
            "time",
            "datetime",
            "httpx",
            "prefect",
            "os",
            "socket",
            "asyncio",
            "threading",
        }


class TestRuntimeDependencies:
    """The exporter's environment has prefect-client, never the full prefect server package."""

    def test_prefect_client_alone(self) -> None:
        """The suite runs the exporter from an environment without the `prefect` distribution."""
        assert importlib.metadata.version("prefect-client")
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("prefect")
