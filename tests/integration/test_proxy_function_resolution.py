"""Which function a name means, by the server's catalog, through the real proxy (attack
findings F3 and F6).

PostgreSQL reads ``o.purge_orders`` as ``purge_orders(o)`` when shop.orders has no such column
(functional notation), and calls a user's ``public.lower(int)`` for ``lower(42)`` although
pg_catalog comes first in the path (the overload whose argument types fit best wins). The proxy
reads the function names outside pg_catalog at login, and again after DDL, and judges such
names as calls of user functions (which may write): a select rule no longer lets them run.
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
CREATE TABLE shop.orders (id integer PRIMARY KEY, status text);
CREATE TABLE public.audit (note text);
INSERT INTO shop.orders VALUES (1, 'OPEN'), (2, 'PAID');
"""
PURGE = (
    "CREATE FUNCTION public.purge_orders(o shop.orders) RETURNS int LANGUAGE sql "
    "AS 'INSERT INTO public.audit VALUES (''purged'') RETURNING 1'"
)
LOWER = (
    "CREATE FUNCTION public.lower(n int) RETURNS text LANGUAGE sql "
    "AS 'INSERT INTO public.audit VALUES (''lowered'') RETURNING ''x'''"
)
POLICY = {
    "default": "block",
    "rules": [
        {"name": "reads", "verdict": "allow", "statements": ["select"], "tables": ["shop.*"]},
        # (DDL through the proxy: a function whose body writes the audit table)
        {"name": "functions", "verdict": "allow", "statements": ["create"]},
        {"name": "audit", "verdict": "allow", "statements": ["insert"], "tables": ["public.audit"]},
    ],
}
F3 = "SELECT o.purge_orders FROM shop.orders o WHERE id = 1"
F6 = "SELECT lower(42)"


@pytest.fixture
def governed(make_proxy: object, pg_server: pg.PgServer) -> Iterator[tuple[RunningProxy, engine.Engine, str]]:
    eng = engine.Engine(policy_compile.compile_policy(POLICY))
    with pg.scratch_database(pg_server, "fnres", SCHEMA) as name:
        yield make_proxy(policy=policy_port.EnginePolicy(eng)), eng, name  # type: ignore[operator]


def _direct(pg_server: pg.PgServer, database: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg.connect(pg_server.dsn(user="app", dbname=database), autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def _refused(conn: psycopg.Connection[tuple[object, ...]], sql: str, function: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
        conn.execute(sql)
    message = info.value.diag.message_primary or ""
    assert f"it calls {function}" in message, message


def test_functional_notation_calls_the_function(
    governed: tuple[RunningProxy, engine.Engine, str], pg_server: pg.PgServer
) -> None:
    proxy, _, database = governed
    # No such function: o.purge_orders is a column reference the server itself refuses.
    with (
        psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn,
        pytest.raises(psycopg.errors.UndefinedColumn),
    ):
        conn.execute(F3)
    _direct(pg_server, database, PURGE)
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        _refused(conn, F3, "purge_orders")
        _refused(conn, "SELECT (o).purge_orders FROM shop.orders o", "purge_orders")
        _refused(conn, "SELECT purge_orders(o) FROM shop.orders o", "purge_orders")
        assert conn.execute("SELECT o.status FROM shop.orders o WHERE id = 1").fetchall() == [("OPEN",)]
    assert _direct(pg_server, database, "SELECT count(*) FROM public.audit") == [(0,)]


def test_a_user_overload_of_a_builtin_name_is_a_user_function(
    governed: tuple[RunningProxy, engine.Engine, str], pg_server: pg.PgServer
) -> None:
    proxy, _, database = governed
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute(F6)  # (forwarded: only the built-in lower(text) exists)
        # Another session creates the overload: this session's facts are its login's ...
        _direct(pg_server, database, LOWER)
    # ... and a new session reads them.
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        _refused(conn, F6, "lower")
        _refused(conn, "SELECT lower(status) FROM shop.orders", "lower")
        assert conn.execute("SELECT pg_catalog.lower(status) FROM shop.orders WHERE id = 1").fetchall() == [
            ("open",)
        ]
    assert _direct(pg_server, database, "SELECT count(*) FROM public.audit") == [(0,)]


def test_ddl_in_the_session_refreshes_the_function_names(
    governed: tuple[RunningProxy, engine.Engine, str], pg_server: pg.PgServer
) -> None:
    proxy, _, database = governed
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        assert conn.execute("SELECT lower(status) FROM shop.orders WHERE id = 1").fetchall() == [("open",)]
        conn.execute(LOWER)  # allowed by the policy, through the proxy
        _refused(conn, F6, "lower")
        _refused(conn, "SELECT lower(status) FROM shop.orders WHERE id = 1", "lower")
        conn.execute(PURGE)
        _refused(conn, F3, "purge_orders")
    assert _direct(pg_server, database, "SELECT count(*) FROM public.audit") == [(0,)]


def test_a_builtin_call_stays_allowed_and_cached_without_an_overload(
    governed: tuple[RunningProxy, engine.Engine, str], pg_server: pg.PgServer
) -> None:
    proxy, eng, database = governed
    _direct(pg_server, database, PURGE)  # (a user function of another name does not matter)
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        assert conn.execute("SELECT lower(status) FROM shop.orders WHERE id = 1").fetchall() == [("open",)]
        misses = eng.stats.misses
        for i in (2, 1, 2):
            rows = conn.execute(f"SELECT lower(status) FROM shop.orders WHERE id = {i}").fetchall()
            assert rows == [("paid",) if i == 2 else ("open",)]
        assert eng.stats.misses == misses  # decided from the cache (or the lane it taught)


def test_a_user_operator_of_a_builtin_name_is_a_user_function(
    governed: tuple[RunningProxy, engine.Engine, str], pg_server: pg.PgServer
) -> None:
    proxy, _, database = governed
    sql = "SELECT 'a'::text + 'b'::text"
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedFunction):
            conn.execute(sql)  # (forwarded: pg_catalog has no + of text)
        _direct(
            pg_server,
            database,
            "CREATE FUNCTION public.glue(a text, b text) RETURNS text LANGUAGE sql "
            "AS 'INSERT INTO public.audit VALUES (''glued'') RETURNING a || b'; "
            "CREATE OPERATOR public.+ (leftarg = text, rightarg = text, function = public.glue)",
        )
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        _refused(conn, sql, "operator +")
        # Judged by name, without the operands' types: every unqualified + may be the user's.
        _refused(conn, "SELECT 1 + 2", "operator +")
        assert conn.execute("SELECT 1 OPERATOR(pg_catalog.+) 2").fetchall() == [(3,)]
    assert _direct(pg_server, database, "SELECT count(*) FROM public.audit") == [(0,)]


def test_a_superuser_extension_is_the_platform_teams(
    governed: tuple[RunningProxy, engine.Engine, str], pg_server: pg.PgServer
) -> None:
    """pgvector (installed by a superuser) has sum(vector), avg(vector), + and = of its own: they
    are its code, not a user's, so sum(id) and = stay built-ins; a user's own overload still counts."""
    proxy, _, database = governed
    with psycopg.connect(pg_server.dsn(user="postgres", dbname=database), autocommit=True) as admin:
        admin.execute("CREATE EXTENSION vector")
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        assert conn.execute("SELECT sum(id), avg(id) FROM shop.orders WHERE id = 1 OR id + 0 = 2").fetchall()
        assert conn.execute("SELECT '[1,2]'::vector + '[3,4]'::vector").fetchall() == [("[4,6]",)]
    _direct(pg_server, database, "CREATE FUNCTION public.sum(n int) RETURNS int LANGUAGE sql AS 'SELECT n'")
    with psycopg.connect(proxy.dsn(dbname=database), autocommit=True) as conn:
        _refused(conn, "SELECT sum(id) FROM shop.orders", "sum")
