"""The compatibility claims (pyproject.toml, README's table) stay in step with what is tested."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
SERVERS = load_script(ROOT / "scripts" / "servers.py")


def version_key(version: str) -> tuple[int, int, int]:
    """`3.6` and `3.6.0` alike, for comparing."""
    major, minor, patch = (*map(int, version.split(".")), 0, 0)[:3]
    return major, minor, patch


def compatibility_rows() -> list[tuple[str, str, str]]:
    """(Prefect, status, proven by) of README's compatibility table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Compatibility", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and not set(cells[0]) <= {"-"} and cells[0] != "Prefect":
            rows.append((cells[0], cells[1], cells[2]))
    return rows


class TestClaims:
    """What the project claims is what the matrix and the tests cover."""

    def test_the_oldest_allowed_client_is_the_one_tested(self) -> None:
        """pyproject.toml's lower bound of prefect-client is the oldest client environment."""
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        (requirement,) = [d for d in project["dependencies"] if d.startswith("prefect-client")]
        lower = re.search(r">=\s*([0-9.]+)", requirement)
        assert lower is not None
        oldest = min(SERVERS.CLIENTS, key=version_key)
        assert version_key(lower.group(1)) == version_key(oldest)

    def test_every_matrix_server_has_its_pins_and_a_readme_row(self) -> None:
        """The CI matrix is a subset of SERVERS, and README names each version as supported."""
        rows = {prefect: status for prefect, status, _ in compatibility_rows()}
        for version in SERVERS.MATRIX:
            assert version in SERVERS.SERVERS
            (row,) = [p for p in rows if p.startswith(f"server {version}")]
            assert rows[row] == "supported"

    def test_every_supported_row_names_a_test_file_that_exists(self) -> None:
        """A claim without a test is not a claim: each row's test file is in tests/."""
        for prefect, status, proof in compatibility_rows():
            if status != "supported":
                continue
            files = re.findall(r"tests/[\w*]+\.py", proof)
            named = re.findall(r"`(Test\w+)`", proof)
            assert files or named, f"{prefect}: no test named"
            for pattern in files:
                assert list(ROOT.glob(pattern)), f"{prefect}: {pattern} does not exist"
            for cls in named:
                sources = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
                assert f"class {cls}" in sources, f"{prefect}: {cls} does not exist"
