"""The socket-free benchmark still runs against today's proxy code (a bench that rots measures nothing)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_pure_bench_runs_both_protocols() -> None:
    env = {**os.environ, "PURE_STATEMENTS": "300", "PURE_REPEAT": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "pure.py")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    figures = dict(re.findall(r"^(simple|extended)\s+([0-9.]+) µs/statement$", done.stdout, re.M))
    assert set(figures) == {"simple", "extended"} and all(float(v) > 0 for v in figures.values())
