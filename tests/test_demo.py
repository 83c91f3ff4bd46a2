"""The README's demo command works: a real stack comes up and /metrics shows it."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import pytest

from demo.stack import ProcessExited, wait_for

ROOT = Path(__file__).resolve().parent.parent


def read_lines_in_background(stream: IO[str]) -> tuple[queue.Queue[str | None], threading.Thread]:
    """Lines of `stream` as they arrive, None once it closes (a pipe read cannot time out)."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


def first_match(lines: queue.Queue[str | None], pattern: str, timeout: float) -> str:
    """The first group of the first line matching `pattern`; fails at the deadline or at EOF."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            break
        if line is None:
            pytest.fail("output ended before a match; it was:\n" + "".join(seen[-30:]))
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match.group(1)
    pytest.fail(f"nothing matched {pattern!r} in {timeout:g}s; output:\n" + "".join(seen[-30:]))


@pytest.mark.integration
class TestDemo:
    """`bash scripts/demo.sh` serves the seeded picture and says where, even into a pipe."""

    def test_demo_prints_a_metrics_url_that_serves_the_seeded_backlog(self) -> None:
        """Piped (block-buffered) output still shows the URL while the demo runs."""
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        process = subprocess.Popen(
            ["bash", "scripts/demo.sh"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        assert process.stdout is not None
        lines, reader = read_lines_in_background(process.stdout)
        try:
            url = first_match(lines, r"metrics:\s+(http://\S+/metrics)", 240)
            assert process.poll() is None, "the URL appeared only when the demo exited"

            wait_for(
                lambda: 'work_queue="nobody-polls-this"} 30.0' in httpx.get(url).text,
                60,
                "the demo backlog on /metrics",
            )
            text = httpx.get(url).text
            assert "prefect_up 1.0" in text
            assert 'prefect_work_pool_status{status="PAUSED",work_pool="paused-pool"} 1.0' in text
        finally:
            # SIGINT to the demo only (bash exec'd it): it stops its server, worker and exporter.
            process.send_signal(signal.SIGINT)
            code = process.wait(timeout=60)
            reader.join(timeout=30)  # EOF follows the exit; then the pipe can be closed
            process.stdout.close()
        assert code == 0


class TestWaitFor:
    """The test stack's waits: errors while a thing starts are retried, a dead process is not."""

    def test_an_exited_process_ends_the_wait_at_once(self) -> None:
        calls: list[int] = []

        def condition() -> bool:
            calls.append(1)
            raise ProcessExited("prefect server exited; see server.log")

        with pytest.raises(ProcessExited, match=r"server\.log"):
            wait_for(condition, timeout=30, what="the server", interval=0.01)
        assert len(calls) == 1

    def test_other_errors_are_retried_until_the_condition_holds(self) -> None:
        refusals = iter([ConnectionError("refused"), ConnectionError("refused")])

        def condition() -> str:
            refusal = next(refusals, None)
            if refusal is not None:
                raise refusal
            return "up"

        assert wait_for(condition, timeout=30, what="the server", interval=0.01) == "up"

    def test_the_timeout_names_the_thing_and_the_last_error(self) -> None:
        def condition() -> bool:
            raise ConnectionError("refused")

        with pytest.raises(TimeoutError, match=r"waiting for the server \(last error: refused\)"):
            wait_for(condition, timeout=0.05, what="the server", interval=0.01)
