"""One audit event per statement run, also when a prepared statement runs again and again."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import pytest

from conftest import RunningProxy

pytestmark = pytest.mark.integration

SQL_PSYCOPG = "SELECT %s::int * 3"
SQL_SERVER = "SELECT $1::int * 3"


def _runs(proxy: RunningProxy, sql: str) -> list[dict[str, object]]:
    return [e for e in proxy.events if e.get("type") == "statement" and e.get("statement") == sql]


def test_every_execution_of_a_prepared_statement_is_audited(dbgov: RunningProxy) -> None:
    with psycopg.connect(dbgov.dsn(), autocommit=True) as conn:
        for i in range(5):
            assert conn.execute(SQL_PSYCOPG, [i], prepare=True).fetchone() == (i * 3,)
    runs = _runs(dbgov, SQL_SERVER)
    executed = [e for e in runs if e["rows_returned"] == 1]
    assert len(executed) == 5, runs
    assert len(runs) - len(executed) <= 1  # psycopg's own Parse-only batch, audited as the prepare


def test_asyncpg_prepared_statement_executions_are_audited(dbgov: RunningProxy) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(dbgov.url())
        try:
            stmt = await conn.prepare(SQL_SERVER)
            for i in range(4):
                assert await stmt.fetchval(i) == i * 3
        finally:
            await conn.close()

    asyncio.run(main())
    assert len(_runs(dbgov, SQL_SERVER)) >= 4
