"""Optional features a Prefect server may lack, switched off for a while when it answers 404."""

from __future__ import annotations

from enum import StrEnum

from structlog.typing import FilteringBoundLogger

from exporter.errors import PrefectApiError

# A feature the server lacked (404) is asked for again after this many polls, so an upgraded
# server is noticed without restarting the exporter.
FEATURE_RETRY_POLLS = 20


class Feature(StrEnum):
    """The parts of a poll that older Prefect 3.x servers may not offer."""

    CONCURRENCY_LIMITS = "concurrency_limits"
    EVENTS = "events"
    # GET /admin/version, for prefect_server_info (Prefect Cloud may not offer it).
    SERVER_VERSION = "server_version"


class FeatureGate:
    """Which features to read in poll number `poll`; a 404 turns one off for a few polls."""

    def __init__(self, log: FilteringBoundLogger, retry_polls: int = FEATURE_RETRY_POLLS) -> None:
        self._log = log
        self._retry_polls = retry_polls
        self._unavailable_until: dict[Feature, int] = {}

    def available(self, feature: Feature, poll: int) -> bool:
        return poll >= self._unavailable_until.get(feature, 0)

    def degrade(self, feature: Feature, error: PrefectApiError, poll: int) -> None:
        """The server lacks an endpoint (older Prefect 3.x), or answers an informational one
        badly: go on without the feature."""
        self._unavailable_until[feature] = poll + self._retry_polls
        self._log.warning(
            "feature_unavailable",
            feature=str(feature),
            error=str(error),
            retry_after_polls=self._retry_polls,
        )

    def states(self, poll: int) -> tuple[tuple[str, bool], ...]:
        """(feature, available) for every feature, as the snapshot exports them."""
        return tuple((str(f), self.available(f, poll)) for f in Feature)
