"""Hundreds of pgbench clients through `dbgov proxy` (issue 14, item 9): the proxy survives, every
transaction has its audit line, and nothing is dropped.

Before, at ~576 clients and more the audit flush nested once per session whose lane held lines:
the proxy died of SIGSEGV within a second (or, with the recursion limit hit first, answered
"internal error" and lost tens of thousands of audit lines while dbgov_audit_dropped_total
stayed 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import pg
from dbgov_sidecar import audit

pytestmark = pytest.mark.integration

CLIENTS, TRANSACTIONS = 640, 40
SCRIPT = "SELECT abalance FROM pgbench_accounts WHERE aid = "


@pytest.fixture(scope="module")
def big_server() -> Iterator[pg.PgServer]:
    """A PostgreSQL that takes a connection per client (the proxy has no pool)."""
    with pg.running_server(max_connections=CLIENTS + 40) as server:
        pg.init_pgbench(server)
        yield server


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_hundreds_of_clients_are_served_and_audited(big_server: pg.PgServer, tmp_path: Path) -> None:
    port, metrics_port = pg.free_port(), pg.free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(pg.PGBENCH_POLICY)
    audit_file = tmp_path / "audit.jsonl"
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{big_server.port}/shop?sslmode=disable",
        "DBGOV_POLICY": str(policy),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _metrics(metrics_port)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        target = ["-h", "127.0.0.1", "-p", str(port), "-U", "app", "shop"]
        done = subprocess.run(
            [
                *(str(pg.BIN / "pgbench"), "-n", "-S", "-M", "simple", "-c", str(CLIENTS), "-j", "2"),
                *("-t", str(TRANSACTIONS), *target),
            ],
            env={**os.environ, "PGPASSWORD": pg.APP_PASSWORD},
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.poll() is None, "the proxy died under load"
        assert done.returncode == 0, done.stderr[-2000:]
        processed = f"number of transactions actually processed: {CLIENTS * TRANSACTIONS}/"
        assert processed in done.stdout, done.stdout
        counted = _metrics(metrics_port)
        assert counted["dbgov_audit_dropped_total"] == 0
    finally:
        proc.terminate()
        status = proc.wait(60)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    assert status == 0, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    selects = [e for e in events if e["type"] == "statement" and e["statement"].startswith(SCRIPT)]
    assert len(selects) == CLIENTS * TRANSACTIONS
    assert all(e["enforced"] == "allow" and e["sqlstate"] is None for e in selects)
    sessions: dict[str, list[dict[str, object]]] = {}
    for event in events:
        sessions.setdefault(str(event["session_id"]), []).append(event)
    assert len(sessions) >= CLIENTS
    assert all(audit.verify(trail) for trail in sessions.values())
    assert all(trail[-1]["type"] == "session_end" for trail in sessions.values())
    # Through the lane, which the crash was in.
    assert counted["dbgov_lane_statements_total"] >= 0.9 * CLIENTS * TRANSACTIONS
