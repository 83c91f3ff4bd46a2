"""Tests for the cached rendering and the composed /metrics bodies."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.exposition import EMPTY, TEXT, Exposition, OwnSeries, compose, negotiate, render
from exporter.exposition import OPENMETRICS as OPENMETRICS_FORMAT
from exporter.snapshot import PoolState, Snapshot
from exporter.store import PollStatus

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def parts() -> tuple[Exposition, OwnSeries]:
    snap = Snapshot(1.0, (PoolState("p", "process", "READY", 3, 1),), (), ())
    own = CollectorRegistry()
    own.register(ExporterCollector(lambda: PollStatus(up=True, last_success=1.0)))
    return render(SnapshotCollector(snap)), OwnSeries(own, max_age=0.0)


def families(body: bytes) -> dict[str, object]:
    """The metric families of a text exposition by name, whatever their order."""
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


class TestCompose:
    """Cached Prefect part + own part = one valid exposition in each format and encoding."""

    def test_text_contains_both_parts(self) -> None:
        """Plain text has the pool series and prefect_up."""
        cached, own = parts()
        response = compose(cached, own, None, None)
        names = {f.name for f in text_string_to_metric_families(b"".join(response.parts).decode())}
        assert {"prefect_work_pool_concurrency_limit", "prefect_up"} <= names
        assert response.content_type.startswith("text/plain")
        assert not response.gzip

    def test_gzip_is_one_member_with_the_plain_bodys_series(self) -> None:
        """The kept compressor state yields one gzip member (readers that stop after the first,
        as Python's and curl's do, see everything) holding the plain body's families."""
        cached, own = parts()
        plain = b"".join(compose(cached, own, None, None).parts)
        zipped = compose(cached, own, None, "gzip, deflate")
        assert zipped.gzip
        # Twice from the same cache: the saved compressor state is copied, not consumed.
        again = compose(cached, own, None, "gzip")
        for response in (zipped, again):
            reader = zlib.decompressobj(31)
            text = reader.decompress(b"".join(response.parts))
            assert reader.eof
            assert not reader.unused_data
            assert families(text) == families(plain)

    def test_openmetrics_ends_with_the_only_eof_gzipped_too(self) -> None:
        """Plain (own series first) and gzipped (cached first): one # EOF, the last line."""
        cached, own = parts()
        for encoding in (None, "gzip"):
            response = compose(cached, own, OPENMETRICS, encoding)
            body = b"".join(response.parts)
            text = (gzip.decompress(body) if encoding else body).decode()
            assert text.count("# EOF") == 1
            assert text.endswith("# EOF\n")
            assert {"prefect_work_pool_info", "prefect_up"} <= {
                f.name
                for f in openmetrics_families(text)  # type: ignore[no-untyped-call]
            }

    def test_openmetrics_has_exactly_one_eof_at_the_end(self) -> None:
        """The cached part drops its # EOF; the composed body ends with the only one."""
        cached, own = parts()
        response = compose(cached, own, OPENMETRICS, None)
        body = b"".join(response.parts).decode()
        assert response.content_type.startswith("application/openmetrics-text")
        assert body.count("# EOF") == 1
        assert body.endswith("# EOF\n")
        assert "prefect_work_pool_info" in body

    def test_empty_cache_in_openmetrics_still_ends_with_eof(self) -> None:
        """No snapshot yet, OpenMetrics plain and gzipped: the own series, then one # EOF."""
        _, own = parts()
        for encoding in (None, "gzip"):
            body = b"".join(compose(EMPTY, own, OPENMETRICS, encoding).parts)
            text = (gzip.decompress(body) if encoding else body).decode()
            assert text.count("# EOF") == 1
            assert text.endswith('prefect_exporter_build_info{version="0.1.0"} 1.0\n# EOF\n')

    def test_empty_cache_serves_only_the_exporters_own_series(self) -> None:
        """Without a fresh snapshot there are no Prefect series, but prefect_up is there."""
        _, own = parts()
        body = b"".join(compose(EMPTY, own, None, "gzip").parts)
        text = gzip.decompress(body).decode()
        assert "prefect_up" in text
        assert "prefect_work_pool" not in text

    def test_the_cached_part_is_sent_as_it_is_not_copied(self) -> None:
        """The large cached bytes are the very object rendered at the poll, in both encodings:
        a copy per scrape would allocate (and fault in) the whole body again every time."""
        cached, own = parts()
        plain = compose(cached, own, None, None)
        zipped = compose(cached, own, None, "gzip")
        assert plain.parts[-1] is cached.text.plain
        assert zipped.parts == (zipped.parts[0],)  # gzipped: one member, built per scrape


def example_series(max_age: float, monotonic: Callable[[], float]) -> tuple[Gauge, OwnSeries]:
    """One own gauge, `prefect_exporter_example`, and its `OwnSeries`."""
    gauge = Gauge("prefect_exporter_example", "An own series.", registry=None)
    own = CollectorRegistry()
    own.register(gauge)
    return gauge, OwnSeries(own, max_age=max_age, monotonic=monotonic)


class TestOwnSeries:
    """The own series are rendered at most once per max age, per format."""

    def test_reused_within_the_max_age_and_rendered_again_after(self) -> None:
        """A changed value shows once the rendering is `max_age` seconds old, not before."""
        now = [100.0]
        gauge, series = example_series(max_age=1.0, monotonic=lambda: now[0])
        gauge.set(1)
        first = series.rendered(TEXT, EMPTY)
        assert b"prefect_exporter_example 1.0" in first
        gauge.set(2)
        now[0] += 0.9
        assert series.rendered(TEXT, EMPTY) is first
        # Each format is kept on its own: the OpenMetrics one is rendered now, with the new value.
        assert b"prefect_exporter_example 2.0" in series.rendered(OPENMETRICS_FORMAT, EMPTY)
        now[0] += 0.1
        assert b"prefect_exporter_example 2.0" in series.rendered(TEXT, EMPTY)

    @pytest.mark.parametrize(
        ("max_age", "published"),
        [(60.0, True), (0.0, False)],
        ids=["a newly published poll, within the max age", "max age 0, the same exposition"],
    )
    def test_rendered_again_for_a_new_poll_or_at_max_age_zero(
        self, max_age: float, published: bool
    ) -> None:
        """A newly published exposition never gets a rendering made beside an older one; with
        max age 0 (the tests' choice, and a way to turn reuse off) every call renders."""
        gauge, series = example_series(max_age=max_age, monotonic=lambda: 5.0)
        gauge.set(1)
        series.rendered(TEXT, EMPTY)
        gauge.set(3)
        beside = parts()[0] if published else EMPTY
        assert b"prefect_exporter_example 3.0" in series.rendered(TEXT, beside)


class TestNegotiate:
    """Content negotiation follows prometheus-client."""

    def test_formats(self) -> None:
        """OpenMetrics when asked for, text otherwise."""
        assert negotiate(OPENMETRICS)[0] == "openmetrics"
        assert negotiate("text/plain")[0] == "text"
        assert negotiate(None)[0] == "text"
