"""Starts a real Prefect server and process workers, and seeds them through the REST API.

The server runs from its own virtual environment (full `prefect`), apart from the exporter's
(`prefect-client` only), as a separate deployment would in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
SERVER_VENV = Path(os.environ.get("PREFECT_SERVER_VENV", ROOT / ".venv-prefect-server"))
FLOWS_DIR = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessExited(RuntimeError):
    """The process a wait was for has exited: waiting longer cannot help."""


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.25
) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`.

    Errors of `condition` count as "not yet" (the thing may be starting up), except
    `ProcessExited`, which ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except ProcessExited:
            raise
        except Exception as exc:  # the condition may fail while the thing starts up
            last_error = exc
        else:
            if result:
                return result
        time.sleep(interval)
    raise TimeoutError(
        f"timed out after {timeout:g}s waiting for {what} (last error: {last_error})"
    )


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


class PrefectServer:
    """`prefect server start` on a free port with a throw-away PREFECT_HOME (SQLite).

    `venv` is the virtual environment holding the server (default SERVER_VENV; the
    compatibility tests pass older versions' environments).
    """

    def __init__(
        self,
        home: Path,
        port: int | None = None,
        log_path: Path | None = None,
        extra_env: Mapping[str, str] | None = None,
        venv: Path | None = None,
    ) -> None:
        self.home = home
        self.venv = venv or SERVER_VENV
        self.port = port or free_port()
        self.log_path = log_path or home / "server.log"
        self.extra_env = dict(extra_env or {})
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        return _clean_env({"PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url})

    def start(self, timeout: float = 180) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = _clean_env({"PREFECT_HOME": str(self.home), **self.extra_env})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.venv / "bin" / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--no-ui",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            # A healthy answer counts only while our own process is alive (the port could
            # belong to another server otherwise).
            assert self.process is not None
            if self.process.poll() is not None:
                raise ProcessExited(f"prefect server exited; see {self.log_path}")
            # With an auth string set, /health answers 401: the server is up all the same.
            return httpx.get(f"{self.api_url}/health", timeout=2).status_code in (200, 401)

        wait_for(healthy, timeout, f"the Prefect server on port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None


class Worker:
    """A `prefect worker start --type process` subprocess."""

    def __init__(
        self,
        server: PrefectServer,
        pool: str,
        name: str,
        queues: Iterable[str] = (),
        heartbeat_seconds: int = 30,
        extra_env: Mapping[str, str] | None = None,
        api_url: str | None = None,
    ) -> None:
        self.server, self.pool, self.name = server, pool, name
        self.api_url = api_url or server.api_url
        self.queues = list(queues)
        self.heartbeat_seconds = heartbeat_seconds
        self.extra_env = dict(extra_env or {})
        self.log_path = server.home / f"worker-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            str(self.server.venv / "bin" / "prefect"),
            "worker",
            "start",
            "--pool",
            self.pool,
            "--type",
            "process",
            "--name",
            self.name,
        ]
        for queue in self.queues:
            command += ["--work-queue", queue]
        env = self.server.env()
        env.update(
            {
                "PREFECT_API_URL": self.api_url,
                "PREFECT_WORKER_HEARTBEAT_SECONDS": str(self.heartbeat_seconds),
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                **self.extra_env,
            }
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=FLOWS_DIR,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL the worker and its flow-run children: no goodbye, like a crashed node."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # Prefect's worker escalates on the second signal; give it one graceful chance.
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class PrefectAdmin:
    """Seeds pools, queues, deployments and runs through the REST API (test and demo only)."""

    def __init__(self, api_url: str) -> None:
        self.client = httpx.Client(base_url=api_url + "/", timeout=30)

    def close(self) -> None:
        self.client.close()

    def request(self, method: str, path: str, body: Any = None, retries: int = 20) -> Any:
        # SQLite answers 503 while locked; seeding retries where the exporter never would.
        for attempt in range(retries):
            response = self.client.request(method, path, json=body)
            if response.status_code != 503:
                response.raise_for_status()
                return response.json() if response.content else None
            time.sleep(min(2.0, 0.1 * (attempt + 1)))
        response.raise_for_status()
        return None

    def create_pool(
        self, name: str, concurrency_limit: int | None = None, paused: bool = False
    ) -> dict[str, Any]:
        pool: dict[str, Any] = self.request(
            "POST",
            "work_pools/",
            {
                "name": name,
                "type": "process",
                "concurrency_limit": concurrency_limit,
                "is_paused": paused,
            },
        )
        return pool

    def create_queue(
        self,
        pool: str,
        name: str,
        priority: int | None = None,
        concurrency_limit: int | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "concurrency_limit": concurrency_limit}
        if priority is not None:
            body["priority"] = priority
        queue: dict[str, Any] = self.request("POST", f"work_pools/{pool}/queues", body)
        return queue

    def create_deployment(
        self,
        name: str,
        pool: str,
        queue: str,
        flow: str = "quick",
        concurrency_limit: int | None = None,
    ) -> str:
        flow_id = self.request("POST", "flows/", {"name": flow})["id"]
        deployment = self.request(
            "POST",
            "deployments/",
            {
                "name": name,
                "flow_id": flow_id,
                "work_pool_name": pool,
                "work_queue_name": queue,
                "entrypoint": f"flows.py:{flow}",
                "path": str(FLOWS_DIR),
                "concurrency_limit": concurrency_limit,
            },
        )
        return str(deployment["id"])

    def create_runs(
        self,
        deployment_id: str,
        count: int,
        scheduled: datetime | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> list[str]:
        """Create `count` runs in bulk, re-submitting the ones SQLite refused."""
        state: dict[str, Any] = {"type": "SCHEDULED"}
        if scheduled is not None:
            state["state_details"] = {"scheduled_time": iso(scheduled)}
        created: list[str] = []
        while len(created) < count:
            batch = min(100, count - len(created))
            answer = self.request(
                "POST",
                f"deployments/{deployment_id}/create_flow_run/bulk",
                [{"state": state, "parameters": dict(parameters or {})} for _ in range(batch)],
            )
            created += [r["flow_run_id"] for r in answer["results"] if r["status"] == "CREATED"]
        return created

    def create_pending_run(self, pool: str, queue: str, flow: str = "pending-only") -> str:
        """A run that sits in Pending: nothing will ever start it."""
        flow_id = self.request("POST", "flows/", {"name": flow})["id"]
        run = self.request(
            "POST",
            "flow_runs/",
            {
                "flow_id": flow_id,
                "work_pool_name": pool,
                "work_queue_name": queue,
                "state": {"type": "PENDING"},
            },
        )
        return str(run["id"])

    def force_state(self, run_id: str, state_type: str, name: str | None = None) -> None:
        """Put a run into a state directly (orchestration rules bypassed), for test fixtures."""
        state: dict[str, Any] = {"type": state_type}
        if name:
            state["name"] = name
        self.request("POST", f"flow_runs/{run_id}/set_state", {"state": state, "force": True})

    def create_global_limit(self, name: str, limit: int) -> None:
        self.request("POST", "v2/concurrency_limits/", {"name": name, "limit": limit})

    def create_tag_limit(self, tag: str, limit: int) -> None:
        self.request("POST", "concurrency_limits/", {"tag": tag, "concurrency_limit": limit})

    def pause_pool(self, name: str, paused: bool = True) -> None:
        self.request("PATCH", f"work_pools/{name}", {"is_paused": paused})

    def workers(self, pool: str) -> list[dict[str, Any]]:
        workers: list[dict[str, Any]] = self.request(
            "POST", f"work_pools/{pool}/workers/filter", {}
        )
        return workers

    def queues(self) -> list[dict[str, Any]]:
        queues: list[dict[str, Any]] = self.request("POST", "work_queues/filter", {})
        return queues

    def pools(self) -> list[dict[str, Any]]:
        pools: list[dict[str, Any]] = self.request("POST", "work_pools/filter", {})
        return pools

    def runs(self, body: Mapping[str, Any]) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.request("POST", "flow_runs/filter", dict(body))
        return runs

    def count(self, body: Mapping[str, Any]) -> int:
        return int(self.request("POST", "flow_runs/count", dict(body)))


def flow_run_pids(flow_run_id: str) -> list[int]:
    """Processes running a flow run, found by the id Prefect puts in their environment."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def past(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


class ExporterProcess:
    """The real `prefect-exporter` command, scraped over HTTP or, secured, over HTTPS.

    For an exporter started with `--web.config.file` (see README, "Securing /metrics"):
    `scheme="https"`; `verify`, the client's `ssl.SSLContext` trusting the exporter's CA (with
    `load_cert_chain` of a client certificate when the web config requires one), or False to
    skip verification; `auth`, the (user, password) sent with every scrape. /healthz is
    reached without `auth`, as probes do.
    """

    def __init__(
        self,
        api_url: str,
        *args: str,
        log_path: Path,
        venv: Path = ROOT / ".venv",
        port: int | None = None,
        scheme: str = "http",
        verify: ssl.SSLContext | bool = True,
        auth: tuple[str, str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.api_url = api_url
        self.args = list(args)
        self.log_path = log_path
        self.venv = venv
        self.scheme = scheme
        self.verify = verify
        self.auth = auth
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def get(self, path: str, timeout: float = 5) -> httpx.Response:
        """GET `path` (such as "/metrics") with the exporter's scheme, `verify` and `auth`."""
        return httpx.get(f"{self.url}{path}", timeout=timeout, verify=self.verify, auth=self.auth)

    def start(self, timeout: float = 30) -> None:
        env = _clean_env({"PREFECT_API_URL": self.api_url})
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.venv / "bin" / "prefect-exporter"),
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    *self.args,
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def serving() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ProcessExited(f"exporter exited; see {self.log_path}")
            return (
                httpx.get(f"{self.url}/healthz", timeout=2, verify=self.verify).status_code == 200
            )

        wait_for(serving, timeout, "the exporter to serve /healthz")

    def scrape_text(self) -> str:
        return self.get("/metrics").text

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of one scrape, keyed by name and label set."""
        from prometheus_client.parser import text_string_to_metric_families

        result = {}
        for family in text_string_to_metric_families(self.scrape_text()):
            for sample in family.samples:
                result[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return result

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples().get((name, frozenset(labels.items())))

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class Prometheus:
    """A real Prometheus (Debian's `prometheus`) on a free loopback port, for tests and pictures.

    `config` is the configuration file to load; the time series database goes to `data`.
    """

    def __init__(self, config: Path, data: Path) -> None:
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api/v1"
        self._args = [
            shutil.which("prometheus") or "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            self._args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The result vector of an instant query (raises httpx errors while it starts)."""
        answer = httpx.get(f"{self.api}/query", params={"query": expr}, timeout=5).json()
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
