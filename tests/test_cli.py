"""Tests for the command line as a user runs it (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {"PATH": "/usr/bin:/bin"},
    )


class TestInvalidConfiguration:
    """Invalid configuration exits 2 with every problem listed and no traceback."""

    def test_bad_flags_and_file_exit_2_listing_each_problem(self, tmp_path: Path) -> None:
        """Two problems, two lines, exit code 2."""
        config = tmp_path / "c.yml"
        config.write_text("poll:\n  interval: -5s\n")
        result = run_cli("--config.file", str(config), "--web.telemetry-path", "metrics")
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert "poll_interval" in result.stderr
        assert "telemetry_path" in result.stderr

    def test_secret_in_bad_url_is_not_printed(self) -> None:
        """Credentials in PREFECT_API_URL are refused without echoing them."""
        result = run_cli(
            env={"PATH": "/usr/bin:/bin", "PREFECT_API_URL": "http://u:hunter2@h:1/api"}
        )
        assert result.returncode == 2
        assert "hunter2" not in result.stderr + result.stdout

    def test_help_lists_prometheus_style_flags(self) -> None:
        """--help shows the documented flags."""
        result = run_cli("--help")
        assert result.returncode == 0
        for flag in (
            "--web.listen-address",
            "--web.telemetry-path",
            "--config.file",
            "--log.level",
            "--log.format",
        ):
            assert flag in result.stdout
