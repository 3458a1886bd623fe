"""Faults: dead upstreams, vanished or slow clients, garbage on the wire, many connections."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pg
from conftest import RulesPolicy, RunningProxy, upstream_config
from dbgov_sidecar import policy_port, proxy
from dbgov_sidecar.pgwire import framing, messages

pytestmark = pytest.mark.integration


def _app_backends(server: pg.PgServer) -> int:
    out = server.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app';")
    return int(out.strip())


def _login(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(messages.startup_message({"user": "app", "database": "shop"}))
    framer = framing.Framer(side="backend")
    while True:
        framer.feed(sock.recv(65536))
        _, msgs = framer.drain()
        if any(m.type == messages.READY_FOR_QUERY for m in msgs):
            return sock


def _wait_for(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_upstream_killed_mid_query(dbgov: RunningProxy, pg_server: pg.PgServer) -> None:
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        killer = threading.Timer(0.5, lambda: pg_server.psql(f"SELECT pg_terminate_backend({backend})"))
        killer.start()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT pg_sleep(20)")
        killer.join()
    with psycopg.connect(dbgov.dsn()) as conn:  # the proxy is still serving
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # The statement whose ReadyForQuery never came is still evidence, with the server's last word
    # (57P01: terminated by an administrator), then the session's end.
    (cut,) = [e for e in dbgov.events if e.get("statement") == "SELECT pg_sleep(20)"]
    assert cut["sqlstate"] == "57P01"
    ends = [
        e for e in dbgov.events if e.get("type") == "session_end" and e["session_id"] == cut["session_id"]
    ]
    assert [e["reason"] for e in ends] == ["upstream lost"]


def test_client_gone_mid_result_frees_the_upstream(dbgov: RunningProxy, pg_server: pg.PgServer) -> None:
    before = _app_backends(pg_server)
    sock = _login(dbgov.port)
    assert _app_backends(pg_server) == before + 1
    sock.sendall(messages.query("SELECT g, repeat('x', 500) FROM generate_series(1, 500000) g"))
    assert sock.recv(4096)  # the result has started streaming
    sock.close()
    _wait_for(lambda: _app_backends(pg_server) == before)
    # No Terminate, the socket just closed: the session still ends in the audit trail.
    statement = "SELECT g, repeat('x', 500) FROM generate_series(1, 500000) g"
    _wait_for(lambda: any(e.get("reason") == "client disconnected" for e in dbgov.events))
    (cut,) = [e for e in dbgov.events if e.get("statement") == statement]
    assert cut["sqlstate"] == "08006" and cut["rows_returned"] > 0
    starts = [e for e in dbgov.events if e.get("type") == "session_start"]
    ends = [e for e in dbgov.events if e.get("type") == "session_end"]
    assert {e["session_id"] for e in starts} == {e["session_id"] for e in ends}  # every session ends


def test_slow_client_keeps_proxy_memory_bounded(dbgov: RunningProxy) -> None:
    sock = _login(dbgov.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(messages.query("SELECT repeat('y', 1000) FROM generate_series(1, 200000)"))
    time.sleep(1.5)  # ~200 MB on offer; the client reads nothing

    async def buffered() -> int:
        return max(c.transport.get_write_buffer_size() for c in dbgov.proxy.connections if c.transport)

    assert dbgov.call(buffered()) < 4 * 1024 * 1024
    sock.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(min_size=1, max_size=200), after_login=st.booleans())
def test_malformed_messages_close_the_connection_with_an_error(
    shared_proxy: RunningProxy, garbage: bytes, after_login: bool
) -> None:
    sock = (
        _login(shared_proxy.port)
        if after_login
        else socket.create_connection(("127.0.0.1", shared_proxy.port))
    )
    sock.settimeout(10)
    try:
        sock.sendall(garbage)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    except (ConnectionResetError, BrokenPipeError):
        reply = b""
    finally:
        sock.close()
    if b"08P01" in reply:
        assert b"protocol violation" in reply
    shared_proxy.assert_clean()


def test_proxy_survives_garbage_and_serves_the_next_client(dbgov: RunningProxy) -> None:
    sock = _login(dbgov.port)
    sock.sendall(b"Q" + struct.pack("!i", 2))  # length below 4
    reply = sock.recv(4096)
    assert b"08P01" in reply and b"below the minimum of 4" in reply
    assert sock.recv(10) == b""  # closed
    sock.close()
    with psycopg.connect(dbgov.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_oversized_message_is_refused(make_proxy: object) -> None:
    from dbgov_sidecar import session

    running = make_proxy(session_config=session.SessionConfig(max_message_size=1024))  # type: ignore[operator]
    sock = _login(running.port)
    sock.sendall(messages.query("SELECT '" + "z" * 2000 + "'"))
    reply = sock.recv(4096)
    assert b"exceeds the limit of 1024" in reply
    sock.close()


@pytest.fixture(scope="module")
def big_server() -> Iterator[pg.PgServer]:
    """A PostgreSQL that accepts a thousand sessions (the shared one is sized for the suite)."""
    with pg.running_server(max_connections=1100) as server:
        yield server


def test_a_thousand_concurrent_connections(big_server: pg.PgServer) -> None:
    count = 1000
    running = RunningProxy(
        proxy.ProxyConfig(listen_port=0, upstream=upstream_config(big_server)), RulesPolicy()
    )
    try:

        async def one(i: int, opened: asyncio.Event, ready: list[int]) -> int:
            conn = await asyncpg.connect(running.url(), ssl=False, timeout=120)
            try:
                ready.append(i)
                if len(ready) == count:
                    opened.set()
                await asyncio.wait_for(opened.wait(), 120)  # all open at once
                value: int = await conn.fetchval("SELECT $1::int * 2", i)
                return value
            finally:
                await conn.close()

        async def run() -> tuple[list[int], int]:
            opened, ready = asyncio.Event(), []
            tasks = [asyncio.create_task(one(i, opened, ready)) for i in range(count)]
            await opened.wait()
            peak = len(running.proxy.connections)
            return list(await asyncio.gather(*tasks)), peak

        values, peak = asyncio.run(run())
        assert values == [i * 2 for i in range(count)]
        assert peak == count
        running.assert_clean(timeout=60)
    finally:
        running.close()


class _BrokenRewrite(RulesPolicy):
    def decide(self, sql: str, context: object) -> policy_port.Decision:
        if "explode" in sql:
            return policy_port.SimpleDecision(
                verdict="mask", rule="bad", reason="bug", rewritten="SELECT '\0'"
            )
        return super().decide(sql, context)


def test_a_proxy_bug_costs_one_session_not_the_proxy(make_proxy: object) -> None:
    running = make_proxy(policy=_BrokenRewrite())  # type: ignore[operator]
    conn = psycopg.connect(running.dsn(), autocommit=True)
    with pytest.raises(psycopg.errors.InternalError_, match="internal error in the proxy"):
        conn.execute("SELECT 'explode'")
    assert conn.closed or conn.info.status == psycopg.pq.ConnStatus.BAD
    conn.close()
    with psycopg.connect(running.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_connections_over_max_connections_are_refused_like_postgresql(make_proxy: object) -> None:
    running = make_proxy(max_connections=2)  # type: ignore[operator]
    first = psycopg.connect(running.dsn())
    second = psycopg.connect(running.dsn())
    try:
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(running.dsn())
        with pytest.raises(asyncpg.TooManyConnectionsError):  # SQLSTATE 53300, as PostgreSQL's
            asyncio.run(asyncpg.connect(running.url(), ssl=False))
        assert first.execute("SELECT 1").fetchone() == (1,)  # the ones in are untouched
    finally:
        first.close()
    try:
        with psycopg.connect(running.dsn()) as third:  # a freed slot is usable again
            assert third.execute("SELECT 2").fetchone() == (2,)
    finally:
        second.close()


def test_a_client_that_never_finishes_starting_up_is_disconnected(make_proxy: object) -> None:
    from dbgov_sidecar import session
    from dbgov_sidecar.pgwire import auth

    keys = auth.scram_keys("letmein", salt=b"s" * 16)
    running = make_proxy(auth_timeout=0.3, session_config=session.SessionConfig(client_scram=keys))  # type: ignore[operator]
    silent = socket.create_connection(("127.0.0.1", running.port))  # no startup packet at all
    half = socket.create_connection(("127.0.0.1", running.port))
    try:
        # SCRAM demanded and never answered: a FATAL the client can read, then the close
        half.sendall(messages.startup_message({"user": "app", "database": "shop"}))
        silent.settimeout(5)
        assert silent.recv(100) == b""  # closed by the proxy, nothing to read
        half.settimeout(5)
        data = b""
        while chunk := half.recv(4096):
            data += chunk
        assert b"authentication timed out" in data and b"08006" in data
    finally:
        silent.close()
        half.close()
    with psycopg.connect(running.dsn(extra="password=letmein")) as conn:  # finishing in time: unaffected
        time.sleep(0.5)
        assert conn.execute("SELECT 1").fetchone() == (1,)
