"""The README's demo command works: a real stack comes up and /metrics shows it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
class TestDemo:
    """`python -m demo` (what scripts/demo.sh runs after setup) serves the seeded picture."""

    def test_demo_prints_a_metrics_url_that_serves_the_seeded_backlog(self) -> None:
        """The stuck queue's 30 overdue runs are visible before the demo is stopped."""
        process = subprocess.Popen(
            [sys.executable, "-u", "-m", "demo"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert process.stdout is not None
            url = None
            for line in process.stdout:
                match = re.search(r"metrics:\s+(http://\S+/metrics)", line)
                if match:
                    url = match.group(1)
                    break
            assert url, "the demo did not print a metrics URL"
            from demo.stack import wait_for

            wait_for(
                lambda: 'work_queue="nobody-polls-this"} 30.0' in httpx.get(url).text,
                60,
                "the demo backlog on /metrics",
            )
            text = httpx.get(url).text
            assert "prefect_up 1.0" in text
            assert 'prefect_work_pool_status{status="PAUSED",work_pool="paused-pool"} 1.0' in text
        finally:
            process.send_signal(2)
            code = process.wait(timeout=60)
            if process.stdout is not None:
                process.stdout.close()
        assert code == 0
