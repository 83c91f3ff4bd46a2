"""Settings: one frozen object built from flags, an optional YAML file and Prefect's environment.

Every option is declared once, in `OPTIONS`: its flag, YAML key, environment variable, default,
parser, range check and help. The command line, the YAML reader, validation, `--help` and the
README's configuration table (which a test compares with `documentation_rows()`) all derive from
that table, so a setting is added in one place.

Precedence, highest first: command-line flags, environment variables, the YAML file, defaults.
Validation collects every problem before failing, so a user fixes a config in one round, and each
problem names what the user wrote: `--poll.interval`, `poll.interval in config file c.yml`,
`PREFECT_API_KEY`. Secrets are never repeated in a problem or a warning.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import textwrap
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

import yaml

from exporter import __version__
from exporter.secret import Secret

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
DEFAULT_LISTEN_ADDRESS = ":9716"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
POLL_MODES = ("auto", "per-queue", "run-centric")
PROG = "prefect-exporter"

# A configuration file is a few hundred bytes; reading at most this much keeps a wrong path
# (a log file, /dev/zero) from exhausting memory.
MAX_CONFIG_FILE_BYTES = 1024 * 1024

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every reason, one sentence each.

    `log_format` is the log format the user asked for when that part was valid (so the
    problems can be reported in it), else None.
    """

    def __init__(self, problems: Sequence[str], log_format: str | None = None) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)
        self.log_format = log_format


# --- Parsers: raw value (a flag's string, a YAML scalar or list, an environment string) to the
# typed value. They raise ValueError with a message that completes "WHERE: ...".


def parse_duration(value: object) -> float:
    """Seconds from a number or a Prometheus-style duration such as '30s', '5m', '250ms'.

    Raises ValueError for anything else, including booleans and infinite or NaN numbers.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"expected a finite duration, got {value!r}")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration such as 30s or 5m, got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_listen_address(value: str) -> tuple[str, int]:
    """Split '[host]:port' (IPv6 hosts in brackets) into host and port; ValueError if malformed."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected [HOST]:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _whole_number(value: object) -> int:
    if isinstance(value, bool | float):
        raise ValueError(f"expected a whole number, got {value!r}")
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    try:
        number = float(value) if isinstance(value, int | float) else float(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"expected a finite number, got {value!r}")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "false"):
        return str(value).strip().lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


def _text(value: object) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ValueError(f"expected a string, got {value!r}")
    return str(value)


def _optional_path(value: object) -> str | None:
    # An empty value (or YAML's `state_file:`) means "no file", as when the option is absent.
    return None if value is None or value == "" else _text(value)


def _listen_address(value: object) -> tuple[str, int]:
    return parse_listen_address(_text(value))


def _url(value: object) -> str:
    # The URL may carry credentials: messages name the problem, never the value.
    if not isinstance(value, str):
        raise ValueError("expected a URL string such as " + DEFAULT_API_URL)
    if _has_control_or_space(value):
        raise ValueError("contains spaces or control characters")
    url = urlsplit(value)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise ValueError("expected an http:// or https:// URL such as " + DEFAULT_API_URL)
    if url.username or url.password:
        raise ValueError("must not contain credentials; use PREFECT_API_AUTH_STRING")
    return value.rstrip("/")


def _api_key(value: object) -> Secret | None:
    text = _secret_text(value)
    if text is None:
        return None
    # The key travels in an HTTP header as `Bearer <key>`: printable ASCII only.
    for position, char in enumerate(text, start=1):
        if not "!" <= char <= "~":
            kind = "a space or control character" if char.isascii() else "a non-ASCII character"
            raise ValueError(
                f"contains {kind} (character {position}); keys are printable ASCII, no spaces"
            )
    return Secret(text)


def _auth_string(value: object) -> Secret | None:
    text = _secret_text(value)
    if text is None:
        return None
    # Base64-encoded as UTF-8 like Prefect's client does, so any printable character works;
    # a control character is a copy-and-paste accident.
    for position, char in enumerate(text, start=1):
        if unicodedata.category(char) == "Cc":
            raise ValueError(f"contains a control character (character {position})")
    return Secret(text)


def _secret_text(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _has_control_or_space(text: str) -> bool:
    return any(char.isspace() or unicodedata.category(char) == "Cc" for char in text)


def _telemetry_path(value: object) -> str:
    path = _text(value)
    if not path.startswith("/") or path in ("/", "/healthz"):
        raise ValueError(f"must start with / and not be / or /healthz, got {path!r}")
    return path


def _worker_logs(value: object) -> tuple[tuple[str, str], ...]:
    """`[WORKER=]PATH` strings (flags, YAML) or `{path, worker}` mappings (YAML)."""
    if value is None:
        return ()
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected a list, got {value!r}")
    logs, bad = [], []
    for item in value:
        if isinstance(item, dict):
            path, worker = item.get("path"), item.get("worker")
        elif isinstance(item, str):
            worker, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        else:
            path = worker = None
        if not path or not isinstance(path, str):
            bad.append(item)
            continue
        logs.append((str(worker) if worker else Path(path).stem, path))
    if bad:
        shown = ", ".join(repr(item) for item in bad)
        raise ValueError(f"expected [WORKER=]PATH or {{path, worker}}, got {shown}")
    names = [worker for worker, _ in logs]
    if len(set(names)) != len(names):
        raise ValueError("two logs have the same worker name; name them WORKER=PATH")
    return tuple(logs)


def _globs(value: object) -> tuple[str, ...]:
    """Shell-style patterns (`etl-*`, `k8s-?`): repeated flags or a YAML list of strings."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(
        isinstance(item, str) and item.strip() for item in items
    ):
        raise ValueError(f"expected a list of patterns such as etl-*, got {value!r}")
    return tuple(item.strip() for item in items)


# --- Range checks: typed value to a problem, or None when fine.


def _greater_than_zero(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _at_least(minimum: float) -> Callable[[float], str | None]:
    return lambda value: None if value >= minimum else f"must be at least {minimum:g}"


def _between(low: int, high: int) -> Callable[[int], str | None]:
    return lambda value: None if low <= value <= high else f"must be between {low} and {high}"


@dataclass(frozen=True)
class Option:
    """One setting, declared once: where it can be given, how it is read, checked and shown.

    `name` is the key of the resolved values (the Settings field, except `listen_address`,
    which becomes `listen_host` and `listen_port`). `default` is written as a user would write
    it and goes through `parse` like any value; `default_text` replaces it in the docs when the
    default is derived from other options by `derive`. `help` is Markdown (README) and loses its
    backticks in `--help`.
    """

    name: str
    help: str
    parse: Callable[[Any], Any]
    default: Any = None
    flag: str | None = None
    yaml_key: str | None = None
    env: str | None = None
    metavar: str = "VALUE"
    check: Callable[[Any], str | None] | None = None
    default_text: str | None = None
    derive: Callable[[Mapping[str, Any]], Any] | None = None
    boolean: bool = False
    repeatable: bool = False
    # Surrounding whitespace is removed with a warning: a Kubernetes secret made from a file
    # ends with a newline that would otherwise break every request.
    strip: bool = False

    def default_shown(self) -> str:
        """The default as the README shows it (Markdown)."""
        if self.default_text is not None:
            return self.default_text
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        if self.default is None or self.default == ():
            return "none"
        return f"`{self.default}`"


def _derived_poll_timeout(values: Mapping[str, Any]) -> float:
    # A poll may use its whole interval, never more. A shorter default (20 s at 30 s polls)
    # cut off every poll of a 5,000-run burst at 1,000 queues on a saturated server (18-25 s
    # each): three in a row timed out and dropped what they had read (scale bench, full point).
    return float(values["poll_interval"])


def _derived_staleness(values: Mapping[str, Any]) -> float:
    # The last snapshot is served for about three intervals of failed polls.
    return 3 * float(values["poll_interval"])


OPTIONS: tuple[Option, ...] = (
    Option(
        "api_url",
        "Prefect API URL",
        _url,
        DEFAULT_API_URL,
        flag="--prefect.api-url",
        yaml_key="prefect.api_url",
        env="PREFECT_API_URL",
        metavar="URL",
        strip=True,
    ),
    Option(
        "api_key",
        "sent as `Authorization: Bearer` (Prefect Cloud)",
        _api_key,
        yaml_key="prefect.api_key",
        env="PREFECT_API_KEY",
        strip=True,
    ),
    Option(
        "auth_string",
        "`user:password`, sent as Basic auth (self-hosted with `PREFECT_SERVER_API_AUTH_STRING`);"
        " wins over the key, as in Prefect's client",
        _auth_string,
        yaml_key="prefect.auth_string",
        env="PREFECT_API_AUTH_STRING",
        strip=True,
    ),
    Option(
        "prefect_enabled",
        "poll the API; off for a log-only sidecar",
        _boolean,
        True,
        flag="--prefect.enabled",
        yaml_key="prefect.enabled",
        boolean=True,
    ),
    Option(
        "requests_per_minute",
        "request budget: at most N requests in any 60 s window; the exporter waits rather"
        " than exceed it (on Prefect Cloud, a fifth of the plan's limit or less: README, Sizing"
        " the request budget)",
        _whole_number,
        "150",
        flag="--prefect.requests-per-minute",
        yaml_key="prefect.requests_per_minute",
        metavar="N",
        check=_at_least(1),
    ),
    Option(
        "request_timeout",
        "timeout of one request",
        parse_duration,
        "10s",
        flag="--prefect.request-timeout",
        yaml_key="prefect.request_timeout",
        metavar="DURATION",
        check=_greater_than_zero,
    ),
    Option(
        "poll_interval",
        "time between polls",
        parse_duration,
        "30s",
        flag="--poll.interval",
        yaml_key="poll.interval",
        metavar="DURATION",
        check=_greater_than_zero,
    ),
    Option(
        "poll_timeout",
        "deadline for a whole poll (at most the interval)",
        parse_duration,
        flag="--poll.timeout",
        yaml_key="poll.timeout",
        metavar="DURATION",
        check=_greater_than_zero,
        default_text="the interval",
        derive=_derived_poll_timeout,
    ),
    Option(
        "max_staleness",
        "how long the last snapshot is served while polls fail; after that Prefect series are"
        " dropped",
        parse_duration,
        flag="--poll.max-staleness",
        yaml_key="poll.max_staleness",
        metavar="DURATION",
        check=_greater_than_zero,
        default_text="3 intervals",
        derive=_derived_staleness,
    ),
    Option(
        "poll_concurrency",
        "requests in flight during a poll",
        _whole_number,
        "4",
        flag="--poll.concurrency",
        yaml_key="poll.concurrency",
        metavar="N",
        check=_between(1, 32),
    ),
    Option(
        "poll_mode",
        "how queues are read: `per-queue` (1-6 requests a queue), `run-centric` (the runs that"
        " matter listed across all queues: cost follows active runs, not queues) or `auto` (the"
        " cheaper, by measured cost)",
        _choice(*POLL_MODES),
        "auto",
        flag="--poll.mode",
        yaml_key="poll.mode",
        metavar="MODE",
    ),
    Option(
        "max_backoff",
        "longest pause after a throttling answer, whatever its `Retry-After` says",
        parse_duration,
        "10m",
        flag="--poll.max-backoff",
        yaml_key="poll.max_backoff",
        metavar="DURATION",
        check=_greater_than_zero,
    ),
    Option(
        "work_pools_include",
        "watch only work pools whose name matches one of these globs (repeatable; default all):"
        " several exporters can split one workspace, each within its own budget",
        _globs,
        (),
        flag="--work-pool.include",
        yaml_key="work_pools.include",
        metavar="GLOB",
        repeatable=True,
    ),
    Option(
        "work_pools_exclude",
        "leave out work pools whose name matches one of these globs (repeatable; wins over"
        " include)",
        _globs,
        (),
        flag="--work-pool.exclude",
        yaml_key="work_pools.exclude",
        metavar="GLOB",
        repeatable=True,
    ),
    Option(
        "heartbeat_multiple",
        "a worker is online while its last heartbeat is within this many of its intervals",
        _number,
        "3",
        flag="--workers.heartbeat-multiple",
        yaml_key="workers.heartbeat_multiple",
        metavar="X",
        check=_at_least(1),
    ),
    Option(
        "events_enabled",
        "read flow-run events for the latency histograms and transition counters",
        _boolean,
        True,
        flag="--events.enabled",
        yaml_key="events.enabled",
        boolean=True,
    ),
    Option(
        "events_stream",
        "follow Prefect's event stream (`events/out` WebSocket): transitions within seconds and"
        " no request per 50 events; pages `/events/filter` while the stream is refused or down",
        _boolean,
        True,
        flag="--events.stream",
        yaml_key="events.stream",
        boolean=True,
    ),
    Option(
        "events_max_pages",
        "pages of 50 events read per poll at most (`prefect_exporter_events_behind` says when"
        " that was not enough)",
        _whole_number,
        "10",
        flag="--events.max-pages",
        yaml_key="events.max_pages",
        metavar="N",
        check=_between(1, 1000),
    ),
    Option(
        "events_settle",
        "read events once this old: Prefect stores events in batches, later under load",
        parse_duration,
        "30s",
        flag="--events.settle",
        yaml_key="events.settle",
        metavar="DURATION",
        check=_not_negative,
    ),
    Option(
        "events_state_file",
        "keep the event cursor in this file, so a restart neither double counts nor skips events",
        _optional_path,
        flag="--events.state-file",
        yaml_key="events.state_file",
        metavar="PATH",
    ),
    Option(
        "deployments_breakdown",
        "export AwaitingConcurrencySlot runs per limited deployment",
        _boolean,
        False,
        flag="--deployments.breakdown",
        yaml_key="deployments.breakdown",
        boolean=True,
    ),
    Option(
        "deployments_include",
        "export the health of deployments whose `flow/deployment` name matches one of these"
        " globs (repeatable; default none): last success and failure, next run, schedule,"
        " finished runs",
        _globs,
        (),
        flag="--deployments.include",
        yaml_key="deployments.include",
        metavar="GLOB",
        repeatable=True,
    ),
    Option(
        "deployments_exclude",
        "leave out deployments whose `flow/deployment` name matches one of these globs"
        " (repeatable; wins over include)",
        _globs,
        (),
        flag="--deployments.exclude",
        yaml_key="deployments.exclude",
        metavar="GLOB",
        repeatable=True,
    ),
    Option(
        "deployments_max",
        "export at most this many deployments (the first by name, at most 200: one page of the"
        " API serves every deployment's runs); `prefect_exporter_deployments_capped` counts the"
        " others",
        _whole_number,
        "100",
        flag="--deployments.max",
        yaml_key="deployments.max",
        metavar="N",
        check=_between(1, 200),
    ),
    Option(
        "worker_logs",
        "sidecar mode: `[WORKER=]PATH` of a worker log to follow (repeatable; in YAML a list of"
        " such strings or of `{path, worker}`)",
        _worker_logs,
        (),
        flag="--worker-log",
        yaml_key="worker_logs.files",
        metavar="[WORKER=]PATH",
        repeatable=True,
    ),
    Option(
        "worker_log_state_file",
        "keep each log's read position across restarts",
        _optional_path,
        flag="--worker-log.state-file",
        yaml_key="worker_logs.state_file",
        metavar="PATH",
    ),
    Option(
        "listen_address",
        "`[host]:port` to serve on (`[::]:9716` for IPv6)",
        _listen_address,
        DEFAULT_LISTEN_ADDRESS,
        flag="--web.listen-address",
        yaml_key="web.listen_address",
        metavar="[HOST]:PORT",
    ),
    Option(
        "telemetry_path",
        "metrics path",
        _telemetry_path,
        "/metrics",
        flag="--web.telemetry-path",
        yaml_key="web.telemetry_path",
        metavar="PATH",
    ),
    Option(
        "web_config_file",
        "TLS, basic auth and response headers of the HTTP server, in exporter-toolkit's web"
        " config format (README: Securing /metrics); re-read when it or a"
        " certificate changes",
        _optional_path,
        flag="--web.config.file",
        yaml_key="web.config_file",
        metavar="PATH",
    ),
    Option(
        "log_level",
        "log level: `debug`, `info`, `warning` or `error`",
        _choice(*LOG_LEVELS),
        "info",
        flag="--log.level",
        yaml_key="log.level",
        metavar="LEVEL",
    ),
    Option(
        "log_format",
        "log format: `json`, `console`, or `auto` (console on a terminal, JSON otherwise)",
        _choice(*LOG_FORMATS),
        "auto",
        flag="--log.format",
        yaml_key="log.format",
        metavar="FORMAT",
    ),
    Option(
        "config_file",
        "the YAML file",
        _optional_path,
        flag="--config.file",
        metavar="PATH",
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


def _option_default(name: str) -> Any:
    option = _BY_NAME[name]
    return option.parse(option.default)


def _resolved_defaults() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        values[option.name] = (
            option.derive(values) if option.derive is not None else _option_default(option.name)
        )
    return values


_DEFAULTS = _resolved_defaults()


@dataclass(frozen=True)
class Settings:
    """Everything the exporter needs to run; built only by `load_settings`.

    Durations are seconds. Defaults come from `OPTIONS`.
    """

    api_url: str = _DEFAULTS["api_url"]
    api_url_from_default: bool = True
    api_key: Secret | None = None
    auth_string: Secret | None = None
    listen_host: str = _DEFAULTS["listen_address"][0]
    listen_port: int = _DEFAULTS["listen_address"][1]
    telemetry_path: str = _DEFAULTS["telemetry_path"]
    web_config_file: str | None = None
    poll_interval: float = _DEFAULTS["poll_interval"]
    poll_timeout: float = _DEFAULTS["poll_timeout"]
    max_staleness: float = _DEFAULTS["max_staleness"]
    request_timeout: float = _DEFAULTS["request_timeout"]
    requests_per_minute: int = _DEFAULTS["requests_per_minute"]
    poll_concurrency: int = _DEFAULTS["poll_concurrency"]
    poll_mode: str = _DEFAULTS["poll_mode"]
    work_pools_include: tuple[str, ...] = ()
    work_pools_exclude: tuple[str, ...] = ()
    max_backoff: float = _DEFAULTS["max_backoff"]
    heartbeat_multiple: float = _DEFAULTS["heartbeat_multiple"]
    log_level: str = _DEFAULTS["log_level"]
    log_format: str = _DEFAULTS["log_format"]
    config_file: str | None = None
    events_enabled: bool = _DEFAULTS["events_enabled"]
    events_stream: bool = _DEFAULTS["events_stream"]
    events_max_pages: int = _DEFAULTS["events_max_pages"]
    events_settle: float = _DEFAULTS["events_settle"]
    events_state_file: str | None = None
    deployments_breakdown: bool = _DEFAULTS["deployments_breakdown"]
    deployments_include: tuple[str, ...] = ()
    deployments_exclude: tuple[str, ...] = ()
    deployments_max: int = _DEFAULTS["deployments_max"]
    prefect_enabled: bool = _DEFAULTS["prefect_enabled"]
    worker_logs: tuple[tuple[str, str], ...] = ()  # (worker name, path)
    worker_log_state_file: str | None = None


class LoadedSettings(NamedTuple):
    """Valid settings and the warnings met while reading them (secrets never included)."""

    settings: Settings
    warnings: list[str]


class _Given(NamedTuple):
    value: object
    where: str  # what the user wrote, for messages: "--poll.interval", "PREFECT_API_KEY", ...


# --- The command line, derived from OPTIONS.


class _FlagError(Exception):
    """argparse found a problem; raised instead of exiting so every problem can be listed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _FlagError(message)


def _plain(markdown: str) -> str:
    return markdown.replace("`", "")


def _flag_help(option: Option) -> str:
    default = _plain(option.default_shown())
    if option.env:
        default = f"${option.env}, else {default}"
    return f"{_plain(option.help)} (default: {default})"


def _environment_help() -> str:
    width = max(len(option.env) for option in OPTIONS if option.env)
    lines = ["environment variables (a flag wins over its variable):"]
    for option in OPTIONS:
        if option.env:
            lines += textwrap.wrap(
                _plain(option.help),
                width=90,
                initial_indent=f"  {option.env:<{width}}  ",
                subsequent_indent=" " * (width + 4),
            )
    lines += [
        "",
        "Durations take ms, s, m, h suffixes or plain seconds. Flags win over the environment,",
        "which wins over the YAML file (--config.file).",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The Prometheus-style command line; every value defaults to None so sources can layer.

    `parse_args` raises an internal error instead of exiting on a bad flag; use
    `load_settings`, which lists every problem.
    """
    parser = _Parser(
        prog=PROG,
        usage=f"{PROG} [flags]",
        description="Prometheus exporter for Prefect work pools, queues, workers and runs.\n\n"
        "Subcommand: prefect-exporter diagnose [--work-pool GLOB] [--json] reads the workspace\n"
        "once and names why runs are not starting (see prefect-exporter diagnose --help).",
        epilog=_environment_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    for option in OPTIONS:
        if option.flag is None:
            continue
        if option.boolean:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_flag_help(option),
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.name,
                action="append" if option.repeatable else "store",
                metavar=option.metavar,
                help=_flag_help(option),
            )
    return parser


def _flag_spellings() -> dict[str, Option]:
    spellings = {}
    for option in OPTIONS:
        if option.flag is not None:
            spellings[option.flag] = option
            if option.boolean:
                spellings["--no-" + option.flag[2:]] = option
    return spellings


def _suggestion(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _normalize_flags(argv: Sequence[str], problems: list[str]) -> list[str]:
    """Rewrite `--flag value` as `--flag=value` and take out what argparse would stop at.

    argparse exits at the first unknown flag or missing value and takes a value starting with
    '-' for a flag; here each of those becomes a listed problem and parsing goes on.
    """
    spellings = _flag_spellings()
    special = {"-h", "--help", "--version"}
    known = [*spellings, *special]
    tokens: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        index += 1
        name, equals, value = token.partition("=")
        option = spellings.get(name)
        if token in special:
            tokens.append(token)
        elif option is not None and option.boolean:
            if not equals:
                tokens.append(token)
                continue
            try:
                on = _boolean(value) != name.startswith("--no-")
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                continue
            tokens.append(str(option.flag) if on else "--no-" + str(option.flag)[2:])
        elif option is not None:
            if equals:
                tokens.append(token)
            elif index < len(argv) and argv[index] not in known:
                tokens.append(f"{name}={argv[index]}")
                index += 1
            else:
                problems.append(f"{name}: expects a value ({option.metavar})")
        elif token.startswith("-") and token != "-":
            problems.append(f"{name}: unknown flag{_suggestion(name, known)}")
            # `--poll.intervall 5s`: the next word is the mistyped flag's value, not an argument.
            if not equals and index < len(argv) and not argv[index].startswith("-"):
                index += 1
        else:
            problems.append(f"unexpected argument {token!r}; flags start with --")
    return tokens


def _read_flags(argv: Sequence[str], problems: list[str]) -> dict[str, _Given]:
    tokens = _normalize_flags(argv, problems)
    try:
        parsed = vars(build_parser().parse_args(tokens))
    except _FlagError as exc:  # not expected after normalizing; listed rather than raised
        problems.append(str(exc))
        return {}
    given = {}
    for name, value in parsed.items():
        option = _BY_NAME.get(name)
        if value is None or option is None or option.flag is None:
            continue
        flag = option.flag if value is not False else "--no-" + option.flag[2:]
        given[name] = _Given(value, flag)
    return given


# --- The YAML file, derived from OPTIONS.


def _yaml_sections() -> dict[str, dict[str, Option]]:
    sections: dict[str, dict[str, Option]] = {}
    for option in OPTIONS:
        if option.yaml_key is not None:
            section, _, key = option.yaml_key.partition(".")
            sections.setdefault(section, {})[key] = option
    return sections


def _read_yaml(path: str, problems: list[str]) -> dict[str, _Given]:
    where = f"config file {path}"
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_FILE_BYTES + 1)
    except OSError as exc:
        problems.append(f"{where}: cannot be read ({exc.strerror or exc})")
        return {}
    if len(data) > MAX_CONFIG_FILE_BYTES:
        problems.append(f"{where}: larger than {MAX_CONFIG_FILE_BYTES // 1024} KiB; not a config")
        return {}
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_number = data[: exc.start].count(b"\n") + 1
        problems.append(
            f"{where}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line_number});"
            " save it as UTF-8"
        )
        return {}
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problems.append(f"{where}: not valid YAML{line}")
        return {}
    except (ValueError, RecursionError) as exc:
        # PyYAML raises these for impossible dates and for very deep nesting.
        problems.append(f"{where}: not valid YAML ({type(exc).__name__})")
        return {}
    if document is None:
        return {}
    if not isinstance(document, dict):
        problems.append(f"{where}: the top level must be a mapping")
        return {}
    sections = _yaml_sections()
    given: dict[str, _Given] = {}
    for section, values in document.items():
        known = sections.get(str(section))
        if known is None:
            hint = _suggestion(str(section), list(sections))
            problems.append(f"{where}: unknown section {str(section)!r}{hint}")
            continue
        if not isinstance(values, dict):
            problems.append(f"{section} in {where}: must be a mapping")
            continue
        for key, value in values.items():
            option = known.get(str(key))
            if option is None:
                hint = _suggestion(f"{section}.{key}", [f"{section}.{k}" for k in known])
                problems.append(f"{section}.{key} in {where}: unknown key{hint}")
            else:
                given[option.name] = _Given(value, f"{option.yaml_key} in {where}")
    return given


# --- Layering and validation.


def _read_environment(environ: Mapping[str, str]) -> dict[str, _Given]:
    # An empty variable counts as unset, as in Prefect's own settings.
    return {
        option.name: _Given(environ[option.env], option.env)
        for option in OPTIONS
        if option.env and environ.get(option.env)
    }


def _stripped(option: Option, given: _Given, warnings: list[str]) -> object:
    value = given.value
    if not option.strip or not isinstance(value, str) or value == value.strip():
        return value
    newline = value.rstrip(" \t").endswith(("\n", "\r"))
    what = "a trailing newline" if newline else "surrounding whitespace"
    warnings.append(
        f"{given.where}: removed {what} from the value (a secret or file that ends with a newline?)"
    )
    stripped = value.strip()
    if not stripped:
        raise ValueError("is blank")
    return stripped


def _problem(option: Option, where: str, message: str) -> str:
    # The setting's own name ends the line so that one search finds every way to set it.
    return f"{where}: {message} (setting {option.name})"


def _shown(option: Option, values: Mapping[str, Any], given: Mapping[str, _Given]) -> str:
    """A duration in a message about two options, with where it was set: '10s from --x'."""
    source = f"from {given[option.name].where}" if option.name in given else "by default"
    return f"{values[option.name]:g}s {source}"


class _Relation(NamedTuple):
    """A rule between two options, reported on `option` (only checked when the user set it)."""

    option: str
    other: str
    broken: Callable[[Mapping[str, Any]], bool]
    message: str  # completes "WHERE: "; `{other}` is the other option's duration and source


_RELATIONS = (
    _Relation(
        "poll_timeout",
        "poll_interval",
        lambda values: values["poll_timeout"] > values["poll_interval"],
        "must not be longer than the poll interval ({other}): a poll may not outlast it",
    ),
    _Relation(
        "max_staleness",
        "poll_interval",
        lambda values: values["max_staleness"] < values["poll_interval"],
        "must be at least the poll interval ({other})",
    ),
    _Relation(
        "prefect_enabled",
        "worker_logs",
        lambda values: not values["prefect_enabled"] and not values["worker_logs"],
        "with the API off, give at least one --worker-log (worker_logs.files in YAML)",
    ),
)


def _check_relations(
    values: Mapping[str, Any], given: Mapping[str, _Given], failed: set[str]
) -> list[str]:
    problems = []
    for relation in _RELATIONS:
        if relation.option not in given or {relation.option, relation.other} & failed:
            continue
        if relation.broken(values):
            message = relation.message
            if "{other}" in message:
                message = message.format(other=_shown(_BY_NAME[relation.other], values, given))
            problems.append(
                _problem(_BY_NAME[relation.option], given[relation.option].where, message)
            )
    return problems


def read_settings(argv: Sequence[str], environ: Mapping[str, str]) -> LoadedSettings:
    """Build validated Settings from flags, environment and YAML, with warnings to log.

    `argv` excludes the program name. Raises ConfigError listing every problem; `--help` and
    `--version` print and raise SystemExit(0) as argparse does.
    """
    problems: list[str] = []
    warnings: list[str] = []
    flags = _read_flags(argv, problems)
    from_file: dict[str, _Given] = {}
    config_file = flags.get("config_file")
    if config_file is not None and config_file.value:
        from_file = _read_yaml(str(config_file.value), problems)
    given = {**from_file, **_read_environment(environ), **flags}

    values: dict[str, Any] = {}
    failed: set[str] = set()
    for option in OPTIONS:
        if option.name not in given:
            values[option.name] = (
                option.derive(values) if option.derive is not None else _DEFAULTS[option.name]
            )
            continue
        where = given[option.name].where
        try:
            value = option.parse(_stripped(option, given[option.name], warnings))
        except ValueError as exc:
            # The parsers of secrets and of the URL (which may hold credentials) never quote it.
            problems.append(_problem(option, where, str(exc)))
            failed.add(option.name)
            values[option.name] = _DEFAULTS[option.name]
            continue
        problem = option.check(value) if option.check is not None else None
        if problem is not None:
            problems.append(_problem(option, where, problem))
            failed.add(option.name)
        values[option.name] = value
    problems.extend(_check_relations(values, given, failed))
    if problems:
        raise ConfigError(
            problems, log_format=None if "log_format" in failed else values["log_format"]
        )

    host, port = values.pop("listen_address")
    settings = Settings(
        **values,
        listen_host=host,
        listen_port=port,
        api_url_from_default="api_url" not in given,
    )
    return LoadedSettings(settings, warnings)


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build validated Settings from flags, environment and YAML, or raise ConfigError.

    Like `read_settings`, without the warnings.
    """
    return read_settings(argv, environ).settings


def documentation_rows() -> list[tuple[str, str, str, str, str]]:
    """The README's configuration table: (flag, YAML key, environment, default, meaning) cells.

    Markdown, one row per option; an option without a flag, key or variable has an empty cell.
    """
    rows = []
    for option in OPTIONS:
        flag = option.flag or ""
        if option.boolean and option.flag:
            flag = f"--[no-]{option.flag[2:]}"
        rows.append(
            (
                f"`{flag}`" if flag else "",
                f"`{option.yaml_key}`" if option.yaml_key else "",
                f"`{option.env}`" if option.env else "",
                option.default_shown(),
                option.help,
            )
        )
    return rows
