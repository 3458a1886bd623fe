"""Masking through inheritance (issue 13 class 7), against a real PostgreSQL through the proxy.

A masked parent has a plain inheritance child (with an extra column) and a second child whose
columns come in another order; a masked partitioned table has two partitions, one of them
partitioned again, and one attached with its columns in another order (so its attribute numbers
differ from the parent's). Each child is read by its own name with psycopg, in the simple and the
extended protocol, repeated until the compiled lane takes the shape: no canary comes back in
clear. Changing a child's place in the tree, or giving a masked table a new child, is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

import pg
from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

PII = "pii-canary"


def _engine(spec: dict[str, object]) -> policy_port.EnginePolicy:
    return policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(spec)))


@pytest.fixture
def arena(pg_server: pg.PgServer) -> Iterator[str]:
    """A schema with a masked inheritance tree (`people`) and a masked partitioned table (`events`)."""
    s = f"inh_{uuid.uuid4().hex[:8]}"
    pg_server.psql(
        f"CREATE SCHEMA {s} AUTHORIZATION app; SET ROLE app;"
        f"CREATE TABLE {s}.people (id int, name text, email text);"
        f"CREATE TABLE {s}.vip (level int) INHERITS ({s}.people);"
        f"CREATE TABLE {s}.vip_gold () INHERITS ({s}.vip);"
        f"CREATE TABLE {s}.staff (badge text, email text, id int, name text);"
        f"ALTER TABLE {s}.staff INHERIT {s}.people;"
        f"CREATE TABLE {s}.events (id int, at date, email text) PARTITION BY RANGE (at);"
        f"CREATE TABLE {s}.events_2025 PARTITION OF {s}.events"
        "  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY LIST (id);"
        f"CREATE TABLE {s}.events_2025_low PARTITION OF {s}.events_2025 FOR VALUES IN (1, 2);"
        f"CREATE TABLE {s}.events_2026 (gone int, email text, at date, id int);"
        f"ALTER TABLE {s}.events_2026 DROP COLUMN gone;"
        f"ALTER TABLE {s}.events ATTACH PARTITION {s}.events_2026 FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
        f"CREATE TABLE {s}.loose (id int, at date, email text);"
        f"INSERT INTO {s}.people VALUES (1, 'p', '{PII}-p@example.com');"
        f"INSERT INTO {s}.vip VALUES (2, 'v', '{PII}-v@example.com', 1);"
        f"INSERT INTO {s}.vip_gold VALUES (3, 'g', '{PII}-g@example.com', 2);"
        f"INSERT INTO {s}.staff (id, name, email, badge) VALUES (4, 's', '{PII}-s@example.com', 'b');"
        f"INSERT INTO {s}.events VALUES (1, '2025-03-01', '{PII}-e1'), (2, '2026-03-01', '{PII}-e2');",
        dbname="shop",
    )
    yield s
    pg_server.psql(f"DROP SCHEMA {s} CASCADE;", dbname="shop")


def _policy(schema: str) -> policy_port.EnginePolicy:
    return _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "app",
                    "verdict": "allow",
                    "statements": ["select", "copy-to", "create", "alter", "update"],
                    "tables": [f"{schema}.*"],
                }
            ],
            "masks": [
                {"table": f"{schema}.people", "column": "email", "strategy": "email"},
                {"table": f"{schema}.events", "column": "email", "strategy": "redact"},
            ],
        }
    )


CHILDREN = ("vip", "vip_gold", "staff", "events_2025", "events_2025_low", "events_2026")


def _reads(s: str, child: str) -> list[str]:
    return [
        f"SELECT * FROM {s}.{child}",
        f"SELECT email || '' AS e FROM {s}.{child} WHERE id > 0",
        f"TABLE {s}.{child}",
        f"SELECT c.email, x.n FROM {s}.{child} c JOIN (SELECT 1 AS n) x ON true",
        f"SELECT * FROM ONLY {s}.{child}",
        f"SELECT email FROM {s}.{child} UNION ALL SELECT email FROM {s}.people",
    ]


def _clear(rows: object) -> bool:
    return PII in repr(rows)


def test_children_and_partitions_read_by_their_own_name_come_back_masked(
    make_proxy: Callable[..., RunningProxy], arena: str
) -> None:
    proxy = make_proxy(policy=_policy(arena))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for child in CHILDREN:
            for sql in _reads(arena, child):
                for _ in range(3):  # first sight, cached, then the compiled lane's steady state
                    with psycopg.ClientCursor(conn) as simple:  # simple protocol
                        rows = simple.execute(sql).fetchall()
                    assert not _clear(rows), (sql, rows)
                    rows = conn.execute(sql, prepare=True).fetchall()  # extended, prepared
                    assert not _clear(rows), (sql, rows)
                    rows = conn.execute(sql + " LIMIT %s", [100]).fetchall()  # extended, with a parameter
                    assert not _clear(rows), (sql, rows)
        # the children's rows are there, masked (the proxy does not just return nothing)
        emails = conn.execute(f"SELECT email FROM {arena}.staff").fetchall()
        assert emails == [("*" * len(f"{PII}-s") + "@example.com",)]
        assert conn.execute(f"SELECT email FROM {arena}.events_2026").fetchall() == [
            ("*" * len(f"{PII}-e2"),)
        ]
        badge = conn.execute(f"SELECT badge, id FROM {arena}.staff").fetchall()
        assert badge == [("b", 4)]


def test_copy_of_a_child_to_stdout_is_masked(make_proxy: Callable[..., RunningProxy], arena: str) -> None:
    proxy = make_proxy(policy=_policy(arena))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        for child in CHILDREN:
            for sql in (f"COPY {arena}.{child} TO STDOUT", f"COPY {arena}.{child} (email) TO STDOUT"):
                with cur.copy(sql) as copy:
                    data = b"".join(bytes(chunk) for chunk in copy)
                assert data and PII.encode() not in data, (sql, data)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE {s}.vip NO INHERIT {s}.people",
        "ALTER TABLE {s}.vip_gold NO INHERIT {s}.vip",
        "ALTER TABLE {s}.vip RENAME TO vip2",
        "ALTER TABLE {s}.events DETACH PARTITION {s}.events_2026",
        "ALTER TABLE {s}.events_2025 DETACH PARTITION {s}.events_2025_low",
        "CREATE TABLE {s}.vip_new () INHERITS ({s}.vip)",
        "CREATE TABLE {s}.events_2025_high PARTITION OF {s}.events_2025 FOR VALUES IN (3)",
        "CREATE TABLE {s}.people_new () INHERITS ({s}.people)",
        "ALTER TABLE {s}.events ATTACH PARTITION {s}.loose FOR VALUES FROM ('2027-01-01') TO ('2028-01-01')",
        "ALTER TABLE {s}.loose INHERIT {s}.vip",
        "UPDATE {s}.vip SET name = email WHERE id = 2",
        "UPDATE {s}.events_2026 SET id = id WHERE id = 2 RETURNING email",
    ],
)
def test_moving_a_child_out_of_the_tree_or_a_table_into_it_is_refused(
    make_proxy: Callable[..., RunningProxy], arena: str, pg_server: pg.PgServer, sql: str
) -> None:
    proxy = make_proxy(policy=_policy(arena))
    text = sql.format(s=arena)
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(text)
        assert "masked" in str(err.value), err.value
    # nothing changed: every child is still in the tree, no new one
    tree = pg_server.psql(
        f"SELECT count(*) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        f"WHERE c.relnamespace = '{arena}'::regnamespace",
        dbname="shop",
    ).strip()
    assert tree == "6"


def test_the_login_lookup_finds_every_descendant_and_its_masked_attributes(
    arena: str, pg_server: pg.PgServer
) -> None:
    """What the proxy reads at login: the RowDescription check knows the masked columns of the
    descendants by their own attribute numbers (events_2026.email is 2, events.email is 3)."""
    from dbgov_sidecar import proxy

    targets = ((arena, "people", "email"), (arena, "events", "email"))
    with psycopg.connect(pg_server.dsn(user="app", dbname="shop")) as conn:
        attrs = {
            (conn.execute("SELECT %s::oid::regclass::text", [oid]).fetchone() or ("",))[0]: (attnum, name)
            for oid, attnum, name in conn.execute(proxy.masked_columns_query(targets)).fetchall()
        }
        inherits = conn.execute(proxy.descendants_query(targets)).fetchall()
        columns = conn.execute(proxy.table_columns_query(targets)).fetchall()
    people, events = f"{arena}.people.email", f"{arena}.events.email"
    assert attrs == {
        f"{arena}.people": (3, people),
        f"{arena}.vip": (3, people),
        f"{arena}.vip_gold": (3, people),
        f"{arena}.staff": (2, people),
        f"{arena}.events": (3, events),
        f"{arena}.events_2025": (3, events),
        f"{arena}.events_2025_low": (3, events),
        f"{arena}.events_2026": (2, events),
    }
    assert inherits == [
        (arena, "events_2025", arena, "events"),
        (arena, "events_2025_low", arena, "events"),
        (arena, "events_2026", arena, "events"),
        (arena, "staff", arena, "people"),
        (arena, "vip", arena, "people"),
        (arena, "vip_gold", arena, "people"),
    ]
    assert [c for s, t, c in columns if t == "events_2026"] == ["email", "at", "id"]
    assert [c for s, t, c in columns if t == "staff"] == ["badge", "email", "id", "name"]


# Masked tables below unmasked ones: reading the unmasked ancestor without ONLY returns the
# masked table's rows, so the ancestor is masked in the columns it shares with it by name.


@pytest.fixture
def upper(pg_server: pg.PgServer) -> Iterator[str]:
    """A masked inheritance child (`clients`) under an unmasked parent (`folks`) and grandparent
    (`beings`); a masked partition (`ledger_2025`, partitioned again) of an unmasked partitioned
    root (`ledger`). The canary is only in the masked tables' rows."""
    s = f"anc_{uuid.uuid4().hex[:8]}"
    pg_server.psql(
        f"CREATE SCHEMA {s} AUTHORIZATION app; SET ROLE app;"
        f"CREATE TABLE {s}.beings (id int, email text);"
        f"CREATE TABLE {s}.folks (name text) INHERITS ({s}.beings);"
        f"CREATE TABLE {s}.clients (tier int, name text, email text, id int);"
        f"ALTER TABLE {s}.clients INHERIT {s}.folks;"
        f"CREATE TABLE {s}.ledger (id int, at date, email text) PARTITION BY RANGE (at);"
        f"CREATE TABLE {s}.ledger_2025 PARTITION OF {s}.ledger"
        "  FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY LIST (id);"
        f"CREATE TABLE {s}.ledger_2025_low PARTITION OF {s}.ledger_2025 FOR VALUES IN (1, 2);"
        f"CREATE TABLE {s}.ledger_2025_rest PARTITION OF {s}.ledger_2025 DEFAULT;"
        f"CREATE TABLE {s}.ledger_2026 PARTITION OF {s}.ledger FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');"
        f"INSERT INTO {s}.beings VALUES (1, 'b@example.com');"
        f"INSERT INTO {s}.folks VALUES (2, 'f@example.com', 'f');"
        f"INSERT INTO {s}.clients VALUES (1, 'c', '{PII}-c@example.com', 3);"
        f"INSERT INTO {s}.ledger VALUES (1, '2025-03-01', '{PII}-l1'), (7, '2025-04-01', '{PII}-l7'),"
        "  (2, '2026-03-01', 'plain');",
        dbname="shop",
    )
    yield s
    pg_server.psql(f"DROP SCHEMA {s} CASCADE;", dbname="shop")


def _upper_policy(schema: str) -> policy_port.EnginePolicy:
    return _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "app",
                    "verdict": "allow",
                    "statements": ["select", "copy-to", "create", "alter", "update"],
                    "tables": [f"{schema}.*"],
                }
            ],
            "masks": [
                {"table": f"{schema}.clients", "column": "email", "strategy": "email"},
                {"table": f"{schema}.ledger_2025", "column": "email", "strategy": "redact"},
            ],
        }
    )


ANCESTORS = ("folks", "beings", "ledger")


def _ancestor_reads(s: str, table: str) -> list[str]:
    return [
        f"SELECT * FROM {s}.{table}",
        f"SELECT email || '' AS e FROM {s}.{table} WHERE id > 0",
        f"TABLE {s}.{table}",
        f"SELECT t.email, x.n FROM {s}.{table} t JOIN (SELECT 1 AS n) x ON true",
        f"SELECT x.e FROM (SELECT email AS e FROM {s}.{table}) x",
        f"SELECT * FROM ONLY {s}.{table}",
    ]


def test_an_unmasked_ancestor_of_a_masked_table_comes_back_masked(
    make_proxy: Callable[..., RunningProxy], upper: str
) -> None:
    proxy = make_proxy(policy=_upper_policy(upper))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        for table in ANCESTORS:
            for sql in _ancestor_reads(upper, table):
                for _ in range(3):  # first sight, cached, then the compiled lane's steady state
                    with psycopg.ClientCursor(conn) as simple:
                        rows = simple.execute(sql).fetchall()
                    assert not _clear(rows), (sql, rows)
                    rows = conn.execute(sql, prepare=True).fetchall()
                    assert not _clear(rows), (sql, rows)
                    rows = conn.execute(sql + " LIMIT %s", [100]).fetchall()
                    assert not _clear(rows), (sql, rows)
        # every row is there, the email column masked (the ancestors' own rows too: fail closed)
        rows = conn.execute(f"SELECT id, email FROM {upper}.beings ORDER BY id").fetchall()
        assert [r[0] for r in rows] == [1, 2, 3]
        assert rows[2][1] == "*" * len(f"{PII}-c") + "@example.com"
        ledger = conn.execute(f"SELECT id, email FROM {upper}.ledger ORDER BY id").fetchall()
        assert [r[0] for r in ledger] == [1, 2, 7] and "*" * len(f"{PII}-l1") in {r[1] for r in ledger}
        assert conn.execute(f"SELECT name FROM {upper}.folks ORDER BY name").fetchall() == [("c",), ("f",)]


def test_copy_of_an_ancestor_to_stdout_is_masked(make_proxy: Callable[..., RunningProxy], upper: str) -> None:
    proxy = make_proxy(policy=_upper_policy(upper))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn, conn.cursor() as cur:
        for table in ANCESTORS:
            for sql in (
                f"COPY {upper}.{table} TO STDOUT",
                f"COPY (SELECT * FROM {upper}.{table}) TO STDOUT",
                f"COPY (SELECT email FROM {upper}.{table} JOIN (SELECT 1 AS n) x ON true) TO STDOUT",
            ):
                with cur.copy(sql) as copy:
                    data = b"".join(bytes(chunk) for chunk in copy)
                assert data and PII.encode() not in data, (sql, data)


@pytest.mark.parametrize(
    "sql",
    [
        "ALTER TABLE {s}.ledger DETACH PARTITION {s}.ledger_2025",
        "ALTER TABLE {s}.folks RENAME TO folks2",
        "ALTER TABLE {s}.beings RENAME COLUMN email TO e",
        "ALTER TABLE {s}.clients NO INHERIT {s}.folks",
        "UPDATE {s}.folks SET name = email WHERE id = 3",
        "UPDATE {s}.ledger SET id = id WHERE email LIKE 'pii%'",
    ],
)
def test_writes_and_ddl_on_an_ancestor_of_a_masked_table_are_refused(
    make_proxy: Callable[..., RunningProxy], upper: str, sql: str
) -> None:
    proxy = make_proxy(policy=_upper_policy(upper))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute(sql.format(s=upper))
        assert "masked" in str(err.value), err.value


def test_the_login_lookup_finds_the_ancestors_and_their_columns_of_masked_names(
    upper: str, pg_server: pg.PgServer
) -> None:
    from dbgov_sidecar import proxy

    targets = ((upper, "clients", "email"), (upper, "ledger_2025", "email"))
    with psycopg.connect(pg_server.dsn(user="app", dbname="shop")) as conn:
        attrs = {
            ((conn.execute("SELECT %s::oid::regclass::text", [oid]).fetchone() or ("",))[0], attnum, name)
            for oid, attnum, name in conn.execute(proxy.masked_columns_query(targets)).fetchall()
        }
        ancestors = conn.execute(proxy.ancestors_query(targets)).fetchall()
        columns = conn.execute(proxy.table_columns_query(targets)).fetchall()
    clients, ledger = f"{upper}.clients.email", f"{upper}.ledger_2025.email"
    assert {
        (t, n, c) for t, n, c in attrs if t in {f"{upper}.beings", f"{upper}.folks", f"{upper}.ledger"}
    } == {
        (f"{upper}.beings", 2, clients),
        (f"{upper}.folks", 2, clients),
        (f"{upper}.ledger", 3, ledger),
    }
    assert ancestors == [
        (upper, "beings", upper, "clients", "email"),
        (upper, "folks", upper, "clients", "email"),
        (upper, "ledger", upper, "ledger_2025", "email"),
    ]
    assert [c for s, t, c in columns if t == "beings"] == ["id", "email"]
