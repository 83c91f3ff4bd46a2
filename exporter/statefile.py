"""One small JSON state file, written atomically, whose failures are recorded instead of raised.

Two files keep the exporter's place across restarts: the events cursor (`--events.state-file`,
label `file="events"`) and the worker logs' read positions (`--worker-log.state-file`,
`file="worker_log"`). Both go through `StateFile`:

- `save(data)` writes a temporary file next to the target, fsyncs it and renames it over the
  target, so a crash or a full disk never leaves half a file behind. When the file system refuses
  (any `OSError`: a missing directory, a read-only volume, a full disk) it returns False instead of
  raising: losing our place on restart is a smaller harm than stopping the poll or the log reading.
  The failure is counted, and logged once when it starts and once when a later save succeeds.
- `load(parse)` returns None for a file that does not exist yet, and, after one warning, for one
  that cannot be read or holds no valid state; the next save replaces it.
- `check_state_file(path)` is the start-up check: a sentence saying why a path cannot work.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from structlog.typing import FilteringBoundLogger

T = TypeVar("T")


def temporary_path(path: Path) -> Path:
    """Where a new version of `path` is written before it is renamed over it (same directory)."""
    return path.with_name(path.name + ".tmp")


def write_atomically(path: Path, payload: bytes) -> None:
    """Replace `path` with `payload` in one rename; raises OSError, leaving `path` as it was."""
    temporary = temporary_path(path)
    try:
        with temporary.open("wb") as handle:
            handle.write(payload)
            handle.flush()
            # Without this a power loss can persist the rename but not the data: an empty file.
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def describe(error: OSError) -> str:
    """The operating system's words for an error ("Permission denied"), without a traceback."""
    return error.strerror or str(error)


class StateFile:
    """A JSON state file named `name` in metrics and logs ("events" or "worker_log").

    `writable` is False from a failed save until the next successful one; `errors` counts failed
    saves and loads that found the file unreadable or corrupt. Both are read by
    `StateFileCollector`, possibly from another thread (plain attribute reads).
    """

    def __init__(self, path: Path, name: str, log: FilteringBoundLogger) -> None:
        self.path = path
        self.name = name
        self.writable = True
        self.errors = 0
        self._failed_saves = 0  # in the current run of failures, reported on recovery
        self._log = log

    def load(self, parse: Callable[[Any], T]) -> T | None:
        """The saved state turned into T by `parse` (given the decoded JSON value).

        `parse` raises ValueError, TypeError or KeyError for a value of the wrong shape. Returns
        None when there is no file, and when it cannot be read or parsed (logged as
        `state_file_unusable`, counted in `errors`). Never raises for the file's sake.
        """
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._unusable(describe(exc))
            return None
        try:
            return parse(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:  # JSON and Unicode errors are ValueErrors
            self._unusable(f"no valid state in it ({exc})")
            return None

    def _unusable(self, error: str) -> None:
        self.errors += 1
        self._log.warning(
            "state_file_unusable",
            file=self.name,
            path=str(self.path),
            error=error,
            consequence="starting without saved state; the next save replaces the file",
        )

    def save(self, data: Any) -> bool:
        """Write `data` (JSON-serialisable) atomically; False if the file system refused.

        A TypeError for data that is not serialisable is a bug and is raised.
        """
        payload = json.dumps(data, sort_keys=True).encode()
        try:
            write_atomically(self.path, payload)
        except OSError as exc:
            self.errors += 1
            self._failed_saves += 1
            if self.writable:
                self.writable = False
                self._log.warning(
                    "state_file_write_failed",
                    file=self.name,
                    path=str(self.path),
                    error=describe(exc),
                    consequence="state kept in memory only until a save succeeds",
                )
            return False
        if not self.writable:
            self._log.info(
                "state_file_write_recovered",
                file=self.name,
                path=str(self.path),
                failed_saves=self._failed_saves,
            )
            self.writable = True
            self._failed_saves = 0
        return True


def check_state_file(path: str | Path) -> str | None:
    """Why `path` cannot serve as a state file, as a sentence; None when it can.

    For start-up: the directory must exist and let us create a file in it (tried for real, so a
    read-only volume or missing permission shows, also for root), and an existing file must be
    readable. A file with invalid content is not a problem here: it is replaced with a warning.
    """
    target = Path(path)
    if target.is_dir():
        return f"{target} is a directory; give the path of a file"
    directory = target.parent
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        return f"the directory {directory} {what}"
    if target.exists():
        try:
            with target.open("rb"):
                pass
        except OSError as exc:
            return f"{target} cannot be read ({describe(exc)})"
    probe = temporary_path(target)
    try:
        with probe.open("wb"):
            pass
        probe.unlink()
    except OSError as exc:
        return f"cannot create files in {directory} ({describe(exc)})"
    return None


class StateFileCollector(Collector):
    """The health of each configured state file; files not configured have no series.

    Example exposition::

        prefect_exporter_state_file_writable{file="events"} 0.0
        prefect_exporter_state_file_errors_total{file="events"} 12.0
    """

    def __init__(self, files: Iterable[StateFile]) -> None:
        self._files = list(files)

    def collect(self) -> Iterator[Metric]:
        writable = GaugeMetricFamily(
            "prefect_exporter_state_file_writable",
            "1 unless the last save of the state file failed (then the exporter runs on, but "
            "a restart loses its place); by file: events, worker_log.",
            labels=["file"],
        )
        errors = CounterMetricFamily(
            "prefect_exporter_state_file_errors",
            "Failed saves of the state file, and loads that found it unreadable or corrupt.",
            labels=["file"],
        )
        for state_file in self._files:
            writable.add_metric([state_file.name], 1.0 if state_file.writable else 0.0)
            errors.add_metric([state_file.name], state_file.errors)
        yield writable
        yield errors
