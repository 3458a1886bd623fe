"""The proxy with the real policy engine and examples/policy.yaml, checked at the byte level.

A canary customer holds unique values in every masked column. A tap between client and proxy
records every byte the client receives; no canary may appear in any of them (DataRow,
CopyData, ErrorResponse, NoticeResponse), whatever the query does to reach the column.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

import pg
from conftest import RunningProxy
from dbgov_sidecar import policies, policy_port

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
CANARIES = {
    "email": "canary.e7f3@canary-domain.example",
    "ssn": "987-65-4329",
    "card_number": "4000123498761111",
}
CANARY_BYTES = [b"canary.e7f3", b"987-65-43", b"65-4329", b"4000123498761111", b"98761111", b"12349876"]


class Tap:
    """TCP relay in front of the proxy that records every byte sent to the client."""

    def __init__(self, target_port: int) -> None:
        self.received = bytearray()
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            for src, dst, record in ((client, upstream, False), (upstream, client, True)):
                t = threading.Thread(target=self._pump, args=(src, dst, record), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    self.received += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for t in self._threads:
            t.join(10)

    def leaks(self) -> list[bytes]:
        return [c for c in CANARY_BYTES if c in self.received]


@pytest.fixture
def governed(make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer) -> Iterator[RunningProxy]:
    pg_server.psql(
        "INSERT INTO shop.customers (id, name, email, ssn, card_number) VALUES "
        f"(9001, 'Canary', '{CANARIES['email']}', '{CANARIES['ssn']}', '{CANARIES['card_number']}') "
        "ON CONFLICT (id) DO NOTHING;"
    )
    yield make_proxy(policy=policies.load(str(POLICY)))


ATTACKS = [
    "SELECT * FROM shop.customers WHERE id = 9001",
    "SELECT email AS e, ssn AS s, card_number AS c FROM shop.customers WHERE id = 9001",
    "SELECT upper(email), ssn || '', card_number::text FROM shop.customers WHERE id = 9001",
    "SELECT string_agg(email, ','), max(ssn), min(card_number) FROM shop.customers",
    "SELECT c FROM shop.customers c WHERE id = 9001",
    "SELECT row_to_json(c) FROM shop.customers c WHERE id = 9001",
    "WITH x AS (SELECT * FROM shop.customers) SELECT email, ssn FROM x WHERE id = 9001",
    "SELECT (SELECT card_number FROM shop.customers WHERE id = 9001)",
    "SELECT email::int FROM shop.customers WHERE id = 9001",
    "SELECT ssn::date FROM shop.customers WHERE id = 9001",
    "COPY (SELECT * FROM shop.customers WHERE id = 9001) TO STDOUT",
    "COPY shop.customers TO STDOUT",
    "SELECT * FROM shop.customers WHERE email = 'canary.e7f3@canary-domain.example'",
    "UPDATE shop.customers SET name = name WHERE id = 9001 RETURNING email",
]


def test_policy_verdicts_through_the_wire(governed: RunningProxy) -> None:
    with psycopg.connect(governed.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match='rule "no-ddl"'):
            conn.execute("DROP TABLE shop.orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="require-where"):
            conn.execute("DELETE FROM shop.orders")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="requires approval"):
            conn.execute("UPDATE shop.customers SET name = 'x' WHERE id = 1")
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC 1")
        row = conn.execute("SELECT email, ssn, card_number FROM shop.customers WHERE id = 9001").fetchone()
        assert row is not None
        assert row[0] != CANARIES["email"] and row[0].endswith("@canary-domain.example")
        assert row[1].endswith("4329") and row[1] != CANARIES["ssn"]
        assert row[2] != CANARIES["card_number"]
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (200,)
    assert any(e.get("masked_columns") for e in governed.events)


def test_no_canary_reaches_the_client(governed: RunningProxy) -> None:
    tap = Tap(governed.port)
    try:
        dsn = f"host=127.0.0.1 port={tap.port} user=app dbname=shop sslmode=disable"
        for binary in (False, True):
            with psycopg.connect(dsn, autocommit=True) as conn:
                for sql in ATTACKS:
                    if sql.startswith("COPY"):
                        with conn.cursor() as cur, cur.copy(sql) as copy:
                            for _ in copy:
                                pass
                        continue
                    with contextlib.suppress(psycopg.Error):
                        conn.execute(sql, binary=binary).fetchall()
                with conn.transaction():
                    conn.execute(
                        "DECLARE cur CURSOR FOR SELECT email, ssn FROM shop.customers WHERE id = 9001"
                    )
                    conn.execute("FETCH ALL FROM cur").fetchall()
        # Three times in one session: repeated shapes take the compiled lane where it may.
        script = (";\n".join(ATTACKS) + ";\n") * 3
        subprocess.run(
            [str(pg.BIN / "psql"), "-X", "-At", dsn],
            input=script,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    finally:
        tap.close()
    assert len(tap.received) > 1000
    assert tap.leaks() == []


def test_the_tap_would_see_an_unmasked_canary(
    governed: RunningProxy, make_proxy: Callable[..., RunningProxy]
) -> None:
    ungoverned = make_proxy(policy=policy_port.AllowAll())
    tap = Tap(ungoverned.port)
    try:
        dsn = f"host=127.0.0.1 port={tap.port} user=app dbname=shop sslmode=disable"
        with psycopg.connect(dsn) as conn:
            conn.execute("SELECT * FROM shop.customers WHERE id = 9001").fetchall()
    finally:
        tap.close()
    assert set(tap.leaks()) == set(CANARY_BYTES)


class MissesMasks:
    """The real policy's mask list with an engine that forgot to mask: the proxy must catch it.
    ``guardrails``: also maxRowsReturned / maxRowsAffected (the proxy then tracks every Execute)."""

    def __init__(self, *, guardrails: bool = False) -> None:
        self._real = policies.load(str(POLICY))
        self.mask_targets = self._real.mask_targets  # type: ignore[attr-defined]
        self.mask_value = self._real.mask_value  # type: ignore[attr-defined]
        self.mode = "enforce"
        self.max_rows_returned = 1000 if guardrails else None
        self.max_rows_affected = 1000 if guardrails else None

    def new_context(
        self, *, search_path: tuple[str, ...] | None = None, columns: object = None, **_: object
    ) -> object:
        return None

    def decide(self, sql: str, context: object) -> policy_port.Decision:
        return policy_port.SimpleDecision(verdict="allow", rule="oops", reason="engine missed a mask")


@pytest.mark.parametrize("guardrails", [False, True])
def test_unmasked_origin_is_masked_by_the_proxy(
    governed: RunningProxy, make_proxy: Callable[..., RunningProxy], guardrails: bool
) -> None:
    leaky = make_proxy(policy=MissesMasks(guardrails=guardrails))
    tap = Tap(leaky.port)
    sql = "SELECT name, email, ssn, card_number, id FROM shop.customers WHERE id = %s"
    # What the engine's rewrite makes of the row in the database: the proxy must produce the same.
    with psycopg.connect(governed.dsn(), autocommit=True) as conn:
        masked = conn.execute(sql, [9001]).fetchone()
        masked_email = conn.execute("SELECT email, name FROM shop.customers WHERE id = 9001").fetchone()
    assert masked is not None and masked_email is not None
    assert masked[0] == "Canary" and all(v is not None and "*" in v for v in masked[1:4])
    try:
        dsn = f"host=127.0.0.1 port={tap.port} user=app dbname=shop sslmode=disable"
        with psycopg.connect(dsn, autocommit=True) as conn:
            for binary in (False, True):
                for prepare in (False, True):
                    row = conn.execute(sql, [9001], binary=binary, prepare=prepare).fetchone()
                    assert row == masked
            with conn.pipeline():
                first = conn.execute(sql, [9001])
                second = conn.execute("SELECT name, id FROM shop.customers WHERE id = %s", [9001])
            assert first.fetchone() == masked
            assert second.fetchone() == ("Canary", 9001)
            assert conn.execute("SELECT email FROM shop.customers WHERE id = 9001").fetchone() == masked[1:2]
            assert conn.execute("SELECT upper(email) FROM shop.customers WHERE id = 9001").fetchone() != (
                None,
            )
            # A write's RETURNING rows: with guardrails the proxy holds them until the write's
            # count is known; masked ones are held in their place like the rest.
            for prepare in (False, True):
                returning = "UPDATE shop.customers SET name = name WHERE id = %s RETURNING email, name"
                assert conn.execute(returning, [9001], prepare=prepare).fetchone() == masked_email
            with conn.cursor() as cur:
                cur.execute("UPDATE shop.customers SET name = name WHERE id = 9001 RETURNING email, name")
                assert cur.fetchone() == masked_email

        async def with_asyncpg() -> None:
            import asyncpg

            conn = await asyncpg.connect(f"postgresql://app@127.0.0.1:{tap.port}/shop", ssl=False)
            try:
                stmt = await conn.prepare("SELECT email, name FROM shop.customers WHERE id = $1")
                for _ in range(2):
                    record = await stmt.fetchrow(9001)
                    assert record is not None and tuple(record) == masked_email
            finally:
                await conn.close()

        import asyncio

        asyncio.run(with_asyncpg())
    finally:
        tap.close()
    # Only plain column references carry an origin; derived columns are the engine's to mask.
    assert tap.leaks() == []
    warnings = [e for e in leaky.events if e.get("type") == "warning"]
    assert warnings and "shop.customers.email" in warnings[0]["columns"]
    assert all("canary" not in str(e) for e in leaky.events)


def test_startup_settings_follow_the_policy(governed: RunningProxy) -> None:
    async def connect(settings: dict[str, str]) -> str:
        import asyncpg

        conn = await asyncpg.connect(governed.url(), ssl=False, server_settings=settings)
        try:
            return str(await conn.fetchval("SHOW search_path"))
        finally:
            await conn.close()

    import asyncio

    import asyncpg

    # allowedSettings.search_path lists "shop, public"; DateStyle is a session basic.
    assert asyncio.run(connect({"search_path": "shop, public", "DateStyle": "ISO, MDY"})) == "shop, public"
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match='startup parameter "search_path" refused'):
        asyncio.run(connect({"search_path": "evil"}))
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="standard_conforming_strings"):
        asyncio.run(connect({"standard_conforming_strings": "off"}))


class BreaksAtLogin(MissesMasks):
    """A policy with a bug that shows only once the upstream login is done."""

    def new_context(
        self, *, search_path: tuple[str, ...] | None = None, columns: object = None, **_: object
    ) -> object:
        if columns:
            raise RuntimeError("a bug in the policy")
        return None


def test_a_bug_after_the_upstream_login_fails_the_client_at_once(
    governed: RunningProxy, make_proxy: Callable[..., RunningProxy]
) -> None:
    """Not a client waiting for its connect timeout: a FATAL naming an internal error."""
    broken = make_proxy(policy=BreaksAtLogin())
    with pytest.raises(psycopg.OperationalError, match="internal error in the proxy"):
        psycopg.connect(broken.dsn(), connect_timeout=20)
