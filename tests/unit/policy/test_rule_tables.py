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
