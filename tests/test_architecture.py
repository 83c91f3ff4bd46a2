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


def internal_imports_of(path: Path) -> set[str]:
    """The exporter's own modules that `path` imports (`from exporter import x` included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "exporter":
            names |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
            names.add("__init__")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("exporter."):
            names.add(node.module.split(".")[1])  # type: ignore[union-attr]
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("exporter.")}
    return names


# Data flows one way: a module imports only modules of a lower layer. The design's order is
# records -> adapter / snapshot -> store -> collector -> server -> cli, with the readers and the
# poll loop between the adapter and the store, and the sidecar beside the poll loop.
LAYERS = {
    # The shared vocabulary and plain values, importing nothing of ours.
    "__init__": 0,
    "clock": 0,
    "secret": 0,
    "errors": 0,
    "records": 0,
    "gather": 0,
    "statefile": 0,
    "exposition": 0,
    # Pure transformations, small policies and settings.
    "prefect_parse": 1,
    "budget": 1,
    "features": 1,
    "snapshot": 1,
    "transitions": 1,
    "config": 1,
    "webconfig": 1,
    "logs": 1,
    # The adapter: transport, then reads.
    "prefect_http": 2,
    "event_stream": 2,
    "prefect_api": 3,
    # Readers that plan reads on top of the adapter.
    "limits_reader": 4,
    "events_reader": 4,
    "run_reader": 4,
    "deployments_reader": 4,
    "server_info": 4,
    # The poll loop, and the sidecar's log follower beside it.
    "poller": 5,
    "worklog": 5,
    "store": 6,
    # The diagnosis: a pure engine over a snapshot, and the command that reads and renders.
    "diagnosis": 6,
    "collector": 7,
    "server": 8,
    "diagnose": 8,
    # The composition root, the only module that wires the others together.
    "cli": 9,
    "__main__": 10,
}


class TestBoundaries:
    """Only the API adapter speaks HTTP to Prefect; only cli reads the environment."""

    @pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
    def test_only_prefect_api_imports_httpx_or_prefect(self, path: Path) -> None:
        """httpx and prefect stay behind the adapter's transport."""
        if path.name != "prefect_http.py":
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


class TestLayers:
    """Our own imports follow the layer table, so the design cannot drift unnoticed."""

    def test_every_module_has_a_layer(self) -> None:
        """A new module must be placed in the table before it can be imported."""
        assert {p.stem for p in modules()} == set(LAYERS)

    @pytest.mark.parametrize("path", modules(), ids=lambda p: p.name)
    def test_imports_point_only_downwards(self, path: Path) -> None:
        """No module imports one of its own layer or above."""
        upward = {
            name for name in internal_imports_of(path) if LAYERS[name] >= LAYERS[path.stem]
        } - {path.stem}
        assert upward == set(), f"{path.name} imports {sorted(upward)} from its layer or above"


class TestRuntimeDependencies:
    """The exporter's environment has prefect-client, never the full prefect server package."""

    def test_prefect_client_alone(self) -> None:
        """The suite runs the exporter from an environment without the `prefect` distribution."""
        assert importlib.metadata.version("prefect-client")
        with pytest.raises(importlib.metadata.PackageNotFoundError):
            importlib.metadata.version("prefect")
