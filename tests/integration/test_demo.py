"""`make demo` runs the two-service mesh: requests cross two real shoal proxies."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_calls_api_from_web_through_both_sidecars() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "shoal.demo", "--requests", "3", "--interval", "0.05"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = re.findall(
        r"GET http://api/orders/\d → (\d+) from (\w+) .*\(upstream (\d+) ms\)", result.stdout
    )
    assert [(status, served) for status, served, _ in lines] == [("200", "api")] * 3
    assert "admin http://127.0.0.1:15103/stats" in result.stdout
