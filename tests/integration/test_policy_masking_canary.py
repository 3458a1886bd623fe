"""Masking rewrites executed against a real PostgreSQL seeded with canary values.

Every masking case in tests/unit/policy/cases/masking.yaml that the engine rewrites is run
for real (with a follow-up that reads what it produced: FETCH, EXECUTE, reading the table it
filled), and no canary may survive in any result row, COPY byte, error text or notice.
"""

from __future__ import annotations

import pathlib
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import yaml

import pg
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine

pytestmark = pytest.mark.integration

POLICY_DIR = pathlib.Path(__file__).resolve().parents[1] / "unit" / "policy"
POLICY = policy_compile.load_policy_text((POLICY_DIR / "policy.yaml").read_text(), mask_key="canary-key")
CANARIES = ("canarylocal", "SSNCANARY", "CARDCANARY", "PHONECANARY")
SCHEMA = """
CREATE TABLE public.customers (
    id integer PRIMARY KEY, name text, email varchar(60), ssn char(20), card_number text, phone text
);
CREATE TABLE public.products (id integer PRIMARY KEY, name text);
CREATE TABLE public.orders (id integer PRIMARY KEY, customer_id integer, product_id integer, qty integer);
CREATE SCHEMA scratch;
CREATE TABLE scratch.stash (v text);
INSERT INTO public.customers
SELECT i, 'Name ' || i, 'canarylocal' || i || '@example.com', 'SSNCANARY-12-' || (1000 + i),
       'CARDCANARY' || i, 'PHONECANARY' || i
FROM generate_series(1, 20) AS i;
INSERT INTO public.products VALUES (1, 'Widget'), (2, 'Gadget');
INSERT INTO public.orders SELECT i, 1 + i % 20, 1 + i % 2, i FROM generate_series(1, 30) AS i;
"""

FOLLOW_UPS = {
    "DECLARE": "FETCH ALL FROM c",
    "PREPARE": "EXECUTE p(1)",
    "scratch.loot": "SELECT * FROM scratch.loot",
    "scratch.stash": "SELECT * FROM scratch.stash",
}
EXTRA_ATTACKS = (
    "SELECT ssn::int FROM customers",
    "SELECT card_number::numeric FROM customers",
    "SELECT email::inet FROM customers",
    "SELECT to_date(ssn, 'YYYY') FROM customers",
    "SELECT 1 / (CASE WHEN ssn LIKE 'SSNCANARY%' THEN 0 ELSE 1 END) FROM customers",
    "SELECT count(*) FROM customers WHERE email LIKE 'canarylocal%'",
    "SELECT * FROM customers c1 JOIN customers c2 ON c1.ssn = c2.ssn",
    "SELECT jsonb_agg(c) FROM customers c",
    "SELECT array_agg(phone ORDER BY phone) FROM customers",
    "SELECT min(c::text) FROM customers c",
    "SELECT x.* FROM (SELECT * FROM customers) x",
    "SELECT (c).ssn FROM customers c",
)
# (`SELECT … FOR SHARE` of customers takes row locks, which needs what an UPDATE needs: the
# fixture policy holds it for approval, so it is not a masking case any more.)


@pytest.fixture(scope="module")
def canary_db(pg_server: pg.PgServer) -> Iterator[str]:
    name = f"canary_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.dsn(user="postgres", dbname="postgres"), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = pg_server.dsn(user="postgres", dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
    yield dsn
    with psycopg.connect(pg_server.dsn(user="postgres", dbname="postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def catalog(canary_db: str) -> dict[Any, tuple[str, ...]]:
    """The masked tables' columns as the proxy reads them at login (its own catalog query)."""
    from dbgov_policy import model
    from dbgov_sidecar import proxy

    targets = tuple((rel.schema, rel.name, "") for rel in sorted(POLICY.masked_tables, key=str))
    columns: dict[Any, list[str]] = {}
    with psycopg.connect(canary_db) as conn:
        for schema, table, column in conn.execute(proxy.table_columns_query(targets)).fetchall():
            columns.setdefault(model.QualifiedName(schema=schema, name=table), []).append(column)
    assert columns
    return {rel: tuple(names) for rel, names in columns.items()}


def _decide(sql: str, columns: dict[Any, tuple[str, ...]] | None) -> Any:
    """The engine's decision, as a session that knows the catalog (``columns``) or not."""
    return engine.Engine(POLICY).decide(sql, session=engine.SessionContext(columns=columns or {}))


def _masking_statements() -> list[str]:
    cases = yaml.safe_load((POLICY_DIR / "cases" / "masking.yaml").read_text())
    return [c["sql"] for c in cases if c["d"] == "mask"] + list(EXTRA_ATTACKS)


def _run(dsn: str, statements: list[str], errors: list[str] | None = None) -> str:
    """Run statements in one rolled-back transaction; return everything the client saw."""
    seen: list[str] = []
    errors = errors if errors is not None else []
    with psycopg.connect(dsn) as conn:
        conn.add_notice_handler(lambda diag: seen.append(str(diag.message_primary)))
        with conn.cursor() as cur:
            for sql in statements:
                try:
                    if sql.lstrip().upper().startswith("COPY") and "STDOUT" in sql.upper():
                        with cur.copy(sql) as copy:
                            seen.extend(bytes(block).decode() for block in copy)
                        continue
                    cur.execute(sql)
                    if cur.description is not None:
                        seen.extend(repr(row) for row in cur.fetchall())
                    seen.append(str(cur.statusmessage))
                except psycopg.Error as err:
                    seen.append(f"{err.sqlstate} {err}")
                    errors.append(f"{err.sqlstate} {err}")
                    diag: Any = err.diag
                    seen.extend(
                        str(getattr(diag, f, "")) for f in ("message_detail", "message_hint", "context")
                    )
                    conn.rollback()
        conn.rollback()
    return "\n".join(seen)


def test_canaries_are_really_there(canary_db: str) -> None:
    """The seeded canaries come back when the unrewritten SQL runs (so the test can fail)."""
    out = _run(canary_db, ["SELECT * FROM customers"])
    assert all(c in out for c in CANARIES)


@pytest.mark.parametrize("known", [False, True], ids=["no-catalog", "catalog"])
@pytest.mark.parametrize("sql", _masking_statements())
def test_no_canary_survives_the_rewrite(
    canary_db: str, catalog: dict[Any, tuple[str, ...]], sql: str, known: bool
) -> None:
    decision = _decide(sql, catalog if known else None)
    if decision.verdict == "block":
        pytest.fail(f"expected a rewrite, got a block: {decision.reason}")
    assert decision.verdict == "mask", decision.reason
    assert decision.rewritten is not None
    follow = [f for key, f in FOLLOW_UPS.items() if key in sql]
    errors: list[str] = []
    out = _run(canary_db, [decision.rewritten, *follow], errors)
    expects_error = (
        sql in EXTRA_ATTACKS or "::int" in sql or "AS bigint" in sql
    )  # cast errors echo masked values
    if not expects_error:  # the rewrite must still run, or this proves nothing
        assert not errors, errors
    leaked = [c for c in CANARIES if c in out]
    assert not leaked, f"{leaked} leaked through {decision.rewritten[:200]}...\n{out[:2000]}"


@pytest.mark.parametrize("known", [False, True], ids=["no-catalog", "catalog"])
def test_masked_values_keep_the_column_types(
    canary_db: str, catalog: dict[Any, tuple[str, ...]], known: bool
) -> None:
    """Masks fit varchar(n)/char(n) and keep the partial strategy's tail."""
    sql = _decide(
        "SELECT email, ssn, card_number, phone FROM customers WHERE id = 3", catalog if known else None
    ).rewritten
    assert sql is not None
    with psycopg.connect(canary_db) as conn:
        email, ssn, card, phone = conn.execute(sql).fetchone() or ()
    assert email == "************@example.com"
    assert ssn.rstrip().endswith("1003") and ssn.startswith("*") and len(ssn) == 20
    assert card == "*" * len("CARDCANARY3")
    assert phone and "PHONECANARY" not in phone and phone == phone.lower()


@pytest.mark.parametrize("known", [False, True], ids=["no-catalog", "catalog"])
def test_functions_shadowing_pg_catalog_cannot_unmask(
    canary_db: str, catalog: dict[Any, tuple[str, ...]], known: bool
) -> None:
    """A schema searched before pg_catalog cannot swap in its own right(), substr() or ||."""
    rewritten = _decide("SELECT email, ssn, card_number FROM customers", catalog if known else None).rewritten
    assert rewritten is not None
    with psycopg.connect(canary_db) as conn:
        conn.execute(
            "CREATE SCHEMA evil;"
            "CREATE FUNCTION evil.right(text, integer) RETURNS text LANGUAGE sql AS 'SELECT $1';"
            "CREATE FUNCTION evil.substr(text, integer) RETURNS text LANGUAGE sql AS 'SELECT $1';"
            "CREATE FUNCTION evil.repeat(text, integer) RETURNS text LANGUAGE sql AS 'SELECT $1';"
            "SET search_path = evil, pg_catalog, public"
        )
        shadowed = conn.execute("SELECT right('secret', 1)").fetchone()
        assert shadowed == ("secret",)  # the shadowing really is in effect for unqualified calls
        out = repr(conn.execute(rewritten).fetchall())
        conn.rollback()
    assert not [c for c in CANARIES if c in out], out[:500]


_MASK_SAMPLES = (
    "",
    "a",
    "abcd",
    "abcde",
    "jane.doe@example.com",
    "@lead",
    "no-at-sign",
    "two@at@signs",
    "ünïcødé@exämple.org",
    "漢字テキスト12345",
    "trailing spaces   ",
    "x" * 70,
)


@pytest.mark.parametrize(
    ("strategy", "keep_last"),
    [("email", 4), ("partial", 4), ("partial", 1), ("redact", 4), ("hash", 4), ("null", 4)],
)
@pytest.mark.parametrize("key", ["", "k3y", "long-" * 20])
@pytest.mark.parametrize("column_type", ["text", "varchar(80)", "char(80)"])
def test_the_proxy_masks_a_value_exactly_as_the_database_does(
    canary_db: str, strategy: str, keep_last: int, key: str, column_type: str
) -> None:
    """Defense in depth masks values in the proxy: they must equal the rewrite's own output."""
    from dbgov_policy import mask, model

    rule = model.Mask(
        table=model.QualifiedName(schema="public", name="t"),
        column="v",
        strategy=strategy,  # type: ignore[arg-type]
        keep_last=keep_last,
    )
    if strategy == "hash" and not key:
        # never a keyless (reversible) hash: the rewrite refuses, the proxy's backstop gives NULL
        with pytest.raises(mask.RewriteError, match="DBGOV_MASK_KEY"):
            mask.mask_expression(rule, "s.v", key=key)
        assert all(mask.mask_text(rule, sample, key=key) is None for sample in _MASK_SAMPLES)
        return
    expression = mask.mask_expression(rule, "s.v", key=key)
    with psycopg.connect(canary_db, autocommit=True) as conn:
        for sample in _MASK_SAMPLES:
            row = conn.execute(
                f"SELECT {expression}, s.v::text FROM (SELECT %s::{column_type} AS v) s", (sample,)
            ).fetchone()
            assert row is not None
            # char(n) pads; the rewrite reads the value as text (padding gone), so does the proxy
            assert mask.mask_text(rule, row[1], key=key) == row[0], (sample, column_type)


def test_knowing_the_catalog_keeps_the_tables_indexes_usable(
    canary_db: str, catalog: dict[Any, tuple[str, ...]]
) -> None:
    """Without the column list the masking subquery masks every row of the table before any
    WHERE applies (a sequential scan, whatever the indexes); with it PostgreSQL flattens the
    subquery and looks the row up by its key. Same rows, same masked values either way."""
    sql = "SELECT id, name, email, ssn FROM customers WHERE id = 7"
    blind, known = _decide(sql, None).rewritten, _decide(sql, catalog).rewritten
    assert blind is not None and known is not None and "CROSS JOIN LATERAL" not in known
    with psycopg.connect(canary_db) as conn:
        conn.execute("SET enable_seqscan = off")  # the table is tiny: ask for the index where usable
        plan_blind = "\n".join(r[0] for r in conn.execute("EXPLAIN " + blind).fetchall())
        plan_known = "\n".join(r[0] for r in conn.execute("EXPLAIN " + known).fetchall())
        assert "Index Scan using customers_pkey" in plan_known and "Index Cond" in plan_known
        assert "Index Cond" not in plan_blind
        rows_blind, rows_known = conn.execute(blind).fetchall(), conn.execute(known).fetchall()
    assert rows_known == rows_blind and len(rows_known) == 1
    assert not any(c in repr(rows_known) for c in CANARIES)
    # A whole-row star keeps the table's column order and every column.
    star = _decide("SELECT * FROM customers WHERE id = 7", catalog).rewritten
    assert star is not None
    with psycopg.connect(canary_db) as conn:
        cur = conn.execute(star)
        assert [d.name for d in cur.description or ()] == list(
            catalog[next(iter(k for k in catalog if k.name == "customers"))]
        )
