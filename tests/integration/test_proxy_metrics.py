"""/metrics of a real `dbgov proxy` after real statements, read the way Prometheus reads it.

The body comes from prometheus-client (dbgov's collector beside the process and Python ones), so
the test parses it with prometheus-client's own parser rather than by string matching: counts per
class and decision, refusals per rule, masked columns, sessions, a cumulative latency histogram
whose count is the number of statements, and the families a Prometheus user expects. The counts
must also agree with the audit file, the same events they are derived from.
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

import prometheus_client
import psycopg
import pytest
from prometheus_client import parser

import pg

pytestmark = pytest.mark.integration

POLICY = """\
mode: enforce
default: block
rules:
  - {name: no-drop, verdict: block, statements: [drop]}
  - {name: read-shop, verdict: allow, statements: [select], tables: [shop.products, shop.customers]}
masks:
  - {table: shop.customers, column: email, strategy: email}
"""

ALLOWED = "SELECT name FROM shop.products WHERE id = 2"
MASKED = "SELECT email FROM shop.customers WHERE id = 3"
DROPPED = "DROP TABLE shop.orders"
UNCOVERED = "DELETE FROM shop.orders WHERE id = 1"


def _scrape(port: int) -> tuple[str, str, float]:
    """The body, its content type, and how long the scrape took (seconds)."""
    started = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
        content_type = response.headers["Content-Type"]
    return body, content_type, time.perf_counter() - started


def _samples(body: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → labels → value, for every family in the body."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in parser.text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture
def running(pg_server: pg.PgServer, tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """`dbgov proxy` as a process (listen port, metrics port, audit file), stopped with SIGTERM."""
    port, metrics_port = pg.free_port(), pg.free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    audit_file = tmp_path / "audit.jsonl"
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_POLICY": str(policy),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        yield port, metrics_port, audit_file
    finally:
        proc.terminate()
        try:
            status = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
        assert status == 0 and "Traceback" not in stderr, stderr[-2000:]


def _connect(port: int) -> psycopg.Connection[tuple[object, ...]]:
    deadline = time.monotonic() + 20
    while True:
        try:
            return psycopg.connect(
                f"host=127.0.0.1 port={port} user=app dbname=shop sslmode=disable", autocommit=True
            )
        except psycopg.OperationalError:
            assert time.monotonic() < deadline, "the proxy did not start accepting within 20s"
            time.sleep(0.1)


def test_metrics_count_real_statements(running: tuple[int, int, Path]) -> None:
    port, metrics_port, audit_file = running
    with _connect(port) as conn:
        # Unprepared: psycopg would prepare on the fifth run, one more statement to audit.
        for _ in range(25):  # enough repeats for the compiled lane to take them over
            assert conn.execute(ALLOWED, prepare=False).fetchone() == ("Gadget",)
        for _ in range(4):
            (email,) = conn.execute(MASKED, prepare=False).fetchone() or ("",)
            assert email != "customer3@example.com" and str(email).endswith("@example.com")
        for sql in (DROPPED, DROPPED, DROPPED, UNCOVERED):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(sql, prepare=False)
        body, content_type, _ = _scrape(metrics_port)
        samples = _samples(body)
        assert content_type == prometheus_client.CONTENT_TYPE_LATEST
        assert samples["dbgov_sessions_active"] == {(): 1.0}
        assert samples["dbgov_sessions_total"] == {(): 1.0}
    statements = samples["dbgov_statements_total"]
    assert statements[(("class", "select"), ("decision", "allow"))] == 25
    assert statements[(("class", "select"), ("decision", "mask"))] == 4
    assert statements[(("class", "ddl"), ("decision", "block"))] == 3
    assert statements[(("class", "delete"), ("decision", "block"))] == 1
    assert samples["dbgov_refusals_total"] == {(("rule", "no-drop"),): 3.0, (("rule", "default"),): 1.0}
    assert samples["dbgov_masked_columns_total"] == {(): 4.0}
    assert samples["dbgov_lane_statements_total"][()] > 0, "the lane's batched counts caught up"
    assert samples["dbgov_audit_dropped_total"] == {(): 0.0}

    buckets = sorted(
        (
            (float(dict(labels)["le"]), value)
            for labels, value in samples["dbgov_statement_duration_seconds_bucket"].items()
        )
    )
    counts = [value for _, value in buckets]
    assert counts == sorted(counts), f"buckets are not cumulative: {buckets}"
    assert buckets[-1] == (float("inf"), 33)
    assert samples["dbgov_statement_duration_seconds_count"] == {(): 33.0}
    assert 0 < samples["dbgov_statement_duration_seconds_sum"][()] < 33

    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
        assert samples[family][()] > 0, family
    (python_info,) = samples["python_info"]
    assert dict(python_info)["implementation"] == "CPython"
    assert "python_gc_collections_total" in samples

    # The same events, as the audit file has them.
    events = [json.loads(line) for line in audit_file.read_text().splitlines() if line]
    audited = [(e["classes"][0], e["enforced"]) for e in events if e["type"] == "statement"]
    assert len(audited) == 33
    assert {(("class", c), ("decision", d)): float(audited.count((c, d))) for c, d in audited} == statements


def test_scrape_cost_after_ten_thousand_statements(running: tuple[int, int, Path]) -> None:
    """/metrics reads tallies: its cost does not grow with the statements counted, and
    counting stays on the statement path's plain integers. The time is printed (a shared
    machine's timings are reported, not asserted closely)."""
    port, metrics_port, _ = running
    with _connect(port) as conn:
        _scrape(metrics_port)  # the first scrape pays for /proc lookups and the platform's facts
        first = min(_scrape(metrics_port)[2] for _ in range(5))
        with conn.pipeline():
            for i in range(10_000):
                conn.execute(ALLOWED if i % 10 else MASKED, prepare=False)
    body, _, _ = _scrape(metrics_port)
    after = min(_scrape(metrics_port)[2] for _ in range(5))
    samples = _samples(body)
    assert samples["dbgov_statement_duration_seconds_count"] == {(): 10_000.0}
    assert samples["dbgov_statements_total"][(("class", "select"), ("decision", "mask"))] == 1_000
    print(f"/metrics scrape: {first * 1000:.2f} ms before, {after * 1000:.2f} ms after 10k statements")
    assert after < 1.0, f"a scrape took {after:.3f}s"
