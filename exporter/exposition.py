"""Renders the Prefect-derived exposition once per poll and composes /metrics responses.

A scrape concatenates the cached Prefect part with the exporter's few own series rendered on
the spot, so /metrics stays fast however large the Prefect installation is. For gzip, the
compressor's state after the cached part is kept and copied per scrape: one valid gzip member
without recompressing the large part.
"""

from __future__ import annotations

import zlib
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
    """One format's cached bytes plus a gzip compressor positioned after them."""

    body: bytes
    gzip_prefix: bytes
    compressor: zlib._Compress

    @classmethod
    def of(cls, body: bytes) -> Part:
        compressor = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: gzip container
        prefix = compressor.compress(body) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return cls(body, prefix, compressor)

    def join(self, tail: bytes, gzip: bool) -> bytes:
        if not gzip:
            return self.body + tail
        compressor = self.compressor.copy()
        return self.gzip_prefix + compressor.compress(tail) + compressor.flush()


@dataclass(frozen=True)
class Exposition:
    """The Prefect-derived series in both formats, rendered once."""

    text: Part
    openmetrics: Part

    def part(self, fmt: str) -> Part:
        return self.openmetrics if fmt == OPENMETRICS else self.text


def render(collector: Collector) -> Exposition:
    # The OpenMetrics end marker may appear only once, after the exporter's own series.
    return Exposition(
        Part.of(_text(collector)), Part.of(_openmetrics(collector).removesuffix(_EOF))
    )


EMPTY = Exposition(Part.of(b""), Part.of(b""))


@dataclass(frozen=True)
class MetricsResponse:
    body: bytes
    content_type: str
    gzip: bool


def negotiate(accept: str | None) -> tuple[str, str]:
    """The format and content type for an Accept header, as prometheus-client decides them."""
    _, content_type = exposition.choose_encoder(accept or "")
    fmt = OPENMETRICS if content_type.startswith("application/openmetrics-text") else TEXT
    return fmt, content_type


def wants_gzip(accept_encoding: str | None) -> bool:
    return "gzip" in (accept_encoding or "").lower()


def compose(
    cached: Exposition, own: Collector, accept: str | None, accept_encoding: str | None
) -> MetricsResponse:
    fmt, content_type = negotiate(accept)
    tail = _openmetrics(own) if fmt == OPENMETRICS else _text(own)
    gzip = wants_gzip(accept_encoding)
    return MetricsResponse(cached.part(fmt).join(tail, gzip), content_type, gzip)
