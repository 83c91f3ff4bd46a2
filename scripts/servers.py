"""Creates the Prefect environments of the compatibility matrix, cached outside the repository.

    python3 scripts/servers.py            # every environment of the matrix (idempotent)
    python3 scripts/servers.py 3.2.15     # the named server versions of SERVERS
    python3 scripts/servers.py --list     # `kind version path` per environment of the matrix

Servers live in $PREFECT_EXPORTER_CACHE/servers/<version>, prefect-client environments in
$PREFECT_EXPORTER_CACHE/clients/<version> (default ~/.cache/prefect-exporter), so that a fresh
clone or a CI run on the same machine reuses them. Each environment records the requirements it
was built from in `.pins`, written once its import check passed; a change of pins, or a failed
or interrupted build (no `.pins`), rebuilds it.

An old Prefect installed today resolves its dependencies to today's releases, which it predates:
each version's pins below are what it needs to start, found by installing and starting it
(`tests/test_integration_compat.py` starts every server of MATRIX; the failures without the pins
are noted beside them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

CACHE = Path(os.environ.get("PREFECT_EXPORTER_CACHE", Path.home() / ".cache" / "prefect-exporter"))

# Server versions and the extra requirements each needs to start today.
SERVERS: dict[str, tuple[str, ...]] = {
    # Without pins: pydantic 2.14 fails building the result-record models
    # (PydanticUndefinedAnnotation: ResultRecordMetadata); SQLAlchemy 2.1, Starlette 1.x and
    # FastAPI 0.165 postdate it by far.
    "3.0.11": (
        "pydantic<2.10",
        "pydantic-settings<2.7",
        "fastapi<0.116",
        "starlette<0.42",
        "sqlalchemy<2.1",
        "uvicorn<0.33",
    ),
    # Without pins: FastAPI 0.165 refuses `Body(min_items=...)` (TypeError at import), and the
    # worker module imports `importlib_metadata`, which nothing installs any more.
    "3.2.15": (
        "importlib_metadata",
        "pydantic<2.11",
        "pydantic-settings<2.9",
        "fastapi<0.116",
        "starlette<0.47",
        "sqlalchemy<2.1",
        "uvicorn<0.35",
    ),
    # Without pins: the same as 3.2.15 (importlib_metadata; FastAPI and Starlette of today).
    "3.4.25": (
        "importlib_metadata",
        "pydantic<2.12",
        "pydantic-settings<2.11",
        "fastapi<0.117",
        "starlette<0.48",
        "sqlalchemy<2.1",
        "uvicorn<0.36",
    ),
}

# What CI tests beside the newest server (.venv-prefect-server, which the rest of the suite
# uses): the oldest 3.x the exporter claims and one in the middle.
MATRIX = ("3.0.11", "3.4.25")

# prefect-client environments: the oldest version pyproject.toml allows (the newest is the one
# in .venv). The exporter itself is not installed into them: tests run it from the checkout
# with PYTHONPATH, so one cached environment serves every clone.
CLIENTS: dict[str, tuple[str, ...]] = {"3.6.0": ()}
# The exporter's other runtime dependencies, as pyproject.toml declares them (one place: a new
# dependency there reaches the old-client environment, which is then rebuilt).
EXPORTER_REQUIREMENTS = tuple(
    dependency
    for dependency in tomllib.loads(
        (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    )["project"]["dependencies"]
    if not dependency.startswith("prefect-client")
)

# Imports that fail when a dependency is too new for the version (checked before the rename).
SERVER_CHECK = "import prefect.server.api.server, prefect.workers.process"
CLIENT_CHECK = "import prefect.client.schemas.objects, prefect.client.constants"


def server_dir(version: str) -> Path:
    """The environment of Prefect server `version` (it may not exist yet)."""
    return CACHE / "servers" / version


def client_dir(version: str) -> Path:
    """The environment of prefect-client `version` (it may not exist yet)."""
    return CACHE / "clients" / version


def _quiet(output: str) -> str:
    # The local package mirror makes pip warn about every missing index directory.
    return "\n".join(x for x in output.splitlines() if not x.startswith("WARNING: Location"))


def ready(target: Path, requirements: tuple[str, ...]) -> bool:
    """Whether `target` was built from exactly `requirements` and passed its check."""
    pins = target / ".pins"
    return pins.exists() and pins.read_text() == "\n".join(requirements) + "\n"


def ensure(target: Path, requirements: tuple[str, ...], check: str) -> bool:
    """Build `target` with `requirements` unless it holds them already; True when built now.

    `.pins` is written last, after the import check passed: an environment without it (a
    failed or interrupted build) is rebuilt, never used. Raises RuntimeError with pip's or the
    check's output when installing or checking fails.
    """
    if ready(target, requirements):
        return False
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    python = str(target / "bin" / "python")
    steps = [
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", *requirements],
        [python, "-c", check],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(step[2:])} failed:\n{_quiet(done.stdout + done.stderr)}")
    (target / ".pins").write_text("\n".join(requirements) + "\n")
    return True


def server_requirements(version: str) -> tuple[str, ...]:
    return (f"prefect=={version}", *SERVERS[version])


def client_requirements(version: str) -> tuple[str, ...]:
    return (f"prefect-client=={version}", *CLIENTS[version], *EXPORTER_REQUIREMENTS)


def main(argv: list[str]) -> int:
    if argv == ["--list"]:
        for version in MATRIX:
            print("server", version, server_dir(version))
        for version in CLIENTS:
            print("client", version, client_dir(version))
        return 0
    unknown = [v for v in argv if v not in SERVERS]
    if unknown:
        print(f"servers: no pins for {', '.join(unknown)}; known: {', '.join(SERVERS)}")
        return 2
    jobs = [
        (f"prefect {v}", server_dir(v), server_requirements(v), SERVER_CHECK)
        for v in (argv or MATRIX)
    ]
    if not argv:
        jobs += [
            (f"prefect-client {v}", client_dir(v), client_requirements(v), CLIENT_CHECK)
            for v in CLIENTS
        ]
    for name, target, requirements, check in jobs:
        try:
            if ensure(target, requirements, check):
                print(f"servers: built {name} in {target}")
        except RuntimeError as exc:
            print(f"servers: {name}: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
