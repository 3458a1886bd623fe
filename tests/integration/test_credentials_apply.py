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

import contextlib
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
MIGRATION = policy_compile.compile_policy(
    {
        "default": "block",
        "rules": [
            {"name": "read", "verdict": "allow", "statements": ["select"], "tables": ["shop.*"]},
            {"name": "ddl", "verdict": "allow", "statements": ["create"], "tables": ["shop.*"]},
        ],
        "masks": SPEC["masks"],
    },
    mask_key=KEY,
)
"""A migration job's policy: it may create objects in schema shop; email and ssn are masked."""


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
        self,
        pods: list[credentials.Workload],
        *,
        live: list[credentials.Workload] | None = None,
        policy: model.CompiledPolicy = POLICY,
    ) -> credentials.Desired:
        group = credentials.group_role_name(namespace="team-a", policy="shop-policy", database=self.database)
        catalog = pgapply.read_catalog(self.admin)
        compiled = grants.compile_grants(policy, catalog, group_role=group)
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
        """The database's group and login roles (its quarantine role, which outlives them, aside)."""
        rows = self.admin.execute(
            "SELECT rolname FROM pg_roles WHERE starts_with(rolname, 'dbgov_') "
            "AND NOT starts_with(rolname, 'dbgov_q_') "
            "AND shobj_description(oid, 'pg_authid')::jsonb ->> 'database' = %s",
            (self.database,),
        )
        return [r[0] for r in rows]

    def close(self) -> None:
        """Revoke everything of this database (the test's roles) and check none is left."""
        try:
            pgapply.apply(self.admin, self.plan(credentials.Desired(database=self.database)))
            assert self.our_roles() == []
            quarantine = credentials.quarantine_role_name(self.database)
            if _exists(self.admin, quarantine):
                self.admin.execute(f'DROP OWNED BY "{quarantine}"; DROP ROLE "{quarantine}"')
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


def _exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


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


def test_reaper_removes_roles_without_a_live_owner_and_leaves_dbgov_named_roles_it_did_not_make(
    minter: Minter,
) -> None:
    """Attack F6: a DBA's `dbgov_dba` (no dbgov COMMENT), a hand-made `dbgov_w_...` and one with
    a forged owner COMMENT whose hash is not its name were set NOLOGIN, their sessions killed
    and their failing DROP broke every tenant's plan. Only provably minted roles are reaped."""
    pod = minter.workload(1)
    minter.converge(minter.desired([pod]))
    tag = uuid.uuid4().hex[:8]
    dba, lookalike, forged = f"dbgov_dba_{tag}", f"dbgov_w_orphan_{tag}", f"dbgov_g_forged_{tag}"
    foreign = credentials.login_role_name(pod_uid="elsewhere", database="another_db")
    owner = credentials.Owner(kind="login", namespace="x", database="another_db", pod_uid="elsewhere")
    claim = credentials.Owner(
        kind="group", namespace="team-a", policy="shop-policy", database=minter.database
    )
    minter.admin.execute(f"CREATE ROLE \"{dba}\" LOGIN PASSWORD 'dba-pw'")
    minter.admin.execute(f"COMMENT ON ROLE \"{dba}\" IS 'human DBA account for the dbgov team'")
    minter.admin.execute(
        f'CREATE TABLE public.important_{tag} (x int); ALTER TABLE public.important_{tag} OWNER TO "{dba}"'
    )
    minter.admin.execute(f'CREATE ROLE "{lookalike}" LOGIN')
    minter.admin.execute(f'CREATE ROLE "{forged}" LOGIN; COMMENT ON ROLE "{forged}" IS \'{claim.comment()}\'')
    minter.admin.execute(
        f'CREATE ROLE "{foreign}" LOGIN; COMMENT ON ROLE "{foreign}" IS \'{owner.comment()}\''
    )
    dsn = minter.server.dsn(user=dba, password="dba-pw", dbname=minter.database)
    try:
        with psycopg.connect(dsn, autocommit=True) as dba_session:
            # A fresh operator (nothing in memory) that knows of no live pod at all.
            actions = minter.plan(credentials.Desired(database=minter.database))
            assert {a.role for a in actions} == {minter.role(pod), _group(minter)}
            drops = {(a.role, a.reason) for a in actions if isinstance(a, credentials.DropRole)}
            assert drops == {(minter.role(pod), "pod-deleted"), (_group(minter), "policy-unbound")}
            pgapply.apply(minter.admin, actions)
            assert dba_session.execute(f"SELECT count(*) FROM public.important_{tag}").fetchone() == (0,)
        left = {
            r[0]: r[1]
            for r in minter.admin.execute(
                "SELECT rolname, rolcanlogin FROM pg_roles WHERE starts_with(rolname, 'dbgov_')"
            )
        }
        for untouched in (dba, lookalike, forged, foreign):
            assert left.get(untouched) is True, untouched  # still there, still LOGIN
        assert set(credentials.unmanaged(pgapply.read_state(minter.admin))) >= {dba, lookalike, forged}
    finally:
        minter.admin.execute(f"DROP TABLE IF EXISTS public.important_{tag}")
        for name in (foreign, lookalike, forged, dba):
            minter.admin.execute(f'DROP ROLE IF EXISTS "{name}"')


def test_a_revoked_roles_objects_never_become_superuser_owned(minter: Minter) -> None:
    """Attack F1: REASSIGN OWNED ... TO CURRENT_USER gave a migration's view over a masked table
    and its SECURITY DEFINER function to the admin, a superuser: the next workload read the
    masked columns raw through the view and became superuser through the function."""
    first, second = minter.workload(1), minter.workload(2)
    minter.converge(minter.desired([first, second], policy=MIGRATION))
    with minter.connect(first) as conn:
        assert _refused(conn, "SELECT email FROM shop.customers") == "42501"
        conn.execute("CREATE VIEW shop.leak AS SELECT id, email, ssn FROM shop.customers")
        conn.execute("GRANT SELECT ON shop.leak TO PUBLIC")
        conn.execute(
            "CREATE FUNCTION shop.run(q text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER "
            "AS $$ DECLARE r text; BEGIN EXECUTE q INTO r; RETURN r; END $$"
        )
        conn.execute("GRANT EXECUTE ON FUNCTION shop.run(text) TO PUBLIC")
        conn.execute("CREATE TABLE shop.migrated (id int)")  # what the next job must alter
    minter.converge(minter.desired([second], policy=MIGRATION))  # the first pod is gone
    assert not _exists(minter.admin, minter.role(first))
    owners = minter.admin.execute(
        "SELECT r.rolname, r.rolsuper FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
        "WHERE c.oid IN ('shop.leak'::regclass, 'shop.migrated'::regclass) "
        "UNION ALL SELECT r.rolname, r.rolsuper FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
        "WHERE p.oid = 'shop.run(text)'::regprocedure"
    ).fetchall()
    assert {super_ for _, super_ in owners} == {False}, owners
    role = minter.role(second)
    with minter.connect(second) as conn:
        for leak in ("SELECT * FROM shop.leak", "SELECT email FROM shop.leak"):
            assert _refused(conn, leak) == "42501", leak
        assert _refused(conn, f"SELECT shop.run('ALTER ROLE \"{role}\" SUPERUSER')") == "42501"
        assert _refused(conn, "SELECT shop.run('SELECT rolpassword::text FROM pg_authid LIMIT 1')") == "42501"
        assert _value(conn, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
        assert _value(conn, "SELECT shop.run('SELECT current_user::text')") == _group(minter)
        conn.execute("ALTER TABLE shop.migrated ADD COLUMN note text")  # the group owns it: the job may
    assert {name for name, _ in owners} == {_group(minter)}
    assert _value(minter.admin, "SELECT reloptions FROM pg_class WHERE oid = 'shop.leak'::regclass") == [
        "security_invoker=true"
    ]
    # Nobody but the owning group may run its SECURITY DEFINER function any more (PUBLIC's grant is gone).
    assert (
        _value(
            minter.admin, "SELECT has_function_privilege('public', 'shop.run(text)'::regprocedure, 'EXECUTE')"
        )
        is False
    )
    # The policy unbound: the group goes too, and its objects to the powerless quarantine role.
    minter.converge(minter.desired([]))
    quarantine = credentials.quarantine_role_name(minter.database)
    attrs = _row(
        minter.admin,
        "SELECT rolcanlogin, rolsuper, rolinherit, (SELECT count(*) FROM pg_auth_members WHERE roleid = r.oid "
        "OR member = r.oid) FROM pg_roles r WHERE rolname = %s",
        quarantine,
    )
    assert attrs == (False, False, False, 0)
    assert (
        _value(
            minter.admin, "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'shop.leak'::regclass"
        )
        == quarantine
    )
    assert (
        _value(
            minter.admin,
            "SELECT pg_get_userbyid(proowner) FROM pg_proc WHERE oid = 'shop.run(text)'::regprocedure",
        )
        == quarantine
    )


def test_a_role_owning_objects_in_another_database_is_cleaned_up_there_or_reported(
    minter: Minter, pg_server: pg.PgServer
) -> None:
    """Attack F5: a minted role may connect to other databases of the server (PUBLIC has CONNECT)
    and create a large object there; REASSIGN/DROP OWNED work per database, so DROP ROLE failed
    and aborted the whole plan for every pod of the Database."""
    pod, other = minter.workload(1), minter.workload(2)
    minter.converge(minter.desired([pod, other]))
    with pg.scratch_database(pg_server, "elsewhere", "") as elsewhere:
        role = minter.role(pod)
        dsn = minter.server.dsn(user=role, password=minter.secrets[role].password, dbname=elsewhere)
        with psycopg.connect(dsn, autocommit=True) as conn:
            lo = _value(conn, "SELECT lo_create(0)")
        revoke = minter.plan(minter.desired([other]))
        # Without a way into that database: the role stays, NOLOGIN, and the error names it.
        with pytest.raises(pgapply.RoleNotDropped) as err:
            pgapply.apply(minter.admin, revoke)
        assert err.value.databases == (elsewhere,) and elsewhere in str(err.value)
        assert "REVOKE CONNECT ON DATABASE" in str(err.value)
        assert _row(minter.admin, "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", role) == (False,)
        # With it, the object goes to the quarantine role there and the role is dropped.

        @contextlib.contextmanager
        def connect(dbname: str) -> Iterator[psycopg.Connection[Any]]:
            with psycopg.connect(minter.server.dsn(user="postgres", dbname=dbname), autocommit=True) as c:
                yield c

        pgapply.apply(minter.admin, minter.plan(minter.desired([other])), connect=connect)
        assert not _exists(minter.admin, role)
        with connect(elsewhere) as admin:
            owner = _value(
                admin, "SELECT pg_get_userbyid(lomowner) FROM pg_largeobject_metadata WHERE oid = %s", lo
            )
        assert owner == credentials.quarantine_role_name(minter.database)
        with minter.connect(other) as still:
            assert still.execute("SELECT count(*) FROM shop.products").fetchone() == (1,)
