"""Through the proxy with the real engine and a real PostgreSQL: statements are judged by what
PostgreSQL does with them (issue 13). A WITH name never hides the table an UPDATE writes; a
SELECT ... FOR UPDATE needs what an UPDATE needs; an upsert needs insert and update, and its
update obeys requireWhere.

The policy allows reads of `orders` and `customers` (whose `email` and `ssn` are masked), writes
of `orders`, and inserts (only) into `events`. Each attack is refused through the proxy and leaves the rows as they
were; a positive control runs it on PostgreSQL directly, to show what it would have done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

import pg
from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

EMAIL = "canary.5e1f@canary-mail.example"
SCHEMA = f"""
CREATE TABLE customers (id integer PRIMARY KEY, name text, email text, ssn text);
CREATE TABLE orders (id integer PRIMARY KEY, customer_id integer, qty integer);
INSERT INTO customers VALUES (1, 'Canary', '{EMAIL}', '911-27-3346');
INSERT INTO orders SELECT i, 1, i FROM generate_series(1, 10) AS i;
CREATE TABLE events (id integer PRIMARY KEY, note text);
INSERT INTO events VALUES (1, 'original');
"""
POLICY = {
    "mode": "enforce",
    "default": "block",
    "rules": [
        {"name": "reads", "verdict": "allow", "statements": ["select"], "tables": ["orders", "customers"]},
        {
            "name": "write-orders",
            "verdict": "allow",
            "statements": ["insert", "update", "delete"],
            "tables": ["orders"],
        },
        {"name": "log-events", "verdict": "allow", "statements": ["insert", "select"], "tables": ["events"]},
    ],
    "guardrails": {"requireWhere": ["update", "delete"]},
    "masks": [
        {"table": "customers", "column": "email", "strategy": "email"},
        {"table": "customers", "column": "ssn", "strategy": "redact"},
    ],
}
CTE_TARGET = (
    "WITH customers AS (SELECT 1) UPDATE customers SET name = 'pwned' WHERE id > 0 RETURNING id, email, ssn"
)


@pytest.fixture(scope="module")
def database(pg_server: pg.PgServer) -> Iterator[str]:
    with pg.scratch_database(pg_server, "writes", SCHEMA) as name:
        yield name


@pytest.fixture
def governed(make_proxy: Callable[..., RunningProxy], database: str) -> str:
    proxy = make_proxy(policy=policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(POLICY))))
    return f"host=127.0.0.1 port={proxy.port} user=app dbname={database} sslmode=disable"


def _direct(pg_server: pg.PgServer, database: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(pg_server.dsn(user="app", dbname=database))


def test_a_cte_name_does_not_hide_the_table_an_update_writes(
    governed: str, pg_server: pg.PgServer, database: str
) -> None:
    with psycopg.connect(governed, autocommit=True) as conn, pytest.raises(psycopg.Error) as err:
        conn.execute(CTE_TARGET)
    assert err.value.sqlstate == "42501"
    with _direct(pg_server, database) as conn:
        assert conn.execute("SELECT name FROM customers").fetchall() == [("Canary",)]


def test_the_cte_update_writes_the_real_table_without_dbgov(pg_server: pg.PgServer, database: str) -> None:
    """Positive control: PostgreSQL updates public.customers and returns its email in clear."""
    with _direct(pg_server, database) as conn:
        rows = conn.execute(CTE_TARGET).fetchall()
        assert rows == [(1, EMAIL, "911-27-3346")]
        conn.rollback()


LOCK = "SELECT id FROM customers WHERE id = 1 FOR UPDATE"


def _writer_waits(pg_server: pg.PgServer, database: str) -> bool:
    """Does an UPDATE of the locked row wait (lock_timeout 300 ms)?"""
    with _direct(pg_server, database) as conn:
        conn.execute("SET lock_timeout = '300ms'")
        try:
            conn.execute("UPDATE customers SET name = name WHERE id = 1")
        except psycopg.errors.LockNotAvailable:
            return True
        conn.rollback()
        return False


def test_a_row_lock_under_a_read_rule_is_refused_and_writers_go_on(
    governed: str, pg_server: pg.PgServer, database: str
) -> None:
    with psycopg.connect(governed) as conn:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.Error) as err:
            conn.execute(LOCK)
        assert err.value.sqlstate == "42501"
        assert not _writer_waits(pg_server, database)


def test_the_row_lock_stalls_writers_without_dbgov(pg_server: pg.PgServer, database: str) -> None:
    """Positive control: a role with only SELECT would be refused by PostgreSQL itself; this
    one (the owner) takes the lock and the writer waits."""
    with _direct(pg_server, database) as conn:
        conn.execute(LOCK).fetchall()
        assert _writer_waits(pg_server, database)
        conn.rollback()


UPSERT = "INSERT INTO events VALUES (1, 'pwned') ON CONFLICT (id) DO UPDATE SET note = excluded.note"
BULK_UPSERT = "INSERT INTO orders SELECT * FROM orders ON CONFLICT (id) DO UPDATE SET qty = 0"


def test_upserts_are_refused_where_the_update_is_not_allowed_or_not_bounded(
    governed: str, pg_server: pg.PgServer, database: str
) -> None:
    with psycopg.connect(governed, autocommit=True) as conn:
        for sql in (UPSERT, BULK_UPSERT):
            with pytest.raises(psycopg.Error) as err:
                conn.execute(sql)
            assert err.value.sqlstate == "42501", sql
        conn.execute("INSERT INTO events VALUES (1, 'pwned') ON CONFLICT (id) DO NOTHING")
        conn.execute("INSERT INTO orders VALUES (1, 1, 5) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty")
        assert conn.execute("SELECT qty FROM orders WHERE id = 1").fetchone() == (5,)
        conn.execute("INSERT INTO orders VALUES (1, 1, 1) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty")
    with _direct(pg_server, database) as conn:
        assert conn.execute("SELECT note FROM events").fetchall() == [("original",)]
        assert conn.execute("SELECT count(*) FROM orders WHERE qty = 0").fetchone() == (0,)


def test_the_upserts_overwrite_rows_without_dbgov(pg_server: pg.PgServer, database: str) -> None:
    """Positive control: the upsert overwrites the event, the bulk one every order."""
    with _direct(pg_server, database) as conn:
        assert conn.execute(UPSERT).rowcount == 1
        assert conn.execute(BULK_UPSERT).rowcount == 10
        assert conn.execute("SELECT note FROM events").fetchall() == [("pwned",)]
        conn.rollback()


SIDE_EFFECTS = [
    "SELECT nextval('tickets')",
    "SELECT pg_advisory_lock(4242)",
    "SELECT set_config('app.tenant', '2', false)",
]
# READ WRITE where the database made sessions read-only: test_proxy_protocol.py
# (test_read_write_restores_a_session_the_server_started_writable); where the server started the
# session writable, it only restores that.


def test_side_effects_are_not_reads(governed: str, pg_server: pg.PgServer, database: str) -> None:
    """A sequence advanced, an advisory lock held, a setting changed: each refused, none done."""
    with _direct(pg_server, database) as conn:
        conn.execute("CREATE SEQUENCE IF NOT EXISTS tickets")
        conn.commit()
    with psycopg.connect(governed, autocommit=True) as conn:
        for sql in SIDE_EFFECTS:
            with pytest.raises(psycopg.Error) as err:
                conn.execute(sql)
            assert err.value.sqlstate == "42501", sql
        assert conn.execute("SELECT current_setting('app.tenant', true)").fetchone() in {(None,), ("",)}
        with _direct(pg_server, database) as other:
            assert other.execute("SELECT pg_try_advisory_lock(4242)").fetchone() == (True,)
            assert other.execute("SELECT last_value, is_called FROM tickets").fetchone() == (1, False)
