"""Which statements a rule with `tables` decides. An allow rule must cover every relation the
statement touches; a block or approve rule decides every statement that touches one of its
tables. Before, all three needed every relation, so joining any other table (a catalog, a
CTE over the blocked one) took a read of a blocked table out of its rule, and a statement on no
table at all (SELECT 1, BEGIN) fell into a block rule about one table. A rule about writes
only (`[insert, update, delete]`) decides by the relations written."""

from __future__ import annotations

from typing import Any

import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine


def decide(rules: list[dict[str, Any]], sql: str, *, default: str = "allow") -> tuple[str, str | None]:
    d = engine.Engine(policy_compile.compile_policy({"default": default, "rules": rules})).decide(sql)
    return d.verdict, d.rule


NO_ORDERS = {"name": "no-orders", "verdict": "block", "tables": ["shop.orders"]}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM shop.orders o JOIN shop.customers c ON c.id = o.customer_id",
        "SELECT * FROM shop.orders, pg_catalog.pg_class",
        "WITH x AS (SELECT * FROM shop.orders) SELECT * FROM x, shop.customers",
        "SELECT * FROM shop.customers WHERE id IN (SELECT customer_id FROM shop.orders)",
        "SELECT (SELECT count(*) FROM shop.orders) FROM shop.customers",
        "INSERT INTO shop.customers (name) SELECT customer_id::text FROM shop.orders",
        "UPDATE shop.customers SET name = o.id::text FROM shop.orders o",
        "DELETE FROM shop.customers USING shop.orders",
        "TRUNCATE shop.customers, shop.orders",
    ],
)
def test_joining_another_table_does_not_escape_a_block_rule(sql: str) -> None:
    assert decide([NO_ORDERS], sql) == ("block", "no-orders")


@pytest.mark.parametrize("sql", ["SELECT 1", "BEGIN", "SELECT now()", "SELECT * FROM shop.customers"])
def test_a_block_rule_leaves_statements_that_do_not_touch_its_tables(sql: str) -> None:
    assert decide([NO_ORDERS], sql)[0] == "allow"


def test_an_allow_rule_after_a_block_cannot_take_a_joined_read_of_the_blocked_table() -> None:
    rules = [NO_ORDERS, {"name": "reads", "verdict": "allow", "statements": ["select"]}]
    sql = "SELECT * FROM shop.orders o, shop.customers c"
    assert decide(rules, sql, default="block") == ("block", "no-orders")
    assert decide(rules, "SELECT * FROM shop.customers", default="block") == ("allow", "reads")


def test_an_approval_rule_holds_a_write_that_also_reads_another_table() -> None:
    rules = [
        {"name": "hold-deletes", "verdict": "approve", "statements": ["delete"], "tables": ["shop.orders"]},
        {"name": "writes", "verdict": "allow", "statements": ["delete", "select"]},
    ]
    sql = "DELETE FROM shop.orders o USING shop.customers c WHERE c.id = o.customer_id"
    assert decide(rules, sql, default="block") == ("approve", "hold-deletes")


def test_a_rule_about_writes_decides_by_the_relation_written() -> None:
    rules = [
        {
            "name": "hold",
            "verdict": "approve",
            "statements": ["insert", "update", "delete"],
            "tables": ["shop.customers"],
        },
        {"name": "scratch", "verdict": "allow", "statements": ["insert", "select"]},
    ]
    # reads customers, writes elsewhere: not a write to customers
    assert decide(rules, "INSERT INTO shop.stash SELECT * FROM shop.customers", default="block") == (
        "allow",
        "scratch",
    )
    assert decide(
        rules, "INSERT INTO shop.customers (name) SELECT name FROM shop.stash", default="block"
    ) == (
        "approve",
        "hold",
    )
    sql = "WITH d AS (DELETE FROM shop.customers RETURNING id) SELECT * FROM d, shop.stash"
    assert decide(rules, sql, default="block") == ("approve", "hold")


def test_a_block_rule_about_reads_also_judges_what_a_write_reads() -> None:
    rules = [{"name": "no-reads", "verdict": "block", "tables": ["shop.orders"]}]
    assert decide(rules, "INSERT INTO shop.stash SELECT * FROM shop.orders") == ("block", "no-reads")


def problems(rules: list[dict[str, Any]]) -> list[str]:
    try:
        policy_compile.compile_policy({"rules": rules})
    except policy_compile.PolicyInvalid as err:
        return [str(p) for p in err.problems]
    return []


def test_shadowing_follows_the_coverage_of_each_verdict() -> None:
    allow_then_block = [
        {"name": "reads", "verdict": "allow", "statements": ["select"], "tables": ["shop.*"]},
        {"name": "no-orders", "verdict": "block", "statements": ["select"], "tables": ["shop.orders"]},
    ]
    # a read joining shop.orders to pg_class escapes `reads` and reaches `no-orders`
    assert problems(allow_then_block) == []
    assert decide(allow_then_block, "SELECT * FROM shop.orders, pg_catalog.pg_class", default="block") == (
        "block",
        "no-orders",
    )
    block_then_allow_reads = [
        {"name": "no-shop", "verdict": "block", "tables": ["shop.*"]},
        {"name": "reads", "verdict": "allow", "statements": ["select"], "tables": ["shop.orders"]},
    ]
    assert problems(block_then_allow_reads) == []  # SELECT 1 reaches `reads`
    block_then_allow_truncate = [
        {"name": "no-shop", "verdict": "block", "tables": ["shop.*"]},
        {"name": "truncate", "verdict": "allow", "statements": ["truncate"], "tables": ["shop.orders"]},
    ]
    (only,) = problems(block_then_allow_truncate)
    assert "rule 'truncate' can never match" in only
    twice = [
        NO_ORDERS,
        {"name": "again", "verdict": "block", "statements": ["select"], "tables": ["shop.orders"]},
    ]
    (only,) = problems(twice)
    assert "rule 'again' can never match" in only


# What a statement reaches without naming it (found by an attacker who had not seen these tests)
BLOCK_SALARIES = {"name": "no-salaries", "verdict": "block", "tables": ["shop.salaries"]}


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER SCHEMA shop RENAME TO s2",  # then SELECT * FROM s2.salaries
        "ALTER SCHEMA shop OWNER TO someone",
        "DROP SCHEMA shop CASCADE",
        "DROP SCHEMA shop",
        "GRANT SELECT ON ALL TABLES IN SCHEMA shop TO PUBLIC",
        "ALTER DEFAULT PRIVILEGES IN SCHEMA shop GRANT SELECT ON TABLES TO PUBLIC",
        "DROP OWNED BY CURRENT_USER",
        "REASSIGN OWNED BY CURRENT_USER TO someone",
        "DROP TYPE shop.grade CASCADE",  # drops the salaries column of that type
        "DROP SEQUENCE shop.salaries_id_seq CASCADE",
        "DROP FUNCTION shop.f() CASCADE",
        "TRUNCATE shop.customers CASCADE",  # truncates the tables referencing it too
        "ALTER TABLE ALL IN TABLESPACE pg_default SET TABLESPACE other",
    ],
)
def test_a_block_rule_covers_what_reaches_its_tables_unnamed(sql: str) -> None:
    assert decide([BLOCK_SALARIES], sql) == ("block", "no-salaries")


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER SCHEMA other RENAME TO o2",
        "DROP SCHEMA other",
        "GRANT SELECT ON ALL TABLES IN SCHEMA other TO x",
    ],
)
def test_another_schema_is_not_its_business(sql: str) -> None:
    assert decide([BLOCK_SALARIES], sql)[0] == "allow"


def test_an_allow_rule_with_tables_never_covers_what_reaches_unnamed_tables() -> None:
    rules = [{"name": "scratch", "verdict": "allow", "tables": ["scratch.*"]}]
    for sql in ("TRUNCATE scratch.t CASCADE", "DROP SCHEMA scratch", "DROP OWNED BY CURRENT_USER"):
        assert decide(rules, sql, default="block") == ("block", "default"), sql
    assert decide(rules, "TRUNCATE scratch.t", default="block") == ("allow", "scratch")


HOLD_DELETES = {"name": "hold", "verdict": "approve", "statements": ["delete"], "tables": ["shop.orders"]}
WRITES = {
    "name": "writes",
    "verdict": "allow",
    "statements": ["select", "insert", "update", "delete", "merge"],
}


@pytest.mark.parametrize(
    ("held", "sql"),
    [
        (
            ["delete"],
            "MERGE INTO shop.orders o USING (VALUES (1)) v(id) ON o.id = v.id WHEN MATCHED THEN DELETE",
        ),
        (
            ["update"],
            "MERGE INTO shop.orders o USING (VALUES (1)) v(id) ON o.id = v.id WHEN MATCHED THEN UPDATE SET x = 1",
        ),
        (
            ["insert"],
            "MERGE INTO shop.orders o USING (VALUES (1)) v(id) ON o.id = v.id WHEN NOT MATCHED THEN INSERT VALUES (1)",
        ),
        (["update"], "INSERT INTO shop.orders VALUES (2, 1, 0) ON CONFLICT (id) DO UPDATE SET x = 999"),
        (["insert"], "COPY shop.orders (id) FROM STDIN"),
        (["delete"], "TRUNCATE shop.orders"),
    ],
)
def test_an_approval_rule_holds_what_a_statement_does_besides_its_class(held: list[str], sql: str) -> None:
    rules = [
        {**HOLD_DELETES, "statements": held},
        {**WRITES, "statements": [*WRITES["statements"], "copy", "truncate"]},
    ]
    assert decide(rules, sql, default="block") == ("approve", "hold")


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE shop.orders RENAME TO o2",  # then DELETE FROM shop.o2
        "CREATE VIEW public.ov AS SELECT * FROM shop.orders",  # then DELETE FROM public.ov
        "ALTER TABLE shop.orders ALTER COLUMN qty TYPE bigint USING qty * 10",
        "DROP TABLE shop.orders",
    ],
)
def test_a_rule_about_writes_also_holds_ddl_that_changes_what_its_writes_reach(sql: str) -> None:
    assert decide([HOLD_DELETES], sql) == ("approve", "hold")


def test_a_copy_of_the_table_is_not_a_write_to_it() -> None:
    assert decide([HOLD_DELETES], "CREATE TABLE scratch.copy AS SELECT * FROM shop.orders") == (
        "allow",
        "default",
    )


@pytest.mark.parametrize(
    "sql",
    [
        "PREPARE p AS MERGE INTO shop.orders o USING (VALUES (1)) v(id) ON o.id = v.id WHEN MATCHED THEN DELETE",
        "WITH x AS (MERGE INTO shop.orders o USING (VALUES (1)) v(id) ON o.id = v.id WHEN MATCHED THEN DELETE"
        " RETURNING 1) SELECT 1",
        "BEGIN; MERGE INTO shop.orders o USING (VALUES (1)) v(id) ON o.id = v.id WHEN MATCHED THEN DELETE; COMMIT",
    ],
)
def test_what_a_statement_does_is_judged_where_it_hides(sql: str) -> None:
    """A prepared statement, a writable CTE or a batch: the held delete inside is held."""
    assert decide([HOLD_DELETES], sql)[0] == "approve"


@pytest.mark.parametrize(
    "sql",
    [
        "BEGIN; DROP SCHEMA shop CASCADE; COMMIT",
        'ALTER SCHEMA "shop" RENAME TO s2',
        "ALTER SCHEMA SHOP RENAME TO s2",  # folded to shop, as the server does
        "CREATE FUNCTION f() RETURNS void LANGUAGE sql SET search_path = pg_catalog AS $$ DROP SCHEMA shop CASCADE $$",
    ],
)
def test_schema_reach_is_judged_in_batches_bodies_and_every_spelling(sql: str) -> None:
    assert decide([BLOCK_SALARIES], sql)[0] == "block"


def test_a_quoted_schema_of_another_case_is_another_schema() -> None:
    assert decide([BLOCK_SALARIES], 'ALTER SCHEMA "Shop" RENAME TO s2')[0] == "allow"
