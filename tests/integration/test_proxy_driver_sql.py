"""SQL that drivers send and PostgreSQL parses passes the proxy, whatever sqlglot makes of it.

psycopg and pgjdbc write parameters without spaces (`VALUES ($1,$2)`), which sqlglot's tokenizer
rejects; asyncpg's copy_records_to_table sends `COPY t (cols) FROM STDIN (FORMAT binary)`.
libpg_query is the authority: the second opinion refuses only where it parses too and disagrees.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator

import asyncpg
import psycopg
import pytest
from test_proxy_session_truth import _engine

import pg
from conftest import RunningProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def schema(pg_server: pg.PgServer) -> Iterator[str]:
    name = f"drivers_{uuid.uuid4().hex[:8]}"
    pg_server.psql(
        f"CREATE SCHEMA {name} AUTHORIZATION app; CREATE TABLE {name}.victim (id int); ALTER TABLE {name}.victim OWNER TO app;",
        dbname="shop",
    )
    yield name
    pg_server.psql(f"DROP SCHEMA {name} CASCADE;", dbname="shop")


def _writer(schema: str) -> object:
    return _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "victim",
                    "verdict": "allow",
                    "statements": ["select", "insert", "copy-from"],
                    "tables": [f"{schema}.victim"],
                }
            ],
        }
    )


def test_parameters_without_spaces(
    make_proxy: Callable[..., RunningProxy], schema: str, pg_server: pg.PgServer
) -> None:
    proxy = make_proxy(policy=_writer(schema))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        conn.execute(f"INSERT INTO {schema}.victim (id) VALUES (%s),(%s)", [1, 2])
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {schema}.victim (id) VALUES (%s)", [(3,), (4,)])
        got = conn.execute(
            f"SELECT id FROM {schema}.victim WHERE id IN (%s,%s) ORDER BY id", [1, 4]
        ).fetchall()
        assert got == [(1,), (4,)]
        assert conn.execute("SELECT %s::int,%s::int", [5, 6]).fetchone() == (5, 6)
    assert pg_server.psql(f"SELECT count(*) FROM {schema}.victim", dbname="shop").strip() == "4"


def test_asyncpg_copy_records(
    make_proxy: Callable[..., RunningProxy], schema: str, pg_server: pg.PgServer
) -> None:
    proxy = make_proxy(policy=_writer(schema))

    async def run() -> None:
        conn = await asyncpg.connect(proxy.url(), ssl=False)
        try:
            await conn.copy_records_to_table(
                "victim", schema_name=schema, records=[(7,), (8,)], columns=["id"]
            )
        finally:
            await conn.close()

    asyncio.run(run())
    assert (
        pg_server.psql(
            f"SELECT string_agg(id::text, ',' ORDER BY id) FROM {schema}.victim", dbname="shop"
        ).strip()
        == "7,8"
    )
