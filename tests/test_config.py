"""Tests for settings: flags, YAML, environment, and validation that lists every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exporter.config import (
    DEFAULT_API_URL,
    MAX_CONFIG_FILE_BYTES,
    OPTIONS,
    ConfigError,
    Option,
    Settings,
    build_parser,
    documentation_rows,
    load_settings,
    parse_duration,
    read_settings,
)
from exporter.secret import Secret


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


ROOT = Path(__file__).resolve().parent.parent

# One valid sample per option: (text as a user writes it, expected Settings fields). A new
# option must add a line here, which proves its flag, YAML key and variable reach its field.
SAMPLES: dict[str, tuple[str, dict[str, object]]] = {
    "api_url": ("https://prefect.example.com/api/", {"api_url": "https://prefect.example.com/api"}),
    "api_key": ("pnu_abc123", {"api_key": Secret("pnu_abc123")}),
    "auth_string": ("admin:pässword", {"auth_string": Secret("admin:pässword")}),
    "prefect_enabled": ("true", {"prefect_enabled": True}),
    "requests_per_minute": ("300", {"requests_per_minute": 300}),
    "request_timeout": ("4s", {"request_timeout": 4.0}),
    "poll_interval": ("1m", {"poll_interval": 60.0, "max_staleness": 180.0}),
    "poll_timeout": ("15s", {"poll_timeout": 15.0}),
    "max_staleness": ("5m", {"max_staleness": 300.0}),
    "poll_concurrency": ("8", {"poll_concurrency": 8}),
    "poll_mode": ("run-centric", {"poll_mode": "run-centric"}),
    "work_pools_include": ("etl-*", {"work_pools_include": ("etl-*",)}),
    "work_pools_exclude": ("etl-test-*", {"work_pools_exclude": ("etl-test-*",)}),
    "max_backoff": ("2m", {"max_backoff": 120.0}),
    "heartbeat_multiple": ("2.5", {"heartbeat_multiple": 2.5}),
    "events_enabled": ("false", {"events_enabled": False}),
    "events_stream": ("false", {"events_stream": False}),
    "events_max_pages": ("20", {"events_max_pages": 20}),
    "events_settle": ("45s", {"events_settle": 45.0}),
    "events_state_file": ("/var/lib/e.json", {"events_state_file": "/var/lib/e.json"}),
    "deployments_breakdown": ("true", {"deployments_breakdown": True}),
    "deployments_include": ("etl/*", {"deployments_include": ("etl/*",)}),
    "deployments_exclude": ("etl/test-*", {"deployments_exclude": ("etl/test-*",)}),
    "deployments_max": ("20", {"deployments_max": 20}),
    "worker_logs": ("w1=/logs/a.log", {"worker_logs": (("w1", "/logs/a.log"),)}),
    "worker_log_state_file": ("/var/lib/p.json", {"worker_log_state_file": "/var/lib/p.json"}),
    "listen_address": ("127.0.0.1:9000", {"listen_host": "127.0.0.1", "listen_port": 9000}),
    "telemetry_path": ("/prefect", {"telemetry_path": "/prefect"}),
    "web_config_file": ("/etc/exporter/web.yml", {"web_config_file": "/etc/exporter/web.yml"}),
    "log_level": ("DEBUG", {"log_level": "debug"}),
    "log_format": ("json", {"log_format": "json"}),
    "config_file": ("", {"config_file": None}),
}


def readme_configuration_rows() -> list[tuple[str, ...]]:
    """The cells of the README's configuration table, stripped, one tuple per row."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| Flag | YAML key | Environment | Default | Meaning |") + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(tuple(cell.strip() for cell in line.strip().strip("|").split(" | ")))
    return rows


def problems_of(argv: list[str], environ: dict[str, str] | None = None) -> list[str]:
    """The problems load_settings reports (fails the test if it accepts the input)."""
    with pytest.raises(ConfigError) as raised:
        load_settings(argv, environ or {})
    return raised.value.problems


class TestOptionTable:
    """Flags, YAML keys, variables, defaults, --help and the README derive from one table."""

    def test_readme_table_is_the_option_table(self) -> None:
        """Every README row equals the row derived from OPTIONS, in the same order."""
        assert readme_configuration_rows() == [
            tuple(cell.strip() for cell in row) for row in documentation_rows()
        ]

    def test_help_texts_fit_in_a_table_cell(self) -> None:
        """A '|' in a help text would split the README row."""
        for option in OPTIONS:
            assert "|" not in option.help, option.name

    def test_settings_defaults_are_what_loading_nothing_gives(self) -> None:
        """The dataclass defaults and the table's defaults are the same values."""
        assert Settings() == load_settings([], {})
        assert Settings().max_staleness == 3 * Settings().poll_interval == 90

    def test_every_option_has_a_sample(self) -> None:
        """The wiring tests below cover every option."""
        assert set(SAMPLES) == {option.name for option in OPTIONS}

    @pytest.mark.parametrize("option", [o for o in OPTIONS if o.flag], ids=lambda o: o.name)
    def test_each_flag_sets_its_field(self, option: Option) -> None:
        """`--flag=value` reaches the Settings field."""
        text, expected = SAMPLES[option.name]
        settings = load_settings([f"{option.flag}={text}"], {})
        for field, value in expected.items():
            assert getattr(settings, field) == value

    @pytest.mark.parametrize("option", [o for o in OPTIONS if o.yaml_key], ids=lambda o: o.name)
    def test_each_yaml_key_sets_its_field(self, option: Option, tmp_path: Path) -> None:
        """`section: {key: value}` in the file reaches the Settings field."""
        text, expected = SAMPLES[option.name]
        assert option.yaml_key is not None
        section, key = option.yaml_key.split(".")
        value: object = [text] if option.repeatable else text
        config = tmp_path / "c.yml"
        config.write_text(yaml.safe_dump({section: {key: value}}))
        settings = load_settings(["--config.file", str(config)], {})
        for field, wanted in expected.items():
            assert getattr(settings, field) == wanted

    @pytest.mark.parametrize("option", [o for o in OPTIONS if o.env], ids=lambda o: o.name)
    def test_each_variable_sets_its_field(self, option: Option) -> None:
        """The environment variable reaches the Settings field."""
        text, expected = SAMPLES[option.name]
        assert option.env is not None
        settings = load_settings([], {option.env: text})
        for field, value in expected.items():
            assert getattr(settings, field) == value

    def test_help_shows_each_flag_with_its_default(self) -> None:
        """--help lists every flag and the default the table gives it."""
        text = " ".join(build_parser().format_help().split())
        for option in OPTIONS:
            if option.flag:
                assert option.flag in text
        assert "time between polls (default: 30s)" in text
        assert "(default: $PREFECT_API_URL, else http://127.0.0.1:4200/api)" in text
        assert "(default: 3 intervals)" in text
        assert "deployment (default: off)" in text

    def test_help_names_the_credential_variables(self) -> None:
        """Options without a flag are listed with their environment variables."""
        text = build_parser().format_help()
        assert "PREFECT_API_KEY" in text
        assert "PREFECT_API_AUTH_STRING" in text


class TestProblemsNameWhatTheUserWrote:
    """Each problem names the flag, the key and file, or the variable to fix."""

    def test_a_flag_a_key_and_a_variable(self, tmp_path: Path) -> None:
        """One bad value from each source, each named as written."""
        config = tmp_path / "c.yml"
        config.write_text("poll:\n  interval: soon\n")
        problems = problems_of(
            ["--config.file", str(config), "--poll.concurrency", "99"],
            {"PREFECT_API_URL": "ftp://x"},
        )
        assert sorted(problems) == sorted(
            [
                "PREFECT_API_URL: expected an http:// or https:// URL such as "
                "http://127.0.0.1:4200/api (setting api_url)",
                f"poll.interval in config file {config}: expected a duration such as 30s or "
                "5m, got 'soon' (setting poll_interval)",
                "--poll.concurrency: must be between 1 and 32 (setting poll_concurrency)",
            ]
        )

    def test_a_bad_choice_hides_no_other_problem(self) -> None:
        """--log.format xml, a bad URL and a too short staleness: three problems."""
        problems = problems_of(
            ["--prefect.api-url", "ftp://x", "--poll.max-staleness", "1s", "--log.format", "xml"]
        )
        assert problems == [
            "--prefect.api-url: expected an http:// or https:// URL such as "
            "http://127.0.0.1:4200/api (setting api_url)",
            "--log.format: must be one of auto, json, console, got 'xml' (setting log_format)",
            "--poll.max-staleness: must be at least the poll interval (30s by default)"
            " (setting max_staleness)",
        ]

    def test_the_log_format_is_passed_on_when_valid(self) -> None:
        """Problems can be reported as JSON when --log.format json was valid."""
        with pytest.raises(ConfigError) as raised:
            load_settings(["--log.format", "json", "--poll.interval", "x"], {})
        assert raised.value.log_format == "json"
        with pytest.raises(ConfigError) as raised:
            load_settings(["--log.format", "xml"], {})
        assert raised.value.log_format is None

    def test_relations_name_both_sources(self, tmp_path: Path) -> None:
        """A timeout longer than the interval names where each was set."""
        config = tmp_path / "c.yml"
        config.write_text("poll:\n  interval: 10s\n")
        problems = problems_of(["--config.file", str(config), "--poll.timeout", "20s"])
        assert problems == [
            "--poll.timeout: must not be longer than the poll interval (10s from poll.interval "
            f"in config file {config}): a poll may not outlast it (setting poll_timeout)"
        ]


class TestFlags:
    """Bad flags are listed with the rest instead of stopping at the first."""

    def test_a_mistyped_flag_suggests_the_closest(self) -> None:
        """--poll.intervl is unknown, its value is not a stray argument, and others still count."""
        problems = problems_of(["--poll.intervl", "5s", "--poll.concurrency", "0"])
        assert problems == [
            "--poll.intervl: unknown flag (did you mean --poll.interval?)",
            "--poll.concurrency: must be between 1 and 32 (setting poll_concurrency)",
        ]

    def test_abbreviations_are_unknown_flags(self) -> None:
        """A prefix of a flag is not silently taken for it."""
        assert problems_of(["--poll.int=5s"]) == [
            "--poll.int: unknown flag (did you mean --poll.interval?)"
        ]

    def test_a_missing_value_is_a_problem(self) -> None:
        """A flag at the end, or followed by another flag, has no value."""
        problems = problems_of(["--poll.timeout", "--log.level", "debug", "--poll.interval"])
        assert problems == [
            "--poll.timeout: expects a value (DURATION)",
            "--poll.interval: expects a value (DURATION)",
        ]

    def test_a_stray_argument_is_a_problem(self) -> None:
        """The exporter takes no positional arguments."""
        assert problems_of(["metrics"]) == ["unexpected argument 'metrics'; flags start with --"]

    def test_a_value_starting_with_a_dash_is_a_value(self) -> None:
        """--poll.interval -5s is a bad duration, not a missing value."""
        assert problems_of(["--poll.interval", "-5s"]) == [
            "--poll.interval: expected a duration such as 30s or 5m, got '-5s' "
            "(setting poll_interval)"
        ]

    def test_boolean_flags_take_an_explicit_value(self) -> None:
        """--events.enabled=false and --no-events.enabled=true both turn events off."""
        assert not load_settings(["--events.enabled=false"], {}).events_enabled
        assert not load_settings(["--no-events.enabled=true"], {}).events_enabled
        assert load_settings(["--no-deployments.breakdown=false"], {}).deployments_breakdown
        assert problems_of(["--events.enabled=maybe"]) == [
            "--events.enabled: expected true or false, got 'maybe'"
        ]

    def test_no_prefect_enabled_is_named_as_written(self) -> None:
        """The log-only mode without a log names --no-prefect.enabled."""
        assert problems_of(["--no-prefect.enabled"]) == [
            "--no-prefect.enabled: with the API off, give at least one --worker-log "
            "(worker_logs.files in YAML) (setting prefect_enabled)"
        ]


class TestConfigFile:
    """Whatever the file holds, the result is settings or listed problems, never a traceback."""

    def write(self, tmp_path: Path, data: bytes) -> str:
        path = tmp_path / "c.yml"
        path.write_bytes(data)
        return str(path)

    def test_a_file_that_is_not_utf8_is_a_problem(self, tmp_path: Path) -> None:
        """Latin-1 bytes are reported with their offset, along with other problems."""
        path = self.write(tmp_path, b"poll:\n  interval: 5s # \xe9t\xe9\n")
        problems = problems_of(["--config.file", path, "--poll.concurrency", "0"])
        assert problems == [
            f"config file {path}: not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8",
            "--poll.concurrency: must be between 1 and 32 (setting poll_concurrency)",
        ]

    def test_a_huge_file_is_not_read_whole(self, tmp_path: Path) -> None:
        """A file over the size limit is refused."""
        path = self.write(tmp_path, b"#" * (MAX_CONFIG_FILE_BYTES + 1))
        assert problems_of(["--config.file", path]) == [
            f"config file {path}: larger than 1024 KiB; not a config"
        ]

    @pytest.mark.parametrize(
        "text",
        ["poll:\n  interval: 2020-13-45\n", "[" * 5000, "poll: !!python/object:os.system x\n"],
        ids=["impossible-date", "deep-nesting", "python-tag"],
    )
    def test_yaml_the_parser_refuses_is_a_problem(self, tmp_path: Path, text: str) -> None:
        """PyYAML's other exceptions are reported as invalid YAML too."""
        path = self.write(tmp_path, text.encode())
        problems = problems_of(["--config.file", path])
        assert len(problems) == 1
        assert problems[0].startswith(f"config file {path}: not valid YAML")

    def test_unknown_keys_get_a_suggestion(self, tmp_path: Path) -> None:
        """A misspelt key names the closest known one."""
        path = self.write(tmp_path, b"web:\n  listen_adress: ':1'\nlogs: {}\n")
        assert problems_of(["--config.file", path]) == [
            f"web.listen_adress in config file {path}: unknown key "
            "(did you mean web.listen_address?)",
            f"config file {path}: unknown section 'logs' (did you mean log?)",
        ]

    @pytest.mark.parametrize(
        ("text", "field"),
        [
            ("poll:\n  interval: .inf\n", "poll_interval"),
            ("workers:\n  heartbeat_multiple: .nan\n", "heartbeat_multiple"),
            ("poll:\n  concurrency: true\n", "poll_concurrency"),
            ("poll:\n  concurrency: 2.5\n", "poll_concurrency"),
            ("events:\n  enabled: sometimes\n", "events_enabled"),
            ("prefect:\n  api_key: 12\n", "api_key"),
        ],
    )
    def test_values_of_the_wrong_kind_are_problems(
        self, tmp_path: Path, text: str, field: str
    ) -> None:
        """Infinite, NaN, boolean-for-number and number-for-key values are refused."""
        path = self.write(tmp_path, text.encode())
        problems = problems_of(["--config.file", path])
        assert len(problems) == 1
        assert problems[0].endswith(f"(setting {field})")

    def test_an_empty_value_means_unset(self, tmp_path: Path) -> None:
        """`state_file:` with nothing after it is the default, no file."""
        path = self.write(tmp_path, b"events:\n  state_file:\nprefect:\n  api_key:\n")
        settings = load_settings(["--config.file", path], {})
        assert settings.events_state_file is None
        assert settings.api_key is None


class TestCredentials:
    """Keys and auth strings are cleaned or refused with a clear message, never echoed."""

    def test_a_trailing_newline_is_removed_with_a_warning(self) -> None:
        """A Kubernetes secret made from a file works, and the user is told."""
        loaded = read_settings([], {"PREFECT_API_KEY": "pnu_abc\n"})
        assert loaded.settings.api_key == Secret("pnu_abc")
        assert loaded.warnings == [
            "PREFECT_API_KEY: removed a trailing newline from the value (a secret or file that"
            " ends with a newline?)"
        ]

    def test_surrounding_spaces_in_the_url_are_removed_with_a_warning(self) -> None:
        """A URL pasted with a space works, and the user is told."""
        loaded = read_settings([], {"PREFECT_API_URL": " http://h:4200/api "})
        assert loaded.settings.api_url == "http://h:4200/api"
        assert loaded.warnings == [
            "PREFECT_API_URL: removed surrounding whitespace from the value (a secret or file"
            " that ends with a newline?)"
        ]

    @pytest.mark.parametrize(
        ("key", "problem"),
        [
            ("pnu_sécret", "contains a non-ASCII character (character 6)"),
            ("pnu_se cret", "contains a space or control character (character 7)"),
            ("pnu_se\ncret", "contains a space or control character (character 7)"),
            ("  \n", "is blank"),
        ],
    )
    def test_a_bad_api_key_is_refused_without_echoing_it(self, key: str, problem: str) -> None:
        """The message says what is wrong and where, not the key."""
        problems = problems_of([], {"PREFECT_API_KEY": key})
        assert len(problems) == 1
        assert problems[0].startswith(f"PREFECT_API_KEY: {problem}")
        assert "cret" not in problems[0]

    def test_a_control_character_in_the_auth_string_is_refused(self) -> None:
        """A newline inside user:password is a copy-and-paste accident."""
        problems = problems_of([], {"PREFECT_API_AUTH_STRING": "admin:hun\nter2"})
        assert problems == [
            "PREFECT_API_AUTH_STRING: contains a control character (character 10)"
            " (setting auth_string)"
        ]

    def test_a_non_ascii_auth_string_is_accepted(self) -> None:
        """Basic auth is sent UTF-8 encoded, as Prefect's client does."""
        settings = load_settings([], {"PREFECT_API_AUTH_STRING": "admin:pässword"})
        assert settings.auth_string == Secret("admin:pässword")

    def test_a_url_with_spaces_inside_is_refused_without_echoing_it(self) -> None:
        """Whitespace inside the URL is refused; the URL is not repeated."""
        problems = problems_of([], {"PREFECT_API_URL": "http://h:4200/a pi"})
        assert problems == [
            "PREFECT_API_URL: contains spaces or control characters (setting api_url)"
        ]
