"""Masking through inheritance (issue 13 class 7): a descendant of a masked table (a partition or
an inheritance child, any depth) is masked like the table it descends from, once the session
knows the descendants (the proxy reads them from pg_inherits at login)."""

from __future__ import annotations

import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, model
from dbgov_sidecar import policy_port

POLICY = policy_compile.compile_policy(
    {
        "default": "block",
        "rules": [
            {
                "name": "app",
                "verdict": "allow",
                "statements": ["select", "insert", "update", "delete", "copy-to", "create", "alter"],
                "tables": ["public.*"],
            }
        ],
        "masks": [
            {"table": "public.customers", "column": "email", "strategy": "email"},
            {"table": "public.customers", "column": "ssn", "strategy": "null"},
            {"table": "public.events", "column": "payload", "strategy": "redact"},
        ],
    },
    mask_key="k",
)


def _q(name: str) -> model.QualifiedName:
    return model.QualifiedName(schema="public", name=name)


CUSTOMERS, EVENTS = _q("customers"), _q("events")
INHERITS = {
    _q("vip"): (CUSTOMERS,),  # plain inheritance child
    _q("vip_gold"): (CUSTOMERS,),  # its child: the masked ancestor, whatever the depth
    _q("events_2025"): (EVENTS,),  # a partition
    _q("events_2025_q1"): (EVENTS,),  # a sub-partition
}
COLUMNS = {
    CUSTOMERS: ("id", "name", "email", "ssn"),
    _q("vip"): ("ssn", "level", "id", "email", "name"),  # another order, an extra column
    _q("vip_gold"): ("id", "name", "email", "ssn", "level"),
    EVENTS: ("id", "at", "payload"),
    _q("events_2025"): ("id", "at", "payload"),
    _q("events_2025_q1"): ("id", "at", "payload"),
}


def _session(*, inherits: bool = True) -> engine.SessionContext:
    return engine.SessionContext(columns=COLUMNS, inherits=INHERITS if inherits else {})


READS = [
    ("SELECT * FROM vip", "vip", ("email", "ssn")),
    ("SELECT email || '' FROM public.vip WHERE id = 1", "vip", ("email", "ssn")),
    ("TABLE vip_gold", "vip_gold", ("email", "ssn")),
    ("SELECT v.name, o.x FROM vip v JOIN (SELECT 1 AS x) o ON true", "vip", ("email", "ssn")),
    ("COPY vip TO STDOUT", "vip", ("email", "ssn")),
    ("COPY (SELECT email FROM vip_gold) TO STDOUT", "vip_gold", ("email", "ssn")),
    ("SELECT payload FROM events_2025", "events_2025", ("payload",)),
    ("SELECT * FROM ONLY events_2025_q1", "events_2025_q1", ("payload",)),
]


@pytest.mark.parametrize(("sql", "table", "masked"), READS)
def test_a_descendant_is_read_through_the_masks_of_its_ancestor(
    sql: str, table: str, masked: tuple[str, ...]
) -> None:
    eng = engine.Engine(POLICY)
    d = eng.decide(sql, session=_session())
    assert d.verdict == "mask", d.reason
    assert d.rewritten is not None and "jsonb_populate_record" in d.rewritten
    assert set(d.masked_columns) == {f"public.{table}.{c}" for c in masked}
    again = eng.decide(sql, session=_session())  # from the cache: rewritten alike
    assert (again.verdict, again.rewritten) == (d.verdict, d.rewritten)


def test_the_rewrite_names_the_descendants_own_columns_in_its_order() -> None:
    d = engine.Engine(POLICY).decide("SELECT * FROM vip", session=_session())
    assert d.rewritten is not None
    assert d.rewritten.index('"ssn"') < d.rewritten.index('"level"') < d.rewritten.index('"email"')
    assert 'FROM "public"."vip" AS' in d.rewritten  # (its own children too, as PostgreSQL reads it)


def test_without_the_descendants_the_session_masks_nothing_there() -> None:
    """What the proxy did before it read pg_inherits: the child came back in clear."""
    assert (
        engine.Engine(POLICY).decide("SELECT * FROM vip", session=_session(inherits=False)).verdict == "allow"
    )


def test_sessions_with_and_without_descendants_share_no_cached_decision() -> None:
    eng = engine.Engine(POLICY)
    assert eng.decide("SELECT * FROM vip WHERE id = 1", session=_session(inherits=False)).verdict == "allow"
    assert eng.decide("SELECT * FROM vip WHERE id = 2", session=_session()).verdict == "mask"
    assert eng.decide("SELECT * FROM vip WHERE id = 3", session=_session(inherits=False)).verdict == "allow"
    ctx = _session()
    assert eng.cached_shape("SELECT * FROM vip WHERE id = 4", session=ctx) is None
    found = eng.cached_rewrite("SELECT * FROM vip WHERE id = 4", session=ctx)
    assert found is not None and found[1].verdict == "mask"
    assert "jsonb_populate_record" in (found[2]("SELECT * FROM vip WHERE id = 4") or "")


REFUSED = [
    # writes that use masked columns, as for the masked table itself
    "UPDATE vip SET name = email WHERE id = 1",
    "UPDATE vip SET name = 'x' WHERE id = 1 RETURNING ssn",
    "DELETE FROM events_2025 WHERE payload LIKE 'a%'",
    "INSERT INTO vip (id, name) VALUES (1, 'x') RETURNING *",
    # DDL that would give the rows another name, or take them out of the masks' reach
    "ALTER TABLE vip RENAME TO vip2",
    "ALTER TABLE vip RENAME COLUMN email TO e",
    "ALTER TABLE vip NO INHERIT customers",
    "ALTER TABLE vip_gold NO INHERIT vip",
    "ALTER TABLE events DETACH PARTITION events_2025",
    "ALTER TABLE events_2025 DETACH PARTITION events_2025_q1",
    # new children of a masked table or of a descendant
    "CREATE TABLE vip_new () INHERITS (vip)",
    "CREATE TABLE events_2025_q2 PARTITION OF events_2025 FOR VALUES FROM ('2025-04-01') TO ('2025-07-01')",
    "ALTER TABLE events_2025 ATTACH PARTITION loose FOR VALUES FROM ('2025-07-01') TO ('2025-10-01')",
    "ALTER TABLE loose INHERIT vip",
]


@pytest.mark.parametrize("sql", REFUSED)
def test_writes_and_ddl_on_a_descendant_follow_the_rules_of_masked_tables(sql: str) -> None:
    d = engine.Engine(POLICY).decide(sql, session=_session())
    assert (d.verdict, d.rule) == ("block", "guardrail:mask-unprovable"), d.reason
    assert d.hint


def test_ddl_on_a_descendant_names_the_masked_ancestor() -> None:
    d = engine.Engine(POLICY).decide("ALTER TABLE vip NO INHERIT customers", session=_session())
    assert "public.vip descends from public.customers" in d.reason


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE c2 () INHERITS (customers)",
        "CREATE TABLE e2 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "ALTER TABLE events ATTACH PARTITION loose FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        "ALTER TABLE loose INHERIT customers",
    ],
)
def test_a_new_child_of_a_masked_table_is_refused_without_the_catalog(sql: str) -> None:
    """Its rows would be readable under its own name, which no mask covers (`dbgov check` too)."""
    d = engine.Engine(POLICY).decide(sql)
    assert (d.verdict, d.rule) == ("block", "guardrail:mask-unprovable"), d.reason


def test_a_descendant_that_is_masked_itself_keeps_its_own_masks() -> None:
    policy = policy_compile.compile_policy(
        {
            "rules": [{"name": "r", "verdict": "allow", "statements": ["select"]}],
            "masks": [
                {"table": "public.customers", "column": "email", "strategy": "email"},
                {"table": "public.vip", "column": "email", "strategy": "null"},
            ],
        }
    )
    derived = policy.with_descendants({_q("vip"): (CUSTOMERS,), _q("vip_gold"): (CUSTOMERS, _q("vip"))})
    assert [m.strategy for m in derived.masks_for(_q("vip"))] == ["null"]
    assert [m.strategy for m in derived.masks_for(_q("vip_gold"))] == ["email"]
    assert derived.inherited[_q("vip_gold")] == (CUSTOMERS, _q("vip"))
    assert policy.masked_tables < derived.masked_tables


def test_the_policy_port_hands_the_descendants_to_the_engine() -> None:
    port = policy_port.EnginePolicy(engine.Engine(POLICY))
    ctx = port.new_context(
        search_path=("public",),
        columns={("public", "vip"): COLUMNS[_q("vip")]},
        inherits={("public", "vip"): (("public", "customers"),)},
    )
    assert isinstance(ctx, engine.SessionContext)
    assert ctx.inherits == {_q("vip"): (CUSTOMERS,)}
    assert port.decide("SELECT * FROM vip", ctx).verdict == "mask"
    plain = port.new_context(search_path=("public",))
    assert port.decide("SELECT * FROM vip", plain).verdict == "allow"


def test_a_reloaded_policy_decides_a_session_that_knows_descendants() -> None:
    """A reload keeps the session's context: the new engine, not the old one's view, decides."""
    ctx = _session()
    assert engine.Engine(POLICY).decide("SELECT * FROM vip", session=ctx).verdict == "mask"
    stricter = policy_compile.compile_policy({"default": "block", "masks": [], "rules": []})
    assert engine.Engine(stricter).decide("SELECT * FROM vip", session=ctx).verdict == "block"


# Ancestors of masked tables: a masked table that is itself a partition or inheritance child of
# an unmasked table. Reading the ancestor (without ONLY) returns the masked table's rows.

PEOPLE, MEMBERS, LOGS = _q("people"), _q("members"), _q("logs")
ANCESTORS = {
    # people (unmasked) -> customers (masked): people has email but not ssn
    PEOPLE: ((CUSTOMERS, "email"),),
    # members (unmasked) -> people -> customers: a grandparent
    MEMBERS: ((CUSTOMERS, "email"),),
    # logs (unmasked partitioned root) -> events (masked partition)
    LOGS: ((EVENTS, "payload"),),
}
ANCESTOR_COLUMNS = {
    **COLUMNS,
    PEOPLE: ("id", "name", "email"),
    MEMBERS: ("id", "email"),
    LOGS: ("id", "at", "payload"),
}


def _up_session() -> engine.SessionContext:
    return engine.SessionContext(columns=ANCESTOR_COLUMNS, ancestors=ANCESTORS)


ANCESTOR_READS = [
    ("SELECT * FROM people", "people", ("email",)),
    ("SELECT email || '' FROM public.people WHERE id = 1", "people", ("email",)),
    ("TABLE members", "members", ("email",)),
    ("SELECT p.name, o.x FROM people p JOIN (SELECT 1 AS x) o ON true", "people", ("email",)),
    ("COPY (SELECT * FROM members) TO STDOUT", "members", ("email",)),
    ("COPY people TO STDOUT", "people", ("email",)),
    ("SELECT payload FROM logs", "logs", ("payload",)),
    ("SELECT * FROM ONLY logs", "logs", ("payload",)),  # ONLY: masked anyway (fail closed)
]


@pytest.mark.parametrize(("sql", "table", "masked"), ANCESTOR_READS)
def test_an_ancestor_is_read_through_the_masks_of_its_masked_descendants(
    sql: str, table: str, masked: tuple[str, ...]
) -> None:
    eng = engine.Engine(POLICY)
    assert eng.decide(sql, session=engine.SessionContext(columns=ANCESTOR_COLUMNS)).verdict != "mask"
    d = eng.decide(sql, session=_up_session())
    assert d.verdict == "mask", d.reason
    assert d.rewritten is not None and "jsonb_populate_record" in d.rewritten
    assert set(d.masked_columns) == {f"public.{table}.{c}" for c in masked}
    again = eng.decide(sql, session=_up_session())
    assert (again.verdict, again.rewritten) == (d.verdict, d.rewritten)


def test_an_ancestor_takes_only_the_masked_columns_it_has() -> None:
    derived = POLICY.with_descendants({}, ANCESTORS)
    assert [(m.column, m.strategy) for m in derived.masks_for(PEOPLE)] == [("email", "email")]
    assert [(m.column, m.strategy) for m in derived.masks_for(LOGS)] == [("payload", "redact")]
    assert derived.contains == {PEOPLE: (CUSTOMERS,), MEMBERS: (CUSTOMERS,), LOGS: (EVENTS,)}


ANCESTOR_REFUSED = [
    "UPDATE people SET name = email WHERE id = 1",
    "DELETE FROM logs WHERE payload LIKE 'a%'",
    "UPDATE members SET id = id RETURNING *",
    "ALTER TABLE people RENAME TO p2",
    "ALTER TABLE people RENAME COLUMN email TO e",
    "ALTER TABLE logs DETACH PARTITION events",
    "ALTER TABLE customers NO INHERIT people",
]


@pytest.mark.parametrize("sql", ANCESTOR_REFUSED)
def test_writes_and_ddl_on_an_ancestor_follow_the_rules_of_masked_tables(sql: str) -> None:
    d = engine.Engine(POLICY).decide(sql, session=_up_session())
    assert (d.verdict, d.rule) == ("block", "guardrail:mask-unprovable"), d.reason


def test_ddl_on_an_ancestor_names_the_masked_tables_below_it() -> None:
    d = engine.Engine(POLICY).decide("ALTER TABLE logs DETACH PARTITION events", session=_up_session())
    assert "public.logs is an ancestor of public.events" in d.reason


def test_a_write_to_an_ancestor_without_masked_columns_is_allowed() -> None:
    d = engine.Engine(POLICY).decide("UPDATE people SET name = 'x' WHERE id = 1", session=_up_session())
    assert d.verdict == "allow", d.reason


def test_sessions_with_and_without_ancestors_share_no_cached_decision() -> None:
    eng = engine.Engine(POLICY)
    plain = engine.SessionContext(columns=ANCESTOR_COLUMNS)
    assert eng.decide("SELECT * FROM people WHERE id = 1", session=plain).verdict == "allow"
    assert eng.decide("SELECT * FROM people WHERE id = 2", session=_up_session()).verdict == "mask"
    assert eng.decide("SELECT * FROM people WHERE id = 3", session=plain).verdict == "allow"
    ctx = _up_session()
    found = eng.cached_rewrite("SELECT * FROM people WHERE id = 4", session=ctx)
    assert found is not None and found[1].verdict == "mask"


def test_the_policy_port_hands_the_ancestors_to_the_engine() -> None:
    port = policy_port.EnginePolicy(engine.Engine(POLICY))
    ctx = port.new_context(
        search_path=("public",),
        columns={("public", "people"): ANCESTOR_COLUMNS[PEOPLE]},
        ancestors={("public", "people"): (("public", "customers", "email"),)},
    )
    assert isinstance(ctx, engine.SessionContext)
    assert ctx.ancestors == {PEOPLE: ((CUSTOMERS, "email"),)}
    assert port.decide("SELECT * FROM people", ctx).verdict == "mask"
