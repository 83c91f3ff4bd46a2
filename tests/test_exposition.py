"""Tests for the cached rendering and the composed /metrics bodies."""

from __future__ import annotations

import gzip

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from exporter.collector import ExporterCollector, SnapshotCollector
from exporter.exposition import EMPTY, compose, negotiate, render
from exporter.snapshot import PoolState, Snapshot
from exporter.store import PollStatus

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def parts() -> tuple[object, CollectorRegistry]:
    snap = Snapshot(1.0, (PoolState("p", "process", "READY", 3, 1),), (), ())
    own = CollectorRegistry()
    own.register(ExporterCollector(lambda: PollStatus(up=True, last_success=1.0)))
    return render(SnapshotCollector(snap)), own


class TestCompose:
    """Cached Prefect part + own part = one valid exposition in each format and encoding."""

    def test_text_contains_both_parts(self) -> None:
        """Plain text has the pool series and prefect_up."""
        cached, own = parts()
        response = compose(cached, own, None, None)  # type: ignore[arg-type]
        names = {f.name for f in text_string_to_metric_families(response.body.decode())}
        assert {"prefect_work_pool_concurrency_limit", "prefect_up"} <= names
        assert response.content_type.startswith("text/plain")
        assert not response.gzip

    def test_gzip_is_one_valid_stream_equal_to_the_plain_body(self) -> None:
        """The kept compressor state yields a gzip body that decompresses to the plain one."""
        cached, own = parts()
        plain = compose(cached, own, None, None)  # type: ignore[arg-type]
        zipped = compose(cached, own, None, "gzip, deflate")  # type: ignore[arg-type]
        assert zipped.gzip
        assert gzip.decompress(zipped.body) == plain.body
        # Twice from the same cache: the saved compressor state is copied, not consumed.
        again = compose(cached, own, None, "gzip")  # type: ignore[arg-type]
        assert gzip.decompress(again.body) == plain.body

    def test_openmetrics_has_exactly_one_eof_at_the_end(self) -> None:
        """The cached part drops its # EOF; the composed body ends with the only one."""
        cached, own = parts()
        response = compose(cached, own, OPENMETRICS, None)  # type: ignore[arg-type]
        body = response.body.decode()
        assert response.content_type.startswith("application/openmetrics-text")
        assert body.count("# EOF") == 1
        assert body.endswith("# EOF\n")
        assert "prefect_work_pool_info" in body

    def test_empty_cache_serves_only_the_exporters_own_series(self) -> None:
        """Without a fresh snapshot there are no Prefect series, but prefect_up is there."""
        _, own = parts()
        body = compose(EMPTY, own, None, "gzip").body
        text = gzip.decompress(body).decode()
        assert "prefect_up" in text
        assert "prefect_work_pool" not in text


class TestNegotiate:
    """Content negotiation follows prometheus-client."""

    def test_formats(self) -> None:
        """OpenMetrics when asked for, text otherwise."""
        assert negotiate(OPENMETRICS)[0] == "openmetrics"
        assert negotiate("text/plain")[0] == "text"
        assert negotiate(None)[0] == "text"
