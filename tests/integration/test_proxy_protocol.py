"""Startup, authentication, TLS, cancel, limits and refusal paths through the real proxy."""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

import pg
from conftest import RulesPolicy, RunningProxy
from dbgov_sidecar import session
from dbgov_sidecar.pgwire import auth, framing, messages

pytestmark = pytest.mark.integration


class RawClient:
    """A hand-driven client speaking through the codec over a socket."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.framer = framing.Framer(side="backend")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, mtype: bytes) -> list[framing.Message]:
        """Messages up to and including the first of type ``mtype`` (or until EOF)."""
        out: list[framing.Message] = []
        while True:
            msg = self.framer.next_message()
            if msg is not None:
                out.append(msg)
                if msg.type == mtype[0]:
                    return out
                continue
            data = self.sock.recv(65536)
            if not data:
                return out
            self.framer.feed(data)

    def login(self, user: str = "app") -> list[framing.Message]:
        self.send(messages.startup_message({"user": user, "database": "shop"}))
        return self.read_until(b"Z")

    def close(self) -> None:
        self.sock.close()


def _fields(msgs: list[framing.Message]) -> dict[str, str]:
    errors = [m for m in msgs if m.type == messages.ERROR_RESPONSE]
    assert errors, [chr(m.type) for m in msgs]
    return messages.decode_fields(errors[0].data)


@pytest.mark.parametrize(
    ("user", "password"),
    [("app", pg.APP_PASSWORD), ("md5user", pg.MD5_PASSWORD), ("trustuser", None)],
    ids=["scram", "md5", "trust"],
)
def test_upstream_auth_methods(make_proxy: object, user: str, password: str | None) -> None:
    running = make_proxy(upstream={"user": user, "password": password})  # type: ignore[operator]
    with psycopg.connect(running.dsn(user="whoever")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (user,)
        # The client sees the proxy's BackendKeyData, not the server's.
        assert conn.info.backend_pid != conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def test_upstream_wrong_password_passes_the_fatal_on(make_proxy: object) -> None:
    running = make_proxy(upstream={"password": "wrong"})  # type: ignore[operator]
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(running.dsn())
    running_ok = make_proxy()  # type: ignore[operator]
    with psycopg.connect(running_ok.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_upstream_tls_verify_full_through_a_tls_proxy(make_proxy: object, tmp_path: Path) -> None:
    # The pgserver build has no SSL, so the TLS upstream is a second dbgov with a certificate.
    cert, key = pg.make_certificate(tmp_path)
    terminator = make_proxy(tls_cert=str(cert), tls_key=str(key))  # type: ignore[operator]
    front = make_proxy(  # type: ignore[operator]
        upstream={
            "host": "127.0.0.1",
            "port": terminator.port,
            "sslmode": "verify-full",
            "sslrootcert": str(cert),
        }
    )
    with psycopg.connect(front.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    other, _ = pg.make_certificate(tmp_path, name="other")
    untrusting = make_proxy(  # type: ignore[operator]
        upstream={"port": terminator.port, "sslmode": "verify-full", "sslrootcert": str(other)}
    )
    with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
        psycopg.connect(untrusting.dsn())


def test_upstream_require_refuses_a_server_without_tls(make_proxy: object) -> None:
    running = make_proxy(upstream={"sslmode": "require"})  # type: ignore[operator]
    with pytest.raises(psycopg.OperationalError, match="does not support TLS"):
        psycopg.connect(running.dsn())
    preferring = make_proxy(upstream={"sslmode": "prefer"})  # type: ignore[operator]
    with psycopg.connect(preferring.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_client_tls_and_password(make_proxy: object, tmp_path: Path) -> None:
    cert, key = pg.make_certificate(tmp_path)
    keys = auth.scram_keys("letmein", salt=b"0123456789abcdef")
    running = make_proxy(  # type: ignore[operator]
        tls_cert=str(cert), tls_key=str(key), session_config=session.SessionConfig(client_scram=keys)
    )
    dsn = f"host=127.0.0.1 port={running.port} user=agent dbname=shop"
    with psycopg.connect(f"{dsn} sslmode=verify-full sslrootcert={cert} password=letmein") as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{dsn} sslmode=require password=nope")


@pytest.mark.parametrize("key_type", ["p256", "p384"])
def test_client_password_logins_bind_to_the_proxys_certificate(
    make_proxy: object, tmp_path: Path, key_type: str
) -> None:
    """Over TLS the proxy offers SCRAM-SHA-256-PLUS, as PostgreSQL does: libpq's
    channel_binding=require logs in, binding to the proxy's certificate (hashed with SHA-256 or,
    for a SHA-384 signature, SHA-384)."""
    cert, key = pg.make_certificate(tmp_path, key_type=key_type)
    keys = auth.scram_keys("letmein", salt=b"0123456789abcdef")
    running = make_proxy(  # type: ignore[operator]
        tls_cert=str(cert), tls_key=str(key), session_config=session.SessionConfig(client_scram=keys)
    )
    dsn = f"host=127.0.0.1 port={running.port} user=agent dbname=shop sslmode=verify-full sslrootcert={cert}"
    with psycopg.connect(f"{dsn} password=letmein channel_binding=require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(f"{dsn} password=nope channel_binding=require")


def test_a_certificate_without_a_signature_hash_offers_plain_scram(
    make_proxy: object, tmp_path: Path
) -> None:
    """An Ed25519 certificate gives tls-server-end-point nothing to hash with: the proxy offers
    SCRAM-SHA-256 alone (as PostgreSQL cannot bind either), so channel_binding=require is
    refused by the client and prefer logs in."""
    cert, key = pg.make_certificate(tmp_path, key_type="ed25519")
    keys = auth.scram_keys("letmein", salt=b"0123456789abcdef")
    running = make_proxy(  # type: ignore[operator]
        tls_cert=str(cert), tls_key=str(key), session_config=session.SessionConfig(client_scram=keys)
    )
    dsn = f"host=127.0.0.1 port={running.port} user=agent dbname=shop sslmode=require password=letmein"
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(f"{dsn} channel_binding=require")
    with psycopg.connect(f"{dsn} channel_binding=prefer") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_no_tls_configured_answers_n(dbgov: RunningProxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="does not support SSL"):
        psycopg.connect(dbgov.dsn().replace("sslmode=disable", "sslmode=require"))
    raw = RawClient(dbgov.port)
    raw.send(messages.gssenc_request())
    assert raw.sock.recv(1) == b"N"
    assert any(m.type == messages.READY_FOR_QUERY for m in raw.login())
    raw.close()


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        ("options='-B 100'", "options"),
        ("options='-c'", "options"),
        ("replication=database", "replication"),
    ],
)
def test_startup_parameters_that_bypass_policy_get_fatal(
    dbgov: RunningProxy, extra: str, complaint: str
) -> None:
    with pytest.raises(psycopg.OperationalError, match=f'startup parameter "{complaint}"'):
        psycopg.connect(dbgov.dsn(extra=extra))


def _strict() -> object:
    from dbgov_policy import compile as policy_compile
    from dbgov_policy import engine
    from dbgov_sidecar import policy_port

    spec = {"default": "allow", "rules": [], "guardrails": {"allowedSettings": {"search_path": ["shop"]}}}
    return policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(spec)))


@pytest.mark.parametrize(
    "options",
    [
        "-c search_path=evil",
        "--search_path=evil",
        "-c client_encoding=SJIS",
        "-c role=postgres",
        "-c session_replication_role=replica",
    ],
)
def test_settings_in_options_are_judged_as_set(make_proxy: object, options: str) -> None:
    proxy = make_proxy(policy=_strict())  # type: ignore[operator]
    with pytest.raises(psycopg.OperationalError, match='startup parameter "options"'):
        psycopg.connect(proxy.dsn(extra=f"options='{options}'"))


def test_benign_settings_in_options_reach_the_server(make_proxy: object) -> None:
    """libpq's PGOPTIONS / pgjdbc's options: what the policy allows as SET passes at startup."""
    proxy = make_proxy(policy=_strict())  # type: ignore[operator]
    options = r"-c statement_timeout=5s --lock-timeout=2s -c search_path=shop -c application_name=a\\ b"
    with psycopg.connect(proxy.dsn(extra=f"options='{options}'"), autocommit=True) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
        assert conn.execute("SHOW lock_timeout").fetchone() == ("2s",)
        assert conn.execute("SHOW search_path").fetchone() == ("shop",)
        assert conn.execute("SHOW application_name").fetchone() == ("a b",)
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (200,)  # judged as shop.orders


def test_ssl_request_followed_by_data_is_a_violation(dbgov: RunningProxy) -> None:
    raw = RawClient(dbgov.port)
    raw.send(messages.ssl_request() + messages.startup_message({"user": "app"}))
    reply = raw.sock.recv(100)
    assert b"08P01" in reply and b"after SSLRequest" in reply
    raw.close()


def test_cancel_request_reaches_the_right_backend(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        # cancel_safe waits without holding the GIL (the proxy runs in this process).
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(20)")
        timer.join()
        assert time.monotonic() - started < 10
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_function_call_message_is_refused(dbgov: RunningProxy) -> None:
    raw = RawClient(dbgov.port)
    raw.login()
    # FunctionCall: oid of pg_backend_pid(), no arguments, text result.
    body = struct.pack("!ihhh", 2026, 0, 0, 0)
    raw.send(b"F" + struct.pack("!i", len(body) + 4) + body)
    reply = raw.read_until(b"Z")
    fields = _fields(reply)
    assert fields["C"] == "42501" and "FunctionCall" in fields["M"]
    assert messages.decode_ready_for_query(reply[-1].data) == "I"
    raw.send(messages.query("SELECT 42"))
    rows = [m for m in raw.read_until(b"Z") if m.type == messages.DATA_ROW]
    assert messages.decode_data_row(rows[0].data) == [b"42"]
    raw.send(messages.TERMINATE_MESSAGE)
    raw.close()


def test_extended_refusal_skips_until_sync(dbgov: RunningProxy) -> None:
    raw = RawClient(dbgov.port)
    raw.login()
    raw.send(
        messages.parse("ok", "SELECT 1")
        + messages.parse("bad", "DROP TABLE shop.orders")
        + messages.bind("", "bad")
        + messages.execute()
        + messages.SYNC_MESSAGE
        + messages.bind("", "ok")
        + messages.execute()
        + messages.SYNC_MESSAGE
    )
    first = raw.read_until(b"Z")
    assert [chr(m.type) for m in first] == ["1", "E", "Z"]
    assert _fields(first)["C"] == "42501"
    second = raw.read_until(b"Z")
    assert [chr(m.type) for m in second] == ["2", "D", "C", "Z"]
    raw.send(messages.TERMINATE_MESSAGE)
    raw.close()


def test_max_rows_returned_is_an_error_not_a_truncation(dbgov: RunningProxy) -> None:
    dbgov.policy = RulesPolicy(max_rows_returned=10)
    with psycopg.connect(dbgov.dsn()) as conn:
        assert len(conn.execute("SELECT id FROM shop.customers LIMIT 10").fetchall()) == 10
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than 10 rows"):
            conn.execute("SELECT id FROM shop.customers")
        # Inside a transaction block the limit aborts the block, as an error would.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM shop.customers WHERE id <= 50").fetchone() == (50,)
        conn.rollback()
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("SELECT id FROM shop.customers WHERE id > %s", [0], prepare=True)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_max_rows_returned_holds_across_partial_executes(dbgov: RunningProxy) -> None:
    """A driver's fetch size (Execute with a row count, PortalSuspended, Execute again) continues
    one statement: the limit is on all its rows, not on each chunk."""
    import asyncio

    import asyncpg

    dbgov.policy = RulesPolicy(max_rows_returned=10)

    async def fetch(sql: str, prefetch: int) -> list[int]:
        conn = await asyncpg.connect(dbgov.url(), ssl=False)
        try:
            async with conn.transaction():
                return [r[0] async for r in conn.cursor(sql, prefetch=prefetch)]
        finally:
            await conn.close()

    ids = "SELECT id FROM shop.customers ORDER BY id"
    with pytest.raises(asyncpg.ProgramLimitExceededError, match="more than 10 rows"):
        asyncio.run(fetch(ids, prefetch=4))  # chunks of 4: 4, 8, then over 10
    assert asyncio.run(fetch(f"{ids} LIMIT 10", prefetch=4)) == list(range(1, 11))  # at the limit: whole
    assert asyncio.run(fetch(f"{ids} LIMIT 10", prefetch=100)) == list(range(1, 11))


def test_max_rows_returned_holds_for_copy_to_stdout(dbgov: RunningProxy, pg_server: pg.PgServer) -> None:
    """COPY ... TO STDOUT streams rows as CopyData: the limit cannot be stepped around with it."""
    dbgov.policy = RulesPolicy(max_rows_returned=10)
    received: list[bytes] = []
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        with (
            pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than 10 rows"),
            conn.cursor().copy("COPY shop.customers TO STDOUT") as copy,
        ):
            received.extend(bytes(row) for row in copy)
        assert len(received) <= 10  # never a row past the limit
        with conn.cursor().copy("COPY (SELECT id FROM shop.customers LIMIT 10) TO STDOUT") as copy:
            assert len([bytes(row) for row in copy]) == 10  # at the limit: whole
        with conn.transaction():  # the session goes on, in and out of blocks
            assert conn.execute("SELECT 1").fetchone() == (1,)
    proc = subprocess.run(  # psql's \copy uses the same protocol
        [str(pg.BIN / "psql"), "-X", "-At", dbgov.dsn(), "-c", r"\copy shop.customers to stdout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "more than 10 rows" in proc.stderr and len(proc.stdout.splitlines()) <= 10
    counted = [e for e in dbgov.events if e.get("type") == "statement" and "COPY" in str(e.get("statement"))]
    assert counted and counted[0]["sqlstate"] == "54000"


def test_dry_run_forwards_and_records_what_would_have_happened(dbgov: RunningProxy) -> None:
    dbgov.policy = RulesPolicy(mode="dry-run", max_rows_returned=10)
    with psycopg.connect(dbgov.dsn()) as conn:  # limits are not enforced either
        assert len(conn.execute("SELECT id FROM shop.customers WHERE id <= 50").fetchall()) == 50
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn, pytest.raises(psycopg.errors.UndefinedTable):
        conn.execute("DROP TABLE shop.no_such_table")  # the server's own answer
    event = next(e for e in dbgov.events if e.get("rule") == "no-drop")
    assert event["decision"] == "block" and event["enforced"] == "allow"
    assert event["sqlstate"] == "42P01"


def test_audit_event_written_before_the_refusal(dbgov: RunningProxy) -> None:
    raw = RawClient(dbgov.port)
    raw.login()
    original = dbgov.proxy.audit
    client_had_bytes: list[bool] = []

    def record(event: dict[str, object]) -> None:
        if event.get("rule") == "no-drop":
            readable, _, _ = select.select([raw.sock], [], [], 0)  # anything sent yet?
            client_had_bytes.append(bool(readable))
        assert original is not None
        original(event)

    dbgov.proxy.audit = record
    try:
        raw.send(messages.query("DROP TABLE shop.orders"))
        reply = raw.read_until(b"Z")
    finally:
        dbgov.proxy.audit = original
    assert _fields(reply)["C"] == "42501"
    assert client_had_bytes == [False]
    event = next(e for e in dbgov.events if e.get("rule") == "no-drop")
    assert event["statement"] == "DROP TABLE shop.orders"
    assert event["user"] == "app" and event["database"] == "shop"
    raw.send(messages.TERMINATE_MESSAGE)
    raw.close()


def test_client_tls_handshake_garbage_does_not_hurt_the_proxy(make_proxy: object, tmp_path: Path) -> None:
    cert, key = pg.make_certificate(tmp_path)
    running = make_proxy(tls_cert=str(cert), tls_key=str(key))  # type: ignore[operator]
    raw = RawClient(running.port)
    raw.send(messages.ssl_request())
    assert raw.sock.recv(1) == b"S"
    raw.send(b"\x16\x03\x01 definitely not a TLS hello" * 4)
    try:
        leftover = raw.sock.recv(100)
    except OSError:
        leftover = b""
    assert b"ReadyForQuery" not in leftover
    raw.close()
    with psycopg.connect(f"host=127.0.0.1 port={running.port} user=a dbname=shop sslmode=require") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_an_error_quoting_a_marker_is_not_taken_for_a_refusal(dbgov: RunningProxy) -> None:
    """Markers carry a per-session secret: a client echoing `dbgov_refused_1` in its own failing
    statement, pipelined before a refused one, gets its own error back, not the policy's."""
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        with (
            pytest.raises(psycopg.errors.InvalidTextRepresentation, match="dbgov_refused_1"),
            conn.pipeline(),
        ):
            conn.execute("SELECT %s::int", ["dbgov_refused_1"])
            conn.execute("DROP TABLE shop.orders")
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() is not None


def _allow_all() -> object:
    from dbgov_policy import compile as policy_compile
    from dbgov_policy import engine
    from dbgov_sidecar import policy_port

    return policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy({"default": "allow"})))


def test_a_startup_search_path_passes_under_default_allow(make_proxy: object) -> None:
    """pgjdbc's currentSchema (and asyncpg's server_settings) send search_path in the startup
    packet; under `default: allow` it passes, and names resolve where the server resolves them."""
    import asyncpg

    proxy = make_proxy(policy=_allow_all())  # type: ignore[operator]

    async def run() -> None:
        conn = await asyncpg.connect(proxy.url(), ssl=False, server_settings={"search_path": "shop"})
        try:
            assert await conn.fetchval("SHOW search_path") == "shop"
            assert await conn.fetchval("SELECT count(*) FROM orders") == 200
        finally:
            await conn.close()
        with pytest.raises(asyncpg.PostgresError, match="pg_catalog after another schema"):
            await asyncpg.connect(proxy.url(), ssl=False, server_settings={"search_path": "shop, pg_catalog"})

    asyncio.run(run())
    reads = [e for e in proxy.events if e["type"] == "statement" and "orders" in e["statement"]]
    assert [e["tables_read"] for e in reads] == [["shop.orders"]], reads


def test_read_write_restores_a_session_the_server_started_writable(
    make_proxy: object, pg_server: pg.PgServer
) -> None:
    """pgjdbc's setReadOnly(true) then setReadOnly(false): READ WRITE passes where the server
    reported the session writable at login; where the database's default is read-only, turning
    it off stays refused (the server's answer at login decides, not the client's say)."""
    proxy = make_proxy(policy=_allow_all())  # type: ignore[operator]
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
        conn.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE")
        conn.execute("SET default_transaction_read_only = off")
        with conn.transaction():
            conn.execute("SET TRANSACTION READ WRITE")
        conn.execute("START TRANSACTION READ WRITE")
        conn.execute("COMMIT")
        assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("off",)
    with pg.scratch_database(pg_server, "readonly", "SELECT 1") as name:
        with psycopg.connect(pg_server.dsn(user="postgres", dbname="postgres"), autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        with psycopg.connect(proxy.dsn(dbname=name), autocommit=True) as conn:
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
            for sql in (
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
                "SET default_transaction_read_only = off",
                "BEGIN READ WRITE",
                "START TRANSACTION ISOLATION LEVEL READ COMMITTED, READ WRITE",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="transaction_read_only"):
                    conn.execute(sql)
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE, sql
            assert conn.execute("SHOW default_transaction_read_only").fetchone() == ("on",)
