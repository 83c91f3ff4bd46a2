"""The web config file (`--web.config.file`): TLS, basic auth and headers for the HTTP server.

The format is the Prometheus exporter-toolkit's (the file node_exporter and Prometheus read), so
a user's existing file works here as long as it keeps to what Python's `ssl` can do:

    tls_server_config:          cert_file, key_file, client_ca_file, client_auth_type,
                                min_version, max_version, prefer_server_cipher_suites
    http_server_config:         headers (exporter-toolkit's five), http2 (accepted, no effect)
    basic_auth_users:           user: bcrypt hash

Keys of that format this server cannot honour (`cipher_suites`, `curve_preferences`,
`client_allowed_sans`, inline `cert`/`key`/`client_ca`, `rate_limit`, the two client-auth modes
that accept unverified certificates) are refused with the reason: ignoring a security setting
would weaken what the user believes is enforced.

Layers, each testable alone: `parse_web_config` (a YAML document to a frozen `WebConfig`, pure,
every problem listed), `load_web_config` (reads the file and builds the `ssl.SSLContext` and the
`BasicAuth`, so unreadable or mismatched certificates are problems too), `WebConfigLoader` (the
last good configuration, re-read when one of its files changes) and `WebConfigCollector` (its
reload metrics).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import re
import secrets
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import bcrypt
import structlog
import yaml
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from structlog.typing import FilteringBoundLogger

# A web config is a few hundred bytes, a certificate chain a few KiB: a wrong path (a log file,
# /dev/zero) must not exhaust memory.
MAX_FILE_BYTES = 1024 * 1024

# Seconds between two looks at the files (status and SHA-256 of the contents). Looks happen only
# when a connection or request arrives, so an idle exporter does no I/O. A change is applied at
# the second look that finds the files the same (one to two seconds after it was written), so a
# file caught half written is never loaded.
CHECK_INTERVAL = 1.0

# bcrypt checks waiting for or running on the server's bcrypt thread, at most. A check at cost 10
# takes about 70 ms, so a request waits at most about half a second for its own; requests over
# the cap are answered 429 at once instead of queueing behind a client guessing passwords.
MAX_PENDING_AUTH_CHECKS = 6

# bcrypt costs above this are accepted with a warning: one check at cost 15 takes seconds, during
# which no other unremembered credentials can be checked.
HIGH_BCRYPT_COST = 14

# Successful credential checks remembered, least recently used dropped first. A check costs a
# bcrypt hash (about 70 ms at cost 10); Prometheus sends the same credentials every scrape, so
# after the first scrape a check costs a SHA-256. Failures are not remembered: a client guessing
# passwords could otherwise push the legitimate entries out.
AUTH_CACHE_SIZE = 100

# Client-certificate policies, named as in Go's crypto/tls like exporter-toolkit does.
CLIENT_AUTH_TYPES: Mapping[str, ssl.VerifyMode] = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Go can accept a client certificate without verifying it; OpenSSL through Python's `ssl` verifies
# every certificate it asks for, so these modes cannot be offered as documented.
_UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert", "RequireClientCert")

TLS_VERSIONS: Mapping[str, ssl.TLSVersion] = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_OBSOLETE_TLS_VERSIONS = ("TLS10", "TLS11")

# exporter-toolkit's list: the only response headers a web config may set, with the values an
# enumerated one accepts (an empty tuple: any value). Anything else could break the exporter's
# own headers (Content-Type, Content-Length, Connection, WWW-Authenticate).
HEADER_RULES: Mapping[str, tuple[str, ...]] = {
    "Strict-Transport-Security": (),
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": (),
    "Content-Security-Policy": (),
}

# `$2b$10$` + 22 characters of salt + 31 of hash, as htpasswd -B and bcrypt.hashpw make them
# (used with re.fullmatch: no trailing newline). The last character of each holds only 2 and 4
# bits of data, the rest zero; bcrypt refuses another salt ending and a hash with another
# checksum ending can never match. `$2$` (no letter) is refused by bcrypt too.
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2x$", "$2y$")
_BCRYPT_HASH = re.compile(
    r"\$2[abxy]\$([0-9]{2})\$[./A-Za-z0-9]{21}[.Oeu][./A-Za-z0-9]{30}[.CGKOSWaeimquy26]"
)
_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

_TOP_KEYS = ("tls_server_config", "http_server_config", "basic_auth_users")
_TLS_KEYS = (
    "cert_file",
    "key_file",
    "client_ca_file",
    "client_auth_type",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
)
_HTTP_KEYS = ("headers", "http2")
# exporter-toolkit keys refused with the reason, and what to do instead.
_UNSUPPORTED = {
    "rate_limit": "is not supported; rate-limit in front of the exporter (a reverse proxy)",
    "tls_server_config.cert": "(inline certificate) is not supported; use cert_file",
    "tls_server_config.key": "(inline key) is not supported; use key_file",
    "tls_server_config.client_ca": "(inline CA) is not supported; use client_ca_file",
    "tls_server_config.cipher_suites": "is not supported: Python's ssl takes OpenSSL cipher"
    " names, not Go's, and TLS 1.3 suites are not configurable; remove it (OpenSSL's defaults"
    " exclude weak ciphers) or set min_version: TLS13",
    "tls_server_config.curve_preferences": "is not supported by Python's ssl; remove it",
    "tls_server_config.client_allowed_sans": "is not supported; it would not be enforced, so"
    " refuse unwanted clients with their CA (client_ca_file) instead",
}


class WebConfigError(Exception):
    """The web config cannot be used; `problems` lists every reason, one sentence each.

    Each problem starts with the key it is about (`tls_server_config.min_version: ...`) and never
    quotes a password hash.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class TlsSettings:
    """`tls_server_config`: file paths are absolute (relative ones are taken from the web config
    file's directory, as exporter-toolkit does); versions are `ssl.TLSVersion` members.
    """

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    client_auth_type: str = "NoClientCert"
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    prefer_server_cipher_suites: bool = True

    @property
    def files(self) -> tuple[Path, ...]:
        """The files the TLS context is built from."""
        return (
            self.cert_file,
            self.key_file,
            *(() if self.client_ca_file is None else (self.client_ca_file,)),
        )


@dataclass(frozen=True)
class WebConfig:
    """One web config file, parsed: TLS (None for plain HTTP), users and extra headers.

    `users` maps a user name to its bcrypt hash (bytes); it is left out of `repr`. An empty
    `users` means no authentication. `headers` are (canonical name, value) pairs. `warnings`
    are settings that work but cost (a bcrypt cost above 14), one sentence each, to be logged.
    """

    tls: TlsSettings | None = None
    users: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        """Files the configuration reads besides itself (certificates, key, client CA)."""
        return () if self.tls is None else self.tls.files


def _suggestion(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _mapping(value: object, where: str, problems: list[str]) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f"{where}: must be a mapping")
        return {}
    return value


def _known_keys(
    section: Mapping[Any, Any], where: str, known: Sequence[str], problems: list[str]
) -> None:
    for key in section:
        name = f"{where}.{key}" if where else str(key)
        if name in _UNSUPPORTED:
            if section[key] not in (None, [], ""):
                problems.append(f"{name}: {_UNSUPPORTED[name]}")
        elif str(key) not in known:
            problems.append(f"{name}: unknown key{_suggestion(str(key), known)}")


def _path(value: object, where: str, base_dir: Path, problems: list[str]) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        problems.append(f"{where}: expected a file name, got {value!r}")
        return None
    return base_dir / Path(value).expanduser()


def _tls_version(value: object, where: str, default: str, problems: list[str]) -> ssl.TLSVersion:
    text = default if value is None else str(value)
    if text in TLS_VERSIONS:
        return TLS_VERSIONS[text]
    if text in _OBSOLETE_TLS_VERSIONS:
        problems.append(
            f"{where}: {text} is not supported (TLS 1.0 and 1.1 are deprecated by RFC"
            " 8996); use TLS12 or TLS13"
        )
    else:
        problems.append(f"{where}: must be TLS12 or TLS13, got {value!r}")
    return TLS_VERSIONS[default]


def _parse_tls(section: Mapping[Any, Any], base_dir: Path, problems: list[str]) -> TlsSettings:
    where = "tls_server_config"
    _known_keys(section, where, _TLS_KEYS, problems)
    cert = _path(section.get("cert_file"), f"{where}.cert_file", base_dir, problems)
    key = _path(section.get("key_file"), f"{where}.key_file", base_dir, problems)
    if cert is None:
        problems.append(f"{where}.cert_file: missing; TLS needs a certificate and its key")
    if key is None:
        problems.append(f"{where}.key_file: missing; TLS needs a certificate and its key")
    ca = _path(section.get("client_ca_file"), f"{where}.client_ca_file", base_dir, problems)
    auth = section.get("client_auth_type")
    auth_type = "NoClientCert" if auth is None or auth == "" else str(auth)
    if auth_type in _UNVERIFIED_CLIENT_AUTH:
        problems.append(
            f"{where}.client_auth_type: {auth_type} is not supported: it accepts client"
            " certificates without verifying them, which Python's ssl cannot do (exporter-toolkit"
            " calls it insecure); use RequireAndVerifyClientCert or VerifyClientCertIfGiven"
            " with client_ca_file"
        )
    elif auth_type not in CLIENT_AUTH_TYPES:
        problems.append(
            f"{where}.client_auth_type: must be one of {', '.join(CLIENT_AUTH_TYPES)},"
            f" got {auth!r}{_suggestion(auth_type, list(CLIENT_AUTH_TYPES))}"
        )
    elif CLIENT_AUTH_TYPES[auth_type] != ssl.CERT_NONE and ca is None:
        problems.append(
            f"{where}.client_auth_type: {auth_type} needs client_ca_file, the CA that signs"
            " the clients' certificates"
        )
    elif auth_type == "NoClientCert" and ca is not None:
        problems.append(
            f"{where}.client_ca_file: set without a client_auth_type that checks client"
            " certificates (RequireAndVerifyClientCert or VerifyClientCertIfGiven)"
        )
    low = _tls_version(section.get("min_version"), f"{where}.min_version", "TLS12", problems)
    high = _tls_version(section.get("max_version"), f"{where}.max_version", "TLS13", problems)
    if low > high:
        problems.append(f"{where}.min_version: must not be above max_version")
    prefer = section.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        problems.append(f"{where}.prefer_server_cipher_suites: expected true or false")
        prefer = True
    return TlsSettings(
        cert_file=cert or Path(),
        key_file=key or Path(),
        client_ca_file=ca,
        client_auth_type=auth_type,
        min_version=low,
        max_version=high,
        prefer_server_cipher_suites=prefer,
    )


def _parse_headers(value: object, problems: list[str]) -> tuple[tuple[str, str], ...]:
    where = "http_server_config.headers"
    canonical = {name.lower(): name for name in HEADER_RULES}
    headers = []
    for key, text in _mapping(value, where, problems).items():
        name = canonical.get(str(key).lower())
        if name is None:
            problems.append(
                f"{where}.{key}: this header cannot be set; allowed are"
                f" {', '.join(HEADER_RULES)} (exporter-toolkit's list)"
            )
            continue
        if text is None or text == "":
            continue  # blank means unset, as in exporter-toolkit
        if not isinstance(text, str) or any(c in text for c in "\r\n\0"):
            problems.append(f"{where}.{key}: expected a one-line string")
            continue
        allowed = HEADER_RULES[name]
        if allowed and text.lower() not in allowed:
            problems.append(f"{where}.{key}: must be one of {', '.join(allowed)}, got {text!r}")
            continue
        headers.append((name, text))
    return tuple(headers)


def _parse_users(value: object, problems: list[str], warnings: list[str]) -> dict[str, bytes]:
    where = "basic_auth_users"
    users = {}
    for user, hashed in _mapping(value, where, problems).items():
        name = str(user)
        if not isinstance(user, str | int) or isinstance(user, bool) or not name:
            problems.append(f"{where}: user names must be non-empty strings, got {user!r}")
            continue
        if ":" in name:
            problems.append(
                f"{where}.{name}: a user name cannot contain ':' (basic auth splits"
                " at the first one)"
            )
            continue
        # The hash is never quoted: it can be attacked offline.
        match = _BCRYPT_HASH.fullmatch(hashed) if isinstance(hashed, str) else None
        if match is None:
            problems.append(
                f"{where}.{name}: not a bcrypt hash ({', '.join(_BCRYPT_PREFIXES)} followed by"
                " the cost, $ and 53 characters, nothing after them); make one with"
                " htpasswd -nBC 10 or bcrypt.hashpw"
            )
        elif not 4 <= (cost := int(match.group(1))) <= 31:
            problems.append(f"{where}.{name}: bcrypt cost must be between 4 and 31")
        else:
            if cost > HIGH_BCRYPT_COST:
                warnings.append(
                    f"{where}.{name}: bcrypt cost {cost} is above {HIGH_BCRYPT_COST}: each check"
                    f" takes about {0.07 * 2 ** (cost - 10):.0f} s, during which no other new"
                    " credentials are checked; 10 to 12 is usual"
                )
            users[name] = str(hashed).encode()
    return users


def parse_web_config(document: object, base_dir: Path) -> WebConfig:
    """The web config from its YAML document (None, an empty file, is plain HTTP without auth).

    Pure: no file is read. Relative paths are joined to `base_dir` (the file's directory).
    Raises WebConfigError listing every problem.
    """
    problems: list[str] = []
    top = _mapping(document, "the web config", problems)
    _known_keys(top, "", _TOP_KEYS, problems)
    tls = None
    if top.get("tls_server_config") is not None:
        section = _mapping(top["tls_server_config"], "tls_server_config", problems)
        if section:
            tls = _parse_tls(section, base_dir, problems)
    http = _mapping(top.get("http_server_config"), "http_server_config", problems)
    _known_keys(http, "http_server_config", _HTTP_KEYS, problems)
    if not isinstance(http.get("http2", True), bool):
        problems.append("http_server_config.http2: expected true or false")
    headers = _parse_headers(http.get("headers"), problems)
    warnings: list[str] = []
    users = _parse_users(top.get("basic_auth_users"), problems, warnings)
    if problems:
        raise WebConfigError(problems)
    # Read-only, so the frozen dataclass is frozen all the way down.
    return WebConfig(
        tls=tls, users=MappingProxyType(users), headers=headers, warnings=tuple(warnings)
    )


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as file:
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES // 1024} KiB")
    return data


def read_web_config(path: Path, *, allow_empty: bool = True) -> WebConfig:
    """Read and parse the web config file; raises WebConfigError listing every problem.

    With `allow_empty` False an empty file is a problem too (see `WebConfigLoader`).
    """
    try:
        data = _read_bounded(path)
    except OSError as exc:
        raise WebConfigError([f"cannot be read ({exc.strerror or exc})"]) from None
    except ValueError as exc:
        raise WebConfigError([f"{exc}; not a web config"]) from None
    try:
        document = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise WebConfigError(["not UTF-8 text"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise WebConfigError([f"not valid YAML{line}"]) from None
    except (ValueError, RecursionError) as exc:
        raise WebConfigError([f"not valid YAML ({type(exc).__name__})"]) from None
    if document is None and not allow_empty:
        raise WebConfigError(
            [
                "empty; refused on a reload, as it would switch authentication off (a file caught"
                " half written?). Restart the exporter to run without a web config"
            ]
        )
    return parse_web_config(document, path.resolve().parent)


def _no_password() -> bytes:
    # Called only for an encrypted key: refuse it rather than let OpenSSL prompt on a terminal.
    raise ValueError("encrypted")


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """A server-side SSLContext for `tls`, its certificate, key and client CA loaded now.

    Raises WebConfigError listing every file that cannot be read or used (missing, not PEM,
    key not matching the certificate, encrypted key, CA without certificates).
    """
    problems = []
    where = "tls_server_config"
    for key, path in (
        ("cert_file", tls.cert_file),
        ("key_file", tls.key_file),
        ("client_ca_file", tls.client_ca_file),
    ):
        if path is None:
            continue
        try:
            _read_bounded(path)
        except OSError as exc:
            problems.append(f"{where}.{key}: {path} cannot be read ({exc.strerror or exc})")
        except ValueError as exc:
            problems.append(f"{where}.{key}: {path} is {exc}; not a PEM file")
    if problems:
        raise WebConfigError(problems)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = tls.min_version
    context.maximum_version = tls.max_version
    if not tls.prefer_server_cipher_suites:
        context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file, password=_no_password)
    except ssl.SSLError as exc:
        problems.append(
            f"{where}.cert_file, key_file: not a PEM certificate and its matching, unencrypted"
            f" private key ({_ssl_reason(exc)})"
        )
    except ValueError:
        problems.append(f"{where}.key_file: the key is encrypted; give an unencrypted key")
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except ssl.SSLError as exc:
            problems.append(
                f"{where}.client_ca_file: no PEM certificate in it ({_ssl_reason(exc)})"
            )
    context.verify_mode = CLIENT_AUTH_TYPES.get(tls.client_auth_type, ssl.CERT_REQUIRED)
    if problems:
        raise WebConfigError(problems)
    return context


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic ...` value; None when absent or malformed."""
    if header is None:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        # ASCII first: b64decode raises a plain ValueError (not binascii.Error) for a str with
        # other characters, and a header is decoded as Latin-1, so any byte can be in it.
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True).decode("utf-8")
    except ValueError:  # binascii.Error, UnicodeEncodeError and UnicodeDecodeError are ones
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


class RememberedCredentials:
    """Successful credential checks, least recently used dropped first: at most `size` SHA-256
    digests of (user, hash, password), never passwords. Thread-safe.

    Shared by the `BasicAuth` of every reload: the digest includes the user's hash, so an entry
    of a changed or removed user never matches again, while an unchanged user's scrapes stay
    remembered across a reload (no bcrypt check queued for them).
    """

    def __init__(self, size: int = AUTH_CACHE_SIZE) -> None:
        self._size = size
        self._passed: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            if digest not in self._passed:
                return False
            assert isinstance(digest, bytes)
            self._passed.move_to_end(digest)
            return True

    def add(self, digest: bytes) -> None:
        """Remember `digest`, dropping the least recently used beyond the size."""
        with self._lock:
            self._passed[digest] = None
            self._passed.move_to_end(digest)
            while len(self._passed) > self._size:
                self._passed.popitem(last=False)


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


def dummy_hash(cost: int) -> bytes:
    """A bcrypt hash of cost `cost` that no password matches (random salt and checksum).

    Made without hashing, so even cost 31 is instant; a check against it takes as long as one
    against a real hash of that cost.
    """
    checksum = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(30)) + "."
    return bcrypt.gensalt(cost) + checksum.encode()


class BasicAuth:
    """Checks basic-auth credentials against bcrypt hashes, remembering successful checks.

    `cached` answers at once when it can (no credentials, malformed, or a remembered success);
    `verify` does the bcrypt work (tens of milliseconds: call it off the event loop). Successes
    go to `remembered` (a new `RememberedCredentials` of `cache_size` when not given). An unknown
    user is checked against a dummy hash of the highest cost among the users, so that it costs as
    much time as a wrong password of the most expensive user (names cannot be told apart by
    timing when all users have the same cost). Thread-safe.
    """

    def __init__(
        self,
        users: Mapping[str, bytes],
        cache_size: int = AUTH_CACHE_SIZE,
        *,
        remembered: RememberedCredentials | None = None,
    ) -> None:
        self._users = dict(users)
        self.remembered = (
            remembered if remembered is not None else RememberedCredentials(cache_size)
        )
        self.dummy_hash = dummy_hash(max((_cost(h) for h in self._users.values()), default=10))

    def _digest(self, user: str, password: str) -> bytes:
        hashed = self._users.get(user, self.dummy_hash)
        parts = (user.encode(), hashed, password.encode())
        return hashlib.sha256(b"\0".join(len(p).to_bytes(4, "big") + p for p in parts)).digest()

    def cached(self, header: str | None) -> bool | None:
        """True for a remembered success, False for missing or malformed credentials, None when
        only `verify` can tell.
        """
        credentials = basic_credentials(header)
        if credentials is None:
            return False
        return True if self._digest(*credentials) in self.remembered else None

    def verify(self, header: str | None) -> bool:
        """Whether the credentials match a user's hash (bcrypt; an unknown user costs the same)."""
        credentials = basic_credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        known = user in self._users
        try:
            matches = bcrypt.checkpw(password.encode(), self._users.get(user, self.dummy_hash))
        except ValueError:  # bcrypt refuses passwords over 72 bytes; no stored hash has one
            matches = False
        if not (known and matches):
            return False
        self.remembered.add(self._digest(user, password))
        return True


# One file's status (inode, size, modification and change times in ns) and the SHA-256 of its
# contents; None when it cannot be read.
_FilePrint = tuple[int, int, int, int, bytes] | None
Fingerprint = tuple[tuple[Path, _FilePrint], ...]


def fingerprint(paths: Sequence[Path]) -> Fingerprint:
    """Each path with its status and a SHA-256 of its contents (None when unreadable).

    The contents are hashed because a rewrite of the same size within one timestamp tick
    (coarse on some file systems) leaves the status as it was. Files are read up to
    `MAX_FILE_BYTES` and one byte: larger ones are refused by the load anyway.
    """
    prints: list[tuple[Path, _FilePrint]] = []
    for path in paths:
        try:
            stat = path.stat()  # follows symlinks: a Kubernetes secret swaps a link
            with path.open("rb") as file:
                digest = hashlib.sha256(file.read(MAX_FILE_BYTES + 1)).digest()
        except OSError:
            prints.append((path, None))
        else:
            status = (stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
            prints.append((path, (*status, digest)))
    return tuple(prints)


@dataclass(frozen=True)
class ActiveWebConfig:
    """A web config ready to serve: the parsed file, its TLS context (None for plain HTTP), its
    authenticator (None without users) and the fingerprint of the files it was loaded from,
    each taken before the file was read (so a change made during or after the load is seen).
    """

    config: WebConfig
    ssl_context: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    fingerprint: Fingerprint = ()


PLAIN = ActiveWebConfig(WebConfig())


def load_web_config(
    path: Path, *, allow_empty: bool = True, remembered: RememberedCredentials | None = None
) -> ActiveWebConfig:
    """Read the file and every file it names; raises WebConfigError listing every problem.

    `allow_empty` as for `read_web_config`; `remembered` is shared with the new `BasicAuth`
    (see `RememberedCredentials`). Each file is fingerprinted before it is read.
    """
    before = fingerprint([path])
    config = read_web_config(path, allow_empty=allow_empty)
    before += fingerprint(config.files)
    context = tls_context(config.tls) if config.tls is not None else None
    auth = BasicAuth(config.users, remembered=remembered) if config.users else None
    return ActiveWebConfig(config, context, auth, before)


class WebConfigLoader:
    """The last good web config, re-read when the file or a file it names changes.

    `current()` looks at the files (status and SHA-256, see `fingerprint`) at most every
    `check_interval` seconds of the `monotonic` clock. A change is loaded once two looks in a row
    found the files the same, so a file caught half written (a valid YAML prefix ending at
    `basic_auth_users:` reads as no users) is not loaded. `initial`'s fingerprint, taken before
    it was read, is the starting point: a change made right after start-up is seen too.

    A load that fails keeps the last good configuration, is logged once
    (`web_config_reload_failed`, with every problem) and counted; it is tried again when a file
    changes again. Refused on reload, as a restart is the way to do them on purpose: turning TLS
    on or off (a typo must not turn an HTTPS endpoint into plain HTTP, and scrapers would have to
    change scheme anyway), going from some users to none (authentication off), and an empty file.
    A reload that removes users is logged as a warning. Remembered credentials are kept across
    reloads. Thread-safe.
    """

    def __init__(
        self,
        path: Path,
        initial: ActiveWebConfig,
        *,
        log: FilteringBoundLogger | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.path = path
        self._active = initial
        self._log: FilteringBoundLogger = log if log is not None else structlog.get_logger()
        self._monotonic = monotonic
        self._check_interval = check_interval
        self._remembered = initial.auth.remembered if initial.auth else RememberedCredentials()
        self._watched = (path, *initial.config.files)
        # Taken by the load itself, before reading: not now, which could miss a change made since.
        self._seen = initial.fingerprint or fingerprint(self._watched)
        self._changed: Fingerprint | None = None  # a change seen at the last look, to confirm
        self._checked_at = monotonic()
        self._lock = threading.Lock()
        self.reloads = {"success": 0, "failure": 0}
        self.last_reload_successful = True
        # Counted by the server (see `count_refused_auth_check`), exported by the collector.
        self.refused_auth_checks = 0

    def count_refused_auth_check(self) -> None:
        """Count a request answered 429 because too many bcrypt checks were waiting."""
        with self._lock:
            self.refused_auth_checks += 1

    def current(self) -> ActiveWebConfig:
        """The configuration to serve with now; may re-read the files (see the class)."""
        with self._lock:
            now = self._monotonic()
            if now - self._checked_at >= self._check_interval:
                self._checked_at = now
                self._check()
            return self._active

    def _check(self) -> None:
        seen = fingerprint(self._watched)
        if seen == self._seen:
            self._changed = None
            return
        if seen != self._changed:
            self._changed = seen  # still being written, maybe: load it when it stays so
            return
        self._changed = None
        try:
            active = load_web_config(self.path, allow_empty=False, remembered=self._remembered)
            problems = []
            if (active.ssl_context is None) != (self._active.ssl_context is None):
                problems.append(
                    "tls_server_config: turning TLS on or off takes a restart of the exporter"
                )
            if self._active.auth is not None and active.auth is None:
                problems.append(
                    "basic_auth_users: no users any more; refused on a reload, as it would switch"
                    " authentication off (a file caught half written?). Restart the exporter to"
                    " run without authentication"
                )
            if problems:
                raise WebConfigError(problems)
        except WebConfigError as exc:
            # Watch the files the new version names too, when it can be parsed, so that fixing
            # any of them triggers the next attempt; a failure is tried again only after a change.
            try:
                watched = (self.path, *read_web_config(self.path).files)
            except WebConfigError:
                watched = self._watched
            self._seen = seen if watched == self._watched else fingerprint(watched)
            self._watched = watched
            self.reloads["failure"] += 1
            self.last_reload_successful = False
            self._log.error(
                "web_config_reload_failed",
                path=str(self.path),
                problems=exc.problems,
                hint="serving with the last good web config",
            )
            return
        removed = set(self._active.config.users) - set(active.config.users)
        self._active = active
        self._watched = tuple(path for path, _ in active.fingerprint)
        self._seen = active.fingerprint
        self.reloads["success"] += 1
        self.last_reload_successful = True
        self._log.info(
            "web_config_reloaded",
            path=str(self.path),
            tls=active.ssl_context is not None,
            users=len(active.config.users),
        )
        if removed:
            self._log.warning(
                "web_config_users_removed",
                path=str(self.path),
                removed=len(removed),
                users=len(active.config.users),
            )
        for warning in active.config.warnings:
            self._log.warning("web_config_warning", path=str(self.path), warning=warning)


class WebConfigCollector(Collector):
    """The web config's reloads, for an alert on a certificate rotation that did not take.

    Example exposition::

        prefect_exporter_web_config_reloads_total{result="success"} 3.0
        prefect_exporter_web_config_reloads_total{result="failure"} 1.0
        prefect_exporter_web_config_last_reload_successful 0.0
        prefect_exporter_web_auth_checks_refused_total 0.0
    """

    def __init__(self, loader: WebConfigLoader) -> None:
        self._loader = loader

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "prefect_exporter_web_config_reloads",
            "Reloads of --web.config.file after it or a certificate it names changed, by result:"
            " success, failure (the last good config stays in use).",
            labels=["result"],
        )
        for result in ("success", "failure"):
            reloads.add_metric([result], self._loader.reloads[result])
        yield reloads
        yield GaugeMetricFamily(
            "prefect_exporter_web_config_last_reload_successful",
            "1 unless the last reload of --web.config.file failed (then the last good config,"
            " certificates included, is still served).",
            value=1.0 if self._loader.last_reload_successful else 0.0,
        )
        yield CounterMetricFamily(
            "prefect_exporter_web_auth_checks_refused",
            "Requests whose credentials were not remembered, answered 429 at once because the"
            " most bcrypt checks allowed were already waiting (password guessing, or a burst of"
            " new scrapers).",
            value=self._loader.refused_auth_checks,
        )
