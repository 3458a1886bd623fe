"""`t.x` in a write to a masked table: a column of t, or x(t), a function of the whole row.

PostgreSQL reads `t.x` as the function x applied to t's row when t has no column x
(`RETURNING c.row_to_json` returns every column, masked ones unmasked). The proxy knows the
masked tables' columns from the catalog at login; with them, Django's and Hibernate's qualified
writes (`WHERE "customers"."id" = 1`) pass, and a name that is no column is refused.
"""

from __future__ import annotations

import pathlib

import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, model

POLICY = policy_compile.load_policy_text(
    (pathlib.Path(__file__).parent / "policy.yaml").read_text(), source="tests/policy.yaml", mask_key="k"
)
CUSTOMERS = model.QualifiedName(schema="public", name="customers")
COLUMNS = ("id", "name", "email", "ssn", "card_number", "phone")


def _decide(sql: str) -> tuple[str, str | None]:
    session = engine.SessionContext(columns={CUSTOMERS: COLUMNS})
    d = engine.Engine(POLICY).decide(sql, session=session)
    return d.verdict, d.rule


@pytest.mark.parametrize(
    "sql",
    [
        'UPDATE "customers" SET "name" = \'x\' WHERE "customers"."id" = 1',
        'DELETE FROM "customers" WHERE "customers"."id" IN (1)',
        'INSERT INTO "customers" ("name", "email") VALUES (\'a\', \'b\') RETURNING "customers"."id"',
        "UPDATE customers AS c SET name = 'x' WHERE c.id = 1 RETURNING c.id",
        "UPDATE public.customers SET name = 'x' WHERE public.customers.id = 1",
    ],
)
def test_qualified_columns_of_a_masked_target_pass(sql: str) -> None:
    assert _decide(sql) == ("approve", "customers-approval")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE customers SET name = 'x' WHERE id = 1 RETURNING customers.row_to_json",
        "UPDATE customers c SET name = c.to_json::text WHERE c.id = 1",
        "DELETE FROM customers c WHERE c.id = 1 RETURNING c.to_jsonb",
        "UPDATE customers SET name = 'x' WHERE customers.ssn = '1'",
    ],
)
def test_a_name_that_is_no_column_is_the_whole_row(sql: str) -> None:
    assert _decide(sql) == ("block", "guardrail:mask-unprovable")


def test_the_decision_is_not_cached_across_catalogs() -> None:
    """Another database may lack the column: the same text is judged by each session's catalog."""
    eng = engine.Engine(POLICY)
    sql = "UPDATE customers SET name = 'x' WHERE customers.id = 1 RETURNING customers.legacy"
    with_column = engine.SessionContext(columns={CUSTOMERS: (*COLUMNS, "legacy")})
    without = engine.SessionContext(columns={CUSTOMERS: COLUMNS})
    assert eng.decide(sql, session=with_column).verdict == "approve"
    assert eng.decide(sql, session=without).verdict == "block"
    assert eng.decide(sql, session=with_column).verdict == "approve"
