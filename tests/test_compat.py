"""Compatibility: the claims (pyproject.toml, README's table) and older servers' tag limits."""

from __future__ import annotations

import asyncio
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from exporter.clock import Deadline
from exporter.errors import ApiStatusError, MalformedResponse
from exporter.limits_reader import LEGACY_TAGS_CHECK_SECONDS, LimitsReader
from exporter.prefect_parse import parse_v1_tag_limit
from exporter.records import ConcurrencyLimitRecord, RunState
from exporter.snapshot import leaked_slots
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


class LimitsFake:
    """A LimitsApi whose v2 table and v1 view the test sets; counts the v1 reads."""

    def __init__(self, v2: list[ConcurrencyLimitRecord], v1: list[ConcurrencyLimitRecord]) -> None:
        self.v2, self.v1 = v2, v1
        self.v1_reads = 0

    async def concurrency_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]:
        return list(self.v2)

    async def legacy_tag_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]:
        self.v1_reads += 1
        return list(self.v1)

    async def tag_limit_holders(self, deadline: Deadline) -> dict[str, tuple[str, ...]]:
        return {r.tag: () for r in self.v1 if r.tag}

    async def task_run_states(self, ids: Sequence[str], deadline: Deadline) -> list[RunState]:
        return []

    async def flow_run_states(self, ids: Sequence[str], deadline: Deadline) -> list[RunState]:
        return []

    async def deployment_names(self, ids: Sequence[str], deadline: Deadline) -> dict[str, str]:
        return {}

    async def deployment_slot_runs(self, deployment_id: str, deadline: Deadline) -> int:
        return 0

    async def deployment_awaiting_slot(
        self, deployment_id: str, deadline: Deadline
    ) -> tuple[int, float | None]:
        return 0, None


GLOBAL = ConcurrencyLimitRecord("g", "warehouse", 4, 0, True)
TAG = ConcurrencyLimitRecord("t", "tag:reports", 2, 1, True)


def read_names(reader: LimitsReader) -> list[str]:
    limits, _ = asyncio.run(reader.read(Deadline(1e12)))
    return sorted(limit.name for limit in limits)


class TestLegacyTagLimits:
    """Servers before Prefect's v1-to-v2 adapter keep tag limits in the v1 table alone."""

    def test_a_tag_limit_only_the_v1_view_knows_is_read(self) -> None:
        """Prefect 3.0's v2 table lacks the tag limit: it comes from the v1 view, every read."""
        api = LimitsFake([GLOBAL], [TAG])
        reader = LimitsReader(api, 2, False, monotonic=lambda: 0.0)
        assert read_names(reader) == ["tag:reports", "warehouse"]
        assert read_names(reader) == ["tag:reports", "warehouse"]
        assert api.v1_reads == 2

    def test_a_migrated_server_is_asked_once_an_hour_and_nothing_is_doubled(self) -> None:
        """The v1 view repeating v2's tag limits adds nothing and is asked again in an hour."""
        now = [0.0]
        api = LimitsFake([GLOBAL, TAG], [TAG])
        reader = LimitsReader(api, 2, False, monotonic=lambda: now[0])
        assert read_names(reader) == ["tag:reports", "warehouse"]
        now[0] += LEGACY_TAGS_CHECK_SECONDS - 1
        read_names(reader)
        assert api.v1_reads == 1
        now[0] += 1
        read_names(reader)
        assert api.v1_reads == 2

    def test_a_server_without_the_v1_view_keeps_its_v2_limits(self) -> None:
        """A 404 from the v1 view means no legacy tags, not a degraded limits feature."""

        class NoV1(LimitsFake):
            async def legacy_tag_limits(self, deadline: Deadline) -> list[ConcurrencyLimitRecord]:
                raise ApiStatusError("/concurrency_limits/filter", 404, None)

            async def tag_limit_holders(self, deadline: Deadline) -> dict[str, tuple[str, ...]]:
                raise ApiStatusError("/concurrency_limits/filter", 404, None)

        reader = LimitsReader(NoV1([GLOBAL, TAG], []), 2, False, monotonic=lambda: 0.0)
        limits, holders = asyncio.run(reader.read(Deadline(1e12)))
        # The tag limit's holders are unknown (no leak check), the limits are all served.
        assert sorted(limit.name for limit in limits) == ["tag:reports", "warehouse"]
        assert holders.tag_holders == {}
        assert leaked_slots(TAG, holders) is None

    def test_v1_rows_become_tag_limits(self) -> None:
        """Tag, limit and the number of holders; v1 limits are always enforced."""
        row = {"id": "x", "tag": "reports", "concurrency_limit": 3, "active_slots": ["a", "b"]}
        assert parse_v1_tag_limit(row) == ConcurrencyLimitRecord("x", "tag:reports", 3, 2, True)

    @pytest.mark.parametrize(
        "row",
        [
            {"id": "x", "tag": "r", "active_slots": []},
            {"id": "x", "tag": "r", "concurrency_limit": -1},
            {"id": "x", "tag": "r", "concurrency_limit": 1, "active_slots": [1]},
            {"id": "x", "concurrency_limit": 1},
        ],
    )
    def test_impossible_v1_rows_are_malformed(self, row: dict[str, object]) -> None:
        """No limit, a negative one, holders that are not ids, or no tag."""
        with pytest.raises(MalformedResponse):
            parse_v1_tag_limit(row)
