"""Tests for settings: flags, YAML, environment, and validation that lists every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from exporter.config import DEFAULT_API_URL, ConfigError, Secret, load_settings, parse_duration


class TestSources:
    """Flags beat the environment, which beats the YAML file, which beats defaults."""

    def test_defaults_use_prefects_local_address_and_say_so(self) -> None:
        """Without any setting the local default URL is used and flagged as a default."""
        settings = load_settings([], {})
        assert settings.api_url == DEFAULT_API_URL
        assert settings.api_url_from_default
        assert settings.listen_port == 9716
        assert settings.poll_interval == 30

    def test_prefect_environment_variables_are_read(self) -> None:
        """PREFECT_API_URL, PREFECT_API_KEY and PREFECT_API_AUTH_STRING are honoured."""
        settings = load_settings(
            [],
            {
                "PREFECT_API_URL": "https://api.prefect.cloud/api/accounts/a/workspaces/w/",
                "PREFECT_API_KEY": "pnu_secret",
                "PREFECT_API_AUTH_STRING": "admin:pw",
            },
        )
        assert settings.api_url == "https://api.prefect.cloud/api/accounts/a/workspaces/w"
        assert not settings.api_url_from_default
        assert settings.api_key == Secret("pnu_secret")
        assert settings.auth_string == Secret("admin:pw")

    def test_flags_beat_environment_which_beats_the_file(self, tmp_path: Path) -> None:
        """Each layer overrides the one below it."""
        config = tmp_path / "c.yml"
        config.write_text(
            "prefect:\n  api_url: http://file:4200/api\n"
            "poll:\n  interval: 1m\n  timeout: 45s\n"
            "web:\n  listen_address: '127.0.0.1:9000'\n"
        )
        settings = load_settings(
            ["--config.file", str(config), "--poll.interval", "2m"],
            {"PREFECT_API_URL": "http://env:4200/api"},
        )
        assert settings.api_url == "http://env:4200/api"
        assert settings.poll_interval == 120
        assert settings.poll_timeout == 45
        assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 9000)

    def test_ipv6_listen_address(self) -> None:
        """A bracketed IPv6 host is accepted."""
        settings = load_settings(["--web.listen-address", "[::1]:9716"], {})
        assert (settings.listen_host, settings.listen_port) == ("::1", 9716)


class TestValidation:
    """Every problem is reported at once, and secrets never appear in messages."""

    def test_all_problems_are_listed_together(self, tmp_path: Path) -> None:
        """Bad values in several places produce one error with all of them."""
        config = tmp_path / "c.yml"
        config.write_text("poll:\n  interval: soon\n  colour: red\nextra: {}\n")
        with pytest.raises(ConfigError) as raised:
            load_settings(
                [
                    "--config.file",
                    str(config),
                    "--prefect.requests-per-minute",
                    "many",
                    "--web.listen-address",
                    "nowhere",
                ],
                {"PREFECT_API_URL": "ftp://x"},
            )
        text = "\n".join(raised.value.problems)
        for expected in (
            "poll_interval",
            "poll.colour",
            "'extra'",
            "requests_per_minute",
            "listen_address",
            "api_url",
        ):
            assert expected in text
        assert len(raised.value.problems) >= 6

    def test_timeout_longer_than_interval_is_rejected(self) -> None:
        """A poll may not outlast its interval."""
        with pytest.raises(ConfigError, match="poll_timeout"):
            load_settings(["--poll.interval", "10s", "--poll.timeout", "20s"], {})

    def test_missing_and_invalid_files_are_reported(self, tmp_path: Path) -> None:
        """An unreadable or unparsable file is a listed problem, not a traceback."""
        with pytest.raises(ConfigError, match="cannot be read"):
            load_settings(["--config.file", str(tmp_path / "missing.yml")], {})
        bad = tmp_path / "bad.yml"
        bad.write_text("poll: [unclosed\n")
        with pytest.raises(ConfigError, match="not valid YAML"):
            load_settings(["--config.file", str(bad)], {})

    def test_credentials_in_the_url_are_refused_without_echoing_them(self) -> None:
        """A URL with a password is rejected and the password is not repeated."""
        with pytest.raises(ConfigError) as raised:
            load_settings([], {"PREFECT_API_URL": "http://admin:hunter2@prefect:4200/api"})
        assert "hunter2" not in str(raised.value)

    def test_secrets_never_show_in_repr(self) -> None:
        """repr(settings) hides the API key and auth string."""
        settings = load_settings(
            [], {"PREFECT_API_KEY": "pnu_topsecret", "PREFECT_API_AUTH_STRING": "u:hunter2"}
        )
        assert "pnu_topsecret" not in repr(settings)
        assert "hunter2" not in repr(settings)
        assert "hunter2" not in str(settings.auth_string)


class TestDurations:
    """Durations are numbers of seconds or Prometheus-style strings."""

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("30s", 30),
            ("5m", 300),
            ("1h", 3600),
            ("250ms", 0.25),
            ("12", 12),
            (7, 7),
        ],
    )
    def test_parse(self, text: object, seconds: float) -> None:
        """Units ms, s, m, h and bare numbers are understood."""
        assert parse_duration(text) == seconds

    def test_garbage_is_refused(self) -> None:
        """Unknown units raise ValueError."""
        with pytest.raises(ValueError, match="duration"):
            parse_duration("3 fortnights")


class TestWorkerLogs:
    """Sidecar settings: worker logs from flags or YAML, and the log-only mode."""

    def test_flags_name_workers_or_default_to_the_file_name(self) -> None:
        """WORKER=PATH names the worker; a bare path uses the file name."""
        settings = load_settings(
            ["--worker-log", "k8s-1=/var/log/prefect/worker.log", "--worker-log", "/logs/w2.log"],
            {},
        )
        assert settings.worker_logs == (
            ("k8s-1", "/var/log/prefect/worker.log"),
            ("w2", "/logs/w2.log"),
        )

    def test_yaml_files_and_log_only_mode(self, tmp_path: Path) -> None:
        """A sidecar without API access is valid with at least one log."""
        config = tmp_path / "c.yml"
        config.write_text(
            "prefect:\n  enabled: false\nworker_logs:\n  files:\n"
            "    - {path: /logs/worker.log, worker: w1}\n"
        )
        settings = load_settings(["--config.file", str(config)], {})
        assert not settings.prefect_enabled
        assert settings.worker_logs == (("w1", "/logs/worker.log"),)

    def test_log_only_mode_needs_a_log(self) -> None:
        """Turning the API off with nothing to read is a configuration error."""
        with pytest.raises(ConfigError, match="worker-log"):
            load_settings(["--no-prefect.enabled"], {})

    def test_duplicate_worker_names_are_refused(self) -> None:
        """Two logs may not share a worker label."""
        with pytest.raises(ConfigError, match="same worker name"):
            load_settings(["--worker-log", "/a/worker.log", "--worker-log", "/b/worker.log"], {})
