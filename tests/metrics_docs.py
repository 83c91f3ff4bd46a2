"""Reads the metric tables of docs/metrics.md, the contract that tests compare families with."""

from __future__ import annotations

import re
from pathlib import Path

METRICS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def documented_metrics(path: Path = METRICS_PAGE) -> dict[str, tuple[str, set[str]]]:
    """Rows `| \\`name\\` | type | labels | ...` of the metric tables: name to (type, labels).

    A counter's name is given without `_total`, as prometheus-client's families name it.
    """
    rows = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^\|\s*`([a-z_]+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|", line)
        if match:
            name, kind, labels = match.groups()
            family = re.sub(r"_total$", "", name) if kind == "counter" else name
            label_set = {x.strip(" `") for x in labels.split(",") if x.strip(" `-")}
            rows[family] = (kind, label_set)
    return rows
