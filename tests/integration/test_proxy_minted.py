"""The proxy logged in upstream with minted credentials (issue 11), against a real PostgreSQL.

A role is minted with the operator's own plan/apply modules (grants, credentials, pgapply: plain
Python) in a scratch database, then the proxy logs in with it: column privileges keep the masked
columns from the role, so the proxy reads masked tables through the operator's masking views,
and must return exactly what it returns when it logs in as the table's owner. Renewal swaps the
credentials without touching open sessions; expiry refuses new logins with FATAL 57P03.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

import pg
from dbgov_operator import credentials, grants, pgapply
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, mask, model
from dbgov_sidecar import config, policy_port, proxy, session, workload_identity

pytestmark = pytest.mark.integration

KEY = "minted-test-key-" + "m" * 24
SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (
  id serial PRIMARY KEY, name text, email varchar(80), ssn text, card char(16), balance numeric(10,2)
);
CREATE TABLE shop.orders (id int PRIMARY KEY, customer_id int, qty int);
CREATE TABLE shop.vip (perks text) INHERITS (shop.customers);
INSERT INTO shop.customers (name, email, ssn, card, balance) VALUES
  ('Ada', 'ada@example.com', '123-45-6789', '4111111111111111', 10.50),
  ('Bob', 'bob@mail.example', '987-65-4321', '5500000000000004', 99.00),
  ('Cy', NULL, NULL, NULL, NULL);
INSERT INTO shop.orders VALUES (1, 1, 2), (2, 2, 5);
INSERT INTO shop.vip (name, email, ssn, card, balance, perks) VALUES
  ('Vi', 'vi@vip.example', '555-55-5555', '3400000000000009', 1.00, 'lounge');
"""
SPEC: dict[str, Any] = {
    "default": "block",
    "credentials": {"ttl": "15m", "renewBefore": "5m"},
    "rules": [
        {"name": "no-ddl", "verdict": "block", "statements": ["ddl", "dcl"]},
        {
            "name": "read-shop",
            "verdict": "allow",
            "statements": ["select", "copy-to"],
            "tables": ["shop.customers", "shop.orders", "shop.vip"],
        },
    ],
    "masks": [
        {"table": "shop.customers", "column": "email", "strategy": "email"},
        {"table": "shop.customers", "column": "ssn", "strategy": "hash"},
        {"table": "shop.customers", "column": "card", "strategy": "partial", "keepLast": 4},
        {"table": "shop.customers", "column": "balance", "strategy": "redact"},
    ],
}
POLICY = policy_compile.compile_policy(SPEC, mask_key=KEY)
SIDECAR_POLICY = policy_compile.compile_policy(SPEC)
READS = [
    "SELECT * FROM shop.customers ORDER BY id",
    "SELECT id, email, ssn, card, balance FROM shop.customers c WHERE c.id = 1",
    "SELECT c FROM shop.customers c ORDER BY id",
    "SELECT count(*), max(ssn) FROM shop.customers",
    "SELECT o.qty, c.email FROM shop.orders o JOIN shop.customers c ON c.id = o.customer_id ORDER BY o.id",
    "WITH x AS (SELECT * FROM shop.customers) SELECT name, card FROM x ORDER BY 1",
    "SELECT upper(email) FROM shop.customers WHERE ssn IS NOT NULL ORDER BY 1",
    "SELECT name, email, ssn, perks FROM shop.vip",
    "SELECT name, ssn FROM shop.vip UNION ALL SELECT name, ssn FROM ONLY shop.orders o "
    "JOIN shop.customers c ON false",
]


class Minted:
    """A scratch database with a group role for SPEC and one minted login role in it."""

    def __init__(self, server: pg.PgServer, database: str) -> None:
        self.server, self.database = server, database
        self.admin = psycopg.connect(server.dsn(user="postgres", dbname=database), autocommit=True)
        self.group = credentials.group_role_name(namespace="team-a", policy="shop", database=database)
        self.workload = credentials.Workload(
            namespace="team-a", service_account="api", pod_name="api-0", pod_uid=f"uid-{database}"
        )
        self.role = credentials.login_role_name(pod_uid=self.workload.pod_uid, database=database)
        self.secrets: dict[str, credentials.Secret] = {self.role: pgapply.new_secret()}

    def desired(self, *, pods: bool = True, rotate: bool = False) -> credentials.Desired:
        compiled = grants.compile_grants(POLICY, pgapply.read_catalog(self.admin), group_role=self.group)
        return credentials.Desired(
            database=self.database,
            groups=(credentials.DesiredGroup(namespace="team-a", policy="shop", grants=compiled),)
            if pods
            else (),
            logins=(
                credentials.DesiredLogin(
                    workload=self.workload,
                    policies=("shop",),
                    credentials=credentials.parse_credentials(SPEC["credentials"]),
                    rotate_password=rotate,
                ),
            )
            if pods
            else (),
            live_pods=frozenset({self.workload.pod_uid}) if pods else frozenset(),
        )

    def converge(self, desired: credentials.Desired, *, rotate: bool = False) -> None:
        if rotate:
            self.secrets[self.role] = pgapply.new_secret()
        actual = pgapply.read_state(self.admin)
        now = datetime.datetime.now(datetime.UTC)
        pgapply.apply(self.admin, credentials.plan(desired, actual, now=now, secrets=self.secrets))

    @property
    def password(self) -> str:
        return self.secrets[self.role].password

    def credentials(self, *, valid_for: float = 900.0) -> workload_identity.Credentials:
        now = datetime.datetime.now(datetime.UTC)
        return workload_identity.Credentials(
            user=self.role,
            password=self.password,
            valid_until=now + datetime.timedelta(seconds=valid_for),
            host=self.server.host,
            port=self.server.port,
            dbname=self.database,
            sslmode="disable",
        )

    def close(self) -> None:
        try:
            self.converge(self.desired(pods=False))
        finally:
            self.admin.close()


@pytest.fixture
def minted(pg_server: pg.PgServer) -> Iterator[Minted]:
    with pg.scratch_database(pg_server, "minted", SCHEMA) as database:
        m = Minted(pg_server, database)
        try:
            m.converge(m.desired())
            yield m
        finally:
            m.close()


def engine_policy(*, keyed: bool = False) -> policy_port.EnginePolicy:
    """The sidecar's policy: no mask key by default, as in a cluster (the operator answers none;
    its masking views hash in the database); ``keyed`` for a proxy that masks by rewrite."""
    return policy_port.EnginePolicy(engine.Engine(POLICY if keyed else SIDECAR_POLICY))


class Held:
    """What the identity would hold: the credentials a login reads now (or why there are none)."""

    def __init__(self, creds: workload_identity.Credentials | None) -> None:
        self.creds = creds
        self.reason = "the operator has not answered yet"

    def login(self) -> workload_identity.Credentials:
        if self.creds is None:
            raise workload_identity.NoCredentials(self.reason)
        return self.creds


def minted_proxy(
    make_proxy: Callable[..., Any], m: Minted, login: Callable[[], workload_identity.Credentials]
) -> Any:
    # The static upstream is deliberately wrong: the minted answer must be what is used.
    static = {"user": "nobody", "password": None, "port": pg.free_port()}
    running = make_proxy(policy=engine_policy(), upstream=static)
    base = running.proxy.config.upstream
    running.proxy.config = proxy.ProxyConfig(
        listen_port=0,
        upstream=base,
        session=session.SessionConfig(),
        upstream_source=config.minted_upstream(base, login),
    )
    return running


def owner_proxy(make_proxy: Callable[..., Any]) -> Any:
    """The same policy with the proxy logged in as the tables' owner (no views needed: the
    rewrite masks, hashing with the operator's key)."""
    return make_proxy(policy=engine_policy(keyed=True))


def rows(dsn: str, query: str) -> tuple[list[Any], list[tuple[str, int, int]]]:
    """The rows and (name, type OID, table OID) of each result column."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        cur = conn.execute(query)
        desc = [(c.name, c.type_code, 0) for c in cur.description or ()]
        pgres = cur.pgresult
        assert pgres is not None
        desc = [(name, type_oid, pgres.ftable(i)) for i, (name, type_oid, _) in enumerate(desc)]
        return cur.fetchall(), desc


def test_masked_reads_through_the_views_equal_the_owners_masked_reads(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    via_views = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    as_owner = owner_proxy(make_proxy)
    for query in READS:
        got, got_desc = rows(via_views.dsn(dbname=minted.database), query)
        want, want_desc = rows(as_owner.dsn(dbname=minted.database), query)
        assert got == want, query
        assert [(n, t) for n, t, _ in got_desc] == [(n, t) for n, t, _ in want_desc], query
    full, desc = rows(via_views.dsn(dbname=minted.database), READS[0])
    assert full[0][2] == "***@example.com" and full[0][4] == "************1111"
    assert full[0][3] not in (None, "123-45-6789") and len(full[0][3]) == len("123-45-6789")
    assert full[0][5] is None  # a masked numeric is NULL, still numeric
    assert len(full) == 4 and full[3][2] == "**@vip.example"  # the child's rows, masked too
    assert [t for _, t, _ in desc] == [23, 25, 1043, 25, 1042, 1700]  # int4 text varchar text bpchar numeric
    # Masked columns are expressions (no table OID), exactly as in the owner's mode.
    assert all(table == 0 for name, _, table in desc if name in ("email", "ssn", "card", "balance"))
    events = [e for e in via_views.events if e.get("type") == "statement"]
    assert events and {e["db_user"] for e in events} == {minted.role}
    assert all(e["enforced"] == "mask" for e in events if "customers" in e["statement"])


def test_a_plain_table_and_a_blocked_statement(make_proxy: Callable[..., Any], minted: Minted) -> None:
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    got, desc = rows(running.dsn(dbname=minted.database), "SELECT id, qty FROM shop.orders ORDER BY id")
    assert got == [(1, 2), (2, 5)]
    assert {table for _, _, table in desc} != {0}  # plain columns keep their table
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE shop.orders")
        assert conn.execute("SELECT current_user").fetchone() == (minted.role,)


def test_only_of_an_inherited_masked_table_is_refused_through_views(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    """Its view reads the descendants too: ONLY cannot be honoured, so it is refused, not widened."""
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT email FROM ONLY shop.customers")
        assert "ONLY shop.customers cannot be read through its masking view" in str(err.value)
        # A child without children of its own reads the same with or without ONLY.
        assert conn.execute("SELECT email FROM ONLY shop.vip").fetchall() == [("**@vip.example",)]


def test_the_minted_role_cannot_read_a_masked_column_directly(minted: Minted) -> None:
    dsn = minted.server.dsn(user=minted.role, password=minted.password, dbname=minted.database)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT ssn FROM shop.customers")
        assert conn.execute("SELECT name FROM shop.customers ORDER BY id").fetchall()[0] == ("Ada",)


def test_copy_to_of_a_masked_table_goes_through_the_view(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    via_views = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    as_owner = owner_proxy(make_proxy)

    def copied(running: Any, statement: str) -> bytes:
        with (
            psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn,
            conn.cursor().copy(statement) as copy,
        ):
            return b"".join(bytes(chunk) for chunk in copy)

    for statement in (
        "COPY shop.customers TO STDOUT",
        "COPY shop.customers (id, email) TO STDOUT",
        "COPY (SELECT name, ssn FROM shop.customers ORDER BY id) TO STDOUT",
    ):
        got = copied(via_views, statement)
        assert got == copied(as_owner, statement), statement
        assert b"ada@example.com" not in got and b"123-45-6789" not in got
    assert b"***@example.com" in copied(via_views, "COPY shop.customers TO STDOUT")


def test_no_credentials_refuses_logins_with_57p03(make_proxy: Callable[..., Any], minted: Minted) -> None:
    held = Held(None)
    running = minted_proxy(make_proxy, minted, held.login)
    with pytest.raises(psycopg.OperationalError) as err:
        psycopg.connect(running.dsn(dbname=minted.database), connect_timeout=10)
    assert "the sidecar has no database credentials yet: the operator has not answered yet" in str(err.value)
    held.creds = minted.credentials()
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (minted.role,)


# --- renewal and expiry through the real WorkloadIdentity and an HTTPS endpoint --------------


class Operator:
    """A stand-in credential endpoint over HTTPS (the real one needs an apiserver: see
    tests/e2e/test_sidecar_minted.py): answers with whatever ``answer`` holds, or 503."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.answer: dict[str, Any] | None = None
        self.presented = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.presented += 1
                body, status = (
                    (json.dumps(outer.answer).encode(), 200)
                    if outer.answer is not None
                    else (json.dumps({"error": {"code": "unavailable", "message": "down"}}).encode(), 503)
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.server_address[1]}/v1/credentials"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def answer(m: Minted, *, valid_for: float, renew_in: float) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC)

    def iso(t: datetime.datetime) -> str:
        return t.isoformat().replace("+00:00", "Z")

    return {
        "identity": {
            "namespace": "team-a",
            "serviceAccount": "api",
            "pod": "api-0",
            "podUid": "u-1",
            "node": "n",
        },
        "expiresAt": iso(now + datetime.timedelta(seconds=valid_for)),
        "credentials": {
            "database": "shop-db",
            "host": m.server.host,
            "port": m.server.port,
            "dbname": m.database,
            "sslmode": "disable",
            "caPem": None,
            "user": m.role,
            "password": m.password,
            "validUntil": iso(now + datetime.timedelta(seconds=valid_for)),
            "renewAt": iso(now + datetime.timedelta(seconds=renew_in)),
            "policies": ["shop"],
        },
    }


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[tuple[Operator, Path, Path]]:
    cert, key = pg.make_certificate(tmp_path)
    token = tmp_path / "token"
    token.write_text("a-projected-token")
    op = Operator(cert, key)
    try:
        yield op, cert, token
    finally:
        op.close()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _wait(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_renewal_keeps_open_sessions_and_expiry_refuses_new_logins(
    make_proxy: Callable[..., Any], minted: Minted, operator: tuple[Operator, Path, Path]
) -> None:
    op, cert, token = operator
    events: list[dict[str, Any]] = []
    op.answer = answer(minted, valid_for=60, renew_in=1.5)
    running = make_proxy(policy=engine_policy(), upstream={"user": "nobody", "password": None})
    identity = workload_identity.WorkloadIdentity(
        url=op.url, token_file=str(token), ca=str(cert), audit=events.append
    )
    base = running.proxy.config.upstream
    running.proxy.config = proxy.ProxyConfig(
        listen_port=0,
        upstream=base,
        session=session.SessionConfig(workload=identity.audit_fields),
        upstream_source=config.minted_upstream(base, identity.login),
    )

    async def start() -> Any:  # the identity runs on the proxy's loop, as in `dbgov proxy`
        return asyncio.get_running_loop().create_task(identity.run())

    runner = running.call(start())
    try:
        _wait("credentials", lambda: identity.credentials is not None)
        first = identity.credentials
        assert identity.missing() is None
        assert first is not None and minted.password not in repr(first) and KEY not in repr(first)
        dsn = running.dsn(dbname=minted.database)
        with psycopg.connect(dsn, autocommit=True) as open_session:
            assert open_session.execute("SELECT count(*) FROM shop.customers").fetchone() == (4,)
            # The operator renews: a new password and VALID UNTIL (as RenewLoginRole with rotate).
            minted.converge(minted.desired(rotate=True), rotate=True)
            op.answer = answer(minted, valid_for=3, renew_in=60)
            _wait(
                "the renewal", lambda: identity.credentials is not None and identity.credentials is not first
            )
            assert open_session.execute("SELECT email FROM shop.customers WHERE id = 1").fetchone() == (
                "***@example.com",
            )
            with psycopg.connect(dsn, autocommit=True) as renewed:  # a new login uses the new password
                assert renewed.execute("SELECT current_user").fetchone() == (minted.role,)
            # The operator goes away; the credentials run out: new logins are refused, fail closed.
            op.answer = None
            _wait("the expiry event", lambda: any(e["type"] == "credentials_expired" for e in events), 15)
            with pytest.raises(psycopg.OperationalError) as err:
                psycopg.connect(dsn, connect_timeout=10)
            assert "the sidecar has no database credentials yet" in str(err.value)
            assert "expired" in str(err.value)
            assert "expired" in (identity.missing() or "")  # /readyz says so too
            # The open session goes on (VALID UNTIL only stops new logins).
            assert open_session.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
    finally:
        running.call(_cancel(runner))
    kinds = [e["type"] for e in events]
    assert kinds[0] == "credentials_received" and "credentials_renewed" in kinds
    assert "credentials_expired" in kinds
    assert any(e.get("warning") == "credentials renewal failed" for e in events)
    text = json.dumps(events)
    assert minted.password not in text and KEY not in text
    received = events[0]
    assert received["db_user"] == minted.role and received["workload"]["pod"] == "api-0"


def test_sessions_audit_the_role_they_logged_in_as(make_proxy: Callable[..., Any], minted: Minted) -> None:
    held = Held(minted.credentials())
    running = minted_proxy(make_proxy, minted, held.login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        conn.execute("SELECT 1 FROM shop.orders LIMIT 1")
    other = f"dbgov_w_{uuid.uuid4().hex}"
    minted.admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x-pw' IN ROLE {}").format(
            sql.Identifier(other), sql.Identifier(minted.group)
        )
    )
    try:
        held.creds = workload_identity.Credentials(
            user=other,
            password="x-pw",
            valid_until=datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5),
            host=minted.server.host,
            port=minted.server.port,
            dbname=minted.database,
            sslmode="disable",
        )
        with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
            assert conn.execute("SELECT id FROM shop.orders ORDER BY id LIMIT 1").fetchone() == (1,)
        users = [e["db_user"] for e in running.events if e.get("type") == "session_start"]
        assert users == [minted.role, other]
    finally:
        minted.admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(other)))


def test_no_view_for_a_masked_table_refuses_the_read(make_proxy: Callable[..., Any], minted: Minted) -> None:
    """A masked table the operator made no view of yet: the read is refused, not attempted."""
    view = grants.view_name(model.QualifiedName(schema="shop", name="customers"), group_role=minted.group)
    minted.admin.execute(
        sql.SQL("REVOKE SELECT ON {}.{} FROM {}").format(
            sql.Identifier(grants.MASKED_SCHEMA), sql.Identifier(view), sql.Identifier(minted.group)
        )
    )
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT email FROM shop.customers")
        assert "no masking view" in str(err.value)
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)


def test_tablesample_of_a_masked_table_is_refused_through_views(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT email FROM shop.customers TABLESAMPLE SYSTEM (100)")
        assert "TABLESAMPLE of shop.customers cannot be applied through its masking view" in str(err.value)
        assert conn.execute("SELECT qty FROM shop.orders TABLESAMPLE SYSTEM (100) ORDER BY 1").fetchall() == [
            (2,),
            (5,),
        ]


# --- the pure parts, without a network ------------------------------------------------------


def test_credentials_parse_the_documented_answer_and_hide_their_secrets() -> None:
    body = {
        "identity": {
            "namespace": "shop",
            "serviceAccount": "orders",
            "pod": "o-1",
            "podUid": "u",
            "node": "w",
        },
        "expiresAt": "2026-12-05T17:31:00Z",
        "credentials": {
            "database": "orders-db",
            "host": "pg.shop.svc",
            "port": 5432,
            "dbname": "shop",
            "sslmode": "verify-full",
            "caPem": "-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n",
            "user": "dbgov_w_5f0c",
            "password": "s3cret-pw",
            "validUntil": "2026-12-05T17:31:00Z",
            "renewAt": "2026-12-05T17:11:00Z",
            "maskKey": "the-mask-key",  # an older operator's: ignored, never kept
            "policies": ["orders-read"],
        },
    }
    verified = workload_identity.parse_answer(json.dumps(body).encode(), pod_uid="u")
    creds = verified.credentials
    assert creds is not None
    assert (creds.host, creds.port, creds.dbname, creds.sslmode, creds.user) == (
        "pg.shop.svc",
        5432,
        "shop",
        "verify-full",
        "dbgov_w_5f0c",
    )
    assert creds.renew_at == datetime.datetime(2026, 12, 5, 17, 11, tzinfo=datetime.UTC)
    shown = repr(creds) + json.dumps(creds.audit_fields())
    assert "s3cret-pw" not in shown and "the-mask-key" not in shown and "BEGIN" not in shown
    assert "the-mask-key" not in repr(dataclasses.astuple(creds))
    base = proxy.UpstreamConfig(host="static", port=1, user="static", password="static-pw", database="d")
    up = config.minted_upstream(base, lambda: creds)()
    assert (up.host, up.port, up.database, up.user, up.password, up.sslmode) == (
        "pg.shop.svc",
        5432,
        "shop",
        "dbgov_w_5f0c",
        "s3cret-pw",
        "verify-full",
    )
    assert up.masking_views and up.ssl_ca_pem == creds.ca_pem and "s3cret-pw" not in repr(up)
    for broken in ({**body["credentials"], "port": "x"}, {**body["credentials"], "validUntil": "17:00"}):
        with pytest.raises(workload_identity.Unverified):
            workload_identity.parse_answer(json.dumps({**body, "credentials": broken}).encode())


def test_renewal_is_scheduled_at_renew_at_and_never_past_valid_until() -> None:
    now = 1_000_000.0
    identity = workload_identity.WorkloadIdentity(
        url="https://127.0.0.1:1/v1/credentials",
        token_file="/nonexistent",
        ca=certifi_free_ca(),
        clock=lambda: now,
    )

    def at(seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(now + seconds, datetime.UTC)

    def verified(valid: float, renew: float | None) -> workload_identity.Verified:
        creds = workload_identity.Credentials(
            user="u", password="p", valid_until=at(valid), renew_at=None if renew is None else at(renew)
        )
        workload = workload_identity.Workload(
            namespace="n", service_account="s", pod="p", pod_uid="u", node=""
        )
        return workload_identity.Verified(workload=workload, credentials=creds, expires_at=at(valid))

    assert identity._refresh_in(verified(900, 240)) == pytest.approx(240)
    assert identity._refresh_in(verified(3600, 2400)) == pytest.approx(300)  # at least every 5 minutes
    assert identity._refresh_in(verified(120, 600)) == pytest.approx(80)  # renewAt past validUntil
    assert identity._refresh_in(verified(900, None)) == pytest.approx(300)
    assert identity._refresh_in(verified(200, None)) == pytest.approx(140)
    assert identity._refresh_in(verified(600, -5)) == pytest.approx(200)  # renewAt passed: not every second


def certifi_free_ca() -> str:
    """Any PEM CA will do for a WorkloadIdentity that never connects: the test suite's own."""
    import tempfile

    directory = Path(tempfile.mkdtemp())
    cert, _ = pg.make_certificate(directory)
    return cert.read_text()


def test_several_masking_views_of_a_table_refuse_its_reads(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    """Two policies binding a pod give its role one view each, each masking only its own
    policy's columns: the proxy cannot know either masks all, so it reads through neither."""
    other = "shop.customers.other-policy"
    minted.admin.execute(
        sql.SQL(
            "CREATE VIEW {}.{} WITH (security_barrier) AS SELECT id, name, email FROM shop.customers"
        ).format(sql.Identifier(grants.MASKED_SCHEMA), sql.Identifier(other))
    )
    minted.admin.execute(
        sql.SQL("GRANT SELECT ON {}.{} TO {}").format(
            sql.Identifier(grants.MASKED_SCHEMA), sql.Identifier(other), sql.Identifier(minted.group)
        )
    )
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT email FROM shop.customers")
        assert "several masking views of shop.customers" in str(err.value)
        assert conn.execute("SELECT email FROM shop.vip").fetchall() == [("**@vip.example",)]


def test_a_view_that_does_not_mask_what_the_policy_masks_is_not_read(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    """The bundle changed before the operator replaced the view (or the policies differ): a view
    passing a masked column through raw is refused, never read as if it masked it."""
    view = grants.view_name(model.QualifiedName(schema="shop", name="vip"), group_role=minted.group)
    name = sql.SQL("{}.{}").format(sql.Identifier(grants.MASKED_SCHEMA), sql.Identifier(view))
    (definition,) = minted.admin.execute(
        "SELECT pg_get_viewdef(%s::regclass)", (f'dbgov_masked."{view}"',)
    ).fetchone() or ("",)
    assert mask.view_masked_columns(definition) == {"email", "ssn", "card", "balance"}
    # As an older policy would have it: ssn passed through.
    (table,) = [t for t in pgapply.read_catalog(minted.admin).tables if t.name == "vip"]
    masks = tuple(m for m in POLICY.masks if m.column != "ssn")
    older = grants.masking_view(table, masks, group_role=minted.group, key=KEY)
    assert mask.view_masked_columns(older.select_sql) == {"email", "card", "balance"}
    minted.admin.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS ").format(name) + sql.SQL(older.select_sql))
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
            conn.execute("SELECT name, ssn FROM shop.vip")
        assert "masking view of shop.vip passes ssn through unmasked" in str(err.value)
        assert conn.execute("SELECT email FROM shop.customers WHERE name = 'Ada'").fetchall() == [
            ("***@example.com",)
        ]


def test_repeated_masked_shapes_stay_masked_on_the_compiled_lane(
    make_proxy: Callable[..., Any], minted: Minted
) -> None:
    """Once a masked shape is learnt, the lane rewrites each text itself: through the views too."""
    running = minted_proxy(make_proxy, minted, Held(minted.credentials()).login)
    with psycopg.connect(running.dsn(dbname=minted.database), autocommit=True) as conn:
        for i in range(1, 4):
            for _ in range(5):
                got = conn.execute(f"SELECT id, email, ssn FROM shop.customers WHERE id = {i}").fetchall()
                assert got[0][1] in ("***@example.com", "***@mail.example", None), got
                assert got[0][2] not in ("123-45-6789", "987-65-4321"), got
    statements = [e for e in running.events if e.get("type") == "statement"]
    assert len(statements) == 15 and {e["enforced"] for e in statements} == {"mask"}
    assert running.counters.lane_statements >= 5  # (the lane did take some of them)
