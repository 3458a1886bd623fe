"""Unqualified names are judged in the schemas the server will actually resolve them in.

The proxy reads the session's effective search_path right after login, so a role whose
search_path is `shop` cannot have `customers` judged as public.customers (which a policy may
allow) while the server reads shop.customers.
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


def _policy(tables: list[str]) -> policy_port.EnginePolicy:
    spec = {"rules": [{"name": "reads", "verdict": "allow", "statements": ["select"], "tables": tables}]}
    return policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(spec)))


@pytest.fixture
def shop_role(pg_server: pg.PgServer) -> Iterator[tuple[str, str]]:
    """A login role whose search_path is `shop` (set on the role, invisible in the SQL)."""
    name, password = f"path_{uuid.uuid4().hex[:8]}", "path-pw"
    pg_server.psql(
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}';"
        f"ALTER ROLE {name} SET search_path = shop;"
        f"GRANT USAGE ON SCHEMA shop TO {name}; GRANT SELECT ON ALL TABLES IN SCHEMA shop TO {name};",
        dbname="shop",
    )
    yield name, password
    pg_server.psql(f"DROP OWNED BY {name}; DROP ROLE {name};", dbname="shop")


def test_names_resolve_in_the_roles_search_path(
    make_proxy: Callable[..., RunningProxy], shop_role: tuple[str, str]
) -> None:
    user, password = shop_role
    shop_only = make_proxy(policy=_policy(["shop.*"]), upstream={"user": user, "password": password})
    with psycopg.connect(shop_only.dsn(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (200,)


def test_a_policy_on_public_cannot_be_used_to_read_shop(
    make_proxy: Callable[..., RunningProxy], shop_role: tuple[str, str]
) -> None:
    user, password = shop_role
    public_only = make_proxy(policy=_policy(["public.*"]), upstream={"user": user, "password": password})
    with psycopg.connect(public_only.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT * FROM customers")
        assert "shop.customers" in str(info.value)
        # qualified names are unaffected, and the session goes on
        assert conn.execute("SELECT 1").fetchone() == (1,)
