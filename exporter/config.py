"""Settings: one frozen object built from flags, an optional YAML file and Prefect's environment.

Precedence, highest first: command-line flags, environment variables, the YAML file, defaults.
Validation collects every problem before failing, so a user fixes a config in one round.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

DEFAULT_API_URL = "http://127.0.0.1:4200/api"
DEFAULT_LISTEN_ADDRESS = ":9716"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(Exception):
    """The configuration is invalid; `problems` lists every reason, one sentence each."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


class Secret:
    """A credential that never shows itself in repr, str, logs or error messages."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Settings:
    """Everything the exporter needs to run; built only by `load_settings`."""

    api_url: str = DEFAULT_API_URL
    api_url_from_default: bool = True
    api_key: Secret | None = None
    auth_string: Secret | None = None
    listen_host: str = ""
    listen_port: int = 9716
    telemetry_path: str = "/metrics"
    poll_interval: float = 30.0
    poll_timeout: float = 20.0
    max_staleness: float = 90.0
    request_timeout: float = 10.0
    requests_per_minute: int = 150
    poll_concurrency: int = 4
    heartbeat_multiple: float = 3.0
    log_level: str = "info"
    log_format: str = "auto"
    config_file: str | None = None
    events_enabled: bool = True
    events_max_pages: int = 10
    events_settle: float = 30.0
    events_state_file: str | None = None
    deployments_breakdown: bool = False
    prefect_enabled: bool = True
    worker_logs: tuple[tuple[str, str], ...] = ()  # (worker name, path)
    worker_log_state_file: str | None = None


# Each YAML key and environment variable maps onto one Settings field.
_YAML_FIELDS: dict[str, dict[str, str]] = {
    "prefect": {
        "api_url": "api_url",
        "api_key": "api_key",
        "auth_string": "auth_string",
        "request_timeout": "request_timeout",
        "requests_per_minute": "requests_per_minute",
        "enabled": "prefect_enabled",
    },
    "poll": {
        "interval": "poll_interval",
        "timeout": "poll_timeout",
        "max_staleness": "max_staleness",
        "concurrency": "poll_concurrency",
    },
    "workers": {"heartbeat_multiple": "heartbeat_multiple"},
    "events": {
        "enabled": "events_enabled",
        "max_pages": "events_max_pages",
        "settle": "events_settle",
        "state_file": "events_state_file",
    },
    "deployments": {"breakdown": "deployments_breakdown"},
    "worker_logs": {"files": "worker_logs", "state_file": "worker_log_state_file"},
    "web": {"listen_address": "listen_address", "telemetry_path": "telemetry_path"},
    "log": {"level": "log_level", "format": "log_format"},
}

_ENV_FIELDS = {
    "PREFECT_API_URL": "api_url",
    "PREFECT_API_KEY": "api_key",
    "PREFECT_API_AUTH_STRING": "auth_string",
}

_DURATION_FIELDS = (
    "poll_interval",
    "poll_timeout",
    "max_staleness",
    "request_timeout",
    "events_settle",
)
_INT_FIELDS = ("requests_per_minute", "poll_concurrency", "events_max_pages")
_BOOL_FIELDS = ("events_enabled", "deployments_breakdown", "prefect_enabled")
_SECRET_FIELDS = ("api_key", "auth_string")


def build_parser() -> argparse.ArgumentParser:
    """The Prometheus-style command line; every value defaults to None so sources can layer."""
    parser = argparse.ArgumentParser(
        prog="prefect-exporter",
        description="Prometheus exporter for Prefect work pools, queues, workers and runs.",
    )
    add = parser.add_argument
    add("--config.file", dest="config_file", metavar="PATH", help="YAML configuration file")
    add(
        "--web.listen-address",
        dest="listen_address",
        metavar="[HOST]:PORT",
        help=f"address to serve metrics on (default {DEFAULT_LISTEN_ADDRESS})",
    )
    add(
        "--web.telemetry-path",
        dest="telemetry_path",
        metavar="PATH",
        help="path under which to expose metrics (default /metrics)",
    )
    add(
        "--prefect.api-url",
        dest="api_url",
        metavar="URL",
        help="Prefect API URL (default: $PREFECT_API_URL, else " + DEFAULT_API_URL + ")",
    )
    add(
        "--prefect.requests-per-minute",
        dest="requests_per_minute",
        metavar="N",
        help="request budget towards the Prefect API (default 150)",
    )
    add(
        "--prefect.request-timeout",
        dest="request_timeout",
        metavar="DURATION",
        help="timeout of one API request (default 10s)",
    )
    add(
        "--poll.interval",
        dest="poll_interval",
        metavar="DURATION",
        help="time between polls of the Prefect API (default 30s)",
    )
    add(
        "--poll.timeout",
        dest="poll_timeout",
        metavar="DURATION",
        help="deadline for one whole poll (default 20s, at most the interval)",
    )
    add(
        "--poll.max-staleness",
        dest="max_staleness",
        metavar="DURATION",
        help="how long the last snapshot is served after polls fail (default 3 intervals)",
    )
    add(
        "--poll.concurrency",
        dest="poll_concurrency",
        metavar="N",
        help="API requests in flight at once during a poll (default 4)",
    )
    add(
        "--workers.heartbeat-multiple",
        dest="heartbeat_multiple",
        metavar="X",
        help="a worker is online while its last heartbeat is within X intervals (default 3)",
    )
    add(
        "--events.enabled",
        dest="events_enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read flow-run events for latency histograms and transition counts (default on)",
    )
    add(
        "--events.max-pages",
        dest="events_max_pages",
        metavar="N",
        help="pages of 50 events read per poll at most (default 10)",
    )
    add(
        "--events.settle",
        dest="events_settle",
        metavar="DURATION",
        help="read events once this old: Prefect stores them in batches (default 30s)",
    )
    add(
        "--events.state-file",
        dest="events_state_file",
        metavar="PATH",
        help="file keeping the event cursor across restarts (default: start from now)",
    )
    add(
        "--deployments.breakdown",
        dest="deployments_breakdown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="export AwaitingConcurrencySlot runs per limited deployment (default off)",
    )
    add(
        "--worker-log",
        dest="worker_logs",
        action="append",
        metavar="[WORKER=]PATH",
        help="sidecar mode: follow this worker log (repeatable); WORKER names it in metrics "
        "(default: the file name without extension)",
    )
    add(
        "--worker-log.state-file",
        dest="worker_log_state_file",
        metavar="PATH",
        help="file keeping each worker log's read position across restarts",
    )
    add(
        "--prefect.enabled",
        dest="prefect_enabled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="poll the Prefect API (default on); --no-prefect.enabled for a log-only sidecar",
    )
    add("--log.level", dest="log_level", choices=LOG_LEVELS, help="log level (default info)")
    add(
        "--log.format",
        dest="log_format",
        choices=LOG_FORMATS,
        help="log format: json, console, or auto (console on a terminal; default auto)",
    )
    return parser


def parse_duration(value: object) -> float:
    """Seconds from a number or a Prometheus-style duration such as '30s', '5m', '250ms'."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s or 5m")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration such as 30s or 5m, got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def parse_listen_address(value: str) -> tuple[str, int]:
    """Split '[host]:port' (IPv6 hosts in brackets) into host and port."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected [HOST]:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _read_yaml(path: str, problems: list[str]) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        problems.append(f"config file {path}: cannot be read ({exc.strerror or exc})")
        return {}
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problems.append(f"config file {path}: not valid YAML{where}")
        return {}
    if document is None:
        return {}
    if not isinstance(document, dict):
        problems.append(f"config file {path}: the top level must be a mapping")
        return {}
    raw: dict[str, Any] = {}
    for section, values in document.items():
        fields = _YAML_FIELDS.get(str(section))
        if fields is None:
            problems.append(f"config file {path}: unknown section {section!r}")
            continue
        if not isinstance(values, dict):
            problems.append(f"config file {path}: section {section!r} must be a mapping")
            continue
        for key, value in values.items():
            field = fields.get(str(key))
            if field is None:
                problems.append(f"config file {path}: unknown key {section}.{key}")
            else:
                raw[field] = value
    return raw


def load_settings(argv: Sequence[str], environ: Mapping[str, str]) -> Settings:
    """Build validated Settings from flags, environment and YAML, or raise ConfigError."""
    args = vars(build_parser().parse_args(list(argv)))
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if args.get("config_file"):
        raw.update(_read_yaml(args["config_file"], problems))
    for name, field in _ENV_FIELDS.items():
        if environ.get(name):
            raw[field] = environ[name]
    raw.update({k: v for k, v in args.items() if v is not None})
    settings = _validate(raw, problems)
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    return settings


def _validate(raw: dict[str, Any], problems: list[str]) -> Settings | None:
    values: dict[str, Any] = {"config_file": raw.get("config_file")}
    for field in _DURATION_FIELDS:
        if field in raw:
            try:
                values[field] = parse_duration(raw[field])
            except ValueError as exc:
                problems.append(f"{field}: {exc}")
    for field in _INT_FIELDS:
        if field in raw:
            try:
                values[field] = int(str(raw[field]))
            except ValueError:
                problems.append(f"{field}: expected a whole number, got {raw[field]!r}")
    if "heartbeat_multiple" in raw:
        try:
            values["heartbeat_multiple"] = float(raw["heartbeat_multiple"])
        except (TypeError, ValueError):
            problems.append(
                f"heartbeat_multiple: expected a number, got {raw['heartbeat_multiple']!r}"
            )
    for field in _BOOL_FIELDS:
        if field in raw:
            value = raw[field]
            if isinstance(value, bool):
                values[field] = value
            elif str(value).lower() in ("true", "false"):
                values[field] = str(value).lower() == "true"
            else:
                problems.append(f"{field}: expected true or false, got {value!r}")
    for field in ("events_state_file", "worker_log_state_file"):
        if raw.get(field):
            values[field] = str(raw[field])
    if "worker_logs" in raw:
        values["worker_logs"] = _worker_logs(raw["worker_logs"], problems)
    for field in _SECRET_FIELDS:
        if raw.get(field):
            values[field] = Secret(str(raw[field]))
    for field in ("log_level", "log_format", "telemetry_path"):
        if field in raw:
            values[field] = (
                str(raw[field]).lower() if field != "telemetry_path" else str(raw[field])
            )
    if "api_url" in raw:
        values["api_url"] = str(raw["api_url"]).rstrip("/")
        values["api_url_from_default"] = False
    try:
        host, port = parse_listen_address(str(raw.get("listen_address", DEFAULT_LISTEN_ADDRESS)))
        values["listen_host"], values["listen_port"] = host, port
    except ValueError as exc:
        problems.append(f"listen_address: {exc}")

    # Unset timeout and staleness follow the interval: a poll may not outlast its interval, and
    # the last snapshot is served for about three intervals of failed polls.
    interval = values.get("poll_interval", Settings.poll_interval)
    values.setdefault("poll_timeout", min(Settings.poll_timeout, interval))
    values.setdefault("max_staleness", 3 * interval)
    settings = Settings(**values)
    problems.extend(_check_ranges(settings))
    return settings


def _worker_logs(raw: object, problems: list[str]) -> tuple[tuple[str, str], ...]:
    """`[WORKER=]PATH` strings (flags) or `{path, worker}` mappings (YAML)."""
    if not isinstance(raw, list):
        problems.append("worker_logs.files: expected a list")
        return ()
    logs = []
    for item in raw:
        if isinstance(item, dict):
            path, worker = item.get("path"), item.get("worker")
        elif isinstance(item, str):
            worker, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        else:
            path = worker = None
        if not path or not isinstance(path, str):
            problems.append(
                f"worker_logs: expected [WORKER=]PATH or {{path, worker}}, got {item!r}"
            )
            continue
        logs.append((str(worker) if worker else Path(path).stem, path))
    names = [worker for worker, _ in logs]
    if len(set(names)) != len(names):
        problems.append("worker_logs: two logs have the same worker name; name them WORKER=PATH")
    return tuple(logs)


def _check_ranges(s: Settings) -> list[str]:
    problems = []
    url = urlsplit(s.api_url)
    if url.scheme not in ("http", "https") or not url.netloc:
        # The URL may carry credentials; name the problem, not the value.
        problems.append("api_url: expected an http:// or https:// URL such as " + DEFAULT_API_URL)
    elif url.username or url.password:
        problems.append("api_url: must not contain credentials; use PREFECT_API_AUTH_STRING")
    if s.poll_interval <= 0:
        problems.append("poll_interval: must be greater than 0")
    if s.poll_timeout <= 0:
        problems.append("poll_timeout: must be greater than 0")
    elif s.poll_timeout > s.poll_interval:
        problems.append("poll_timeout: must not be longer than poll_interval")
    if s.max_staleness < s.poll_interval:
        problems.append("max_staleness: must be at least poll_interval")
    if s.request_timeout <= 0:
        problems.append("request_timeout: must be greater than 0")
    if s.requests_per_minute < 1:
        problems.append("requests_per_minute: must be at least 1")
    if not 1 <= s.poll_concurrency <= 32:
        problems.append("poll_concurrency: must be between 1 and 32")
    if not s.prefect_enabled and not s.worker_logs:
        problems.append("prefect_enabled: with the API off, give at least one --worker-log")
    if not 1 <= s.events_max_pages <= 1000:
        problems.append("events_max_pages: must be between 1 and 1000")
    if s.events_settle < 0:
        problems.append("events_settle: must not be negative")
    if s.heartbeat_multiple < 1:
        problems.append("heartbeat_multiple: must be at least 1")
    if s.log_level not in LOG_LEVELS:
        problems.append(f"log_level: must be one of {', '.join(LOG_LEVELS)}")
    if s.log_format not in LOG_FORMATS:
        problems.append(f"log_format: must be one of {', '.join(LOG_FORMATS)}")
    if not s.telemetry_path.startswith("/") or s.telemetry_path in ("/", "/healthz"):
        problems.append("telemetry_path: must start with / and not be / or /healthz")
    return problems
