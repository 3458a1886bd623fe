"""What drivers and ORMs send on their own must pass an ordinary read policy.

A fail-closed engine that refuses a driver's catalog queries breaks every application, so
the statements asyncpg, psycopg and SQLAlchemy issue behind the application's back are
judged here against a policy that allows reading the catalogs.
"""

from __future__ import annotations

import asyncpg.introspection
import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine

POLICY = policy_compile.compile_policy(
    {
        "rules": [
            {
                "name": "read",
                "verdict": "allow",
                "statements": ["select"],
                "tables": ["shop.*", "pg_catalog.*", "information_schema.*"],
            }
        ]
    }
)

ASYNCPG = [
    value
    for name, value in vars(asyncpg.introspection).items()
    if isinstance(value, str) and "SELECT" in value.upper() and len(value) > 50
]
SESSION_CHATTER = [
    "BEGIN",
    "BEGIN ISOLATION LEVEL READ COMMITTED",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT sa_savepoint_1",
    "RELEASE SAVEPOINT sa_savepoint_1",
    "ROLLBACK TO SAVEPOINT sa_savepoint_1",
    "SHOW transaction isolation level",
    "SHOW standard_conforming_strings",
    "select pg_catalog.version()",
    "select current_schema()",
    "SET datestyle TO 'ISO'",
    "SET TIME ZONE 'UTC'",
    "SET extra_float_digits = 3",
    "SET application_name = 'PostgreSQL JDBC Driver'",
    "SELECT t.oid, typarray FROM pg_type t JOIN pg_namespace ns ON typnamespace = ns.oid WHERE typname = 'hstore'",
    "DISCARD ALL",
    "DEALLOCATE ALL",
    (
        "SELECT pg_catalog.pg_class.relname FROM pg_catalog.pg_class JOIN pg_catalog.pg_namespace "
        "ON pg_catalog.pg_namespace.oid = pg_catalog.pg_class.relnamespace WHERE pg_catalog.pg_class.relname = "
        "'customers' AND pg_catalog.pg_class.relkind = ANY (ARRAY['r', 'p', 'f', 'v', 'm']) "
        "AND pg_catalog.pg_table_is_visible(pg_catalog.pg_class.oid) AND pg_catalog.pg_namespace.nspname != 'pg_catalog'"
    ),
]
# pgjdbc's DatabaseMetaData.getPrimaryKeys (42.7): information_schema's own helper function.
PGJDBC_METADATA = [
    "SELECT NULL AS TABLE_CAT, n.nspname AS TABLE_SCHEM,   ct.relname AS TABLE_NAME, a.attname AS COLUMN_NAME,"
    "   (information_schema._pg_expandarray(i.indkey)).n AS KEY_SEQ, ci.relname AS PK_NAME,"
    "   information_schema._pg_expandarray(i.indkey) AS KEYS, a.attnum AS A_ATTNUM "
    "FROM pg_catalog.pg_class ct   JOIN pg_catalog.pg_attribute a ON (ct.oid = a.attrelid) "
    "  JOIN pg_catalog.pg_namespace n ON (ct.relnamespace = n.oid) "
    "  JOIN pg_catalog.pg_index i ON ( a.attrelid = i.indrelid) "
    "  JOIN pg_catalog.pg_class ci ON (ci.oid = i.indexrelid) "
    "WHERE true  AND ct.relname = E'customers' AND i.indisprimary ",
    "SELECT tmp.TABLE_CAT, tmp.TABLE_SCHEM, tmp.TABLE_NAME, tmp.NON_UNIQUE FROM (SELECT NULL AS TABLE_CAT,"
    " n.nspname AS TABLE_SCHEM, ct.relname AS TABLE_NAME, NOT i.indisunique AS NON_UNIQUE,"
    " (information_schema._pg_expandarray(i.indkey)).n AS ORDINAL_POSITION "
    "FROM pg_catalog.pg_class ct JOIN pg_catalog.pg_namespace n ON (ct.relnamespace = n.oid) "
    "JOIN pg_catalog.pg_index i ON (ct.oid = i.indrelid)) AS tmp ORDER BY NON_UNIQUE",
]


@pytest.mark.parametrize("sql", ASYNCPG + SESSION_CHATTER + PGJDBC_METADATA)
def test_driver_statements_pass_a_read_policy(sql: str) -> None:
    d = engine.Engine(POLICY).decide(sql)
    assert d.verdict == "allow", d.reason


def test_asyncpg_has_introspection_queries_to_check() -> None:
    assert len(ASYNCPG) >= 3


@pytest.mark.parametrize("schema", ["public", "shop", "pg_temp", "information_schema_x"])
def test_only_information_schemas_own_helpers_are_known_to_read(schema: str) -> None:
    """The same name in any other schema is a user function: it may write."""
    d = engine.Engine(POLICY).decide(f"SELECT {schema}._pg_expandarray(i.indkey) FROM pg_catalog.pg_index i")
    assert d.verdict == "block", d.reason
    assert "_pg_expandarray, which may write" in d.reason
