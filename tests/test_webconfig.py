"""Tests for the web config: parsing and validation, TLS contexts, basic auth, reloads, and the
server's use of them (authentication and headers over a real socket)."""

from __future__ import annotations

import base64
import random
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import structlog.testing
import trustme
import yaml
from prometheus_client import CollectorRegistry

from exporter import webconfig
from exporter.server import authorization_header, request_path
from exporter.webconfig import (
    BasicAuth,
    TlsSettings,
    WebConfig,
    WebConfigCollector,
    WebConfigError,
    WebConfigLoader,
    basic_credentials,
    load_web_config,
    parse_web_config,
    read_web_config,
    tls_context,
)
from tests.test_server import Clock, make_app, make_store, serving, snapshot_of

BASE = Path("/etc/exporter")
# The lowest cost bcrypt allows: a check takes about a millisecond instead of 70.
FAST = 4


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(FAST)).decode()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def problems_of(document: object) -> list[str]:
    """The problems parse_web_config reports (fails the test if it accepts the document)."""
    with pytest.raises(WebConfigError) as raised:
        parse_web_config(document, BASE)
    return raised.value.problems


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by `ca`, and its key, written as PEM files."""
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


class TestParse:
    """A YAML document becomes a WebConfig; exporter-toolkit's keys and defaults."""

    def test_an_empty_file_is_plain_http_without_auth(self) -> None:
        """No document (an empty file) and an empty mapping both mean plain HTTP, no users."""
        assert parse_web_config(None, BASE) == WebConfig()
        assert parse_web_config({}, BASE) == WebConfig()

    def test_a_full_config(self) -> None:
        """Every supported key reaches the WebConfig; relative paths start at the file's dir."""
        hashed = bcrypt_hash("secret")
        config = parse_web_config(
            {
                "tls_server_config": {
                    "cert_file": "tls/server.crt",
                    "key_file": "/abs/server.key",
                    "client_ca_file": "ca.crt",
                    "client_auth_type": "RequireAndVerifyClientCert",
                    "min_version": "TLS13",
                    "max_version": "TLS13",
                    "prefer_server_cipher_suites": False,
                },
                "http_server_config": {
                    "http2": True,
                    "headers": {"x-frame-options": "deny", "Strict-Transport-Security": "max"},
                },
                "basic_auth_users": {"prometheus": hashed},
            },
            BASE,
        )
        assert config.tls == TlsSettings(
            cert_file=BASE / "tls/server.crt",
            key_file=Path("/abs/server.key"),
            client_ca_file=BASE / "ca.crt",
            client_auth_type="RequireAndVerifyClientCert",
            min_version=ssl.TLSVersion.TLSv1_3,
            max_version=ssl.TLSVersion.TLSv1_3,
            prefer_server_cipher_suites=False,
        )
        assert config.headers == (
            ("X-Frame-Options", "deny"),
            ("Strict-Transport-Security", "max"),
        )
        assert config.users == {"prometheus": hashed.encode()}
        assert hashed not in repr(config)

    def test_tls_defaults_are_exporter_toolkits(self) -> None:
        """Without the optional keys: no client certificates, TLS 1.2 to 1.3."""
        config = parse_web_config({"tls_server_config": {"cert_file": "a", "key_file": "b"}}, BASE)
        assert config.tls is not None
        assert config.tls.client_auth_type == "NoClientCert"
        assert (config.tls.min_version, config.tls.max_version) == (
            ssl.TLSVersion.TLSv1_2,
            ssl.TLSVersion.TLSv1_3,
        )
        assert config.files == (BASE / "a", BASE / "b")

    def test_every_problem_is_listed_at_once(self) -> None:
        """One round fixes the file: each mistake is reported, each naming its key."""
        problems = problems_of(
            {
                "tls_server_config": {
                    "cert_file": 3,
                    "client_auth_type": "RequireAndVerifyClientCrt",
                    "min_version": "TLS11",
                    "max_version": "TLS14",
                    "ciphers": ["x"],
                },
                "http_server_config": {"headers": {"Server": "x"}, "http2": "yes"},
                "basic_auth_users": {"bob": "plain-text", "a:b": bcrypt_hash("x")},
                "basic_auth_user": {},
            }
        )
        assert problems == [
            "basic_auth_user: unknown key (did you mean basic_auth_users?)",
            "tls_server_config.ciphers: unknown key",
            "tls_server_config.cert_file: expected a file name, got 3",
            "tls_server_config.cert_file: missing; TLS needs a certificate and its key",
            "tls_server_config.key_file: missing; TLS needs a certificate and its key",
            "tls_server_config.client_auth_type: must be one of NoClientCert,"
            " VerifyClientCertIfGiven, RequireAndVerifyClientCert, got"
            " 'RequireAndVerifyClientCrt' (did you mean RequireAndVerifyClientCert?)",
            "tls_server_config.min_version: TLS11 is not supported (TLS 1.0 and 1.1 are"
            " deprecated by RFC 8996); use TLS12 or TLS13",
            "tls_server_config.max_version: must be TLS12 or TLS13, got 'TLS14'",
            "http_server_config.http2: expected true or false",
            "http_server_config.headers.Server: this header cannot be set; allowed are"
            " Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options,"
            " X-XSS-Protection, Content-Security-Policy (exporter-toolkit's list)",
            "basic_auth_users.bob: not a bcrypt hash ($2a$, $2b$, $2x$, $2y$ followed by the"
            " cost, $ and 53 characters, nothing after them); make one with htpasswd -nBC 10 or"
            " bcrypt.hashpw",
            "basic_auth_users.a:b: a user name cannot contain ':' (basic auth splits at the"
            " first one)",
        ]

    def test_sections_must_be_mappings(self) -> None:
        """A list where a mapping belongs is named, not a crash."""
        assert problems_of(["x"]) == ["the web config: must be a mapping"]
        assert problems_of({"tls_server_config": "x", "basic_auth_users": ["a"]}) == [
            "tls_server_config: must be a mapping",
            "basic_auth_users: must be a mapping",
        ]

    @pytest.mark.parametrize(
        ("key", "value", "reason"),
        [
            ("cipher_suites", ["TLS_AES_128_GCM_SHA256"], "Python's ssl takes OpenSSL cipher"),
            ("curve_preferences", ["X25519"], "not supported by Python's ssl"),
            ("client_allowed_sans", ["scraper"], "it would not be enforced"),
            ("cert", "-----BEGIN CERTIFICATE-----", "use cert_file"),
            ("key", "-----BEGIN PRIVATE KEY-----", "use key_file"),
            ("client_ca", "-----BEGIN CERTIFICATE-----", "use client_ca_file"),
        ],
    )
    def test_toolkit_keys_this_server_cannot_honour_are_refused(
        self, key: str, value: object, reason: str
    ) -> None:
        """A security setting that would be ignored is refused, with the reason and a way out."""
        document = {"tls_server_config": {"cert_file": "a", "key_file": "b", key: value}}
        (problem,) = problems_of(document)
        assert problem.startswith(f"tls_server_config.{key}: ")
        assert reason in problem

    def test_an_empty_unsupported_key_is_harmless(self) -> None:
        """`cipher_suites: []` asks for nothing, so it is accepted."""
        document = {"tls_server_config": {"cert_file": "a", "key_file": "b", "cipher_suites": []}}
        assert parse_web_config(document, BASE).tls is not None

    def test_rate_limit_is_refused(self) -> None:
        """exporter-toolkit's rate limiter is not offered: say so rather than not limit."""
        (problem,) = problems_of({"rate_limit": {"interval": "1s", "burst": 5}})
        assert problem.startswith("rate_limit: is not supported")

    @pytest.mark.parametrize("mode", ["RequestClientCert", "RequireAnyClientCert"])
    def test_modes_that_accept_unverified_certificates_are_refused(self, mode: str) -> None:
        """Python's ssl verifies every client certificate it asks for; the two Go modes that do
        not are refused with the supported alternatives."""
        document = {"tls_server_config": {"cert_file": "a", "key_file": "b"}}
        document["tls_server_config"]["client_auth_type"] = mode
        (problem,) = problems_of(document)
        assert f"{mode} is not supported" in problem
        assert "RequireAndVerifyClientCert" in problem

    def test_verifying_client_certificates_needs_their_ca(self) -> None:
        """RequireAndVerifyClientCert without client_ca_file would refuse every client."""
        document = {
            "tls_server_config": {
                "cert_file": "a",
                "key_file": "b",
                "client_auth_type": "VerifyClientCertIfGiven",
            }
        }
        assert problems_of(document) == [
            "tls_server_config.client_auth_type: VerifyClientCertIfGiven needs client_ca_file,"
            " the CA that signs the clients' certificates"
        ]

    def test_a_client_ca_without_a_policy_is_refused(self) -> None:
        """A CA with NoClientCert would check nothing: exporter-toolkit refuses it too."""
        document = {"tls_server_config": {"cert_file": "a", "key_file": "b", "client_ca_file": "c"}}
        (problem,) = problems_of(document)
        assert problem.startswith("tls_server_config.client_ca_file: set without")

    def test_min_version_above_max_version(self) -> None:
        """TLS13 to TLS12 is an empty range."""
        document = {
            "tls_server_config": {
                "cert_file": "a",
                "key_file": "b",
                "min_version": "TLS13",
                "max_version": "TLS12",
            }
        }
        assert problems_of(document) == [
            "tls_server_config.min_version: must not be above max_version"
        ]

    def test_bcrypt_costs_outside_the_range_are_refused_without_quoting_the_hash(self) -> None:
        """A cost of 32 cannot be checked; problems never repeat a hash."""
        hashed = "$2b$32$" + bcrypt_hash("pw")[7:]
        (problem,) = problems_of({"basic_auth_users": {"bob": hashed}})
        assert problem == "basic_auth_users.bob: bcrypt cost must be between 4 and 31"
        (problem,) = problems_of({"basic_auth_users": {"bob": "$2b$10$short"}})
        assert "$2b$10$short" not in problem

    @pytest.mark.parametrize("prefix", ["$2y$", "$2a$", "$2x$"])
    def test_htpasswd_hashes_are_accepted(self, prefix: str) -> None:
        """`htpasswd -nBC 10` writes $2y$ hashes; older tools $2a$ and $2x$: all verify."""
        hashed = prefix + bcrypt_hash("pw")[4:]
        users = parse_web_config({"basic_auth_users": {"bob": hashed}}, BASE).users
        assert bcrypt.checkpw(b"pw", users["bob"])
        assert BasicAuth(users).verify(basic("bob", "pw"))

    @pytest.mark.parametrize(
        ("why", "change"),
        [
            ("no letter after 2: bcrypt refuses it", lambda h: "$2$" + h[4:]),
            ("a trailing newline", lambda h: h + "\n"),
            ("non-ASCII digits in the cost", lambda h: h[:4] + "\u0661\u0660" + h[6:]),
            ("a salt ending bcrypt refuses", lambda h: h[:28] + "A" + h[29:]),
            ("a checksum ending no hash has", lambda h: h[:-1] + "A"),
        ],
    )
    def test_hashes_that_can_never_match_are_refused(
        self, why: str, change: Callable[[str], str]
    ) -> None:
        """Everything the pattern accepts, bcrypt can check; these it cannot, or never matches."""
        (problem,) = problems_of({"basic_auth_users": {"bob": change(bcrypt_hash("pw"))}})
        assert problem.startswith("basic_auth_users.bob: not a bcrypt hash ($2a$, $2b$, $2x$,")

    def test_every_hash_bcrypt_makes_is_accepted(self) -> None:
        """The canonical salt and checksum endings cover what bcrypt.hashpw writes."""
        for _ in range(64):
            hashed = bcrypt_hash("pw")
            assert parse_web_config({"basic_auth_users": {"u": hashed}}, BASE).users


class TestHeaders:
    """http_server_config.headers follows exporter-toolkit's list and value rules."""

    def headers(self, headers: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        document = {"http_server_config": {"headers": headers}}
        return parse_web_config(document, BASE).headers

    def test_names_are_matched_without_case_and_written_canonically(self) -> None:
        """`content-security-policy` sets Content-Security-Policy."""
        assert self.headers({"content-security-policy": "default-src 'self'"}) == (
            ("Content-Security-Policy", "default-src 'self'"),
        )

    @pytest.mark.parametrize(
        "name", ["Content-Type", "Content-Length", "Connection", "WWW-Authenticate", "Server"]
    )
    def test_other_headers_cannot_be_set(self, name: str) -> None:
        """Headers the server writes itself (and any other) are refused with the allowed list."""
        (problem,) = problems_of({"http_server_config": {"headers": {name: "x"}}})
        assert problem.startswith(f"http_server_config.headers.{name}: this header cannot be set")

    @pytest.mark.parametrize(
        ("name", "value"),
        [("X-Frame-Options", "allow-from x"), ("X-Content-Type-Options", "sniff")],
    )
    def test_enumerated_headers_take_only_their_values(self, name: str, value: str) -> None:
        """X-Frame-Options is deny or sameorigin; X-Content-Type-Options is nosniff."""
        (problem,) = problems_of({"http_server_config": {"headers": {name: value}}})
        assert problem.startswith(f"http_server_config.headers.{name}: must be one of")

    def test_a_blank_value_unsets_the_header(self) -> None:
        """As in exporter-toolkit, an empty value means the header is not sent."""
        assert self.headers({"X-XSS-Protection": "", "X-Frame-Options": None}) == ()

    def test_a_value_with_a_line_break_is_refused(self) -> None:
        """A newline would inject a header of its own."""
        (problem,) = problems_of(
            {"http_server_config": {"headers": {"X-XSS-Protection": "1\r\nSet-Cookie: a"}}}
        )
        assert problem == "http_server_config.headers.X-XSS-Protection: expected a one-line string"


class TestReadFile:
    """The file itself: unreadable, not YAML, too large."""

    def test_a_missing_file(self, tmp_path: Path) -> None:
        """The reason from the system is given."""
        with pytest.raises(WebConfigError, match=r"cannot be read \(No such file"):
            read_web_config(tmp_path / "missing.yml")

    def test_not_yaml(self, tmp_path: Path) -> None:
        """A YAML syntax error names its line."""
        path = tmp_path / "web.yml"
        path.write_text("basic_auth_users:\n  bob: [\n")
        with pytest.raises(WebConfigError, match="not valid YAML at line 3"):
            read_web_config(path)

    def test_too_large(self, tmp_path: Path) -> None:
        """A wrong path to a large file is not read whole."""
        path = tmp_path / "big.yml"
        path.write_bytes(b"#" * (webconfig.MAX_FILE_BYTES + 1))
        with pytest.raises(WebConfigError, match="larger than 1024 KiB"):
            read_web_config(path)

    def test_relative_paths_start_at_the_files_directory(self, tmp_path: Path) -> None:
        """cert_file: server.crt next to the web config is found wherever the exporter runs."""
        path = tmp_path / "web.yml"
        path.write_text("tls_server_config: {cert_file: server.crt, key_file: server.key}\n")
        assert read_web_config(path).files == (tmp_path / "server.crt", tmp_path / "server.key")


class TestTlsContext:
    """The SSLContext is built from real certificates; each unusable file is a problem."""

    def test_a_context_verifying_clients(self, ca: trustme.CA, tmp_path: Path) -> None:
        """RequireAndVerifyClientCert with a CA file gives CERT_REQUIRED and the versions."""
        cert, key = write_pair(ca, tmp_path)
        ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
        context = tls_context(
            TlsSettings(
                cert,
                key,
                tmp_path / "ca.crt",
                "RequireAndVerifyClientCert",
                min_version=ssl.TLSVersion.TLSv1_3,
            )
        )
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.minimum_version == ssl.TLSVersion.TLSv1_3
        assert len(context.get_ca_certs()) == 1

    def test_every_unreadable_file_is_listed(self, tmp_path: Path) -> None:
        """Missing certificate, key and CA: three problems, each with its path."""
        settings = TlsSettings(
            tmp_path / "a.crt", tmp_path / "a.key", tmp_path / "ca.crt", "VerifyClientCertIfGiven"
        )
        with pytest.raises(WebConfigError) as raised:
            tls_context(settings)
        assert [p.split(":")[0] for p in raised.value.problems] == [
            "tls_server_config.cert_file",
            "tls_server_config.key_file",
            "tls_server_config.client_ca_file",
        ]
        assert str(tmp_path / "a.key") in raised.value.problems[1]

    def test_a_key_of_another_certificate(self, ca: trustme.CA, tmp_path: Path) -> None:
        """A certificate and a key that do not match are refused together."""
        cert, _ = write_pair(ca, tmp_path, "one")
        _, other_key = write_pair(ca, tmp_path, "two")
        with pytest.raises(WebConfigError) as raised:
            tls_context(TlsSettings(cert, other_key))
        (problem,) = raised.value.problems
        assert problem.startswith("tls_server_config.cert_file, key_file: not a PEM certificate")

    def test_an_encrypted_key_is_refused_without_a_prompt(
        self, ca: trustme.CA, tmp_path: Path
    ) -> None:
        """OpenSSL would ask for the passphrase on a terminal; the key is refused instead."""
        from cryptography.hazmat.primitives import serialization

        cert, key = write_pair(ca, tmp_path)
        loaded = serialization.load_pem_private_key(key.read_bytes(), password=None)
        key.write_bytes(
            loaded.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"passphrase"),
            )
        )
        with pytest.raises(WebConfigError) as raised:
            tls_context(TlsSettings(cert, key))
        assert raised.value.problems == [
            "tls_server_config.key_file: the key is encrypted; give an unencrypted key"
        ]

    def test_a_ca_file_without_certificates(self, ca: trustme.CA, tmp_path: Path) -> None:
        """A CA file holding no certificate is named."""
        cert, key = write_pair(ca, tmp_path)
        (tmp_path / "ca.crt").write_text("nothing here\n")
        with pytest.raises(WebConfigError) as raised:
            tls_context(TlsSettings(cert, key, tmp_path / "ca.crt", "VerifyClientCertIfGiven"))
        (problem,) = raised.value.problems
        assert problem.startswith("tls_server_config.client_ca_file: no PEM certificate")


class TestBasicAuth:
    """Credentials against bcrypt hashes, with a bounded cache of successes."""

    @pytest.fixture
    def calls(self, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
        """The hashes bcrypt was asked to check, in order (the real bcrypt still answers)."""
        seen: list[bytes] = []
        real = bcrypt.checkpw

        def counting(password: bytes, hashed: bytes) -> bool:
            seen.append(hashed)
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", counting)
        return seen

    def test_the_right_password_passes_and_is_then_remembered(self, calls: list[bytes]) -> None:
        """One bcrypt check, then the cache answers for the same credentials."""
        auth = BasicAuth({"prom": bcrypt_hash("s3cret").encode()})
        header = basic("prom", "s3cret")
        assert auth.cached(header) is None
        assert auth.verify(header) is True
        assert auth.cached(header) is True
        assert len(calls) == 1

    def test_a_wrong_password_fails_and_is_not_remembered(self, calls: list[bytes]) -> None:
        """Failures are checked again each time: guesses cannot evict real entries."""
        auth = BasicAuth({"prom": bcrypt_hash("s3cret").encode()})
        header = basic("prom", "guess")
        assert auth.verify(header) is False
        assert auth.cached(header) is None
        assert len(calls) == 1

    def test_an_unknown_user_costs_a_bcrypt_check_too(self, calls: list[bytes]) -> None:
        """A name that does not exist is checked against a dummy hash: no timing difference."""
        auth = BasicAuth({"prom": bcrypt_hash("s3cret").encode()})
        assert auth.verify(basic("mallory", "s3cret")) is False
        assert calls == [auth.dummy_hash]

    def test_the_dummy_hash_has_the_highest_cost_of_the_users(self) -> None:
        """Not a fixed cost 10: with cost-5 hashes, unknown names cost a cost-5 check."""
        costly = bcrypt.hashpw(b"b", bcrypt.gensalt(FAST + 1))
        auth = BasicAuth({"a": bcrypt_hash("a").encode(), "b": costly})
        assert auth.dummy_hash.startswith(b"$2b$05$")
        assert parse_web_config({"basic_auth_users": {"x": auth.dummy_hash.decode()}}, BASE)
        assert bcrypt.checkpw(b"b", auth.dummy_hash) is False  # a real check, not a ValueError

    @pytest.mark.parametrize(
        "header",
        [
            None,
            "",
            "Bearer abc",
            "Basic !!!",
            "Basic " + base64.b64encode(b"x").decode(),
            "Basic \u00e9t\u00e9",  # non-ASCII: b64decode raises ValueError, not binascii.Error
            "Basic \xff\xfe",  # bytes 0xff 0xfe, as a head decoded as Latin-1 gives them
            "Basic " + base64.b64encode(b"\xff:\xfe").decode(),  # not UTF-8 inside
        ],
    )
    def test_missing_or_malformed_credentials_fail_without_bcrypt(
        self, header: str | None, calls: list[bytes]
    ) -> None:
        """No header, another scheme, bad base64 or no colon: refused at once."""
        auth = BasicAuth({"prom": bcrypt_hash("s3cret").encode()})
        assert auth.cached(header) is False
        assert auth.verify(header) is False
        assert calls == []

    def test_a_password_longer_than_bcrypt_takes_fails(self) -> None:
        """bcrypt raises for more than 72 bytes; that is a wrong password, not a crash."""
        auth = BasicAuth({"prom": bcrypt_hash("s3cret").encode()})
        assert auth.verify(basic("prom", "x" * 100)) is False

    def test_the_cache_is_bounded_least_recently_used_first(self) -> None:
        """With room for two, a third success drops the one used longest ago."""
        users = {name: bcrypt_hash(name).encode() for name in ("a", "b", "c")}
        auth = BasicAuth(users, cache_size=2)
        assert auth.verify(basic("a", "a"))
        assert auth.verify(basic("b", "b"))
        assert auth.cached(basic("a", "a")) is True  # a is now the most recent
        assert auth.verify(basic("c", "c"))
        assert auth.cached(basic("b", "b")) is None
        assert auth.cached(basic("a", "a")) is True

    def test_random_headers_never_raise(self) -> None:
        """2000 random heads (seeded): parsing and checking credentials answer, never raise."""
        rng = random.Random(20261129)
        auth = BasicAuth({"prom": bcrypt_hash("s3cret").encode()})
        alphabet = b"Basic Authorization: \r\n=+/" + bytes(range(256))
        for _ in range(2000):
            size = rng.randrange(64)
            noise = bytes(rng.choice(alphabet) for _ in range(size))
            head = b"GET / HTTP/1.1\r\nAuthorization: Basic " + noise + b"\r\n\r\n"
            header = authorization_header(head if rng.random() < 0.8 else noise)
            assert request_path(noise) is not None
            credentials = basic_credentials(header)
            if credentials is None:
                assert auth.cached(header) is False
        # And valid base64 of random bytes, which reaches the UTF-8 decoding.
        for _ in range(500):
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
            assert basic_credentials("Basic " + base64.b64encode(raw).decode()) in (
                None,
                tuple(raw.decode("utf-8", "replace").partition(":")[::2]),
            )

    def test_credentials_are_split_at_the_first_colon(self) -> None:
        """A password may contain colons; the user name may not."""
        assert basic_credentials(basic("u", "p:a:ss")) == ("u", "p:a:ss")
        assert basic_credentials("basic " + base64.b64encode(b"u:").decode()) == ("u", "")


class TestLoader:
    """The last good config, re-read when a file changes and stays so over two looks."""

    def write(self, path: Path, document: object) -> None:
        path.write_text(yaml.safe_dump(document))

    def loader(self, path: Path, clock: FakeClock) -> WebConfigLoader:
        return WebConfigLoader(path, load_web_config(path), monotonic=clock)

    def settle(self, loader: WebConfigLoader, clock: FakeClock) -> webconfig.ActiveWebConfig:
        """Two looks a second apart: enough for any change made before to be applied."""
        clock.now += 1
        loader.current()
        clock.now += 1
        return loader.current()

    def test_a_change_is_seen_only_after_the_check_interval(self, tmp_path: Path) -> None:
        """No look within a second; a change is applied at the second look that finds it."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        loader = self.loader(path, clock)
        # Same size, and written within the same timestamp tick on a coarse file system: the
        # contents' SHA-256 tells them apart.
        self.write(path, {"basic_auth_users": {"b": bcrypt_hash("b")}})
        clock.now += 0.5
        assert set(loader.current().config.users) == {"a"}
        clock.now += 0.5
        assert set(loader.current().config.users) == {"a"}  # seen once: maybe half written
        clock.now += 0.5
        assert set(loader.current().config.users) == {"a"}  # no look within the interval
        clock.now += 0.5
        assert set(loader.current().config.users) == {"b"}
        assert loader.reloads == {"success": 1, "failure": 0}

    def test_a_same_size_rewrite_with_the_same_status_is_seen(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Status alike to the nanosecond (a coarse clock), contents not: a change."""
        path = tmp_path / "web.yml"
        path.write_text("{}\n")
        status = path.stat()
        monkeypatch.setattr(Path, "stat", lambda self, **kwargs: status)
        before = webconfig.fingerprint([path])
        path.write_text("[]\n")
        assert webconfig.fingerprint([path]) != before

    def test_a_file_still_changing_is_not_loaded(self, tmp_path: Path) -> None:
        """A half-written file that validates (users cut off) is never loaded."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        loader = self.loader(path, clock)
        path.write_text("http_server_config: {}\n")  # the first half of the new file
        clock.now += 1
        assert set(loader.current().config.users) == {"a"}
        self.write(path, {"http_server_config": {}, "basic_auth_users": {"b": bcrypt_hash("b")}})
        clock.now += 1
        assert set(loader.current().config.users) == {"a"}  # changed again: not yet settled
        clock.now += 1
        assert set(loader.current().config.users) == {"b"}
        assert loader.reloads == {"success": 1, "failure": 0}

    def test_going_from_users_to_none_is_refused(self, tmp_path: Path) -> None:
        """A valid prefix ending at `basic_auth_users:` must not switch authentication off."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        loader = self.loader(path, clock)
        path.write_text("http_server_config: {}\nbasic_auth_users:\n")
        with structlog.testing.capture_logs() as logs:
            assert self.settle(loader, clock).auth is not None
        (event,) = logs
        assert event["event"] == "web_config_reload_failed"
        assert event["problems"][0].startswith("basic_auth_users: no users any more; refused")
        assert loader.reloads == {"success": 0, "failure": 1}

    def test_a_reload_removing_users_warns(self, tmp_path: Path) -> None:
        """Fewer users is allowed, with a warning naming how many went."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a"), "b": bcrypt_hash("b")}})
        loader = self.loader(path, clock)
        self.write(path, {"basic_auth_users": {"b": bcrypt_hash("b")}})
        with structlog.testing.capture_logs() as logs:
            assert set(self.settle(loader, clock).config.users) == {"b"}
        warning = next(e for e in logs if e["event"] == "web_config_users_removed")
        assert warning["log_level"] == "warning"
        assert (warning["removed"], warning["users"]) == (1, 1)

    def test_a_costly_hash_is_loaded_with_a_warning(self, tmp_path: Path) -> None:
        """A cost above 14 works but is logged: one check holds the bcrypt thread for seconds."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        loader = self.loader(path, clock)
        costly = "$2b$15$" + bcrypt_hash("a")[7:]  # never checked here: only the cost is read
        self.write(path, {"basic_auth_users": {"a": costly}})
        with structlog.testing.capture_logs() as logs:
            self.settle(loader, clock)
        (warning,) = [e for e in logs if e["event"] == "web_config_warning"]
        assert warning["warning"].startswith("basic_auth_users.a: bcrypt cost 15 is above 14")
        assert costly not in str(logs)

    def test_a_change_right_after_the_first_load_is_seen(self, tmp_path: Path) -> None:
        """The fingerprint is taken before the first read, not when the loader is made."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        initial = load_web_config(path)
        self.write(path, {"basic_auth_users": {"b": bcrypt_hash("b")}})  # during start-up
        loader = WebConfigLoader(path, initial, monotonic=clock)
        assert set(self.settle(loader, clock).config.users) == {"b"}

    def test_a_newly_named_file_changed_during_the_load_is_seen(
        self, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A certificate rotated while the reload that first names it runs is loaded next."""
        path, clock = tmp_path / "web.yml", FakeClock()
        write_pair(ca, tmp_path, "old")
        tls = {"cert_file": "old.crt", "key_file": "old.key"}
        self.write(path, {"tls_server_config": tls})
        loader = self.loader(path, clock)
        write_pair(ca, tmp_path, "new")
        self.write(path, {"tls_server_config": {"cert_file": "new.crt", "key_file": "new.key"}})
        real = webconfig.tls_context
        rotations: list[ssl.SSLContext] = []

        def rotating(settings: TlsSettings) -> ssl.SSLContext:
            context = real(settings)
            if not rotations:
                write_pair(ca, tmp_path, "new")  # rotated just after being read
            rotations.append(context)
            return context

        monkeypatch.setattr(webconfig, "tls_context", rotating)
        first = self.settle(loader, clock).ssl_context
        assert first is rotations[0]
        assert self.settle(loader, clock).ssl_context is rotations[1]
        assert loader.reloads == {"success": 2, "failure": 0}

    def test_remembered_credentials_survive_a_reload(self, tmp_path: Path) -> None:
        """An unchanged user stays remembered; a changed hash is checked again."""
        path, clock = tmp_path / "web.yml", FakeClock()
        users = {"a": bcrypt_hash("a"), "b": bcrypt_hash("b")}
        self.write(path, {"basic_auth_users": users})
        loader = self.loader(path, clock)
        auth = loader.current().auth
        assert auth is not None
        assert auth.verify(basic("a", "a"))
        assert auth.verify(basic("b", "b"))
        self.write(path, {"basic_auth_users": {**users, "b": bcrypt_hash("b")}})
        reloaded = self.settle(loader, clock).auth
        assert reloaded is not None
        assert reloaded is not auth
        assert reloaded.cached(basic("a", "a")) is True
        assert reloaded.cached(basic("b", "b")) is None

    def test_nothing_changed_nothing_reloaded(self, tmp_path: Path) -> None:
        """The same object is served while the files are as they were."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {})
        loader = self.loader(path, clock)
        first = loader.current()
        clock.now += 10
        assert loader.current() is first
        assert loader.reloads == {"success": 0, "failure": 0}

    def test_a_bad_change_keeps_the_last_good_config_logs_and_counts(self, tmp_path: Path) -> None:
        """Every problem is logged once; the failure is tried again only after a new change."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        loader = self.loader(path, clock)
        self.write(path, {"basic_auth_users": {"a": "oops"}, "extra": 1})
        with structlog.testing.capture_logs() as logs:
            assert set(self.settle(loader, clock).config.users) == {"a"}
            self.settle(loader, clock)
        (event,) = logs
        assert event["event"] == "web_config_reload_failed"
        assert event["log_level"] == "error"
        assert len(event["problems"]) == 2
        assert loader.reloads == {"success": 0, "failure": 1}
        assert not loader.last_reload_successful
        self.write(path, {"basic_auth_users": {"c": bcrypt_hash("c")}})
        assert set(self.settle(loader, clock).config.users) == {"c"}
        assert loader.last_reload_successful

    def test_an_empty_file_on_reload_is_refused(self, tmp_path: Path) -> None:
        """A file caught half written must not switch authentication off."""
        path, clock = tmp_path / "web.yml", FakeClock()
        self.write(path, {"basic_auth_users": {"a": bcrypt_hash("a")}})
        loader = self.loader(path, clock)
        path.write_text("")
        with structlog.testing.capture_logs() as logs:
            assert self.settle(loader, clock).auth is not None
        assert logs[0]["problems"][0].startswith("empty; refused on a reload")
        assert loader.reloads == {"success": 0, "failure": 1}

    def test_a_rotated_certificate_is_loaded(self, ca: trustme.CA, tmp_path: Path) -> None:
        """A new certificate and key written over the old files give a new TLS context."""
        path, clock = tmp_path / "web.yml", FakeClock()
        write_pair(ca, tmp_path)
        self.write(
            path, {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}}
        )
        loader = self.loader(path, clock)
        before = loader.current().ssl_context
        write_pair(ca, tmp_path)
        assert self.settle(loader, clock).ssl_context is not before
        assert loader.reloads["success"] == 1

    def test_turning_tls_off_takes_a_restart(self, ca: trustme.CA, tmp_path: Path) -> None:
        """A reload that would serve plain HTTP on an HTTPS port is refused."""
        path, clock = tmp_path / "web.yml", FakeClock()
        write_pair(ca, tmp_path)
        self.write(
            path, {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}}
        )
        loader = self.loader(path, clock)
        self.write(path, {"basic_auth_users": {}})
        with structlog.testing.capture_logs() as logs:
            assert self.settle(loader, clock).ssl_context is not None
        assert "restart" in logs[0]["problems"][0]

    def test_a_missing_certificate_after_a_change_is_a_failed_reload(
        self, ca: trustme.CA, tmp_path: Path
    ) -> None:
        """A key deleted during a rotation keeps the old context until it is back."""
        path, clock = tmp_path / "web.yml", FakeClock()
        _, key = write_pair(ca, tmp_path)
        self.write(
            path, {"tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"}}
        )
        loader = self.loader(path, clock)
        before = loader.current().ssl_context
        key.unlink()
        with structlog.testing.capture_logs():
            assert self.settle(loader, clock).ssl_context is before
        write_pair(ca, tmp_path)
        assert self.settle(loader, clock).ssl_context is not before
        assert loader.reloads == {"success": 1, "failure": 1}


class TestCollector:
    """The reload counters and the last result as metrics."""

    def test_reloads_by_result_and_the_last_outcome(self, tmp_path: Path) -> None:
        """Both results are always exported; the gauge follows the last reload; refusals count."""
        path = tmp_path / "web.yml"
        path.write_text("{}\n")
        loader = WebConfigLoader(path, load_web_config(path), monotonic=FakeClock())
        registry = CollectorRegistry()
        registry.register(WebConfigCollector(loader))
        value = registry.get_sample_value
        assert value("prefect_exporter_web_config_reloads_total", {"result": "failure"}) == 0
        assert value("prefect_exporter_web_config_last_reload_successful") == 1
        loader.reloads["failure"] = 2
        loader.last_reload_successful = False
        assert value("prefect_exporter_web_config_reloads_total", {"result": "failure"}) == 2
        assert value("prefect_exporter_web_config_last_reload_successful") == 0
        assert value("prefect_exporter_web_auth_checks_refused_total") == 0
        loader.count_refused_auth_check()
        assert value("prefect_exporter_web_auth_checks_refused_total") == 1


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[str]:
    """An in-process server requiring user `prom`, password `s3cret`, with two extra headers."""
    path = tmp_path / "web.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "basic_auth_users": {"prom": bcrypt_hash("s3cret")},
                "http_server_config": {
                    "headers": {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
                },
            }
        )
    )
    clock = Clock()
    loader = WebConfigLoader(path, load_web_config(path))
    with serving(make_app(make_store(clock), clock), web=loader) as server:
        yield f"http://127.0.0.1:{server.port}"


class TestServer:
    """The server asks for credentials on every path but /healthz and adds the headers."""

    def test_no_credentials_get_401_with_a_basic_challenge(self, secured: str) -> None:
        """A scrape without credentials is refused with WWW-Authenticate: Basic."""
        response = httpx.get(f"{secured}/metrics")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"].startswith("Basic ")

    def test_a_wrong_password_gets_401(self, secured: str) -> None:
        """Wrong credentials, and the landing page and unknown paths too."""
        for path in ("/metrics", "/", "/nowhere"):
            response = httpx.get(f"{secured}{path}", auth=("prom", "nope"))
            assert response.status_code == 401, path

    def test_the_right_password_scrapes_again_and_again(self, secured: str) -> None:
        """Credentials that pass are served at every scrape on a kept-alive connection."""
        with httpx.Client(auth=("prom", "s3cret")) as client:
            for _ in range(3):
                response = client.get(f"{secured}/metrics")
                assert response.status_code == 200
                assert "prefect_up" in response.text

    def test_healthz_needs_no_credentials(self, secured: str) -> None:
        """Probes read /healthz without a password (a documented choice)."""
        assert httpx.get(f"{secured}/healthz").status_code == 200

    def test_the_headers_are_on_every_response(self, secured: str) -> None:
        """200, 401 and /healthz answers all carry the configured headers."""
        for response in (
            httpx.get(f"{secured}/metrics", auth=("prom", "s3cret")),
            httpx.get(f"{secured}/metrics"),
            httpx.get(f"{secured}/healthz"),
        ):
            assert response.headers["X-Frame-Options"] == "deny"
            assert response.headers["X-Content-Type-Options"] == "nosniff"

    def test_without_a_web_config_nothing_is_asked(self) -> None:
        """The default stays open, without extra headers."""
        clock = Clock()
        with serving(make_app(make_store(clock), clock)) as server:
            response = httpx.get(f"http://127.0.0.1:{server.port}/metrics")
        assert response.status_code == 200
        assert "X-Frame-Options" not in response.headers


class TestTlsLargeAnswers:
    """A large answer over TLS reaches a client that reads late, in full."""

    def test_connection_close_waits_for_the_encrypted_bytes(
        self, ca: trustme.CA, tmp_path: Path
    ) -> None:
        """`Connection: close` and a client that reads only after a pause: the whole body
        arrives. The encrypted bytes wait in the TCP transport under the SSL one, whose own
        count leaves them out; ending the connection on that count cut the answer short."""
        cert, key = write_pair(ca, tmp_path)
        loader = write_web(
            tmp_path, {"tls_server_config": {"cert_file": cert.name, "key_file": key.name}}
        )
        clock = Clock()
        store = make_store(clock)
        store.publish(snapshot_of(2000, clock.now), 0.1)
        client_context = ssl.create_default_context()
        ca.configure_trust(client_context)
        with (
            serving(make_app(store, clock), web=loader) as server,
            socket.socket() as raw,
        ):
            # A small receive window, set before connecting: the server's send buffer stays
            # small too, so most of the answer must wait in the server's transports.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.settimeout(10)
            raw.connect(("127.0.0.1", server.port))
            sock = client_context.wrap_socket(raw, server_hostname="127.0.0.1")
            with sock:
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                time.sleep(0.5)
                answer = bytearray()
                while chunk := sock.recv(1 << 16):
                    answer += chunk
        head, _, body = bytes(answer).partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        assert length > 1_000_000
        assert len(body) == length


HEADERS = {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
GUESS = (
    "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic("prom", "guess") + "\r\n\r\n"
).encode()


def wait_until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> None:
    """Poll `condition` until it holds; fails the test after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, f"still not: {what}"
        time.sleep(0.01)


def write_web(directory: Path, document: dict[str, Any]) -> WebConfigLoader:
    path = directory / "web.yml"
    path.write_text(yaml.safe_dump(document))
    return WebConfigLoader(path, load_web_config(path))


def status_of(sock: socket.socket) -> bytes:
    """The status line of the next response on `sock`; b"" when it was closed instead."""
    sock.settimeout(10)
    data = b""
    while b"\r\n" not in data:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return b""
        if not chunk:
            return b""
        data += chunk
    return data.split(b"\r\n", 1)[0]


class TestPasswordGuessing:
    """bcrypt checks are capped and evictable: guessing neither locks out nor slows scrapers."""

    @pytest.fixture
    def gate(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
        """A slow verifier: wrong passwords block until the test ends; yields what was checked."""
        real, release = bcrypt.checkpw, threading.Event()
        checked: list[bytes] = []

        def slow(password: bytes, hashed: bytes) -> bool:
            checked.append(password)
            if password != b"s3cret":
                release.wait(timeout=30)
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", slow)
        yield checked
        release.set()

    def start(self, tmp_path: Path, **limits: Any) -> Any:
        loader = write_web(
            tmp_path,
            {
                "basic_auth_users": {"prom": bcrypt_hash("s3cret")},
                "http_server_config": {"headers": HEADERS},
            },
        )
        clock = Clock()
        return loader, serving(make_app(make_store(clock), clock), web=loader, **limits)

    def test_a_storm_beyond_the_connection_limit_leaves_scrapes_and_probes_served(
        self, tmp_path: Path, gate: list[bytes]
    ) -> None:
        """Three times the limit of guessing connections; a remembered scrape and /healthz pass."""
        loader, context = self.start(tmp_path, max_connections=8, max_pending_auth=2)
        with context as server, httpx.Client(auth=("prom", "s3cret"), timeout=10) as prometheus:
            url = f"http://127.0.0.1:{server.port}"
            assert prometheus.get(f"{url}/metrics").status_code == 200  # now remembered
            storm = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(24)]
            try:
                for sock in storm:
                    sock.sendall(GUESS * 3)
                # Every storm connection answered 429 or dropped, but the two waiting on bcrypt.
                wait_until(
                    lambda: len(select.select(storm, [], [], 0)[0]) >= len(storm) - 2,
                    "the storm answered",
                )
                assert server.pending_auth_checks == 2
                for _ in range(3):
                    started = time.monotonic()
                    assert prometheus.get(f"{url}/metrics").status_code == 200
                    assert time.monotonic() - started < 5
                probe = httpx.get(f"{url}/healthz", auth=("probe", "x"), timeout=10)
                assert probe.status_code == 200
            finally:
                for sock in storm:
                    sock.close()
        assert loader.refused_auth_checks > 0

    def test_new_credentials_wait_behind_at_most_the_cap(
        self, tmp_path: Path, gate: list[bytes]
    ) -> None:
        """Over the cap the answer is 429 at once, with Connection: close and the headers."""
        loader, context = self.start(tmp_path, max_pending_auth=2)
        with context as server:
            guessers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
            try:
                for sock in guessers:
                    sock.sendall(GUESS)
                wait_until(lambda: server.pending_auth_checks == 2, "two guesses queued")
                started = time.monotonic()
                response = httpx.get(
                    f"http://127.0.0.1:{server.port}/metrics", auth=("prom", "s3cret"), timeout=10
                )
                assert time.monotonic() - started < 5
            finally:
                for sock in guessers:
                    sock.close()
        assert response.status_code == 429
        assert response.headers["Connection"] == "close"
        assert response.headers["X-Frame-Options"] == "deny"
        assert b"s3cret" not in gate  # never queued
        assert loader.refused_auth_checks == 1

    def test_connections_waiting_for_bcrypt_make_room_at_the_limit(
        self, tmp_path: Path, gate: list[bytes]
    ) -> None:
        """At the connection limit, all waiting on bcrypt, the oldest waiter is dropped."""
        _, context = self.start(tmp_path, max_connections=3, max_pending_auth=8)
        with context as server, httpx.Client(auth=("prom", "s3cret"), timeout=10) as prometheus:
            url = f"http://127.0.0.1:{server.port}"
            assert prometheus.get(f"{url}/metrics").status_code == 200
            prometheus.close()  # its kept-alive connection would be the idle one evicted
            guessers = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(3)]
            try:
                for sock in guessers:
                    sock.sendall(GUESS)
                wait_until(lambda: server.pending_auth_checks == 3, "three guesses waiting")
                response = httpx.get(f"{url}/metrics", auth=("prom", "s3cret"), timeout=10)
                assert response.status_code == 200
                # The one that reached its check first (not always the first connected) made room.
                wait_until(lambda: bool(select.select(guessers, [], [], 0)[0]), "one dropped")
                (dropped,) = select.select(guessers, [], [], 0)[0]
                assert status_of(dropped) == b""
            finally:
                for sock in guessers:
                    sock.close()


class TestErrorsCarryTheHeaders:
    """Answers written without the request handler carry the configured headers too."""

    def test_a_head_too_large_gets_431_with_the_headers(self, secured: str) -> None:
        """Over 16 KiB of head."""
        response = httpx.get(f"{secured}/metrics", headers={"X-Big": "x" * 20000})
        assert response.status_code == 431
        assert response.headers["X-Frame-Options"] == "deny"

    def test_a_failing_route_gets_500_with_the_headers(
        self, secured: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A bug in a route is a 500, logged, with the headers."""

        def broken(self: object) -> bytes:
            raise RuntimeError("bug")

        monkeypatch.setattr("exporter.server.App.index", broken)
        with structlog.testing.capture_logs():
            response = httpx.get(f"{secured}/", auth=("prom", "s3cret"))
        assert response.status_code == 500
        assert response.headers["X-Content-Type-Options"] == "nosniff"


class TestTlsConnections:
    """Plain HTTP, silent and half-finished handshakes on the TLS port."""

    @pytest.fixture
    def tls_loader(self, ca: trustme.CA, tmp_path: Path) -> WebConfigLoader:
        write_pair(ca, tmp_path)
        return write_web(
            tmp_path,
            {
                "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
                "http_server_config": {"headers": HEADERS},
            },
        )

    def test_plain_http_gets_gos_400_and_a_close(self, tls_loader: WebConfigLoader) -> None:
        """As Go's exporter-toolkit: 400 Client sent an HTTP request to an HTTPS server."""
        clock = Clock()
        with serving(make_app(make_store(clock), clock), web=tls_loader) as server:
            response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
        assert response.status_code == 400
        assert response.text == "Client sent an HTTP request to an HTTPS server.\n"
        assert response.headers["Connection"] == "close"
        assert response.headers["X-Frame-Options"] == "deny"

    @pytest.mark.parametrize(
        "first", [b"", b"\x16\x03\x01\x00\x10partial"], ids=["silent", "half-hello"]
    )
    def test_an_unfinished_handshake_is_closed_at_the_deadline(
        self, tls_loader: WebConfigLoader, first: bytes
    ) -> None:
        """A client that never sends (or never finishes) its ClientHello is closed."""
        clock = Clock()
        app = make_app(make_store(clock), clock)
        with (
            serving(app, web=tls_loader, idle_timeout=0.3) as server,
            socket.create_connection(("127.0.0.1", server.port)) as sock,
        ):
            sock.sendall(first)
            started = time.monotonic()
            sock.settimeout(10)
            try:
                closed = sock.recv(100)
            except ConnectionResetError:
                closed = b""
            elapsed = time.monotonic() - started
        assert closed == b""
        assert 0.2 < elapsed < 10

    @pytest.mark.parametrize(
        "first", [b"", b"\x16\x03\x01\x00\x10partial"], ids=["silent", "half-hello"]
    )
    def test_unfinished_handshakes_make_room_at_the_limit(
        self, ca: trustme.CA, tls_loader: WebConfigLoader, first: bytes
    ) -> None:
        """At the connection limit the longest-silent handshake is dropped for a scraper."""
        clock = Clock()
        app = make_app(make_store(clock), clock)
        with serving(app, web=tls_loader, max_connections=2) as server:
            silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
            try:
                for sock in silent:
                    sock.sendall(first)
                context = ssl.create_default_context()
                ca.configure_trust(context)
                response = httpx.get(
                    f"https://127.0.0.1:{server.port}/healthz", verify=context, timeout=10
                )
                assert response.status_code == 200
                wait_until(lambda: bool(select.select(silent, [], [], 0)[0]), "one dropped")
                (dropped,) = select.select(silent, [], [], 0)[0]
                assert status_of(dropped) == b""
            finally:
                for sock in silent:
                    sock.close()


class TestExample:
    """The example shipped in deploy/ is a valid web config."""

    def test_the_example_parses(self) -> None:
        """deploy/web-config.example.yml has TLS, a user and headers, and no problem."""
        path = Path(__file__).resolve().parent.parent / "deploy" / "web-config.example.yml"
        config = read_web_config(path)
        assert config.tls is not None
        assert config.tls.cert_file == path.parent / "tls" / "tls.crt"
        assert set(config.users) == {"prometheus"}
        assert bcrypt.checkpw(b"change-me", config.users["prometheus"])
        assert ("X-Content-Type-Options", "nosniff") in config.headers
