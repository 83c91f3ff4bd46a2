"""A Prefect JSON log formatter that keeps what a log call's arguments said.

Prefect's `JsonFormatter` writes a record's template (`msg`) and its arguments (`args`). httpx
logs each response as `HTTP Request: %s %s "%s %d %s"` with an `httpx.URL` among the arguments,
which JSON cannot hold, so the whole tuple becomes "<non-serializable: tuple>" and the status code
is lost. `MessageJsonFormatter` adds `message`, the text with its arguments filled in (what
`%(message)s` gives in a text format); prefect-exporter's sidecar reads `message` first. The rest
of each line is Prefect's JSON, unchanged.

Used by logging.yml in this folder: put the folder on the worker's PYTHONPATH.
"""

from __future__ import annotations

import logging

from prefect.logging.formatters import JsonFormatter


class MessageJsonFormatter(JsonFormatter):
    """Prefect's JSON lines plus `message`; configured like Prefect's (`format: default`)."""

    def format(self, record: logging.LogRecord) -> str:
        # What logging.Formatter.format does first, and Prefect's JSON formatter leaves out.
        record.message = record.getMessage()
        return super().format(record)
