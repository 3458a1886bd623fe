"""Function bodies and search_path through the proxy, with the real engine and PostgreSQL.

A function runs under its caller's search_path unless it pins one. Judging its body under the
path of the session that created it let a body judged as public.customers read shop.customers
unmasked when called under another path (attack round of session 6, F1). The body is judged
under the path the function pins, and a name in an unpinned body must carry its schema.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

import pg
from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

SCHEMA = """
CREATE SCHEMA shop;
CREATE SCHEMA scratch;
CREATE TABLE shop.customers (id integer PRIMARY KEY, name text, email text);
CREATE TABLE scratch.customers (id integer PRIMARY KEY, name text, email text);
INSERT INTO shop.customers VALUES (1, 'Ada', 'ada.real@example.com');
INSERT INTO scratch.customers VALUES (1, 'Decoy', 'decoy@example.com');
"""
POLICY = {
    "default": "allow",
    "masks": [{"table": "shop.customers", "column": "email", "strategy": "email"}],
}
REFUSED = "dbgov: statement refused by rule"


@pytest.fixture
def governed(make_proxy: object, pg_server: pg.PgServer) -> Iterator[tuple[RunningProxy, str]]:
    policy = policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(POLICY)))
    with pg.scratch_database(pg_server, "fnpath", SCHEMA) as name:
        yield make_proxy(policy=policy), name  # type: ignore[operator]


def _refused(conn: psycopg.Connection[tuple[object, ...]], sql: str, rule: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(sql)
    assert (info.value.diag.message_primary or "").startswith(f'{REFUSED} "{rule}"'), info.value


def test_a_body_is_judged_where_it_will_run(
    governed: tuple[RunningProxy, str], pg_server: pg.PgServer
) -> None:
    proxy, database = governed
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        # Pinned to shop: the body reads the masked table, which no body may (it cannot be masked).
        _refused(
            conn,
            "CREATE FUNCTION scratch.f1() RETURNS SETOF text LANGUAGE sql SET search_path = shop "
            "AS 'SELECT email FROM customers'",
            "guardrail:mask-unprovable",
        )
        # Created under scratch, unpinned: it would read shop.customers once called under shop.
        conn.execute("SET search_path = scratch")
        _refused(
            conn,
            "CREATE FUNCTION scratch.f2() RETURNS SETOF text LANGUAGE sql AS 'SELECT email FROM customers'",
            "guardrail:unpinned-function-body",
        )
        _refused(
            conn,
            "CREATE FUNCTION scratch.f3() RETURNS SETOF text LANGUAGE plpgsql AS "
            "$$ BEGIN RETURN QUERY SELECT email FROM customers; END $$",
            "guardrail:unpinned-function-body",
        )
        # Pinned where it reads, or qualified: created, and it reads what it was judged to read.
        conn.execute(
            "CREATE FUNCTION scratch.f4() RETURNS SETOF text LANGUAGE sql SET search_path = scratch "
            "AS 'SELECT email FROM customers'"
        )
        conn.execute(
            "CREATE FUNCTION scratch.f5() RETURNS SETOF text LANGUAGE sql AS 'SELECT email FROM scratch.customers'"
        )
        _refused(conn, "ALTER FUNCTION scratch.f4() SET search_path = shop", "guardrail:function-search-path")
        conn.execute("SET search_path = shop")
        assert conn.execute("SELECT scratch.f4()").fetchall() == [("decoy@example.com",)]
        assert conn.execute("SELECT scratch.f5()").fetchall() == [("decoy@example.com",)]
        assert conn.execute("SELECT email FROM customers").fetchall() == [("********@example.com",)]
    with psycopg.connect(pg_server.dsn(user="postgres", dbname=database), autocommit=True) as admin:
        names = admin.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'scratch'::regnamespace ORDER BY 1"
        )
        assert [r[0] for r in names.fetchall()] == ["f4", "f5"]


def test_t_dot_f_on_a_masked_write_target_is_a_function_of_the_whole_row(
    governed: tuple[RunningProxy, str],
) -> None:
    """`RETURNING c.row_to_json` is row_to_json(c), every column unmasked (F2); `c.id` is a
    column, which the proxy tells from the catalog (Django's qualified writes pass)."""
    proxy, database = governed
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        for sql in (
            "UPDATE shop.customers SET name = name WHERE id = 1 RETURNING customers.row_to_json",
            "UPDATE shop.customers c SET name = c.to_json::text WHERE c.id = 1",
            "INSERT INTO shop.customers AS c (id, name) VALUES (1, 'x') "
            "ON CONFLICT (id) DO UPDATE SET name = c.name RETURNING c.to_jsonb",
            "MERGE INTO shop.customers c USING (VALUES (1)) v(id) ON c.id = v.id "
            "WHEN MATCHED THEN UPDATE SET name = c.row_to_json::text",
        ):
            _refused(conn, sql, "guardrail:mask-unprovable")
        row = conn.execute(
            'UPDATE "shop"."customers" SET "name" = \'Ada L.\' WHERE "customers"."id" = 1 RETURNING "customers"."id"'
        ).fetchone()
        assert row == (1,)
        assert conn.execute("SELECT name, email FROM shop.customers").fetchall() == [
            ("Ada L.", "********@example.com")
        ]
