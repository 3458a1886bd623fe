"""asyncpg's and psycopg 3's COPY through `dbgov proxy` against a real PostgreSQL (issue 10).

Bulk loads and exports go through COPY, in forms the simple-query tests never send: asyncpg's
`copy_records_to_table` sends `COPY t (cols) FROM STDIN (FORMAT binary)` in the extended
protocol, psycopg writes and reads binary rows of typed values. Each scenario runs through the
proxy into one schema and directly into an identical one, and the results must be equal except
where the policy says otherwise: COPY TO of a masked table comes back masked (the proxy rewrites
`COPY t TO` into `COPY (SELECT ... FROM <masked subquery>) TO`, in every format), and a COPY FROM
that a rule blocks fails with the policy's 42501 naming the rule, writes nothing, and leaves the
connection usable.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import io
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from test_proxy_session_truth import _engine

import pg
from conftest import RunningProxy
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

REFUSED = "dbgov: statement refused by"
PEOPLE = [
    (1, "Ada", "ada.lovelace@example.com"),
    (2, "Grace", "grace@example.org"),
    (3, "Edsger", "ewd@example.nl"),
]
UTC = datetime.UTC
#: Typed rows: int, text (with the characters CSV and text COPY escape), numeric, timestamptz,
#: bool, bytea, jsonb, uuid, int[] and NULLs.
TYPED = [
    (
        1,
        'comma, "quote"\ttab\nnewline \\ backslash',
        decimal.Decimal("12345.6789"),
        datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=UTC),
        True,
        b"\x00\x01\xff",
        '{"k": [1, 2]}',
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        [1, 2, 3],
    ),
    (
        2,
        "",
        decimal.Decimal("-0.5"),
        datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        False,
        b"",
        "[]",
        uuid.UUID(int=0),
        [],
    ),
    (3, None, None, None, None, None, None, None, None),
]
TYPED_COLUMNS = ["id", "note", "amount", "at", "flag", "blob", "doc", "ref", "nums"]
TYPED_TYPES = ["int4", "text", "numeric", "timestamptz", "bool", "bytea", "jsonb", "uuid", "int4[]"]


@pytest.fixture
def arena(pg_server: pg.PgServer) -> Iterator[Callable[[], str]]:
    """Makes schemas of their own in `shop`, each with `people` (3 rows; email is what the
    masking policy masks), an empty `typed` and an empty `items`; all dropped afterwards."""
    made: list[str] = []
    people = ",".join(f"({i}, '{n}', '{e}')" for i, n, e in PEOPLE)

    def make() -> str:
        name = f"copy_{uuid.uuid4().hex[:8]}"
        made.append(name)
        pg_server.psql(
            f"CREATE SCHEMA {name} AUTHORIZATION app; SET search_path = {name};"
            "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL);"
            "CREATE TABLE typed (id int PRIMARY KEY, note text, amount numeric, at timestamptz,"
            " flag bool, blob bytea, doc jsonb, ref uuid, nums int[]);"
            "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL);"
            "ALTER TABLE people OWNER TO app; ALTER TABLE typed OWNER TO app; ALTER TABLE items OWNER TO app;"
            f"INSERT INTO people VALUES {people};",
            dbname="shop",
        )
        return name

    yield make
    for name in made:
        pg_server.psql(f"DROP SCHEMA {name} CASCADE;", dbname="shop")


def _policy(schema: str, *, load: bool, masks: bool) -> policy_port.EnginePolicy:
    loading: dict[str, Any] = {"name": "bulk-load", "verdict": "allow", "statements": ["copy-from", "insert"]}
    if not load:
        loading = {"name": "no-bulk-load", "verdict": "block", "statements": ["copy-from"]}
    return _engine(
        {
            "default": "block",
            "rules": [
                {"name": "transactions", "verdict": "allow", "statements": ["tcl"]},
                {**loading, "tables": [f"{schema}.*"]},
                {
                    "name": "reads",
                    "verdict": "allow",
                    "statements": ["select", "copy-to"],
                    "tables": [f"{schema}.*", "pg_catalog.*"],  # asyncpg reads types from pg_catalog
                },
            ],
            "masks": [{"table": f"{schema}.people", "column": "email", "strategy": "email"}] if masks else [],
        }
    )


def masking_policy(schema: str) -> policy_port.EnginePolicy:
    """Loads, reads and exports of the schema allowed; people.email masked."""
    return _policy(schema, load=True, masks=True)


def blocking_policy(schema: str) -> policy_port.EnginePolicy:
    """Reads and exports allowed; COPY FROM refused by `no-bulk-load`."""
    return _policy(schema, load=False, masks=False)


def _masked(email: str) -> str:
    local, at, domain = email.partition("@")
    return "*" * len(local) + at + domain


def _direct_url(server: pg.PgServer) -> str:
    return f"postgresql://app@{server.host}:{server.port}/shop"


# ---------------------------------------------------------------------------------------------
# asyncpg


async def _asyncpg_connect(url: str, password: str | None) -> asyncpg.Connection:
    return await asyncpg.connect(url, password=password, ssl=False)


async def _asyncpg_copy(url: str, password: str | None, schema: str) -> dict[str, Any]:
    conn = await _asyncpg_connect(url, password)
    out: dict[str, Any] = {}
    try:
        out["records"] = await conn.copy_records_to_table(
            "typed",
            schema_name=schema,
            records=TYPED,
            columns=TYPED_COLUMNS,
        )
        out["typed"] = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {schema}.typed ORDER BY id")]
        source = io.BytesIO(b'id,label\n1,"one, uno"\n2,"two ""2"""\n3,\xc3\xbe\xc3\xb3r\n')
        out["csv_in"] = await conn.copy_to_table(
            "items", schema_name=schema, source=source, columns=["id", "label"], format="csv", header=True
        )
        out["items"] = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {schema}.items ORDER BY id")]
        for name, kwargs in {
            "people_csv": {"format": "csv"},
            "people_text": {},
            "people_columns": {"columns": ["email", "id"], "format": "csv"},
            "typed_csv": {"format": "csv", "table": "typed"},
        }.items():
            buffer = io.BytesIO()
            table = kwargs.pop("table", "people")
            out[name + "_status"] = await conn.copy_from_table(
                table, schema_name=schema, output=buffer, **kwargs
            )
            out[name] = buffer.getvalue().decode()
        buffer = io.BytesIO()
        out["query_status"] = await conn.copy_from_query(
            f"SELECT p.id, upper(p.email) AS shout FROM {schema}.people p WHERE p.id <= $1 ORDER BY p.id",
            2,
            output=buffer,
            format="csv",
        )
        out["query"] = buffer.getvalue().decode()
        chunks: list[bytes] = []

        async def sink(chunk: bytes) -> None:
            chunks.append(bytes(chunk))

        out["binary_status"] = await conn.copy_from_table(
            "typed", schema_name=schema, output=sink, format="binary"
        )
        out["binary"] = b"".join(chunks)
    finally:
        await conn.close()
    return out


def _both(
    *,
    through: Callable[[str], dict[str, Any]],
    direct: Callable[[str], dict[str, Any]],
    proxy: RunningProxy,
    arena: Callable[[], str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``through`` the proxy, ``direct``), each run on a schema of its own; the proxy masks
    people.email in its schema."""
    mine, theirs = arena(), arena()
    proxy.policy = masking_policy(mine)
    return through(mine), direct(theirs)


def _run_async(url: str, password: str | None, schema: str) -> dict[str, Any]:
    result: dict[str, Any] = asyncio.run(_asyncpg_copy(url, password, schema))
    return result


def test_asyncpg_copy_in_and_out_is_as_direct_but_masked(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, arena: Callable[[], str]
) -> None:
    proxy = make_proxy()
    through, direct = _both(
        through=lambda schema: _run_async(proxy.url(), None, schema),
        direct=lambda schema: _run_async(_direct_url(pg_server), pg.APP_PASSWORD, schema),
        proxy=proxy,
        arena=arena,
    )
    assert direct["records"] == "COPY 3" and direct["csv_in"] == "COPY 3"
    assert direct["items"] == [(1, "one, uno"), (2, 'two "2"'), (3, "þór")]
    assert direct["typed"] == TYPED
    for _, _, email in PEOPLE:
        assert email in direct["people_csv"] and email in direct["people_text"]
    expected = dict(direct)
    for key in ("people_csv", "people_text", "people_columns"):
        text = direct[key]
        for _, _, email in PEOPLE:
            text = text.replace(email, _masked(email))
        expected[key] = text
    query = direct["query"]
    for _, _, email in PEOPLE:
        query = query.replace(email.upper(), _masked(email).upper())
    expected["query"] = query
    assert through == expected
    copies = [e for e in proxy.events if "COPY" in str(e.get("statement", "")).upper()]
    assert any(e.get("masked_columns") for e in copies), "COPY TO of people should be masked"


def test_asyncpg_copy_refused_by_policy_writes_nothing_and_connection_goes_on(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, arena: Callable[[], str]
) -> None:
    schema = arena()
    proxy = make_proxy(policy=blocking_policy(schema))

    async def run() -> None:
        conn = await _asyncpg_connect(proxy.url(), None)
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as info:
                await conn.copy_records_to_table(
                    "typed", schema_name=schema, records=TYPED, columns=TYPED_COLUMNS
                )
            assert info.value.sqlstate == "42501"
            assert str(info.value).startswith(f'{REFUSED} rule "no-bulk-load"')
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="no-bulk-load"):
                await conn.copy_to_table(
                    "items", schema_name=schema, source=io.BytesIO(b"1,one\n"), format="csv"
                )
            assert await conn.fetchval(f"SELECT count(*) FROM {schema}.typed") == 0
            async with conn.transaction():  # a refusal inside a transaction aborts it, as an error there does
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.copy_records_to_table("items", schema_name=schema, records=[(1, "x")])
                with pytest.raises(asyncpg.InFailedSQLTransactionError):
                    await conn.fetchval("SELECT 1")
            # (asyncpg's COMMIT of the failed block is PostgreSQL's ROLLBACK)
            buffer = io.BytesIO()
            assert await conn.copy_from_table("people", schema_name=schema, output=buffer) == "COPY 3"
            assert buffer.getvalue().decode().count("@") == 3  # COPY TO still works, unmasked here
        finally:
            await conn.close()

    asyncio.run(run())
    assert pg_server.psql(f"SELECT count(*) FROM {schema}.typed", dbname="shop").strip() == "0"
    assert pg_server.psql(f"SELECT count(*) FROM {schema}.items", dbname="shop").strip() == "0"
    refused = [e for e in proxy.events if e.get("enforced") == "block"]
    assert refused and {e["rule"] for e in refused} == {"no-bulk-load"}


# ---------------------------------------------------------------------------------------------
# psycopg 3 binary COPY

PEOPLE_TYPES = ["int4", "text", "text"]


def _psycopg_rows() -> list[tuple[Any, ...]]:
    """TYPED as psycopg adapts it: jsonb as the value it holds."""
    return [(*row[:6], None if row[6] is None else json.loads(row[6]), *row[7:]) for row in TYPED]


def _read_rows(copy: psycopg.Copy, types: list[str]) -> list[tuple[Any, ...]]:
    copy.set_types(types)
    return list(iter(copy.read_row, None))


def _psycopg_copy(dsn: str, schema: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cols = ", ".join(TYPED_COLUMNS)
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        with cur.copy(f"COPY {schema}.typed ({cols}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(TYPED_TYPES)
            for row in _psycopg_rows():
                copy.write_row(row)
        out["loaded"] = cur.rowcount
        with cur.copy(f"COPY {schema}.typed ({cols}) TO STDOUT (FORMAT BINARY)") as copy:
            out["typed"] = _read_rows(copy, TYPED_TYPES)
        with cur.copy(f"COPY {schema}.people TO STDOUT (FORMAT BINARY)") as copy:
            out["people"] = _read_rows(copy, PEOPLE_TYPES)
        with cur.copy(f"COPY {schema}.people (email, id) TO STDOUT (FORMAT BINARY)") as copy:
            out["people_columns"] = _read_rows(copy, ["text", "int4"])
        query = f"SELECT id, lower(email) FROM {schema}.people WHERE id > 1 ORDER BY id"
        with cur.copy(f"COPY ({query}) TO STDOUT (FORMAT BINARY)") as copy:
            out["query"] = _read_rows(copy, ["int4", "text"])
        with cur.copy(f"COPY {schema}.people TO STDOUT WITH (FORMAT csv, HEADER)") as copy:
            out["csv"] = b"".join(bytes(chunk) for chunk in copy).decode()
        with (
            conn.transaction(force_rollback=True),
            cur.copy(f"COPY {schema}.items (id, label) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["int4", "text"])
            copy.write_row((1, "rolled back"))
        out["after_rollback"] = conn.execute(f"SELECT count(*) FROM {schema}.items").fetchone()
    return out


def test_psycopg_binary_copy_is_as_direct_but_masked(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, arena: Callable[[], str]
) -> None:
    proxy = make_proxy()
    through, direct = _both(
        through=lambda schema: _psycopg_copy(proxy.dsn(), schema),
        direct=lambda schema: _psycopg_copy(pg_server.dsn(user="app", dbname="shop"), schema),
        proxy=proxy,
        arena=arena,
    )
    assert direct["loaded"] == 3 and direct["typed"] == _psycopg_rows()
    assert direct["people"] == PEOPLE and direct["after_rollback"] == (0,)
    masked = {e: _masked(e) for _, _, e in PEOPLE}
    csv = direct["csv"]
    for email, hidden in masked.items():
        csv = csv.replace(email, hidden)
    assert through == {
        **direct,
        "people": [(i, n, masked[e]) for i, n, e in PEOPLE],
        "people_columns": [(masked[e], i) for e, i in direct["people_columns"]],
        "query": [(i, masked[PEOPLE[i - 1][2]].lower()) for i, _ in direct["query"]],
        "csv": csv,
    }


def test_psycopg_binary_copy_refused_by_policy_writes_nothing_and_connection_goes_on(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, arena: Callable[[], str]
) -> None:
    schema = arena()
    proxy = make_proxy(policy=blocking_policy(schema))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:  # noqa: SIM117
            with cur.copy(f"COPY {schema}.items (id, label) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "text"])
                copy.write_row((1, "one"))
        assert info.value.diag.sqlstate == "42501"
        assert (info.value.diag.message_primary or "").startswith(f'{REFUSED} rule "no-bulk-load"')
        assert conn.execute(f"SELECT count(*) FROM {schema}.items").fetchone() == (0,)
        with cur.copy(f"COPY {schema}.people TO STDOUT (FORMAT BINARY)") as copy:
            assert _read_rows(copy, PEOPLE_TYPES) == PEOPLE  # no mask in this policy
    assert pg_server.psql(f"SELECT count(*) FROM {schema}.items", dbname="shop").strip() == "0"
    refused = [e for e in proxy.events if e.get("enforced") == "block"]
    assert [e["rule"] for e in refused] == ["no-bulk-load"]
