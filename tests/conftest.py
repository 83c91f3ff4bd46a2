"""Shared fixtures: a real Prefect server per module for integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.stack import SERVER_VENV, PrefectServer


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A fresh `prefect server start` (SQLite, temporary PREFECT_HOME, free port)."""
    if not (SERVER_VENV / "bin" / "prefect").exists():
        pytest.fail(f"no Prefect server at {SERVER_VENV}; run scripts/setup.sh first")
    server = PrefectServer(Path(tmp_path_factory.mktemp("prefect-home")))
    server.start()
    yield server
    server.stop()
