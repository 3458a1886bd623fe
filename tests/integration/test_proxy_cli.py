"""`dbgov proxy` as a process: environment configuration, audit file, metrics, SIGTERM drain."""

from __future__ import annotations

import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest

import pg
from dbgov_sidecar import audit

pytestmark = pytest.mark.integration


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _allow_all(tmp_path: Path) -> Path:
    path = tmp_path / "allow-all.yaml"
    path.write_text("mode: enforce\ndefault: allow\n")
    return path


def test_proxy_process_end_to_end(pg_server: pg.PgServer, tmp_path: Path) -> None:
    port, metrics_port = pg.free_port(), pg.free_port()
    audit_file = tmp_path / "audit.jsonl"
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": pg.APP_PASSWORD,
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
        "DBGOV_POLICY": str(_allow_all(tmp_path)),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = psycopg.connect(f"host=127.0.0.1 port={port} user=cli dbname=shop sslmode=disable")
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        conn.autocommit = True
        try:
            assert conn.execute("SELECT count(*) FROM shop.products").fetchone() == (4,)
            status, body = _get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200 and "dbgov_sessions_active 1" in body
            assert 'decision="allow"' in body
            assert _get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200
            assert _get(f"http://127.0.0.1:{metrics_port}/readyz")[0] == 200
            result: list[object] = []
            worker = threading.Thread(
                target=lambda: result.append(conn.execute("SELECT pg_sleep(1), 7").fetchone())
            )
            worker.start()
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)  # drain: the statement in flight finishes
            worker.join(10)
            assert result == [("", 7)]
            with pytest.raises(psycopg.OperationalError):  # not accepting any more
                psycopg.connect(f"host=127.0.0.1 port={port} user=cli dbname=shop sslmode=disable")
        finally:
            conn.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    assert events[0]["type"] == "session_start"
    statements = [e for e in events if e["type"] == "statement"]
    assert any(e["statement"].startswith("SELECT count(*)") for e in statements)
    assert audit.verify(events)


ALLOW_ALL = "mode: enforce\ndefault: allow\n"
BLOCK_PRODUCTS = """\
mode: enforce
default: allow
rules:
  - {name: no-products, verdict: block, statements: [select], tables: [shop.products]}
"""


def _start(
    pg_server: pg.PgServer, tmp_path: Path, policy: Path, *, metrics: str = ""
) -> tuple[subprocess.Popen[str], int]:
    port = pg.free_port()
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_POLICY": str(policy),
        "DBGOV_AUDIT": "off",
        "DBGOV_METRICS": metrics,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env=env, stderr=subprocess.PIPE, text=True
    )
    return proc, port


def _connect(proc: subprocess.Popen[str], port: int) -> psycopg.Connection[tuple[object, ...]]:
    deadline = time.monotonic() + 20
    while True:
        try:
            return psycopg.connect(
                f"host=127.0.0.1 port={port} user=cli dbname=shop sslmode=disable", autocommit=True
            )
        except psycopg.OperationalError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)


def _eventually(check: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()  # type: ignore[operator]
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_policy_hot_reload_keeps_sessions(pg_server: pg.PgServer, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(ALLOW_ALL)
    proc, port = _start(pg_server, tmp_path, policy)
    try:
        conn = _connect(proc, port)
        try:
            assert conn.execute("SELECT count(*) FROM shop.products").fetchone() == (4,)
            policy.write_text(BLOCK_PRODUCTS)
            proc.send_signal(signal.SIGHUP)

            def blocked() -> None:
                try:
                    conn.execute("SELECT count(*) FROM shop.products")
                except psycopg.errors.InsufficientPrivilege as err:
                    assert "no-products" in str(err)
                    return
                raise AssertionError("still allowed")

            _eventually(blocked)  # same session, new policy
            policy.write_text("mode: enforce\ndefault: maybe\nrules: 7\n")  # invalid: kept out
            os.utime(policy, (time.time() + 5, time.time() + 5))
            time.sleep(3)  # the file watcher polls every 2 s
            blocked()
            assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (200,)
        finally:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "not reloaded" in stderr and "default" in stderr
    assert "reloaded" in stderr


def test_invalid_policy_at_start_exits_with_every_problem(pg_server: pg.PgServer, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: sometimes\ndefault: maybe\n")
    proc, _ = _start(pg_server, tmp_path, policy)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "mode" in stderr and "default" in stderr


def test_audit_to_stdout_pipe_and_a_file(pg_server: pg.PgServer, tmp_path: Path) -> None:
    port = pg.free_port()
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_AUDIT": f"stdout,{tmp_path / 'audit.jsonl'}",
        "DBGOV_METRICS": "",
        "DBGOV_POLICY": str(_allow_all(tmp_path)),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        conn = _connect(proc, port)  # type: ignore[arg-type]
        with conn:
            for i in range(3):
                conn.execute("SELECT %s::int", [i])
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in stdout.splitlines()]
    assert [e["type"] for e in events] == [
        "session_start",
        "statement",
        "statement",
        "statement",
        "session_end",
    ]
    assert audit.verify(events)


@pytest.mark.parametrize("kind", ["file", "pipe", "devnull", "tty"])
def test_audit_to_any_kind_of_stdout(pg_server: pg.PgServer, tmp_path: Path, kind: str) -> None:
    """`dbgov proxy > proxy.log` and `dbgov proxy > /dev/null` (uvloop aborted on both), a pipe
    and a terminal."""
    port = pg.free_port()
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_AUDIT": "stdout",
        "DBGOV_METRICS": "",
        "DBGOV_POLICY": str(_allow_all(tmp_path)),
    }
    log = tmp_path / "proxy.log"
    terminal, tty = pty.openpty()  # a few audit lines fit in its buffer: read after the exit
    with open(log, "w") as log_file:
        stdout = {"file": log_file, "pipe": subprocess.PIPE, "devnull": subprocess.DEVNULL, "tty": tty}
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbgov_sidecar.proxy_cli"],
            env=env,
            stdout=stdout[kind],
            stderr=subprocess.PIPE,
            text=True,
        )
    os.close(tty)
    try:
        with _connect(proc, port) as conn:  # type: ignore[arg-type]
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = {"pipe": out, "file": log.read_text(), "devnull": "", "tty": _drain(terminal)}[kind]
    assert proc.returncode == 0, err
    if kind == "devnull":
        return
    events = [json.loads(line) for line in written.splitlines()]
    assert [e["type"] for e in events] == ["session_start", "statement", "session_end"]
    assert events[1]["statement"] == "SELECT 41 + 1"
    assert audit.verify(events)


def _drain(terminal: int) -> str:
    """What was written to a pty's other side, once the writer has exited."""
    chunks = []
    try:
        while chunk := os.read(terminal, 65536):
            chunks.append(chunk)
    except OSError:  # EIO: no writer left and nothing more to read
        pass
    finally:
        os.close(terminal)
    return b"".join(chunks).decode()


def test_not_ready_until_the_policy_file_arrives(pg_server: pg.PgServer, tmp_path: Path) -> None:
    """The kubelet's startup/readiness probes must not pass while every statement would be refused."""
    policy = tmp_path / "bundle" / "policy.yaml"  # the operator has not written it yet
    metrics_port = pg.free_port()
    # "*": every interface, as the injected sidecar is told, so the kubelet reaches it on the pod IP
    proc, port = _start(pg_server, tmp_path, policy, metrics=f"*:{metrics_port}")
    readyz = f"http://127.0.0.1:{metrics_port}/readyz"
    try:
        conn = _connect(proc, port)  # listening, and refusing (fail closed)
        try:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="does not exist yet"):
                conn.execute("SELECT 1")

            def unready() -> None:
                status, body = _get(readyz)
                assert status == 503 and "no policy loaded" in body and str(policy) in body, body

            _eventually(unready)
            assert _get(f"http://127.0.0.1:{metrics_port}/healthz")[0] == 200  # alive all the same
            if socket.has_ipv6 and _ipv6_loopback():
                assert _get(f"http://[::1]:{metrics_port}/healthz")[0] == 200  # both families
            policy.parent.mkdir()
            policy.write_text(ALLOW_ALL)
            _eventually(lambda: _assert_ready(readyz))  # the watcher picks the file up
            assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _assert_ready(url: str) -> None:
    assert _get(url) == (200, "ready\n")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.parametrize("setting", ["metrics", "listen"])
def test_a_second_proxy_on_a_busy_port_says_which_setting(
    pg_server: pg.PgServer, tmp_path: Path, setting: str
) -> None:
    """Two proxies on one machine: the second one's port is taken (the default 9187 for metrics)."""
    metrics_port = pg.free_port()
    first, port = _start(pg_server, tmp_path, _allow_all(tmp_path), metrics=f"127.0.0.1:{metrics_port}")
    try:
        _connect(first, port).close()
        env = {
            **os.environ,
            "DBGOV_LISTEN": f"127.0.0.1:{port if setting == 'listen' else pg.free_port()}",
            "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
            "DBGOV_POLICY": str(_allow_all(tmp_path)),
            "DBGOV_AUDIT": "stdout",
            "DBGOV_METRICS": f"127.0.0.1:{metrics_port}" if setting == "metrics" else "",
        }
        second = subprocess.run(
            [sys.executable, "-m", "dbgov_sidecar.cli", "proxy"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert second.returncode == 2
        assert "Traceback" not in second.stderr
        last = second.stderr.strip().splitlines()[-1]
        env_name = f"DBGOV_{setting.upper()}"
        assert last.startswith("dbgov proxy: cannot ")
        assert f"127.0.0.1:{port if setting == 'listen' else metrics_port}" in last
        assert "the port is in use" in last
        assert f"set {env_name} (or --{setting}) to a free host:port" in last
        assert second.stdout == ""
        _connect(first, port).close()  # the first one is untouched
    finally:
        first.send_signal(signal.SIGTERM)
        try:
            first.wait(20)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
