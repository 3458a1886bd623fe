"""Real clients through the proxy against a real PostgreSQL: they must not notice it."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import orm

import pg
from conftest import RunningProxy

pytestmark = pytest.mark.integration


def test_psql_simple_and_multi_statement(dbgov: RunningProxy) -> None:
    out = pg.run_psql(
        dbgov.dsn(),
        "SELECT count(*) FROM shop.customers WHERE id <= 50; SELECT name FROM shop.products ORDER BY id LIMIT 2;",
    )
    assert out.split() == ["50", "Widget", "Gadget"]
    # psql -c sends one Query message holding both statements.
    proc = subprocess.run(
        [str(pg.BIN / "psql"), "-X", "-At", dbgov.dsn(), "-c", "SELECT 1; SELECT 2"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["1", "2"]


def test_psql_copy_in_and_out(dbgov: RunningProxy) -> None:
    out = pg.run_psql(
        dbgov.dsn(),
        "CREATE TEMP TABLE t (a int, b text);\n"
        "COPY t FROM STDIN;\n1\tone\n2\ttwo\n\\.\n"
        "COPY (SELECT a, b FROM t ORDER BY a) TO STDOUT;\n",
    )
    assert out.splitlines()[-2:] == ["1\tone", "2\ttwo"]


def test_refused_statement_gets_policy_error_and_session_continues(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("DROP TABLE shop.orders")
        diag = info.value.diag
        assert diag.sqlstate == "42501"
        assert diag.message_primary is not None
        assert 'rule "no-drop"' in diag.message_primary
        assert "DROP is not allowed" in diag.message_primary
        assert diag.message_hint == "Ask a DBA to run schema changes."
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (200,)
        with pytest.raises(psycopg.errors.SyntaxError) as syntax:
            conn.execute("SELECT GARBAGE FROM")
        assert syntax.value.diag.sqlstate == "42601"
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="requires approval"):
            conn.execute("TRUNCATE shop.orders")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    refused = [e for e in dbgov.events if e.get("enforced") == "block"]
    assert [e["rule"] for e in refused][:1] == ["no-drop"]


def test_refusal_inside_transaction_aborts_it_like_postgres(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn()) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS shop.scratch (v int)")
        conn.commit()
        conn.execute("INSERT INTO shop.scratch VALUES (1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM shop.scratch")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.commit()  # PostgreSQL turns this COMMIT into a rollback
        assert conn.execute("SELECT count(*) FROM shop.scratch WHERE v = 1").fetchone() == (0,)
        conn.rollback()
    proc = subprocess.run(
        [str(pg.BIN / "psql"), "-X", "-At", dbgov.dsn()],
        input="BEGIN;\nINSERT INTO shop.scratch VALUES (2);\nDROP TABLE shop.scratch;\n"
        "COMMIT;\nSELECT count(*) FROM shop.scratch WHERE v = 2;\n",
        capture_output=True,
        text=True,
        check=False,
    )
    assert "ROLLBACK" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "0"
    assert 'refused by rule "no-drop"' in proc.stderr


def test_psycopg_text_binary_prepared(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn(), prepare_threshold=0) as conn:
        for binary in (False, True):
            with conn.cursor(binary=binary) as cur:
                cur.execute("SELECT id, name, created_at FROM shop.customers WHERE id = %s", [7])
                row = cur.fetchone()
                assert row is not None and row[:2] == (7, "Customer 7")
        for i in range(5):
            got = conn.execute("SELECT %s::int * 2", [i], prepare=True).fetchone()
            assert got == (i * 2,)
        prepared = [s for s in dbgov.policy.decided if "* 2" in s]
        assert len(prepared) == 1  # prepared once server-side, then executed by name


def test_psycopg_pipeline_with_refusal_in_the_middle(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        with conn.pipeline() as pipe:
            first = conn.execute("SELECT 1")
            second = conn.execute("SELECT 2")
            pipe.sync()
            third = conn.execute("SELECT 3")
        assert [first.fetchone(), second.fetchone(), third.fetchone()] == [(1,), (2,), (3,)]
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop"):  # noqa: SIM117
            with conn.pipeline() as pipe:
                conn.execute("SELECT 1")
                conn.execute("DROP TABLE shop.orders")
                conn.execute("SELECT 3")
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (200,)


def test_masking_rewrite_reaches_the_client(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn()) as conn:
        row = conn.execute("SELECT id, ssn FROM shop.customers WHERE id = 3").fetchone()
        assert row is not None and row[1].startswith("***-**-")
        row = conn.execute("SELECT id, ssn FROM shop.customers WHERE id = %s", [3], prepare=True).fetchone()
        assert row is not None and row[1].startswith("***-**-")
    masked = [e for e in dbgov.events if e.get("decision") == "mask"]
    assert masked and masked[0]["masked_columns"] == ["shop.customers.ssn"]


def test_asyncpg_binary_prepared_copy_and_notify(dbgov: RunningProxy) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dbgov.url(), password="x", ssl=False)
        try:
            stmt = await conn.prepare("SELECT id, email, created_at FROM shop.customers WHERE id = $1")
            row = await stmt.fetchrow(5)
            assert row is not None and row["email"] == "customer5@example.com"
            rows = await conn.fetch("SELECT id FROM shop.customers ORDER BY id LIMIT 3")
            assert [r["id"] for r in rows] == [1, 2, 3]
            await conn.execute("CREATE TEMP TABLE c (a int, b text)")
            await conn.copy_records_to_table("c", records=[(1, "x"), (2, "y")])
            assert await conn.fetchval("SELECT count(*) FROM c") == 2
            got: asyncio.Queue[str] = asyncio.Queue()
            await conn.add_listener("chan", lambda *args: got.put_nowait(args[3]))
            await conn.execute("NOTIFY chan, 'hello'")
            assert await asyncio.wait_for(got.get(), 5) == "hello"
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no-drop"):
                await conn.execute("DROP TABLE shop.orders")
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("DROP TABLE shop.orders")
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        finally:
            await conn.close()

    asyncio.run(run())


def test_sqlalchemy_orm_session(dbgov: RunningProxy) -> None:
    class Base(orm.DeclarativeBase):
        pass

    class Product(Base):
        __tablename__ = "products"
        __table_args__ = {"schema": "shop"}  # noqa: RUF012
        id: orm.Mapped[int] = orm.mapped_column(primary_key=True)
        name: orm.Mapped[str]
        price_cents: orm.Mapped[int]

    engine = sa.create_engine(f"postgresql+psycopg://app@127.0.0.1:{dbgov.port}/shop")
    try:
        with orm.Session(engine) as db:
            cheap = db.scalars(sa.select(Product).where(Product.price_cents < 1000)).all()
            assert sorted(p.name for p in cheap) == ["Doohickey", "Gizmo"]
            db.add(Product(id=1000, name="Thing", price_cents=1))
            db.flush()
            assert db.get(Product, 1000) is not None
            db.rollback()
        with orm.Session(engine) as db:
            assert db.get(Product, 1000) is None
    finally:
        engine.dispose()


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_through_the_proxy(dbgov: RunningProxy, pg_server: pg.PgServer, mode: str) -> None:
    pg.init_pgbench(pg_server)
    proc = subprocess.run(
        [
            str(pg.BIN / "pgbench"),
            "-n",
            "-S",
            "-M",
            mode,
            "-c",
            "4",
            "-j",
            "2",
            "-t",
            "50",
            "-h",
            "127.0.0.1",
            "-p",
            str(dbgov.port),
            "-U",
            "app",
            "shop",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "number of transactions actually processed: 200/200" in proc.stdout


def test_notices_parameter_status_and_binary_copy(dbgov: RunningProxy) -> None:
    notices: list[str] = []
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: notices.append(diag.message_primary or ""))
        conn.execute("SET client_min_messages = notice")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS n (a int)")
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS n (a int)")  # NOTICE: already exists
        assert any("already exists" in n for n in notices)
        conn.execute("SET application_name = 'renamed'")
        assert conn.info.parameter_status("application_name") == "renamed"  # ParameterStatus
        with conn.cursor() as cur:
            with cur.copy("COPY n (a) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4"])
                for i in range(100):
                    copy.write_row((i,))
            rows = []
            with cur.copy("COPY (SELECT a FROM n ORDER BY a) TO STDOUT (FORMAT BINARY)") as copy:
                copy.set_types(["int4"])
                rows = [r[0] for r in copy.rows()]
        assert rows == list(range(100))
