"""Through the proxy with the real engine and a real PostgreSQL: statements are judged by what
PostgreSQL does with them (issue 13). A WITH name never hides the table an UPDATE writes.

The policy allows reads of `orders` and `customers` (whose `email` and `ssn` are masked) and
writes of `orders` only. Each attack is refused through the proxy and leaves the rows as they
were; a positive control runs it on PostgreSQL directly, to show what it would have done.
"""

from __future__ import annotations

import uuid
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
    name = f"writes_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(user="postgres", dbname="postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER app')
    with psycopg.connect(pg_server.dsn(user="app", dbname=name), autocommit=True) as conn:
        conn.execute(SCHEMA)
    yield name
    with psycopg.connect(pg_server.dsn(user="postgres", dbname="postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


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
