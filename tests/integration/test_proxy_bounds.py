"""Denial of service bounds (issue 14 item 8), against `dbgov proxy` and PostgreSQL: what one
client sends cannot stall the other sessions, balloon the proxy's memory or lock clients out."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from test_proxy_protocol import RawClient

import pg
from conftest import RunningProxy
from dbgov_sidecar import session
from dbgov_sidecar.pgwire import messages

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"  # maxRowsAffected: 100


def _rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmRSS for {pid}")


class Proxy:
    """`dbgov proxy` as its own process (its memory is its own), and a watch on it."""

    def __init__(self, server: pg.PgServer, **env: str) -> None:
        self.port = pg.free_port()
        environ = {
            **os.environ,
            "DBGOV_LISTEN": f"127.0.0.1:{self.port}",
            "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{server.port}/shop?sslmode=disable",
            "DBGOV_POLICY": str(POLICY),
            "DBGOV_AUDIT": "off",
            "DBGOV_METRICS": "",
            **env,
        }
        cmd = [sys.executable, "-m", "dbgov_sidecar.proxy_cli"]
        self.proc = subprocess.Popen(cmd, env=environ, stderr=subprocess.DEVNULL)
        self.dsn = f"host=127.0.0.1 port={self.port} user=app dbname=shop sslmode=disable"
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(self.dsn).close()
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline and self.proc.poll() is None
                time.sleep(0.1)
        self.base = _rss_mb(self.proc.pid)
        self.peak = self.base
        self.worst = 0.0  # the slowest `SELECT 1` of another session while watching
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @contextlib.contextmanager
    def watching(self, *, ping: bool = True) -> Iterator[None]:
        """Sample the proxy's RSS (and time a `SELECT 1` loop on its own session) meanwhile."""
        self._stop.clear()
        self._threads = [threading.Thread(target=self._sample)]
        if ping:
            self._threads.append(threading.Thread(target=self._ping, args=(psycopg.connect(self.dsn),)))
        for t in self._threads:
            t.start()
        try:
            yield
        finally:
            self._stop.set()
            for t in self._threads:
                t.join()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb(self.proc.pid))
            time.sleep(0.02)

    def _ping(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        with conn:
            while not self._stop.is_set():
                started = time.monotonic()
                assert conn.execute("SELECT 1").fetchone() == (1,)
                self.worst = max(self.worst, time.monotonic() - started)
                time.sleep(0.01)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def start_proxy(pg_server: pg.PgServer) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(**env: str) -> Proxy:
        started.append(Proxy(pg_server, **env))
        return started[-1]

    yield start
    for proxy in started:
        proxy.close()


def _psql(dsn: str, sql: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """psql sends the file's statement as one simple Query (and runs in its own process)."""
    path = tmp_path / "statement.sql"
    path.write_text(sql + ";\nSELECT 'after';\n")
    return subprocess.run(
        [str(pg.BIN / "psql"), "-X", "-At", "-f", str(path), dsn],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


# --- 1. analysis bounds -------------------------------------------------------------------


def test_a_statement_over_the_analysis_limit_is_refused_naming_the_setting(
    start_proxy: Callable[..., Proxy], pg_server: pg.PgServer, tmp_path: Path
) -> None:
    proxy = start_proxy()
    before = pg_server.psql("SELECT count(*) FROM shop.orders;").strip()
    rows = ",".join(f"({10**6 + i}, 1, 1, {i % 7 + 1})" for i in range(150_000))  # ~2.6 MB
    insert = f"INSERT INTO shop.orders (id, customer_id, product_id, quantity) VALUES {rows}"
    with proxy.watching():
        result = _psql(proxy.dsn, insert, tmp_path)
    assert 'refused by rule "guardrail:max-statement-size"' in result.stderr, result.stderr[-500:]
    assert "more than the 1048576 bytes dbgov analyzes" in result.stderr
    assert "DBGOV_MAX_STATEMENT_SIZE" in result.stderr
    assert result.stdout.strip() == "after"  # the session goes on
    assert pg_server.psql("SELECT count(*) FROM shop.orders;").strip() == before
    assert proxy.worst < 1.0, f"other sessions waited {proxy.worst:.1f} s"
    assert proxy.peak - proxy.base < 200, f"RSS {proxy.base} -> {proxy.peak} MB"


def test_a_wide_select_list_does_not_balloon_the_proxy(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """libpg_query's normalizer takes ~8 KB per SELECT target: 600 KB of `SELECT 1,1,…` took the
    proxy to 2.7 GB (it normalized the text three times: lane, cache, lane again)."""
    proxy = start_proxy()
    with proxy.watching():
        result = _psql(proxy.dsn, "SELECT " + ",".join(["1"] * 300_000), tmp_path)
    assert "target lists can have at most 1664 entries" in result.stderr  # PostgreSQL's own answer
    assert result.stdout.strip() == "after"
    assert proxy.peak - proxy.base < 800, f"RSS {proxy.base} -> {proxy.peak} MB"


def test_a_long_group_by_does_not_stall_other_sessions(
    start_proxy: Callable[..., Proxy], tmp_path: Path
) -> None:
    """The normalizer matches every GROUP BY item against every SELECT target: quadratic. A
    330 KB statement stalled every session for ~10 s; its analysis is linear and far shorter."""
    proxy = start_proxy()
    targets = ",".join(f"a{i}" for i in range(20_000))
    groups = ",".join(f"b{i}" for i in range(20_000))
    with proxy.watching():
        result = _psql(proxy.dsn, f"SELECT {targets} FROM shop.orders GROUP BY {groups}", tmp_path)
    assert "ERROR" in result.stderr and result.stdout.strip() == "after"
    assert proxy.worst < 3.0, f"other sessions waited {proxy.worst:.1f} s"


# --- 2. bounded buffering -----------------------------------------------------------------

SYNC = messages.SYNC_MESSAGE
READY_IDLE = messages.ready_for_query("I")


def _guarded_update(raw: RawClient) -> None:
    """An extended-protocol UPDATE under maxRowsAffected: the proxy holds its Sync (and all
    client input after it) until the server reports the count."""
    raw.send(
        messages.parse("", "UPDATE shop.orders SET quantity = quantity WHERE id = 1", ())
        + messages.bind("", "", [])
        + messages.execute("", 0)
        + SYNC
    )


def test_input_held_behind_a_guarded_write_is_bounded(
    start_proxy: Callable[..., Proxy], pg_server: pg.PgServer
) -> None:
    proxy = start_proxy()
    locker = psycopg.connect(pg_server.dsn())
    locker.execute("SELECT 1 FROM shop.orders WHERE id = 1 FOR UPDATE")  # holds the row lock
    raw = RawClient(proxy.port)
    try:
        assert raw.login()[-1].type == messages.READY_FOR_QUERY
        _guarded_update(raw)
        syncs = 2_000_000  # 10 MB of input while the write waits
        sent = threading.Event()
        failed: list[BaseException] = []

        def stream_syncs() -> None:
            try:
                raw.sock.sendall(SYNC * syncs)
            except BaseException as err:  # the test fails on it below, not in a dying thread
                failed.append(err)
            else:
                sent.set()

        stream = threading.Thread(target=stream_syncs)
        # sendall's timeout bounds the whole 10 MB send (Python 3.5+), and the proxy rightly stops
        # reading while it holds: on a loaded machine that outlasts the client's usual 10 s.
        raw.sock.settimeout(180)
        with proxy.watching(ping=False):
            stream.start()
            time.sleep(3)
            held_peak = proxy.peak
            assert not sent.is_set(), "the proxy read all of it while it could not pass any on"
            locker.commit()  # the write goes ahead: everything held flows
            answer = raw.read_until(b"Z")
            assert [chr(m.type) for m in answer] == ["1", "2", "C", "Z"]
            readies, rest = 0, raw.framer.take_buffer()
            while readies < syncs:
                chunk = rest + raw.sock.recv(1 << 20)
                whole = len(chunk) - len(chunk) % len(READY_IDLE)
                assert chunk[:whole] == READY_IDLE * (whole // len(READY_IDLE)), chunk[:40]
                readies, rest = readies + whole // len(READY_IDLE), chunk[whole:]
            stream.join(30)
        assert not failed, failed
        assert sent.is_set() and readies == syncs and not rest
        assert held_peak - proxy.base < 60, f"RSS {proxy.base} -> {held_peak} MB while held"
        assert proxy.peak - proxy.base < 200, f"RSS {proxy.base} -> {proxy.peak} MB"
        raw.send(messages.query("SELECT 'still here'"))
        assert [m.type for m in raw.read_until(b"Z")][-1] == messages.READY_FOR_QUERY
    finally:
        raw.close()
        locker.close()


def test_a_server_message_over_the_limit_ends_the_session_clearly(
    make_proxy: Callable[..., RunningProxy],
) -> None:
    running = make_proxy(session_config=session.SessionConfig(max_message_size=1 << 20))
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT length(repeat('x', 1000000))").fetchone() == (1000000,)
        with pytest.raises(psycopg.OperationalError) as err:
            conn.execute("SELECT repeat('x', 2000000)")
    text = str(err.value)
    assert "server message 'D' (a row) of 2000010 bytes exceeds the limit of 1048576" in text, text
    assert "DBGOV_MAX_MESSAGE_SIZE" in text
    ended = [e for e in running.events if e["type"] == "session_end"]
    assert ended and "exceeds the limit of 1048576" in ended[-1]["reason"]
    failed = [e for e in running.events if e.get("statement") == "SELECT repeat('x', 2000000)"]
    assert failed and failed[0]["sqlstate"] == "08006"  # its outcome was never seen


# --- 3. connections that have not authenticated -------------------------------------------


def _idle_sockets(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def test_idle_sockets_do_not_take_the_sessions_slots(make_proxy: Callable[..., RunningProxy]) -> None:
    running = make_proxy(max_connections=20)
    idle = _idle_sockets(running.port, 30)  # more than max_connections, fewer than the startup slots
    try:
        time.sleep(0.3)
        with psycopg.connect(running.dsn(), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        for sock in idle:
            sock.close()


def test_more_idle_sockets_than_startup_slots_close_the_oldest(
    make_proxy: Callable[..., RunningProxy],
) -> None:
    running = make_proxy(max_connections=50, max_startup_connections=10, auth_timeout=60)
    idle = _idle_sockets(running.port, 25)
    try:
        time.sleep(0.3)
        with psycopg.connect(running.dsn(), autocommit=True) as conn:  # evicts the oldest idle one
            assert conn.execute("SELECT 1").fetchone() == (1,)
        closed = 0
        for sock in idle:
            sock.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                closed += sock.recv(1) == b""
        assert closed == 16  # 25 + 1 arrived, 10 may wait: the 16 oldest were closed
        assert all(sock.recv(1) == b"" for sock in idle[:16])
    finally:
        for sock in idle:
            sock.close()
