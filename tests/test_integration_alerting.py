"""End to end, the whole alert chain: Prefect -> exporter -> Prometheus -> Alertmanager -> webhook.

A real Prefect server and process worker on a pool with a concurrency limit and a burst of runs,
the real exporter behind `--web.config.file` (HTTPS with a test CA, basic auth), a real
Prometheus scraping it with `tls_config` and `basic_auth` and loading the shipped rules (generated
by alerts/generate.py with every `for:` shortened, expressions unchanged), and a real Alertmanager
with deploy/alertmanager's routing, its receivers pointed at a webhook server in this test.
Killing the worker must page through the pager route with the runbook and dashboard links;
starting it again must resolve the page.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import bcrypt
import httpx
import pytest
import trustme
import yaml

from demo.stack import ExporterProcess, PrefectAdmin, PrefectServer, Worker, free_port, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
ALERT = "PrefectNoOnlineWorkers"
POOL = "etl"
HEARTBEAT = 5  # seconds: the killed worker is offline after three of them plus a poll
FOR = "2s"  # every alert's `for:`, so the test waits seconds, not the shipped minutes
USER, PASSWORD = "prometheus", "scrape me"


@dataclass(frozen=True)
class Tls:
    """The exporter's web config (HTTPS, one basic-auth user) and what a scraper needs."""

    web_config: Path
    ca_file: Path
    client: ssl.SSLContext


def secure(directory: Path) -> Tls:
    """A fresh CA, a certificate for 127.0.0.1 and a web config using both (exporter-toolkit's
    format, as deploy/web-config.example.yml)."""
    directory.mkdir()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(directory / "server.crt"))
    cert.private_key_pem.write_to_path(str(directory / "server.key"))
    ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    web_config = directory / "web.yml"
    # Cost 4, bcrypt's lowest: the exporter checks it on every scrape of a loaded machine.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
    web_config.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
                "basic_auth_users": {USER: hashed},
            }
        )
    )
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return Tls(web_config, directory / "ca.crt", client)


@dataclass
class Webhook:
    """A local HTTP server that records every Alertmanager notification (JSON bodies)."""

    server: ThreadingHTTPServer
    received: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def notifications(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    holder: list[Webhook] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with holder[0].lock:
                holder[0].received.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep the test output to the assertions

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Webhook(server))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def alertmanager_config(webhook_url: str) -> dict[str, Any]:
    """deploy/alertmanager's routing with every receiver sent to the webhook and short timers.

    The routes, matchers, grouping and inhibitions are the shipped ones; only the endpoints and
    the waits change (30 s / 5 min between notifications would not fit in a test).
    """
    config: dict[str, Any] = yaml.safe_load(
        (ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text()
    )
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url

    def shorten(route: dict[str, Any]) -> None:
        route.update({"group_wait": "1s", "group_interval": "2s", "repeat_interval": "1h"})
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return config


def start(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def binary(*names: str) -> str:
    for name in names:
        if path := shutil.which(name):
            return path
    pytest.fail(f"none of {names} is installed: install Debian's prometheus and alertmanager")


class TestAlertChain:
    """A killed worker pages through Alertmanager; a restarted one resolves the page."""

    def test_no_online_worker_pages_and_resolves(
        self, prefect_server: PrefectServer, webhook: Webhook, tmp_path: Path
    ) -> None:
        """PrefectNoOnlineWorkers reaches Alertmanager and the pager webhook, then resolves."""
        admin = PrefectAdmin(prefect_server.api_url)
        processes: list[subprocess.Popen[bytes]] = []
        worker = Worker(prefect_server, POOL, "etl-worker", heartbeat_seconds=HEARTBEAT)
        tls = secure(tmp_path / "tls")
        exporter = ExporterProcess(
            prefect_server.api_url,
            "--poll.interval=1s",
            "--prefect.requests-per-minute=6000",
            f"--web.config.file={tls.web_config}",
            log_path=tmp_path / "exporter.log",
            scheme="https",
            verify=tls.client,
            auth=(USER, PASSWORD),
        )
        try:
            admin.create_pool(POOL, concurrency_limit=2)
            deployment = admin.create_deployment("etl-dep", POOL, "default")
            worker.start()
            exporter.start()
            wait_for(
                lambda: exporter.value("prefect_work_pool_online_workers", work_pool=POOL) == 1,
                90,
                "the worker to be online",
            )
            # A burst behind the pool's limit of 2: a backlog stays while the worker lives.
            admin.create_runs(deployment, 20, parameters={"seconds": 30})

            rules = tmp_path / "rules.yml"
            generator = str(ROOT / "alerts" / "generate.py")
            generated = subprocess.run(
                [sys.executable, generator, "--for", FOR, "--out", str(rules)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert generated.returncode == 0, generated.stderr

            am_port, prom_port = free_port(), free_port()
            am_config = tmp_path / "alertmanager.yml"
            am_config.write_text(yaml.safe_dump(alertmanager_config(webhook.url)))
            processes.append(
                start(
                    [
                        binary("prometheus-alertmanager", "alertmanager"),
                        f"--config.file={am_config}",
                        f"--storage.path={tmp_path / 'am-data'}",
                        f"--web.listen-address=127.0.0.1:{am_port}",
                        "--cluster.listen-address=",  # one instance, no gossip port
                    ],
                    tmp_path / "alertmanager.log",
                )
            )
            am = f"http://127.0.0.1:{am_port}/api/v2"
            wait_for(lambda: httpx.get(f"{am}/status", timeout=2).is_success, 60, "Alertmanager")

            prom_config = tmp_path / "prometheus.yml"
            prom_config.write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(rules)],
                        "alerting": {
                            "alertmanagers": [
                                {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}
                            ]
                        },
                        "scrape_configs": [
                            {
                                "job_name": "prefect-exporter",
                                "scheme": "https",
                                "tls_config": {"ca_file": str(tls.ca_file)},
                                "basic_auth": {"username": USER, "password": PASSWORD},
                                "static_configs": [
                                    {"targets": [exporter.url.removeprefix("https://")]}
                                ],
                            }
                        ],
                    }
                )
            )
            processes.append(
                start(
                    [
                        binary("prometheus"),
                        f"--config.file={prom_config}",
                        f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                        # A resolved alert is sent at once; a firing one again after this.
                        "--rules.alert.resend-delay=1s",
                    ],
                    tmp_path / "prometheus.log",
                )
            )
            prom = f"http://127.0.0.1:{prom_port}/api/v1"

            def query(expr: str) -> list[dict[str, Any]]:
                answer = httpx.get(f"{prom}/query", params={"query": expr}, timeout=5).json()
                result: list[dict[str, Any]] = answer["data"]["result"]
                return result

            def our_alerts() -> list[dict[str, Any]]:
                answer: list[dict[str, Any]] = httpx.get(f"{am}/alerts", timeout=5).json()
                return [
                    a
                    for a in answer
                    if a["labels"].get("alertname") == ALERT and a["status"]["state"] == "active"
                ]

            # The scrape needs what Prometheus was given: without the password it is refused.
            refused = httpx.get(f"{exporter.url}/metrics", verify=tls.client, timeout=5)
            assert refused.status_code == 401
            # Healthy first: the rules see the backlog and the online worker, and stay quiet.
            wait_for(
                lambda: query(f'prefect:work_queue_backlog_runs:max{{work_pool="{POOL}"}} > 0'),
                90,
                "Prometheus to see the backlog",
            )
            assert query(f'prefect_work_pool_online_workers{{work_pool="{POOL}"}} == 1')
            assert query('up{job="prefect-exporter"} == 1')  # over HTTPS, with basic auth
            assert not query(f'ALERTS{{alertname="{ALERT}"}}')
            assert not our_alerts()

            worker.kill()
            alert = wait_for(our_alerts, 120, f"{ALERT} to reach Alertmanager")[0]
            assert alert["labels"] == {
                "alertname": ALERT,
                "severity": "critical",
                "job": "prefect-exporter",
                "work_pool": POOL,
            }
            runbook = alert["annotations"]["runbook_url"]
            assert runbook.endswith(f"/docs/runbooks/{ALERT}.md")
            assert (ROOT / "docs" / "runbooks" / f"{ALERT}.md").exists()
            assert alert["annotations"]["dashboard_url"] == (
                "https://grafana.example.com/d/prefect-queues"
                f"?var-job=prefect-exporter&var-work_pool={POOL}"
            )
            assert alert["annotations"]["diagnose"] == (
                f"prefect-exporter diagnose --work-pool '{POOL}'"
            )
            assert [r["name"] for r in alert["receivers"]] == ["prefect-pager"]

            def delivered(status: str) -> dict[str, Any] | None:
                for note in webhook.notifications():
                    for a in note["alerts"]:
                        if a["labels"]["alertname"] == ALERT and a["status"] == status:
                            return note
                return None

            page = wait_for(lambda: delivered("firing"), 60, "the page at the webhook")
            assert page["receiver"] == "prefect-pager"
            assert page["groupLabels"] == {
                "alertname": ALERT,
                "job": "prefect-exporter",
                "work_pool": POOL,
            }

            worker.start()
            wait_for(lambda: not our_alerts(), 120, f"{ALERT} to leave Alertmanager")
            resolved = wait_for(
                lambda: delivered("resolved"), 60, "the resolved notification at the webhook"
            )
            assert resolved["receiver"] == "prefect-pager"
        finally:
            for process in reversed(processes):
                stop(process)
            exporter.stop()
            worker.stop()
            admin.close()
