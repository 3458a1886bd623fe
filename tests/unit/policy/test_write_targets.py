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
