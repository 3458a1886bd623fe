"""The compiled lane in the real proxy process: pgbench (simple, extended, prepared, TPC-B) through
`dbgov proxy` against PostgreSQL, with the lane on and off. Both must audit every statement with
an unbroken hash chain per session and count the same statements; with the lane on, the steady
state must actually go through it (dbgov_lane_statements_total)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import pg
from dbgov_sidecar import audit

pytestmark = pytest.mark.integration

POLICY = pg.PGBENCH_POLICY
CLIENTS, TRANSACTIONS = 3, 60
RUNS = {  # pgbench arguments, and statements audited per transaction
    "simple": (["-S", "-M", "simple"], 1),
    "extended": (["-S", "-M", "extended"], 1),
    "prepared": (["-S", "-M", "prepared"], 1),
    "tpcb": (["-M", "simple"], 7),
}


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _run(pg_server: pg.PgServer, tmp_path: Path, *, lane: bool) -> tuple[list[dict[str, Any]], float, float]:
    port, metrics_port = pg.free_port(), pg.free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    audit_file = tmp_path / f"audit-{lane}.jsonl"
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_POLICY": str(policy),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
        "DBGOV_LANE": "on" if lane else "off",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env=env, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if _metric(metrics_port, "dbgov_sessions_total") >= 0:
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        for args, _ in RUNS.values():
            target = ["-h", "127.0.0.1", "-p", str(port), "-U", "app", "shop"]
            done = subprocess.run(
                [str(pg.BIN / "pgbench"), "-n", "-c", str(CLIENTS), "-t", str(TRANSACTIONS), *args, *target],
                check=False,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
        statements = _metric(metrics_port, "dbgov_statements_total")
        through_lane = _metric(metrics_port, "dbgov_lane_statements_total")
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    return events, statements, through_lane


def test_pgbench_through_the_lane_is_audited_like_without_it(pg_server: pg.PgServer, tmp_path: Path) -> None:
    pg.init_pgbench(pg_server)
    results = {lane: _run(pg_server, tmp_path, lane=lane) for lane in (True, False)}
    shapes: dict[bool, Counter[tuple[str, Any, Any, Any]]] = {}
    for lane, (events, counted, through_lane) in results.items():
        sessions: dict[str, list[dict[str, Any]]] = {}
        for event in events:
            sessions.setdefault(event["session_id"], []).append(event)
        assert all(audit.verify(trail) for trail in sessions.values())
        assert all(trail[-1]["type"] == "session_end" for trail in sessions.values())
        everything = [e for e in events if e["type"] == "statement"]
        # pgbench reads the catalog once per run (partitioning); this policy refuses that.
        statements = [e for e in everything if "pg_catalog" not in e["statement"]]
        assert len(everything) - len(statements) == len(RUNS)
        assert all(e["enforced"] == "block" for e in everything if e not in statements)
        assert all(e["decision"] == "allow" and e["sqlstate"] is None for e in statements)
        # Every transaction's statements, pgbench's row count of branches once per run, and the
        # Parse of the prepared statement once per client.
        expected = sum(per * CLIENTS * TRANSACTIONS for _, per in RUNS.values())
        counts = sum(1 for e in statements if e["statement"] == "select count(*) from pgbench_branches")
        prepared_parses = sum(1 for e in statements if e["rows_returned"] == 0 and "$1" in e["statement"])
        assert (counts, prepared_parses) == (len(RUNS), CLIENTS)
        assert len(statements) == expected + counts + prepared_parses
        assert counted == len(everything)
        shapes[lane] = Counter(
            (e["fingerprint"], e["rows_returned"], e["rows_affected"], e["enforced"]) for e in statements
        )
        if lane:
            assert through_lane >= 0.9 * len(statements)
        else:
            assert through_lane == 0
    assert shapes[True] == shapes[False]


SHOP_READS = """\
mode: enforce
default: block
rules:
  - name: shop-reads
    verdict: allow
    statements: [select]
    tables: [shop.customers, shop.products, shop.orders]
"""


def test_drivers_through_the_lane(make_proxy: Any, pg_server: pg.PgServer, tmp_path: Path) -> None:
    """psycopg (simple, extended text and binary, server-side prepared, pipeline) and asyncpg
    (prepared, binary) repeat statements until the lane takes them; every answer is what
    PostgreSQL answers directly, and every statement is audited once."""
    import asyncio

    import asyncpg
    import psycopg

    from dbgov_sidecar import policies

    path = tmp_path / "policy.yaml"
    path.write_text(SHOP_READS)
    running = make_proxy(policy=policies.load(str(path)))
    sql = "SELECT id, name, email, created_at FROM shop.customers WHERE id = %s"
    with psycopg.connect(pg_server.dsn(user="app"), autocommit=True) as direct:
        expected = {i: direct.execute(sql, (i,)).fetchone() for i in range(1, 11)}
    issued = 0
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        for i in range(1, 11):
            with psycopg.ClientCursor(conn) as simple:  # literals in the text: simple protocol
                assert simple.execute(sql, (i,)).fetchone() == expected[i]
            assert conn.execute(sql, (i,)).fetchone() == expected[i]
            assert conn.execute(sql, (i,), binary=True).fetchone() == expected[i]
            assert conn.execute(sql, (i,), prepare=True).fetchone() == expected[i]
            issued += 4
        with conn.pipeline():
            cursors = [conn.execute(sql, (i,)) for i in range(1, 11)]
        assert [c.fetchone() for c in cursors] == [expected[i] for i in range(1, 11)]
        issued += 10

    async def with_asyncpg() -> int:
        conn = await asyncpg.connect(running.url(), password="x", ssl=False)
        try:
            statement = await conn.prepare(sql.replace("%s", "$1"))
            for i in range(1, 11):
                row = await statement.fetchrow(i)
                assert row is not None and tuple(row) == expected[i]
            return 10
        finally:
            await conn.close()

    issued += asyncio.run(with_asyncpg())
    statements = [
        e for e in running.events if e["type"] == "statement" and "shop.customers" in e["statement"]
    ]
    executions = [e for e in statements if e["rows_returned"] == 1]
    assert len(executions) == issued
    assert all(e["decision"] == "allow" for e in statements)
    sessions: dict[str, list[dict[str, Any]]] = {}
    for event in running.events:
        sessions.setdefault(event["session_id"], []).append(event)
    assert all(audit.verify(trail) for trail in sessions.values())
    assert running.counters.lane_statements >= issued // 2


def test_the_lane_over_tls_on_both_sides(make_proxy: Any, tmp_path: Path) -> None:
    """Client TLS to the proxy and TLS to the upstream (verify-full): the lane writes to the
    encrypting transports, not the sockets under them."""
    import psycopg

    from dbgov_sidecar import policies

    cert, key = pg.make_certificate(tmp_path)
    path = tmp_path / "policy.yaml"
    path.write_text(SHOP_READS)
    terminator = make_proxy(tls_cert=str(cert), tls_key=str(key))  # a TLS upstream (pgserver has none)
    front = make_proxy(
        policy=policies.load(str(path)),
        tls_cert=str(cert),
        tls_key=str(key),
        upstream={
            "host": "127.0.0.1",
            "port": terminator.port,
            "sslmode": "verify-full",
            "sslrootcert": str(cert),
        },
    )
    dsn = f"host=localhost port={front.port} user=app dbname=shop sslmode=verify-full sslrootcert={cert}"
    sql = "SELECT id, name FROM shop.products WHERE id = %s"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.info.pgconn.ssl_in_use
        for _ in range(5):
            for i in range(1, 5):
                with psycopg.ClientCursor(conn) as simple:
                    assert simple.execute(sql, (i,)).fetchone() == conn.execute(sql, (i,)).fetchone()
    statements = [e for e in front.events if "shop.products" in e.get("statement", "")]  # (flushes the lanes)
    # 40 executions, and psycopg's own Parse once it prepares the repeated statement.
    assert sum(1 for e in statements if e["rows_returned"] == 1) == 40
    assert front.counters.lane_statements >= 20
