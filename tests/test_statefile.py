"""Tests for the state files: atomic writes, failures recorded not raised, start-up checks."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import CollectorRegistry

from exporter.poller import Poller, PollMetrics, PollSettings
from exporter.records import FlowRunEvent
from exporter.statefile import StateFile, StateFileCollector, check_state_file
from exporter.transitions import Cursor
from tests.test_poller import NOW, FakeApi, FakeStore


def state_file(path: Path, name: str = "events") -> StateFile:
    return StateFile(path, name, structlog.get_logger())


def events_of(logs: Iterable[Mapping[str, Any]]) -> list[str]:
    return [entry["event"] for entry in logs]


def parse_anything(data: Any) -> Any:
    return data


class TestSave:
    """Saving is atomic and never raises for the file system's sake."""

    def test_save_then_load_round_trip(self, tmp_path: Path) -> None:
        """What is saved is loaded back; no temporary file is left behind."""
        file = state_file(tmp_path / "state.json")
        assert file.save({"a": [1, 2]})
        assert file.load(parse_anything) == {"a": [1, 2]}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    def test_a_missing_directory_fails_quietly_and_logs_once(self, tmp_path: Path) -> None:
        """Three failed saves: False each time, one warning, counted, not writable."""
        file = state_file(tmp_path / "gone" / "state.json")
        with structlog.testing.capture_logs() as logs:
            results = [file.save({"n": n}) for n in range(3)]
        assert results == [False, False, False]
        assert events_of(logs) == ["state_file_write_failed"]
        assert logs[0]["file"] == "events"
        assert logs[0]["error"] == "No such file or directory"
        assert "Traceback" not in json.dumps(logs)
        assert (file.writable, file.errors) == (False, 3)

    def test_recovery_is_logged_once_with_the_number_of_failures(self, tmp_path: Path) -> None:
        """When the directory appears, the next save succeeds and says how many failed."""
        file = state_file(tmp_path / "later" / "state.json")
        with structlog.testing.capture_logs() as logs:
            file.save({"n": 1})
            file.save({"n": 2})
            (tmp_path / "later").mkdir()
            assert file.save({"n": 3})
            assert file.save({"n": 4})
        assert events_of(logs) == ["state_file_write_failed", "state_file_write_recovered"]
        assert logs[1]["failed_saves"] == 2
        assert file.writable
        assert file.errors == 2
        assert file.load(parse_anything) == {"n": 4}

    def test_a_full_disk_keeps_the_old_state_and_no_temporary(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """ENOSPC while writing: the previous state stays whole and the temporary is removed."""
        file = state_file(tmp_path / "state.json")
        assert file.save({"n": 1})

        def disk_full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("exporter.statefile.os.fsync", disk_full)
        with structlog.testing.capture_logs() as logs:
            assert not file.save({"n": 2})
        assert logs[0]["error"] == "No space left on device"
        assert file.load(parse_anything) == {"n": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]

    def test_a_directory_in_the_files_place_is_a_recorded_failure(self, tmp_path: Path) -> None:
        """The rename over a directory fails; save says so."""
        (tmp_path / "state.json").mkdir()
        file = state_file(tmp_path / "state.json")
        with structlog.testing.capture_logs():
            assert not file.save({"n": 1})
        assert not file.writable


class TestLoad:
    """A missing file is normal; an unusable one is replaced with a warning, never silently."""

    def test_a_missing_file_is_no_state_and_no_warning(self, tmp_path: Path) -> None:
        """First start: None, nothing logged, nothing counted."""
        file = state_file(tmp_path / "state.json")
        with structlog.testing.capture_logs() as logs:
            assert file.load(parse_anything) is None
        assert logs == []
        assert file.errors == 0

    @pytest.mark.parametrize(
        "content",
        [b"{not json", b"\xff\xfe", b"", b"[1, 2]"],
        ids=["json", "utf8", "empty", "shape"],
    )
    def test_a_corrupt_file_warns_and_is_replaced_by_the_next_save(
        self, tmp_path: Path, content: bytes
    ) -> None:
        """None, one warning naming the file, one error counted; the next save is valid."""
        path = tmp_path / "state.json"
        path.write_bytes(content)
        file = state_file(path, "worker_log")

        def want_object(data: Any) -> dict[str, Any]:
            if not isinstance(data, dict):
                raise TypeError("expected an object")
            return data

        with structlog.testing.capture_logs() as logs:
            assert file.load(want_object) is None
        assert events_of(logs) == ["state_file_unusable"]
        assert logs[0]["file"] == "worker_log"
        assert logs[0]["log_level"] == "warning"
        assert file.errors == 1
        assert file.save({"ok": True})
        assert json.loads(path.read_text()) == {"ok": True}

    def test_an_unreadable_file_warns(self, tmp_path: Path) -> None:
        """A directory where the file should be cannot be read: None and a warning."""
        (tmp_path / "state.json").mkdir()
        file = state_file(tmp_path / "state.json")
        with structlog.testing.capture_logs() as logs:
            assert file.load(parse_anything) is None
        assert events_of(logs) == ["state_file_unusable"]
        assert logs[0]["error"] == "Is a directory"


class TestCheckStateFile:
    """The start-up check names what is wrong, or returns None."""

    def test_a_good_path_passes_and_leaves_nothing_behind(self, tmp_path: Path) -> None:
        """A new file in an existing directory is fine; the probe is removed."""
        assert check_state_file(tmp_path / "state.json") is None
        assert list(tmp_path.iterdir()) == []

    def test_an_existing_valid_or_corrupt_file_passes(self, tmp_path: Path) -> None:
        """Content is not checked here: a corrupt file is replaced with a warning later."""
        (tmp_path / "state.json").write_text("{not json")
        assert check_state_file(str(tmp_path / "state.json")) is None

    def test_a_missing_directory(self, tmp_path: Path) -> None:
        """The case of the report: a directory that does not exist."""
        problem = check_state_file(tmp_path / "nonexistent-dir" / "cursor.json")
        assert problem == f"the directory {tmp_path / 'nonexistent-dir'} does not exist"

    def test_a_parent_that_is_a_file(self, tmp_path: Path) -> None:
        """A path below a regular file cannot be created."""
        (tmp_path / "file").write_text("")
        problem = check_state_file(tmp_path / "file" / "cursor.json")
        assert problem == f"the directory {tmp_path / 'file'} is not a directory"

    def test_a_directory_given_as_the_file(self, tmp_path: Path) -> None:
        """The state file path must name a file."""
        assert check_state_file(tmp_path) == f"{tmp_path} is a directory; give the path of a file"

    def test_a_directory_we_may_not_write(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Creating the probe fails (a read-only volume, no permission): named with the reason."""
        real_open = Path.open

        def refuse_writes(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            if "w" in mode:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
            return real_open(self, mode, *args, **kwargs)

        monkeypatch.setattr(Path, "open", refuse_writes)
        problem = check_state_file(tmp_path / "state.json")
        assert problem == f"cannot create files in {tmp_path} (Read-only file system)"

    @pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
    def test_a_read_only_directory_for_real(self, tmp_path: Path) -> None:
        """Without root, a directory of mode 555 is found unwritable."""
        tmp_path.chmod(0o555)
        try:
            problem = check_state_file(tmp_path / "state.json")
        finally:
            tmp_path.chmod(0o755)
        assert problem == f"cannot create files in {tmp_path} (Permission denied)"


class TestCollector:
    """Each configured file's health is exported; unconfigured files have no series."""

    def test_series_follow_the_files_state(self, tmp_path: Path) -> None:
        """Writable 1 and no errors, then 0 and one error after a failed save."""
        good = state_file(tmp_path / "positions.json", "worker_log")
        bad = state_file(tmp_path / "gone" / "cursor.json", "events")
        registry = CollectorRegistry()
        registry.register(StateFileCollector([good, bad]))
        get = registry.get_sample_value
        assert get("prefect_exporter_state_file_writable", {"file": "events"}) == 1
        assert get("prefect_exporter_state_file_errors_total", {"file": "events"}) == 0
        with structlog.testing.capture_logs():
            bad.save({})
        good.save({})
        assert get("prefect_exporter_state_file_writable", {"file": "events"}) == 0
        assert get("prefect_exporter_state_file_errors_total", {"file": "events"}) == 1
        assert get("prefect_exporter_state_file_writable", {"file": "worker_log"}) == 1
        assert get("prefect_exporter_state_file_errors_total", {"file": "worker_log"}) == 0

    def test_no_files_no_series(self) -> None:
        """Without state files nothing is exported (absent, not a made-up 1)."""
        registry = CollectorRegistry()
        registry.register(StateFileCollector([]))
        assert registry.get_sample_value("prefect_exporter_state_file_writable", {}) is None
        assert [s for m in registry.collect() for s in m.samples] == []


class TestCursorFile:
    """The events cursor goes through a StateFile: saved atomically, failures returned."""

    def test_round_trip(self, tmp_path: Path) -> None:
        """A cursor with ids at its timestamp comes back equal."""
        file = state_file(tmp_path / "cursor.json")
        cursor = Cursor(1_700_000_000.5, frozenset({"b", "a"}))
        assert cursor.save(file)
        assert Cursor.load(file) == cursor
        assert json.loads((tmp_path / "cursor.json").read_text()) == {
            "occurred": 1_700_000_000.5,
            "ids_at_occurred": ["a", "b"],
        }

    def test_an_unwritable_cursor_file_returns_false(self, tmp_path: Path) -> None:
        """The save fails without raising; the file records it."""
        file = state_file(tmp_path / "nonexistent-dir" / "cursor.json")
        with structlog.testing.capture_logs():
            assert not Cursor(5.0).save(file)
        assert (file.writable, file.errors) == (False, 1)

    @pytest.mark.parametrize(
        "content",
        [
            {"occurred": "soon", "ids_at_occurred": []},
            {"occurred": math.inf, "ids_at_occurred": []},
            {"occurred": 5.0},
            {"occurred": 5.0, "ids_at_occurred": "abc"},
            [5.0, []],
        ],
        ids=["text", "infinite", "no-ids", "ids-not-a-list", "list"],
    )
    def test_a_cursor_of_the_wrong_shape_is_unusable(self, tmp_path: Path, content: object) -> None:
        """Valid JSON but not a cursor: None with a warning, never a crash or a wrong cursor."""
        (tmp_path / "cursor.json").write_text(json.dumps(content))
        file = state_file(tmp_path / "cursor.json")
        with structlog.testing.capture_logs() as logs:
            assert Cursor.load(file) is None
        assert events_of(logs) == ["state_file_unusable"]


class TestPollerWithAnUnwritableCursorFile:
    """The reported case: a cursor file that cannot be written no longer blinds the exporter."""

    def test_every_poll_succeeds_and_the_failure_is_logged_once(self, tmp_path: Path) -> None:
        """Three polls with events publish three snapshots; one warning, no poll failure."""
        api = FakeApi()
        api.events = [FlowRunEvent("e1", NOW - 60, "r1", "PENDING", "Pending", "p")]
        store = FakeStore()
        times = [NOW - 100, NOW, NOW + 30, NOW + 60]  # start-up, then three polls

        def clock() -> float:
            return times.pop(0) if len(times) > 1 else times[0]

        poller = Poller(
            api,
            store,
            PollSettings(
                30, 5, 2, 3, events_settle=10, events_state_file=tmp_path / "gone" / "cursor.json"
            ),
            PollMetrics(CollectorRegistry()),
            structlog.get_logger(),
            clock=clock,
        )
        with structlog.testing.capture_logs() as logs:
            for _ in range(3):
                asyncio.run(poller.poll_and_publish())
        assert store.failures == []
        assert len(store.published) == 3
        assert len(api.event_windows) == 3  # each read events and tried to save the cursor
        latency = store.published[-1].latency
        assert latency is not None
        assert latency.transitions[("p", "Pending")] == 1
        assert events_of(logs).count("state_file_write_failed") == 1
