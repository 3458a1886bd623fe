"""Minted credentials against a real PostgreSQL (issue 11): plan (pure) → apply (psycopg).

A policy is compiled into a group role's grants, a pod gets a login role in it, and the minted
role is then used *directly*, bypassing the proxy, to show that PostgreSQL itself enforces the
policy: allowed reads work, blocked statements fail with 42501, a masked column cannot be read
raw and its masking view returns exactly what the proxy's mask produces. Renewal, revocation,
1,000 mint/revoke cycles, half-applied plans and the orphan reaper are checked against the
catalog. Every test works in a scratch database; the role names hash that database's name, so
they are unique per test, and every test drops its roles at the end.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import pg
from dbgov_operator import credentials, grants, pgapply
from dbgov_policy import compile as policy_compile
from dbgov_policy import mask, model

pytestmark = pytest.mark.integration

KEY = "test-hmac-key-" + "k" * 24
SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (id serial PRIMARY KEY, name text, email text, ssn text, card_number text);
CREATE TABLE shop.orders (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, customer_id int, qty int);
CREATE TABLE shop.products (id int PRIMARY KEY, title text);
CREATE TABLE shop.secrets (id int PRIMARY KEY, note text);
CREATE TABLE shop.vip_customers (perks text) INHERITS (shop.customers);
CREATE VIEW shop.customer_contacts AS SELECT id, email FROM shop.customers;
CREATE VIEW shop.product_titles WITH (security_invoker) AS SELECT title FROM shop.products;
INSERT INTO shop.customers (name, email, ssn, card_number) VALUES
  ('Ada', 'ada@example.com', '123-45-6789', '4111111111111111'),
  ('Bob', 'bob@mail.example', '987-65-4321', '5500000000000004');
INSERT INTO shop.orders (customer_id, qty) VALUES (1, 2), (2, 5);
INSERT INTO shop.products VALUES (1, 'lamp');
INSERT INTO shop.secrets VALUES (1, 'launch codes');
"""
SPEC: dict[str, Any] = {
    "default": "block",
    "credentials": {"ttl": "15m", "renewBefore": "5m"},
    "rules": [
        {"name": "no-ddl", "verdict": "block", "statements": ["ddl", "dcl"]},
        {
            "name": "read-shop",
            "verdict": "allow",
            "statements": ["select"],
            "tables": [
                "shop.orders",
                "shop.products",
                "shop.customers",
                "shop.vip_customers",
                "shop.customer_contacts",
                "shop.product_titles",
            ],
        },
        {
            "name": "write-orders",
            "verdict": "allow",
            "statements": ["insert", "update"],
            "tables": ["shop.orders"],
        },
        {
            "name": "customer-changes",
            "verdict": "approve",
            "statements": ["insert", "update", "delete"],
            "tables": ["shop.customers"],
        },
    ],
    "masks": [
        {"table": "shop.customers", "column": "email", "strategy": "email"},
        {"table": "shop.customers", "column": "ssn", "strategy": "hash"},
    ],
}
POLICY = policy_compile.compile_policy(SPEC, mask_key=KEY)
CREDS = credentials.parse_credentials(SPEC["credentials"])


class Minter:
    """One scratch database, its admin connection, and plan → apply for it."""

    def __init__(self, server: pg.PgServer, database: str) -> None:
        self.server = server
        self.database = database
        self.admin = psycopg.connect(server.dsn(user="postgres", dbname=database), autocommit=True)
        self.secrets: dict[str, credentials.Secret] = {}

    def workload(self, n: int) -> credentials.Workload:
        return credentials.Workload(
            namespace="team-a", service_account="api", pod_name=f"api-{n}", pod_uid=f"uid-{self.database}-{n}"
        )

    def desired(
        self, pods: list[credentials.Workload], *, live: list[credentials.Workload] | None = None
    ) -> credentials.Desired:
        group = credentials.group_role_name(namespace="team-a", policy="shop-policy", database=self.database)
        catalog = pgapply.read_catalog(self.admin)
        compiled = grants.compile_grants(POLICY, catalog, group_role=group)
        return credentials.Desired(
            database=self.database,
            groups=(credentials.DesiredGroup(namespace="team-a", policy="shop-policy", grants=compiled),)
            if pods
            else (),
            logins=tuple(
                credentials.DesiredLogin(workload=w, policies=("shop-policy",), credentials=CREDS)
                for w in pods
            ),
            live_pods=frozenset(w.pod_uid for w in (live if live is not None else pods)),
        )

    def plan(
        self, desired: credentials.Desired, *, now: datetime.datetime | None = None
    ) -> tuple[credentials.Action, ...]:
        for login in desired.logins:
            name = credentials.login_role_name(pod_uid=login.workload.pod_uid, database=self.database)
            self.secrets.setdefault(name, pgapply.new_secret())
        return credentials.plan(
            desired,
            pgapply.read_state(self.admin),
            now=now or datetime.datetime.now(datetime.UTC),
            secrets=self.secrets,
        )

    def converge(self, desired: credentials.Desired, **kw: Any) -> list[credentials.Action]:
        return pgapply.apply(self.admin, self.plan(desired), **kw)

    def role(self, w: credentials.Workload) -> str:
        return credentials.login_role_name(pod_uid=w.pod_uid, database=self.database)

    def connect(self, w: credentials.Workload) -> psycopg.Connection[Any]:
        role = self.role(w)
        dsn = self.server.dsn(user=role, password=self.secrets[role].password, dbname=self.database)
        return psycopg.connect(dsn, autocommit=True, connect_timeout=5)

    def our_roles(self) -> list[str]:
        rows = self.admin.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, 'dbgov_') "
            "AND shobj_description(oid, 'pg_authid')::jsonb ->> 'database' = %s",
            (self.database,),
        )
        return [r[0] for r in rows]

    def close(self) -> None:
        """Revoke everything of this database (the test's roles) and check none is left."""
        try:
            pgapply.apply(self.admin, self.plan(credentials.Desired(database=self.database)))
            assert self.our_roles() == []
        finally:
            self.admin.close()


@pytest.fixture
def minter(pg_server: pg.PgServer) -> Iterator[Minter]:
    with pg.scratch_database(pg_server, "creds", SCHEMA) as database:
        m = Minter(pg_server, database)
        try:
            yield m
        finally:
            m.close()


def _group(m: Minter) -> str:
    return credentials.group_role_name(namespace="team-a", policy="shop-policy", database=m.database)


def _granted(m: Minter, role: str) -> set[tuple[str, ...]]:
    """The role's privileges as PostgreSQL's information_schema and aclexplode report them."""
    conn = m.admin
    tables = conn.execute(
        "SELECT 'table', table_schema, table_name, '', privilege_type FROM information_schema.role_table_grants "
        "WHERE grantee = %s",
        (role,),
    ).fetchall()
    columns = conn.execute(
        "SELECT 'column', table_schema, table_name, column_name, privilege_type "
        "FROM information_schema.role_column_grants WHERE grantee = %s",
        (role,),
    ).fetchall()
    # information_schema lists a table-level privilege on every column too: keep column grants.
    whole = {(r[1], r[2], r[4]) for r in tables}
    columns = [r for r in columns if (r[1], r[2], r[4]) not in whole]
    others = conn.execute(
        "SELECT CASE c.relkind WHEN 'S' THEN 'sequence' END, n.nspname, c.relname, '', a.privilege_type "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a "
        "WHERE c.relkind = 'S' AND a.grantee = %s::regrole "
        "UNION ALL SELECT 'schema', n.nspname, '', '', a.privilege_type "
        "FROM pg_namespace n, aclexplode(n.nspacl) a WHERE a.grantee = %s::regrole",
        (role, role),
    ).fetchall()
    return {tuple(r) for r in [*tables, *columns, *others]}


def _row(conn: psycopg.Connection[Any], query: str, *params: Any) -> tuple[Any, ...]:
    row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return tuple(row)


def _value(conn: psycopg.Connection[Any], query: str, *params: Any) -> Any:
    return _row(conn, query, *params)[0]


def _refused(conn: psycopg.Connection[Any], statement: str) -> str:
    with pytest.raises(psycopg.Error) as err:
        conn.execute(statement)
    return str(err.value.sqlstate)


def test_minted_role_has_exactly_the_compiled_grants_and_postgres_enforces_them(minter: Minter) -> None:
    pod = minter.workload(1)
    started = datetime.datetime.now(datetime.UTC)
    applied = minter.converge(minter.desired([pod]))
    assert {type(a).__name__ for a in applied} >= {"CreateGroupRole", "GrantPrivileges", "CreateLoginRole"}
    role, group = minter.role(pod), _group(minter)

    until, can_login, members = _row(
        minter.admin,
        "SELECT rolvaliduntil, rolcanlogin, ARRAY(SELECT roleid::regrole::text FROM pg_auth_members "
        "WHERE member = r.oid) FROM pg_roles r WHERE rolname = %s",
        role,
    )
    assert can_login and members == [group]
    assert abs((until - (started + datetime.timedelta(minutes=15))).total_seconds()) < 10
    stored = _value(minter.admin, "SELECT rolpassword FROM pg_authid WHERE rolname = %s", role)
    assert stored.startswith("SCRAM-SHA-256$4096:")
    assert minter.secrets[role].password not in stored

    view = grants.view_name(model.QualifiedName(schema="shop", name="customers"), group_role=group)
    vip_view = grants.view_name(model.QualifiedName(schema="shop", name="vip_customers"), group_role=group)
    expected = {
        ("schema", "shop", "", "", "USAGE"),
        ("schema", "dbgov_masked", "", "", "USAGE"),
        ("table", "shop", "orders", "", "SELECT"),
        ("table", "shop", "orders", "", "INSERT"),
        ("table", "shop", "orders", "", "UPDATE"),
        ("table", "shop", "products", "", "SELECT"),
        ("column", "shop", "customers", "id", "SELECT"),
        ("column", "shop", "customers", "name", "SELECT"),
        ("column", "shop", "customers", "card_number", "SELECT"),
        ("sequence", "shop", "orders_id_seq", "", "USAGE"),
        ("sequence", "shop", "orders_id_seq", "", "SELECT"),
        ("table", "dbgov_masked", view, "", "SELECT"),
        # The child inherits the masks (the policy masks only its parent): read it directly
        # and its rows' email and ssn would be raw.
        *{("column", "shop", "vip_customers", c, "SELECT") for c in ("id", "name", "card_number", "perks")},
        ("table", "dbgov_masked", vip_view, "", "SELECT"),
        # A view with its owner's rights over a masked table would return email raw: no grant.
        ("table", "shop", "product_titles", "", "SELECT"),
    }
    assert _granted(minter, group) == expected
    assert _granted(minter, role) == set()  # everything comes through the group

    with minter.connect(pod) as conn:
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
        assert conn.execute("SELECT title FROM shop.product_titles").fetchall() == [("lamp",)]
        assert conn.execute("SELECT id, name FROM shop.customers ORDER BY id").fetchall() == [
            (1, "Ada"),
            (2, "Bob"),
        ]
        conn.execute("INSERT INTO shop.orders (customer_id, qty) VALUES (1, 1)")
        conn.execute("UPDATE shop.orders SET qty = 3 WHERE id = 1")
        for blocked in (
            "DELETE FROM shop.orders WHERE id = 1",
            "DROP TABLE shop.products",
            "CREATE TABLE shop.mine (x int)",
            "CREATE TABLE public.mine (x int)",
            "SELECT * FROM shop.secrets",
            "UPDATE shop.customers SET name = 'x' WHERE id = 1",
            "TRUNCATE shop.orders",
            "SELECT ssn FROM shop.customers",
            "SELECT ssn FROM shop.vip_customers",
            "SELECT email FROM shop.customer_contacts",
            "SELECT email FROM ONLY shop.customers",
            "SELECT * FROM shop.customers",
            "SELECT id FROM shop.customers WHERE email LIKE 'ada%'",
            "SELECT c FROM shop.customers c",
            "SELECT * FROM dbgov_masked.hmac_keys",
            f"GRANT SELECT ON shop.secrets TO {role}",
        ):
            assert _refused(conn, blocked) == "42501", blocked
        rows = conn.execute(f'SELECT id, email, ssn FROM dbgov_masked."{view}" ORDER BY id').fetchall()
        email = model.Mask(
            table=model.QualifiedName(schema="shop", name="customers"), column="email", strategy="email"
        )
        ssn = model.Mask(table=email.table, column="ssn", strategy="hash")
        assert rows == [
            (
                1,
                mask.mask_text(email, "ada@example.com", key=KEY),
                mask.mask_text(ssn, "123-45-6789", key=KEY),
            ),
            (
                2,
                mask.mask_text(email, "bob@mail.example", key=KEY),
                mask.mask_text(ssn, "987-65-4321", key=KEY),
            ),
        ]
        assert rows[0][1] == "***@example.com"
        definition = _value(conn, "SELECT pg_get_viewdef(%s::regclass)", f'dbgov_masked."{view}"')
        pads = grants.hmac_pads(KEY)
        assert (
            pads.ipad.hex() not in definition and pads.opad.hex() not in definition and KEY not in definition
        )
    assert minter.plan(minter.desired([pod])) == ()  # converged: nothing left to do


def test_renewal_moves_valid_until_and_keeps_live_sessions(minter: Minter) -> None:
    pod = minter.workload(1)
    minter.converge(minter.desired([pod]))
    role = minter.role(pod)
    until = "SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s"
    before = _value(minter.admin, until, role)
    with minter.connect(pod) as live:
        pid = live.info.backend_pid
        # 4 minutes left, less than renewBefore (5m): due for renewal.
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=11)
        actions = minter.plan(minter.desired([pod]), now=later)
        assert [type(a).__name__ for a in actions] == ["RenewLoginRole"]
        assert actions[0].reason == "renewed"
        pgapply.apply(minter.admin, actions)
        after = _value(minter.admin, until, role)
        assert abs((after - (later + datetime.timedelta(minutes=15))).total_seconds()) < 2
        assert after - before > datetime.timedelta(minutes=10)
        assert live.execute("SELECT pg_backend_pid()").fetchone() == (pid,)
        assert live.execute("SELECT count(*) FROM shop.products").fetchone() == (1,)
    with minter.connect(pod) as again:  # the same password still logs in
        assert again.execute("SELECT 1").fetchone() == (1,)


def test_revocation_terminates_live_sessions_and_the_role_cannot_log_in(minter: Minter) -> None:
    pod, other = minter.workload(1), minter.workload(2)
    minter.converge(minter.desired([pod, other]))
    live = minter.connect(pod)
    password = minter.secrets[minter.role(pod)].password
    try:
        started = time.monotonic()
        actions = minter.plan(minter.desired([other]))  # pod 1 is gone
        kinds = [(type(a).__name__, a.role, a.reason) for a in actions]
        assert kinds == [
            ("DisableLogin", minter.role(pod), "pod-deleted"),
            ("TerminateSessions", minter.role(pod), "pod-deleted"),
            ("DropRole", minter.role(pod), "pod-deleted"),
        ]
        assert actions[0].audit()["owner"]["pod_name"] == "api-1"
        pgapply.apply(minter.admin, actions)
        with pytest.raises(psycopg.OperationalError):
            live.execute("SELECT 1")
        assert time.monotonic() - started < 5
    finally:
        live.close()
    dsn = minter.server.dsn(user=minter.role(pod), password=password, dbname=minter.database)
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(dsn, connect_timeout=5)
    assert "authentication failed" in str(err.value)
    assert minter.role(pod) not in minter.our_roles()
    with minter.connect(other) as still:  # the other pod is untouched
        assert still.execute("SELECT 1").fetchone() == (1,)


def test_policy_unbound_and_expiry_reasons(minter: Minter) -> None:
    a, b = minter.workload(1), minter.workload(2)
    minter.converge(minter.desired([a, b]))
    past_expiry = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=16)
    actions = minter.plan(minter.desired([b], live=[a, b]), now=past_expiry)
    reasons = {(type(x).__name__, x.role): x.reason for x in actions}
    assert reasons[("DropRole", minter.role(a))] == "expired"
    actions = minter.plan(minter.desired([b], live=[a, b]))
    assert {x.reason for x in actions if x.role == minter.role(a)} == {"policy-unbound"}


def test_one_thousand_mint_revoke_cycles_leave_no_role(minter: Minter) -> None:
    rounds, per_round = 10, 100
    started = time.monotonic()
    for r in range(rounds):
        pods = [minter.workload(r * per_round + i) for i in range(per_round)]
        minter.converge(minter.desired(pods), roles_per_transaction=per_round)
        assert len(minter.our_roles()) == per_round + 1
        minter.converge(minter.desired([]), roles_per_transaction=per_round)
        assert minter.our_roles() == []
    elapsed = time.monotonic() - started
    print(
        f"\n{rounds * per_round} mint/revoke cycles in {elapsed:.1f}s ({rounds * per_round / elapsed:.0f}/s)"
    )
    assert elapsed < 60
    # (roles are server-wide: other tests' databases on this server may hold dbgov roles of their own)
    assert minter.our_roles() == []


def test_half_applied_plans_converge_without_orphans(minter: Minter) -> None:
    pods = [minter.workload(i) for i in range(3)]
    full = minter.plan(minter.desired(pods))
    assert len(full) > 6
    for n in (1, 3, len(full) - 2):  # the operator dies after n actions, then starts again
        pgapply.apply(minter.admin, full[:n])
        minter.converge(minter.desired(pods))
        assert minter.plan(minter.desired(pods)) == ()
        assert sorted(minter.our_roles()) == sorted([_group(minter), *(minter.role(p) for p in pods)])
        assert _granted(minter, _group(minter)) >= {("table", "shop", "products", "", "SELECT")}
        for p in pods:
            with minter.connect(p) as conn:
                assert conn.execute("SELECT count(*) FROM shop.products").fetchone() == (1,)
        revoke = minter.plan(minter.desired([]))
        pgapply.apply(minter.admin, revoke[: max(1, n // 2)])
        minter.converge(minter.desired([]))
        assert minter.our_roles() == []
        assert minter.plan(minter.desired([])) == ()


def test_reaper_removes_roles_without_a_live_owner(minter: Minter) -> None:
    pod = minter.workload(1)
    minter.converge(minter.desired([pod]))
    orphan = f"dbgov_w_orphan_{uuid.uuid4().hex[:8]}"
    foreign = credentials.login_role_name(pod_uid="elsewhere", database="another_db")
    owner = credentials.Owner(kind="login", namespace="x", database="another_db", pod_uid="elsewhere")
    minter.admin.execute(f'CREATE ROLE "{orphan}" LOGIN')
    minter.admin.execute(
        f'CREATE ROLE "{foreign}" LOGIN; COMMENT ON ROLE "{foreign}" IS \'{owner.comment()}\''
    )
    try:
        # A fresh operator (nothing in memory) that knows of no live pod at all.
        actions = minter.plan(credentials.Desired(database=minter.database))
        drops = {(a.role, a.reason) for a in actions if isinstance(a, credentials.DropRole)}
        assert drops == {
            (orphan, "orphan"),
            (minter.role(pod), "pod-deleted"),
            (_group(minter), "policy-unbound"),
        }
        pgapply.apply(minter.admin, actions)
        left = {
            r[0]
            for r in minter.admin.execute("SELECT rolname FROM pg_roles WHERE starts_with(rolname, 'dbgov_')")
        }
        mine = {orphan, foreign, minter.role(pod), _group(minter)}
        assert left & mine == {foreign}  # another database's role is that database's plan's to judge
    finally:
        minter.admin.execute(f'DROP ROLE IF EXISTS "{foreign}"')
        minter.admin.execute(f'DROP ROLE IF EXISTS "{orphan}"')
