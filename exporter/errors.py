"""The expected failures of the Prefect API, as a closed set of reasons used as a metric label.

    PrefectApiError            reason
    ├── ApiTimeout             "timeout"
    ├── ApiConnectionError     "connection"
    ├── ApiStatusError         "http_status" (carries the status and any Retry-After)
    ├── MalformedResponse      "malformed_response" (undecodable, oversized or impossible answers)
    └── ApiBudgetExhausted     "budget"

    ObjectGone                 not a failure: one object vanished between two requests of a poll

All of them mean "the poll fails (or leaves one object out), the exporter keeps serving".
"""

from __future__ import annotations

_STATUS_HINTS = {
    401: " (unauthorized: check PREFECT_API_KEY or PREFECT_API_AUTH_STRING)",
    403: " (forbidden: check the key's permissions on this workspace)",
}


class PrefectApiError(Exception):
    """An expected failure of the Prefect API."""

    reason = "http_status"


class ApiTimeout(PrefectApiError):
    reason = "timeout"


class ApiConnectionError(PrefectApiError):
    reason = "connection"


class MalformedResponse(PrefectApiError):
    reason = "malformed_response"


class ApiBudgetExhausted(PrefectApiError):
    reason = "budget"


class ApiStatusError(PrefectApiError):
    """An HTTP error status; `retry_after` is the header's finite value in seconds, if any."""

    reason = "http_status"

    def __init__(
        self,
        endpoint: str,
        status: int,
        retry_after: float | None,
        maintenance: bool = False,
        retry_after_header: str | None = None,
    ) -> None:
        super().__init__(f"{endpoint} answered HTTP {status}{_STATUS_HINTS.get(status, '')}")
        self.status = status
        self.retry_after = retry_after
        self.maintenance = maintenance
        # The header as sent (cut short), so a value that was rejected or clamped can be logged.
        self.retry_after_header = retry_after_header[:64] if retry_after_header else None

    @property
    def throttled(self) -> bool:
        """Rate limited (429) or overloaded (503): the whole poller should back off."""
        return self.status in (429, 503)


# The closed set of reasons for a failed request, in the order of the class diagram above.
ERROR_CLASSES: tuple[type[PrefectApiError], ...] = (
    ApiTimeout,
    ApiConnectionError,
    ApiStatusError,
    MalformedResponse,
    ApiBudgetExhausted,
)
ERROR_REASONS = tuple(cls.reason for cls in ERROR_CLASSES)


class ObjectGone(Exception):
    """An object named in a per-object route answered 404: it was deleted since it was listed.

    Not a failure of the API: the poller leaves the object out of this snapshot.
    """

    def __init__(self, endpoint: str, name: str) -> None:
        super().__init__(f"{endpoint}: {name!r} is gone")
        self.name = name
