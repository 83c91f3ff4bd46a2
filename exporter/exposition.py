"""Renders the Prefect-derived exposition once per poll and composes /metrics responses.

A scrape sends the cached Prefect part and the exporter's few own series, rendered on the spot,
so /metrics stays fast however large the Prefect installation is. Plain, the cached bytes are
sent as they are, not copied into a response buffer (the transport copies what the kernel does
not take at once, for a client that reads slowly): at 1,000 queues they are about 1.9 MB,
and each copy is a fresh allocation whose pages the kernel must fault in (2-3 ms a copy on the
bench machine, with a tail of 17-40 ms). They come last, after the own series, so that the small
part joins the response head and the whole answer takes two writes (each write gives up the
GIL, and while a poll runs, getting it back costs up to the switch interval).

Gzipped, the body must be one gzip member (Python's and curl's readers stop after the first),
so the cached part comes first: the compressor's state after it is kept and copied per scrape,
and the own series (and OpenMetrics' end marker) close the member without recompressing the
large part. The gzipped body (70 KB for 1.9 MB at 1,000 synthetic queues) is built whole per
scrape and goes out with the head in one write.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import exposition
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

TEXT = "text"
OPENMETRICS = "openmetrics"
_EOF = b"# EOF\n"


def _text(collector: Collector) -> bytes:
    return exposition.generate_latest(collector)


def _openmetrics(collector: Collector) -> bytes:
    body: bytes = openmetrics.generate_latest(collector)  # type: ignore[no-untyped-call]
    return body


@dataclass(frozen=True)
class Part:
    """One format's cached series: `plain`, ending with the format's `end` marker, to send
    after the own series; `gzip_prefix` (the series without the marker, compressed and
    sync-flushed) with `compressor` positioned after it, to continue with the own series."""

    plain: bytes
    end: bytes
    gzip_prefix: bytes
    compressor: zlib._Compress

    @classmethod
    def of(cls, series: bytes, end: bytes = b"") -> Part:
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container
        prefix = compressor.compress(series) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return cls(series + end, end, prefix, compressor)

    def with_own(self, own: bytes, gzipped: bool) -> tuple[bytes, ...]:
        """The body's parts in order: `own` then the cached bytes (shared, not copied); or,
        gzipped, one gzip member of the cached series, `own` and the end marker."""
        if not gzipped:
            return own, self.plain
        compressor = self.compressor.copy()
        return (self.gzip_prefix + compressor.compress(own + self.end) + compressor.flush(),)


@dataclass(frozen=True)
class Exposition:
    """The Prefect-derived series in both formats, rendered once."""

    text: Part
    openmetrics: Part

    def part(self, fmt: str) -> Part:
        return self.openmetrics if fmt == OPENMETRICS else self.text


def render(collector: Collector) -> Exposition:
    """Both formats of `collector`'s series, rendered once (in the poller's thread)."""
    # The OpenMetrics end marker may appear only once, at the very end of the response.
    return Exposition(
        Part.of(_text(collector)), Part.of(_openmetrics(collector).removesuffix(_EOF), _EOF)
    )


EMPTY = Exposition(Part.of(b""), Part.of(b"", _EOF))


@dataclass(frozen=True)
class MetricsResponse:
    """A /metrics body as the parts to send in order: plain, the own series and then the shared
    cached part; gzipped, one part built for this scrape."""

    parts: tuple[bytes, ...]
    content_type: str
    gzip: bool


def negotiate(accept: str | None) -> tuple[str, str]:
    """The format and content type for an Accept header, as prometheus-client decides them."""
    _, content_type = exposition.choose_encoder(accept or "")
    fmt = OPENMETRICS if content_type.startswith("application/openmetrics-text") else TEXT
    return fmt, content_type


def wants_gzip(accept_encoding: str | None) -> bool:
    return "gzip" in (accept_encoding or "").lower()


# Seconds a rendering of the exporter's own series is reused. Scrapes in a loop (a load test,
# several Prometheus servers) then render them at most once a second, not once per answer: at the
# full bench point (1,000 queues) they are about 250 lines, mostly the API request histogram,
# and rendering them was 89 % of the server thread's time under a scrape loop (py-spy, about
# 2.8 ms an answer). Prometheus, scraping every 15 s or so, still gets a fresh rendering each time.
OWN_SERIES_MAX_AGE = 1.0


class OwnSeries:
    """The exporter's own series (`collector`), rendered per format and reused for `max_age`
    seconds of `monotonic` time (0: rendered at every call).

    Not thread-safe: the HTTP server's thread alone asks for them.
    """

    def __init__(
        self,
        collector: Collector,
        max_age: float = OWN_SERIES_MAX_AGE,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._collector = collector
        self._max_age = max_age
        self._monotonic = monotonic
        self._kept: dict[str, tuple[float, Exposition, bytes]] = {}

    def rendered(self, fmt: str, beside: Exposition) -> bytes:
        """The own series in `fmt` (TEXT or OPENMETRICS, without the end marker) to send beside
        the cached exposition `beside`: a rendering made beside another one (before a poll was
        published) is not reused, so `prefect_up` and the poll's own counters never lag the
        Prefect series they come with."""
        now = self._monotonic()
        kept = self._kept.get(fmt)
        if kept is not None and kept[1] is beside and now - kept[0] < self._max_age:
            return kept[2]
        if fmt == OPENMETRICS:
            body = _openmetrics(self._collector).removesuffix(_EOF)
        else:
            body = _text(self._collector)
        self._kept[fmt] = (now, beside, body)
        return body


def compose(
    cached: Exposition, own: OwnSeries, accept: str | None, accept_encoding: str | None
) -> MetricsResponse:
    """The /metrics body for one request: the own series and the cached part (see the module)."""
    fmt, content_type = negotiate(accept)
    own_series = own.rendered(fmt, cached)
    gzipped = wants_gzip(accept_encoding)
    return MetricsResponse(cached.part(fmt).with_own(own_series, gzipped), content_type, gzipped)
