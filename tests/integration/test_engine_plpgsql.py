"""Through the proxy with the real engine and a real PostgreSQL: a PL/pgSQL body is judged as
PostgreSQL's own PL/pgSQL parser reads it (issue 13 class 3).

A `:=` inside a string literal or a comment of an assignment once cut the expression there, and
what followed ran unjudged: a masked column went out in clear through RAISE NOTICE. A tap records
every byte the client receives; the canary must be in none of them. A positive control runs the
same blocks on PostgreSQL directly. The false refusals this fixes (a function that returns a
value, the standard updated_at trigger) are created and used through the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest
from test_engine_hidden_sql import Tap, _run

import pg
from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

EMAIL = "canary.p7q2@canary-mail.example"
CANARIES = [EMAIL.encode(), b"canary.p7q2", b"p7q2@"]
SCHEMA = f"""
CREATE TABLE customers (id integer PRIMARY KEY, email text);
CREATE TABLE orders (id integer PRIMARY KEY, qty integer, updated_at timestamptz);
INSERT INTO customers VALUES (1, '{EMAIL}');
INSERT INTO orders SELECT i, i, NULL FROM generate_series(1, 5) AS i;
"""
POLICY = {
    "mode": "enforce",
    "default": "allow",
    "rules": [],
    "guardrails": {"requireWhere": ["update", "delete"]},
    "masks": [{"table": "customers", "column": "email", "strategy": "email"}],
}
LEAKS = [
    "DO $$DECLARE v text; BEGIN v = ':= 1 --' || (SELECT email FROM customers LIMIT 1); "
    "RAISE NOTICE '%', v; END$$",
    "DO $b$DECLARE v text; BEGIN v = $q$:= 1 --$q$ || (SELECT email FROM customers LIMIT 1); "
    "RAISE NOTICE '%', v; END$b$",
    "DO $$DECLARE v text; BEGIN BEGIN PERFORM 1 / 0; EXCEPTION WHEN others THEN "
    "v = ':= 0 --' || (SELECT email FROM customers LIMIT 1); RAISE NOTICE '%', v; END; END$$",
    "DO $$DECLARE r record; BEGIN FOR r IN SELECT email FROM customers LOOP "
    "RAISE NOTICE '%', r.email; END LOOP; END$$",
]


@pytest.fixture(scope="module")
def database(pg_server: pg.PgServer) -> Iterator[str]:
    with pg.scratch_database(pg_server, "plpgsql", SCHEMA) as name:
        yield name


@pytest.fixture
def governed(make_proxy: Callable[..., RunningProxy], database: str) -> RunningProxy:
    compiled = policy_compile.compile_policy(POLICY, mask_key="k")
    return make_proxy(policy=policy_port.EnginePolicy(engine.Engine(compiled)))


def test_a_body_cut_at_a_quoted_assign_leaks_nothing(governed: RunningProxy, database: str) -> None:
    tap = Tap(governed.port)
    try:
        dsn = f"host=127.0.0.1 port={tap.port} user=app dbname={database} sslmode=disable"
        states = _run(dsn, LEAKS)
    finally:
        tap.close()
    assert states == ["42501"] * len(LEAKS)
    assert b"mask-unprovable" in tap.received
    assert tap.found(CANARIES) == []


def test_the_blocks_would_leak_without_dbgov(pg_server: pg.PgServer, database: str) -> None:
    seen: list[str] = []
    with psycopg.connect(pg_server.dsn(user="app", dbname=database), autocommit=True) as conn:
        conn.add_notice_handler(lambda diag: seen.append(str(diag.message_primary)))
        for sql in LEAKS:
            conn.execute(sql)
    assert len(seen) == len(LEAKS) and all(EMAIL in notice for notice in seen)


def test_functions_that_return_values_and_triggers_run(governed: RunningProxy, database: str) -> None:
    dsn = f"host=127.0.0.1 port={governed.port} user=app dbname={database} sslmode=disable"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION total_qty() RETURNS bigint LANGUAGE plpgsql SET search_path = public AS $$"
            "DECLARE r record; n bigint := 0; BEGIN FOR r IN SELECT qty FROM orders LOOP "
            "n := n + r.qty; END LOOP; RETURN n; END$$"
        )
        conn.execute(
            "CREATE OR REPLACE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$"
            "BEGIN NEW.updated_at := now(); RETURN NEW; END$$"
        )
        conn.execute(
            "CREATE TRIGGER orders_touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch()"
        )
        conn.execute("UPDATE orders SET qty = 10 WHERE id = 1")
        row = conn.execute(
            "SELECT total_qty(), (SELECT updated_at IS NOT NULL FROM orders WHERE id = 1)"
        ).fetchone()
    assert row == (24, True)
