"""Calls the fixture policy cannot isolate (it blocks DO and CREATE FUNCTION by default): SQL-text
runners and EXPLAIN inside bodies, deniedFunctions through built-in SQL wrappers, and requireWhere
on what real workloads write. Judged under `default: allow`, so only a guardrail can refuse."""

from __future__ import annotations

import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, guards


def _policy(denied: list[str]) -> engine.Engine:
    spec = {
        "default": "allow",
        "rules": [],
        "guardrails": {"deniedFunctions": denied, "requireWhere": ["update", "delete", "merge"]},
    }
    return engine.Engine(policy_compile.compile_policy(spec))


@pytest.mark.parametrize(
    ("denied", "sql"),
    [
        (["pg_sleep"], "SELECT pg_sleep_for('1 s')"),
        (["pg_sleep"], "SELECT pg_sleep_until(now())"),
        (["pg_catalog.pg_sleep"], "SELECT pg_sleep_for('1 s')"),
        (["pg_catalog.pg_sleep"], "SELECT pg_sleep(1)"),
        (["ts_parse"], "SELECT * FROM ts_debug('english', 'a fat cat')"),
        (["similar_to_escape"], "SELECT substring('abc', 'a', '#')"),
        (["octet_length"], "SELECT bit_length('abc'::text)"),
    ],
)
def test_denying_a_builtin_denies_the_sql_functions_that_call_it(denied: list[str], sql: str) -> None:
    d = _policy(denied).decide(sql)
    assert (d.verdict, d.rule) == ("block", "guardrails.deniedFunctions"), d.reason


def test_the_reason_names_the_callee() -> None:
    d = _policy(["pg_sleep"]).decide("SELECT pg_sleep_for('1 s')")
    assert "pg_sleep_for()" in d.reason and "calls pg_sleep()" in d.reason


@pytest.mark.parametrize(
    "sql",
    ["SELECT pg_sleep_for('1 s')", "SELECT app.pg_sleep_for('1 s')", "SELECT clock_timestamp()"],
)
def test_other_functions_stay_allowed(sql: str) -> None:
    d = _policy(["app.other"]).decide(sql)
    assert d.verdict == "allow", d.reason


def test_a_user_function_of_a_wrappers_name_is_not_a_wrapper() -> None:
    d = _policy(["pg_sleep"]).decide("SELECT app.pg_sleep_for('1 s')")
    assert d.verdict == "allow", d.reason


def test_the_wrapper_table_is_closed_under_calls() -> None:
    for wrapper, callees in guards.BUILTIN_CALLS.items():
        assert wrapper not in callees
        for callee in callees:
            assert guards.BUILTIN_CALLS.get(callee, frozenset()) <= callees


@pytest.mark.parametrize(
    "sql",
    [
        # pgbench's TPC-B script, extended (parameters) and simple (literals) protocol
        "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
        "UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tid = $2",
        "UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE bid = $2",
        "UPDATE pgbench_accounts SET abalance = abalance + -4371 WHERE aid = 73411",
        # what ORMs send
        'UPDATE "users" SET "name" = $1, "updated_at" = $2 WHERE "users"."id" = $3',
        'DELETE FROM "users" WHERE "users"."id" IN ($1, $2, $3)',
        "UPDATE users SET name=%(name)s WHERE users.id = %(id_1)s".replace("%(name)s", "$1").replace(
            "%(id_1)s", "$2"
        ),
        "DELETE FROM sessions WHERE expires_at < now()",
        "UPDATE jobs SET state = 'taken' WHERE id = (SELECT j.id FROM jobs j WHERE j.state = 'new' "
        "ORDER BY j.id LIMIT 1 FOR UPDATE SKIP LOCKED)",
        "MERGE INTO stock s USING (VALUES ($1::int, $2::int)) v(id, qty) ON s.id = v.id "
        "WHEN MATCHED THEN UPDATE SET qty = v.qty",
    ],
)
def test_ordinary_writes_pass_require_where(sql: str) -> None:
    d = _policy([]).decide(sql)
    assert d.verdict == "allow", d.reason


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$BEGIN PERFORM ts_stat('SELECT to_tsvector(email) FROM customers'); END$$",
        "DO $$DECLARE v text; BEGIN v := (SELECT string_agg(word, ',') FROM "
        "ts_stat('SELECT to_tsvector(email) FROM customers')); RAISE NOTICE '%', v; END$$",
        "DO $$BEGIN RAISE NOTICE '%', ts_rewrite('a'::tsquery, 'SELECT 1'); END$$",
        "DO LANGUAGE sql $$SELECT * FROM ts_stat('SELECT 1')$$",
        "CREATE FUNCTION f() RETURNS SETOF text LANGUAGE sql AS "
        "$$SELECT word FROM ts_stat('SELECT to_tsvector(email) FROM customers')$$",
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM query_to_xml('SELECT * FROM customers', true, true, ''); END$$",
        "CREATE FUNCTION f() RETURNS text LANGUAGE sql RETURN (SELECT max(word) FROM ts_stat('SELECT 1'))",
        "CREATE VIEW v AS SELECT * FROM crosstab('SELECT 1') AS t(a text)",
    ],
)
def test_sql_text_runners_in_bodies_are_refused(sql: str) -> None:
    d = _policy([]).decide(sql)
    assert (d.verdict, d.rule) == ("block", "guardrail:dynamic-sql"), d.reason
    assert "inside the server" in d.reason and d.hint


def _masked(strategy: str) -> engine.Engine:
    spec = {
        "default": "allow",
        "rules": [],
        "masks": [{"table": "customers", "column": "ssn", "strategy": strategy}],
    }
    return engine.Engine(policy_compile.compile_policy(spec, mask_key="secret-key"))


@pytest.mark.parametrize(
    "sql",
    [
        "DO $$DECLARE r record; BEGIN FOR r IN EXPLAIN VERBOSE EXECUTE p LOOP RAISE NOTICE '%', r; END LOOP; END$$",
        "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS "
        "$$DECLARE r record; BEGIN FOR r IN EXPLAIN (VERBOSE) EXECUTE p LOOP END LOOP; END$$",
        "EXPLAIN (VERBOSE) SELECT ssn FROM customers",
        "EXPLAIN (GENERIC_PLAN) SELECT id FROM customers WHERE id = $1",
        "CREATE VIEW v AS SELECT ssn FROM customers",
    ],
)
def test_a_hash_mask_key_is_never_printed(sql: str) -> None:
    d = _masked("hash").decide(sql)
    assert (d.verdict, d.rule) == ("block", "guardrail:mask-key"), d.reason


def test_explain_of_an_unkeyed_mask_is_masked() -> None:
    d = _masked("partial").decide("EXPLAIN (VERBOSE) SELECT ssn FROM customers")
    assert d.verdict == "mask" and d.rewritten is not None, d.reason
    assert _masked("partial").decide("EXPLAIN EXECUTE p").verdict == "allow"


@pytest.mark.parametrize("strategy", ["partial", "hash"])
@pytest.mark.parametrize(
    "sql", ["SELECT * FROM pg_prepared_statements", "SELECT * FROM pg_cursors", "SET debug_print_plan = on"]
)
def test_statement_texts_are_refused_whenever_the_policy_masks(strategy: str, sql: str) -> None:
    d = _masked(strategy).decide(sql)
    assert (d.verdict, d.rule) == ("block", "guardrail:mask-key"), d.reason
    assert _policy([]).decide(sql).verdict == "allow"


def test_turning_a_tree_printer_off_is_allowed() -> None:
    d = _masked("hash").decide("SET debug_print_plan = off")
    assert d.verdict == "allow", d.reason


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER SCHEMA shop RENAME TO loot",
        'ALTER SCHEMA "shop" RENAME TO loot',
        "ALTER SCHEMA shop RENAME TO shop2",
    ],
)
def test_renaming_the_schema_of_a_masked_table_is_refused(sql: str) -> None:
    """Masks name their tables by schema: a renamed schema would carry them out from under it."""
    spec = {
        "default": "allow",
        "rules": [],
        "masks": [{"table": "shop.customers", "column": "email", "strategy": "redact"}],
    }
    d = engine.Engine(policy_compile.compile_policy(spec)).decide(sql)
    assert (d.verdict, d.rule) == ("block", "guardrail:mask-unprovable"), d.reason
    assert "shop.customers" in d.reason
    other = engine.Engine(policy_compile.compile_policy(spec)).decide("ALTER SCHEMA staging RENAME TO old")
    assert other.verdict == "allow"


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT pg_notify('c', 'x')", "pg_notify() (notify)"),
        ("SELECT nextval('s') FROM t", "nextval() (call)"),
        ("SELECT pg_advisory_lock(1)", "pg_advisory_lock() (lock)"),
    ],
)
def test_a_refusal_names_the_function_that_changes_state(sql: str, named: str) -> None:
    """Issue 10: `SELECT pg_notify(…)` under a select rule said only "no rule covers this select"."""
    spec = {
        "default": "block",
        "rules": [{"name": "reads", "verdict": "allow", "statements": ["select"], "tables": ["t"]}],
    }
    d = engine.Engine(policy_compile.compile_policy(spec)).decide(sql)
    assert d.verdict == "block" and named in d.reason, d.reason
