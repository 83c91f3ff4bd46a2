"""The real exporter process behind `--web.config.file`: HTTPS, basic auth, client certificates,
certificate rotation and reloads, scraped as Prometheus would.

No Prefect server is needed: the exporter runs as a log-reading sidecar (`--no-prefect.enabled`),
which serves the same HTTP server; its own series (the web config's reload metrics among them)
are what is scraped.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import trustme
import yaml

from demo.stack import ROOT, ExporterProcess, wait_for

pytestmark = pytest.mark.integration

CONSOLE_SCRIPT = ROOT / ".venv" / "bin" / "prefect-exporter"
USER, PASSWORD = "prometheus", "correct horse"
# Generous: an exporter under a loaded CI machine starts in seconds, reloads within one.
STARTUP = 60.0
RELOAD = 30.0
RELOADS = "prefect_exporter_web_config_reloads_total"


def client_context(ca: trustme.CA, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    """What a scraper uses: trust in `ca`, and a client certificate when given."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    return context


def write_cert(cert: trustme.LeafCert, directory: Path) -> None:
    """Write a certificate and its key over server.crt and server.key, as a rotation does."""
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    cert.private_key_pem.write_to_path(str(directory / "server.key"))


def write_config(directory: Path, document: dict[str, Any]) -> Path:
    path = directory / "web.yml"
    path.write_text(yaml.safe_dump(document))
    return path


def users(password: str = PASSWORD) -> dict[str, str]:
    # Cost 4, bcrypt's lowest, keeps the first check of each test fast.
    return {USER: bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()}


TLS = {"cert_file": "server.crt", "key_file": "server.key"}


def launch(directory: Path, **client: Any) -> ExporterProcess:
    """An exporter in sidecar mode with `directory/web.yml`, started; `client` as for
    ExporterProcess (scheme, verify, auth)."""
    log = directory / "worker.log"
    log.touch()
    exporter = ExporterProcess(
        "http://127.0.0.1:9/api",
        "--no-prefect.enabled",
        f"--worker-log=w={log}",
        f"--web.config.file={directory / 'web.yml'}",
        "--log.format=json",
        log_path=directory / "exporter.log",
        **client,
    )
    try:
        exporter.start(timeout=STARTUP)
    except BaseException:
        exporter.stop()
        raise
    return exporter


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ExporterProcess]]:
    """Starts exporters with `tmp_path/web.yml` (see `launch`); stops them after the test."""
    started: list[ExporterProcess] = []

    def start_exporter(**client: Any) -> ExporterProcess:
        started.append(launch(tmp_path, **client))
        return started[-1]

    yield start_exporter
    for exporter in started:
        assert exporter.stop() == 0


def reloads(exporter: ExporterProcess, result: str) -> float | None:
    return exporter.value(RELOADS, result=result)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExporterProcess]:
    """One exporter over HTTPS (a fresh CA) with user `prometheus`, shared by a class's tests."""
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    write_cert(ca.issue_cert("127.0.0.1"), directory)
    write_config(directory, {"tls_server_config": TLS, "basic_auth_users": users()})
    exporter = launch(directory, scheme="https", verify=client_context(ca), auth=(USER, PASSWORD))
    yield exporter
    assert exporter.stop() == 0


class TestTlsAndBasicAuth:
    """HTTPS with a CA the scraper trusts, and a password on /metrics."""

    def test_a_scrape_with_the_ca_and_the_password_works(self, secured: ExporterProcess) -> None:
        """Prometheus with the CA and the credentials gets the metrics."""
        scrape = secured.get("/metrics")
        assert scrape.status_code == 200
        assert "prefect_exporter_web_config_last_reload_successful 1.0" in scrape.text

    def test_one_kept_alive_connection_serves_scrape_after_scrape(
        self, secured: ExporterProcess
    ) -> None:
        """As Prometheus does: one TLS handshake, then every scrape on the same connection."""
        with httpx.Client(verify=secured.verify, auth=secured.auth, timeout=5) as client:
            for _ in range(3):
                assert client.get(f"{secured.url}/metrics").status_code == 200

    def test_plain_http_to_the_tls_port_gets_400(self, secured: ExporterProcess) -> None:
        """An http:// scrape gets Go's 400 and no metrics, so the mistake is plain to see."""
        response = httpx.get(f"http://127.0.0.1:{secured.port}/metrics", timeout=5)
        assert response.status_code == 400
        assert response.text == "Client sent an HTTP request to an HTTPS server.\n"

    @pytest.mark.parametrize("value", ["Basic \u00e9t\u00e9", "Basic \xff\xfe", "\xff"])
    def test_a_non_ascii_authorization_gets_401_not_500(
        self, secured: ExporterProcess, value: str
    ) -> None:
        """Bytes beyond ASCII in the header are malformed credentials, not a server error."""
        context = secured.verify
        assert isinstance(context, ssl.SSLContext)
        with (
            socket.create_connection(("127.0.0.1", secured.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            head = "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: " + value + "\r\n\r\n"
            sock.sendall(head.encode("latin-1"))
            assert sock.recv(12) == b"HTTP/1.1 401"
        assert "http_request_failed" not in secured.log_path.read_text()

    def test_a_client_that_does_not_trust_the_ca_refuses_the_server(
        self, secured: ExporterProcess
    ) -> None:
        """The system's trust store does not know the exporter's CA."""
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{secured.url}/metrics", timeout=5)

    def test_a_wrong_or_missing_password_gets_401(self, secured: ExporterProcess) -> None:
        """401 with a Basic challenge, over the same TLS."""
        for auth in ((USER, "wrong"), ("someone", PASSWORD), None):
            response = httpx.get(
                f"{secured.url}/metrics", verify=secured.verify, auth=auth, timeout=5
            )
            assert response.status_code == 401, auth
            assert response.headers["WWW-Authenticate"].startswith("Basic")

    def test_healthz_answers_probes_over_https_without_a_password(
        self, secured: ExporterProcess
    ) -> None:
        """A liveness probe needs TLS but no credentials."""
        health = httpx.get(f"{secured.url}/healthz", verify=secured.verify, timeout=5)
        assert health.status_code == 200


class TestClientCertificates:
    """RequireAndVerifyClientCert refuses a scraper without a certificate from the CA."""

    def test_a_client_without_a_certificate_is_refused(
        self, tmp_path: Path, start: Callable[..., ExporterProcess]
    ) -> None:
        """The handshake fails without a client certificate; one from the CA scrapes."""
        ca = trustme.CA()
        write_cert(ca.issue_cert("127.0.0.1"), tmp_path)
        ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.crt"))
        write_config(
            tmp_path,
            {
                "tls_server_config": {
                    **TLS,
                    "client_ca_file": "clients-ca.crt",
                    "client_auth_type": "RequireAndVerifyClientCert",
                }
            },
        )
        scraper = ca.issue_cert("prometheus@example.com")
        exporter = start(scheme="https", verify=client_context(ca, scraper))
        assert exporter.get("/metrics").status_code == 200
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{exporter.url}/metrics", verify=client_context(ca), timeout=5)
        stranger = trustme.CA().issue_cert("mallory@example.com")
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{exporter.url}/metrics", verify=client_context(ca, stranger), timeout=5)


class TestRotation:
    """Certificates written over the old files are served without a restart."""

    def test_a_rotated_certificate_is_served(
        self, tmp_path: Path, start: Callable[..., ExporterProcess]
    ) -> None:
        """After a certificate from a new CA replaces the old one, clients trusting only the new
        CA can scrape, and the reload is counted."""
        old_ca, new_ca = trustme.CA(), trustme.CA()
        write_cert(old_ca.issue_cert("127.0.0.1"), tmp_path)
        write_config(tmp_path, {"tls_server_config": TLS})
        exporter = start(scheme="https", verify=client_context(old_ca))
        write_cert(new_ca.issue_cert("127.0.0.1"), tmp_path)
        new_client = client_context(new_ca)
        wait_for(
            lambda: httpx.get(f"{exporter.url}/healthz", verify=new_client, timeout=5).is_success,
            RELOAD,
            "the new certificate to be served",
        )
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{exporter.url}/healthz", verify=client_context(old_ca), timeout=5)
        exporter.verify = new_client
        # Written file by file, a rotation may be seen half done (a failed reload) first.
        assert (reloads(exporter, "success") or 0) >= 1

    def test_an_expired_certificate_replaced_by_a_fresh_one(
        self, tmp_path: Path, start: Callable[..., ExporterProcess]
    ) -> None:
        """An exporter started with an expired certificate is refused by clients until a fresh
        one is written; then it is served without a restart."""
        ca = trustme.CA()
        now = datetime.now(UTC)
        expired = ca.issue_cert(
            "127.0.0.1", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        )
        write_cert(expired, tmp_path)
        write_config(tmp_path, {"tls_server_config": TLS})
        # Served, but only a client that checks nothing accepts it.
        exporter = start(scheme="https", verify=False)
        checking = client_context(ca)
        with pytest.raises(httpx.ConnectError, match="certificate has expired"):
            httpx.get(f"{exporter.url}/healthz", verify=checking, timeout=5)
        write_cert(ca.issue_cert("127.0.0.1"), tmp_path)
        wait_for(
            lambda: httpx.get(f"{exporter.url}/healthz", verify=checking, timeout=5).is_success,
            RELOAD,
            "the fresh certificate",
        )


class TestReload:
    """The web config file itself is re-read; a broken one leaves the last good in force."""

    def test_a_broken_config_keeps_the_old_one_and_a_fix_is_picked_up(
        self, tmp_path: Path, start: Callable[..., ExporterProcess]
    ) -> None:
        """A bad edit is counted, logged and ignored; the next good edit changes the password."""
        path = write_config(tmp_path, {"basic_auth_users": users()})
        exporter = start(auth=(USER, PASSWORD))
        path.write_text("basic_auth_users:\n  prometheus: not-a-hash\n")
        wait_for(lambda: (reloads(exporter, "failure") or 0) >= 1, RELOAD, "the failed reload")
        assert exporter.value("prefect_exporter_web_config_last_reload_successful") == 0
        assert "web_config_reload_failed" in exporter.log_path.read_text()
        write_config(tmp_path, {"basic_auth_users": users("new password")})
        wait_for(lambda: exporter.get("/metrics").status_code == 401, RELOAD, "the new password")
        exporter.auth = (USER, "new password")
        # The exporter's own series may be a rendering up to 1 s old (docs/metrics.md).
        wait_for(
            lambda: exporter.value("prefect_exporter_web_config_last_reload_successful") == 1,
            5.0,
            "the reload counted as successful",
        )


class TestInvalidConfig:
    """A web config that cannot be used stops the start with every problem listed."""

    def test_exit_2_listing_every_problem(self, tmp_path: Path) -> None:
        """Each bad key is reported with the flag, the file and the key, beside other problems."""
        path = write_config(
            tmp_path,
            {
                "tls_server_config": {**TLS, "min_version": "TLS10"},
                "http_server_config": {"headers": {"Content-Type": "text/html"}},
            },
        )
        result = subprocess.run(
            [
                str(CONSOLE_SCRIPT),
                "--no-prefect.enabled",
                f"--worker-log=w={tmp_path}",
                f"--web.config.file={path}",
                "--log.format=console",
            ],
            capture_output=True,
            text=True,
            timeout=STARTUP,
            check=False,
        )
        assert result.returncode == 2, result.stderr
        assert f"--web.config.file {path}: tls_server_config.min_version" in result.stderr
        assert "http_server_config.headers.Content-Type" in result.stderr
        assert "--worker-log w=" in result.stderr
        assert "Traceback" not in result.stderr
