"""Tests for the command line as a user runs it (a real subprocess)."""

from __future__ import annotations

import gc
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
import tomllib
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from exporter import __version__
from exporter.cli import startup_problems
from exporter.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "prefect-exporter"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exporter", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or {"PATH": "/usr/bin:/bin"},
    )


def strict_json(line: str) -> dict[str, Any]:
    """Parse one line, refusing the Infinity and NaN that Python's json accepts."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    parsed: dict[str, Any] = json.loads(line, parse_constant=refuse)
    return parsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def closed_api_url() -> str:
    """An API URL on a port nobody listens on: every poll fails fast with `connection`."""
    return f"http://127.0.0.1:{free_port()}/api"


def read_until(fd: int, done: Callable[[bytes], bool], timeout: float, output: bytearray) -> bool:
    """Append what `fd` yields to `output` until `done(output)`, EOF or the deadline."""
    deadline = time.monotonic() + timeout
    while not done(bytes(output)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end of a terminal closed
            return done(bytes(output))
        if not chunk:
            return done(bytes(output))
        output += chunk
    return True


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
        assert f"poll.interval in config file {config}" in result.stderr
        assert "--web.telemetry-path: must start with /" in result.stderr

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

    def test_a_config_file_that_is_not_utf8_exits_2(self, tmp_path: Path) -> None:
        """Latin-1 bytes are a listed problem, not a UnicodeDecodeError traceback."""
        config = tmp_path / "latin1.yaml"
        config.write_bytes(b"\xff\xfe not utf-8\n")
        result = run_cli("--config.file", str(config), "--log.format", "console")
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr == (
            "prefect-exporter: invalid configuration:\n"
            f"  - config file {config}: not UTF-8 text (byte 0xff on line 1); save it as UTF-8\n"
        )

    def test_a_non_ascii_api_key_exits_2_without_echoing_it(self) -> None:
        """The key is refused at start-up, not by httpx with a traceback."""
        result = run_cli(
            "--log.format",
            "console",
            env={"PATH": "/usr/bin:/bin", "PREFECT_API_KEY": "pnu_clé"},
        )
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert "PREFECT_API_KEY: contains a non-ASCII character (character 7)" in result.stderr
        assert "clé" not in result.stderr

    def test_a_bad_choice_does_not_hide_the_other_problems(self) -> None:
        """--log.format xml, a bad URL and a too short staleness: all three are listed."""
        result = run_cli(
            "--prefect.api-url", "ftp://x", "--poll.max-staleness", "1s", "--log.format", "xml"
        )
        assert result.returncode == 2
        problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
        assert [problem.split(":")[0] for problem in problems] == [
            "  - --prefect.api-url",
            "  - --log.format",
            "  - --poll.max-staleness",
        ]

    def test_a_mistyped_flag_suggests_the_closest(self) -> None:
        """--poll.intervall gets 'did you mean --poll.interval?'."""
        result = run_cli("--poll.intervall", "5s", "--log.format", "console")
        assert result.returncode == 2
        assert "--poll.intervall: unknown flag (did you mean --poll.interval?)" in result.stderr

    def test_with_json_each_problem_is_a_json_line(self) -> None:
        """A log shipper reading JSON gets the problems too, one line each."""
        result = run_cli("--log.format", "json", "--poll.interval", "soon", "--poll.x", "1")
        assert result.returncode == 2
        lines = [strict_json(line) for line in result.stderr.splitlines()]
        assert [(line["event"], line["level"]) for line in lines] == [
            ("config_invalid", "error"),
            ("config_invalid", "error"),
        ]
        assert lines[1]["problem"].startswith("--poll.interval: expected a duration")


class TestStartupChecks:
    """Files named in the settings are checked before anything starts: exit 2, flag named."""

    def test_an_events_state_file_in_a_missing_directory_exits_2(self, tmp_path: Path) -> None:
        """The problem names --events.state-file and the directory."""
        missing = tmp_path / "nowhere" / "cursor.json"
        result = run_cli(f"--events.state-file={missing}", "--log.format=console")
        assert result.returncode == 2
        assert "--events.state-file" in result.stderr
        assert "does not exist" in result.stderr

    def test_a_directory_as_worker_log_and_its_state_file_exit_2_with_both_listed(
        self, tmp_path: Path
    ) -> None:
        """Every file problem is listed, not only the first."""
        result = run_cli(
            f"--worker-log=w1={tmp_path}",
            f"--worker-log.state-file={tmp_path}",
            "--no-prefect.enabled",
            "--log.format=console",
        )
        assert result.returncode == 2
        assert "--worker-log w1=" in result.stderr
        assert "--worker-log.state-file" in result.stderr

    def test_an_events_state_file_is_not_checked_when_events_are_off(self, tmp_path: Path) -> None:
        """A setting that is not used cannot stop the exporter."""
        assert (
            startup_problems(
                load_settings(
                    [f"--events.state-file={tmp_path / 'no' / 'x'}", "--no-events.enabled"], {}
                )
            )
            == []
        )


class TestInformation:
    """--version and --help tell a new user what they need."""

    def test_version_matches_the_package(self) -> None:
        """--version prints the program name and the version of pyproject.toml."""
        result = run_cli("--version")
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert result.returncode == 0
        assert result.stdout == f"prefect-exporter {project['version']}\n"
        assert __version__ == project["version"]

    def test_help_names_the_credential_variables(self) -> None:
        """The API key and auth string, which have no flags, are explained in --help."""
        result = run_cli("--help")
        assert result.returncode == 0
        assert "PREFECT_API_KEY" in result.stdout
        assert "PREFECT_API_AUTH_STRING" in result.stdout
        assert "(default: 30s)" in result.stdout


class TestJsonOutput:
    """With --log.format json every line the process writes is strict JSON."""

    def test_every_line_is_json_and_a_key_newline_is_removed_with_a_warning(self) -> None:
        """Start-up, a warning, failing polls (in dev mode, with asyncio's own checks) and
        shutdown all come out as JSON; the key works without its newline and never shows."""
        env = {"PATH": "/usr/bin:/bin", "PREFECT_API_KEY": "pnu_k8ssecret\n"}
        process = subprocess.Popen(
            [
                sys.executable,
                "-X",
                "dev",  # asyncio debug mode and all warnings: more for us to keep JSON
                "-m",
                "exporter",
                "--log.format=json",
                "--poll.interval=1s",
                f"--prefect.api-url={closed_api_url()}",
                f"--web.listen-address=127.0.0.1:{free_port()}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert process.stderr is not None
        assert process.stdout is not None
        output = bytearray()
        try:
            polled = read_until(
                process.stderr.fileno(), lambda seen: b"poll_failed" in seen, 60, output
            )
        finally:
            process.send_signal(signal.SIGTERM)
            read_until(process.stderr.fileno(), lambda seen: False, 30, output)
            code = process.wait(timeout=30)
            stdout = process.stdout.read()
            process.stdout.close()
            process.stderr.close()
        text = output.decode()
        assert polled, text
        assert code == 0
        assert stdout == b""
        lines = [strict_json(line) for line in text.splitlines()]
        events = [line["event"] for line in lines]
        assert events[0] == "config_warning"
        assert lines[0]["problem"].startswith("PREFECT_API_KEY: removed a trailing newline")
        assert "exporter_started" in events
        assert "poll_failed" in events
        assert events[-1] == "exporter_stopped"
        assert "k8ssecret" not in text


class TestNoTelemetry:
    """The exporter sends no telemetry and writes nothing under the user's home."""

    def test_a_terminal_run_shows_no_notice_and_leaves_home_empty(self, tmp_path: Path) -> None:
        """Under a pseudo-terminal (where prefect-client would print its telemetry notice and
        create ~/.prefect) a real run polls, stops, and HOME stays empty."""
        if not CONSOLE_SCRIPT.exists():
            pytest.fail(f"no console script at {CONSOLE_SCRIPT}; run scripts/setup.sh first")
        home = tmp_path / "home"
        home.mkdir()
        # No CI variables: prefect-client stays quiet in CI on its own, which would hide a fault.
        env = {"PATH": "/usr/bin:/bin", "HOME": str(home), "TERM": "xterm"}
        controller, terminal = pty.openpty()
        process = subprocess.Popen(
            [
                str(CONSOLE_SCRIPT),
                "--poll.interval=1s",
                f"--prefect.api-url={closed_api_url()}",
                f"--web.listen-address=127.0.0.1:{free_port()}",
            ],
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            env=env,
            cwd=tmp_path,
            start_new_session=True,
        )
        os.close(terminal)
        output = bytearray()
        try:
            polled = read_until(controller, lambda seen: b"poll_failed" in seen, 60, output)
            process.send_signal(signal.SIGTERM)
            read_until(controller, lambda seen: False, 30, output)
            code = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            os.close(controller)
        text = output.decode(errors="replace")
        assert polled, text
        assert code == 0
        assert "anonymous usage" not in text
        assert "DO_NOT_TRACK" not in text
        assert "exporter_stopped" in text
        assert sorted(p.name for p in home.rglob("*")) == []


class Node:
    """An object that can take part in a reference cycle and be weakly referenced."""

    peer: Node | None = None


class TestTuneForScrapes:
    """The process-wide settings that keep /metrics fast while a poll parses (cli docstring)."""

    def test_start_up_objects_are_frozen_and_the_switch_interval_is_short(self) -> None:
        from exporter.cli import SWITCH_INTERVAL_SECONDS, tune_for_scrapes

        interval = sys.getswitchinterval()
        gc.disable()  # no automatic collection may hide what the function does
        try:
            # Garbage made before the call is collected by it, not frozen for ever.
            before = Node()
            before.peer = before
            old_garbage = weakref.ref(before)
            del before
            tune_for_scrapes()
            assert old_garbage() is None
            assert gc.get_freeze_count() > 10_000  # the modules imported so far
            assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_SECONDS)
            assert interval > SWITCH_INTERVAL_SECONDS
            # Objects made afterwards are still collected: cycles do not leak.
            after = Node()
            after.peer = after
            new_garbage = weakref.ref(after)
            del after
            gc.collect()
            assert new_garbage() is None
        finally:
            gc.enable()
            gc.unfreeze()
            sys.setswitchinterval(interval)
