"""Reads the Prefect server's version at start and then rarely, one request an hour at most."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from exporter.clock import Deadline

# A server's version changes only when it is upgraded; one request an hour is noise in any
# budget (the smallest Cloud plan allows 625 a minute) and notices an upgrade soon enough.
SERVER_INFO_REFRESH_SECONDS = 3600.0


class VersionApi(Protocol):
    """The read the server info reader needs (prefect_api.PrefectApi has it)."""

    async def server_version(self, deadline: Deadline) -> str: ...


class ServerInfoReader:
    """The server's version as its API reports it (`GET /admin/version`), kept between reads.

    `read` asks the API on the first call and again once `refresh_seconds` (monotonic) have
    passed since the last answer; otherwise it returns the version it has, at no request.
    A failed read raises PrefectApiError (ApiStatusError 404 where the route is not offered,
    which the poller turns into a degraded feature) and keeps no stale version: the next call
    asks again.
    """

    def __init__(
        self,
        api: VersionApi,
        monotonic: Callable[[], float],
        refresh_seconds: float = SERVER_INFO_REFRESH_SECONDS,
    ) -> None:
        self._api = api
        self._monotonic = monotonic
        self._refresh_seconds = refresh_seconds
        self._version: str | None = None
        self._read_at: float | None = None  # monotonic seconds of the last answer

    @property
    def version(self) -> str | None:
        """The last version read, None before the first answer or after a failed read."""
        return self._version

    def due(self) -> bool:
        """Whether the next `read` would send a request."""
        return self._read_at is None or self._monotonic() - self._read_at >= self._refresh_seconds

    async def read(self, deadline: Deadline, refresh: bool = True) -> str | None:
        """The server's version, read from the API when due and `refresh` allows a request.

        With `refresh` False (a poll the budget shortened) no request is sent: the version
        already known is returned, or None.
        """
        if not (refresh and self.due()):
            return self._version
        self._version, self._read_at = None, None
        version = await self._api.server_version(deadline)
        self._version, self._read_at = version, self._monotonic()
        return version
