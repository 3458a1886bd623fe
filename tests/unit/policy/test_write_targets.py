"""What a statement writes and locks, judged the way PostgreSQL resolves it (issue 13 classes 1
and 5), in places the fixture policy cannot isolate (it refuses DO and CREATE FUNCTION anyway).
Judged under `default: allow` with a rule allowing writes to `orders` (which a write of no
relation at all would satisfy) before one refusing writes to `secrets`, so only a correct reading
of the target refuses them."""

from __future__ import annotations

import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine

WRITES = ["insert", "update", "delete", "merge"]


def _engine(*rules: dict[str, object], require_where: tuple[str, ...] = ()) -> engine.Engine:
    spec = {
        "default": "allow",
        "rules": [
            *rules,
            {"name": "write-orders", "verdict": "allow", "statements": WRITES, "tables": ["orders"]},
            {"name": "no-secret-writes", "verdict": "block", "statements": WRITES, "tables": ["secrets"]},
        ],
        "guardrails": {"requireWhere": list(require_where)},
    }
    return engine.Engine(policy_compile.compile_policy(spec))


CTE_SHADOWED_TARGETS = [
    "WITH secrets AS (SELECT 1) UPDATE secrets SET a = 1 WHERE id = 1",
    "DO $$BEGIN WITH secrets AS (SELECT 1) DELETE FROM secrets WHERE id = 1; END$$",
    "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS $$WITH secrets AS (SELECT 1) DELETE FROM secrets WHERE id = 1$$",
    "CREATE FUNCTION f() RETURNS void LANGUAGE plpgsql AS $$BEGIN WITH secrets AS (SELECT 1) UPDATE secrets SET a = 1 WHERE id = 1; END$$",
    "CREATE RULE r AS ON INSERT TO orders DO ALSO (WITH secrets AS (SELECT 1) DELETE FROM secrets WHERE id = 1)",
    "DECLARE c CURSOR FOR WITH secrets AS (SELECT 1), d AS (DELETE FROM secrets WHERE id = 1 RETURNING 1) SELECT * FROM d",
]


@pytest.mark.parametrize("sql", CTE_SHADOWED_TARGETS)
def test_a_cte_name_never_hides_a_write_target(sql: str) -> None:
    d = _engine().decide(sql)
    assert (d.verdict, d.rule) == ("block", "no-secret-writes"), d.reason


@pytest.mark.parametrize(
    "sql",
    [
        "WITH secrets AS (SELECT 1 AS id) INSERT INTO orders SELECT id FROM secrets",
        "WITH secrets AS (SELECT 1 AS id) MERGE INTO orders o USING secrets s ON o.id = s.id WHEN MATCHED THEN DELETE",
    ],
)
def test_a_cte_name_still_shadows_what_is_read(sql: str) -> None:
    d = _engine().decide(sql)
    assert d.verdict == "allow", d.reason
    assert all(s.reads == () for s in d.statements), d.statements


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM secrets FOR UPDATE",
        "DO $$BEGIN PERFORM 1 FROM secrets FOR SHARE; END$$",
        "CREATE FUNCTION f() RETURNS SETOF int LANGUAGE sql SET search_path = public AS $$SELECT id FROM secrets FOR KEY SHARE$$",
        "CREATE VIEW v AS SELECT * FROM orders o, secrets s FOR UPDATE OF s",
        "DECLARE c CURSOR FOR SELECT * FROM (SELECT * FROM secrets) s FOR NO KEY UPDATE",
    ],
)
def test_a_row_lock_is_judged_as_an_update_of_the_rows_it_locks(sql: str) -> None:
    d = _engine().decide(sql)
    assert (d.verdict, d.rule) == ("block", "no-secret-writes"), d.reason


def test_a_rule_may_allow_row_locks_without_allowing_updates() -> None:
    locks = {"name": "locks", "verdict": "allow", "statements": ["select-for-update"], "tables": ["secrets"]}
    eng = _engine(locks)
    assert eng.decide("SELECT * FROM secrets WHERE id = 1 FOR UPDATE").verdict == "allow"
    d = eng.decide("UPDATE secrets SET a = 1 WHERE id = 1")
    assert (d.verdict, d.rule) == ("block", "no-secret-writes"), d.reason


def test_an_upsert_needs_a_rule_allowing_insert_and_update() -> None:
    inserts = {"name": "inserts", "verdict": "allow", "statements": ["insert"], "tables": ["secrets"]}
    eng = _engine(inserts)
    assert eng.decide("INSERT INTO secrets VALUES (1) ON CONFLICT DO NOTHING").verdict == "allow"
    d = eng.decide("INSERT INTO secrets VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 2")
    assert (d.verdict, d.rule) == ("block", "no-secret-writes"), d.reason


@pytest.mark.parametrize(
    ("sql", "bounded"),
    [
        ("INSERT INTO orders VALUES (1, 2) ON CONFLICT (id) DO UPDATE SET qty = excluded.qty", True),
        ("INSERT INTO orders DEFAULT VALUES ON CONFLICT (id) DO UPDATE SET qty = 0", True),
        (
            "INSERT INTO orders SELECT * FROM orders ON CONFLICT (id) DO UPDATE SET qty = 0 WHERE orders.id = $1",
            True,
        ),
        ("INSERT INTO orders SELECT * FROM orders ON CONFLICT (id) DO UPDATE SET qty = 0", False),
        (
            "INSERT INTO orders SELECT * FROM orders ON CONFLICT (id) DO UPDATE SET qty = 0 WHERE qty = 1",
            False,
        ),
        (
            "INSERT INTO orders SELECT * FROM orders ON CONFLICT (id) DO UPDATE SET qty = 0 WHERE orders.id = orders.id",
            False,
        ),
        (
            "INSERT INTO orders VALUES (1, (SELECT max(o.qty) FROM orders o)) ON CONFLICT (id) DO UPDATE SET qty = 0",
            True,
        ),
        ("INSERT INTO orders VALUES (random()) ON CONFLICT (id) DO UPDATE SET qty = 0", False),
    ],
)
def test_an_upserts_update_obeys_require_where(sql: str, bounded: bool) -> None:
    d = _engine(require_where=("update",)).decide(sql)
    assert (d.verdict == "allow", d.rule) == (
        bounded,
        "write-orders" if bounded else "guardrail:require-where",
    )
