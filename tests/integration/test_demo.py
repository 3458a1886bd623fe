"""`make demo` stays true: the live demo runs end to end and shows what the README promises."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_live_demo_runs_and_tells_the_story() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dbgov_sidecar.demo"], capture_output=True, text=True, timeout=300, check=False
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "*********@example.com | *******1001" in out  # masked through the wire
    assert "@example.com" in out and "customer1@example.com" not in out
    assert 'refused by rule "no-ddl"' in out
    assert 'refused by rule "guardrail:require-where"' in out
    assert "more than maxRowsAffected (100); it was rolled back" in out
    assert "requires approval" in out
    assert "hash chains: " in out and "intact" in out and "BROKEN" not in out
    assert out.rstrip().endswith("stopped the proxy and PostgreSQL.")


def test_offline_demo_explains_decisions() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dbgov_sidecar.demo", "--offline"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert proc.stdout.count("BLOCK ") >= 5 and "MASK " in proc.stdout and "APPROVE " in proc.stdout
