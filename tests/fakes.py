"""In-process fakes of the Prefect API for unit tests (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from exporter.budget import RequestBudget
from exporter.prefect_api import PrefectApi
from exporter.prefect_http import MAX_RESPONSE_BYTES, ApiMetrics, Connection, PrefectHttp

API_URL = "http://prefect.test/api"


@dataclass
class FakePrefect:
    """Routes requests to handlers by (method, path below /api); records every request."""

    routes: dict[tuple[str, str], Callable[[httpx.Request], httpx.Response]] = field(
        default_factory=dict
    )
    requests: list[httpx.Request] = field(default_factory=list)

    def on(
        self,
        method: str,
        path: str,
        answer: Any,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            body = answer(request) if callable(answer) else answer
            if isinstance(body, httpx.Response):
                return body
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            return httpx.Response(status, content=content, headers=headers)

        self.routes[(method, path)] = handler

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix("/api/")
        handler = self.routes.get((request.method, path))
        if handler is None:
            return httpx.Response(404, json={"detail": "Not Found"})
        return handler(request)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [
            json.loads(r.content)
            for r in self.requests
            if r.url.path.removeprefix("/api/") == path and r.content
        ]


def make_api(
    fake: FakePrefect,
    registry: CollectorRegistry | None = None,
    connection: Connection | None = None,
    per_minute: int = 10_000,
    max_response_bytes: int = MAX_RESPONSE_BYTES,
) -> PrefectApi:
    return PrefectApi(
        PrefectHttp(
            connection or Connection(API_URL),
            ApiMetrics(registry or CollectorRegistry()),
            RequestBudget(per_minute),
            transport=httpx.MockTransport(fake),
            max_response_bytes=max_response_bytes,
        )
    )


def pool_json(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"id-{name}",
        "name": name,
        "type": "process",
        "status": "READY",
        "is_paused": False,
        "concurrency_limit": None,
        **extra,
    }


def queue_json(qid: str, name: str, pool: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": qid,
        "name": name,
        "work_pool_name": pool,
        "status": "READY",
        "is_paused": False,
        "priority": 1,
        "concurrency_limit": None,
        "last_polled": "2026-11-29T10:00:00Z",
        **extra,
    }


def worker_json(
    name: str, heartbeat: str = "2026-11-29T10:00:00Z", interval: int | None = 30
) -> dict[str, Any]:
    return {
        "name": name,
        "last_heartbeat_time": heartbeat,
        "heartbeat_interval_seconds": interval,
        "status": "ONLINE",
    }
