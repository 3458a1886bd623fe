"""Minted database roles end to end (issue 11): a real kube-apiserver, the operator as a process
under the chart's RBAC, and a real PostgreSQL.

A pod's bound token (TokenRequest, as the kubelet gets one) is presented to the operator's
credential endpoint; the answer's credentials are then used DIRECTLY against PostgreSQL,
bypassing any proxy, to show that the database itself enforces the policy. Renewal, revocation
on pod deletion, on unbinding and on expiry, and the reaper after an operator restart are
checked against pg_roles and live sessions; every issue/renew/revoke is an audit line in the
operator's log. Pods are stored, never run (no kubelet).
"""

from __future__ import annotations

import base64
import datetime
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import pg
from dbgov_operator import credentials, grants, minting, pgapply
from dbgov_policy import compile as policy_compile
from dbgov_policy import mask
from dbgov_sidecar import embedded_pg

from . import kube
from .operator_proc import GROUP, PLURAL, VERSION, Installed, wait_for
from .test_identity import ACCOUNT, Endpoint, bound_token
from .test_operator import deployed, wait_served

SCHEMA = """
CREATE SCHEMA shop;
CREATE TABLE shop.customers (id serial PRIMARY KEY, name text, email text, ssn text);
CREATE TABLE shop.orders (id serial PRIMARY KEY, customer_id int, qty int);
CREATE TABLE shop.secrets (id int PRIMARY KEY, note text);
INSERT INTO shop.customers (name, email, ssn) VALUES
  ('Ada', 'ada@example.com', '123-45-6789'), ('Bob', 'bob@mail.example', '987-65-4321');
INSERT INTO shop.orders (customer_id, qty) VALUES (1, 2), (2, 5);
INSERT INTO shop.secrets VALUES (1, 'launch codes');
"""
RULES: list[dict[str, Any]] = [
    {
        "name": "read",
        "verdict": "allow",
        "statements": ["select"],
        "tables": ["shop.orders", "shop.customers"],
    },
    {"name": "write-orders", "verdict": "allow", "statements": ["insert"], "tables": ["shop.orders"]},
]
MASKS = [
    {"table": "shop.customers", "column": "email", "strategy": "email"},
    {"table": "shop.customers", "column": "ssn", "strategy": "hash"},
]
ENROLLED = {"dbgov.io/inject": "true"}
TTL = datetime.timedelta(minutes=15)


@dataclass(frozen=True, slots=True, kw_only=True)
class Env:
    endpoint: Endpoint
    installed: Installed
    cluster: kube.KubeCluster
    pg_server: pg.PgServer

    @property
    def core(self) -> Any:
        return self.installed.core  # models out, held untyped as the operator does

    @property
    def custom(self) -> Any:
        return self.installed.custom


@pytest.fixture(scope="module")
def env(  # noqa: PLR0917 -- pytest fixtures are positional
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: pg.PgServer,
) -> Iterator[Env]:
    workdir = tmp_path_factory.mktemp("minting")
    (port,) = kube.free_ports(1)
    settings = {
        "DBGOV_CREDENTIAL_PORT": str(port),
        "DBGOV_REAP_SECONDS": "2",
        "DBGOV_DATABASE_CHECK_SECONDS": "5",
    }
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=settings) as found:
        ca = (workdir / "certs" / "ca.crt").read_text()
        endpoint = Endpoint(installed=found, url=f"https://127.0.0.1:{port}/v1/credentials", ca_pem=ca)
        yield Env(endpoint=endpoint, installed=found, cluster=kube_cluster, pg_server=pg_server)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scene:
    """A namespace with a scratch database, its Database object and a policy binding ACCOUNT."""

    namespace: str
    dbname: str
    database: str
    policy: str

    @property
    def database_id(self) -> str:
        return minting.database_id(namespace=self.namespace, name=self.database)


@pytest.fixture
def scene(env: Env, namespace: str) -> Iterator[Scene]:
    with pg.scratch_database(env.pg_server, "mint", SCHEMA) as dbname:
        _secret(env, namespace, "pg-admin", username="postgres", password=embedded_pg.SUPERUSER_PASSWORD)
        database = _database(env, namespace, name="orders-db", dbname=dbname)
        policy = _policy(env, namespace, name="orders-read", database=database)
        found = Scene(namespace=namespace, dbname=dbname, database=database, policy=policy)
        try:
            yield found
        finally:
            _drop_roles(env, found)


# --------------------------------------------------------------------------------------------
# issue, grants, direct login, renewal
# --------------------------------------------------------------------------------------------


def test_a_bound_pod_gets_credentials_that_postgres_itself_enforces(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-1")
    token = bound_token(env.cluster, scene.namespace, pod="orders-1", uid=uid)
    before = datetime.datetime.now(datetime.UTC)
    status, body = env.endpoint.post(token)
    assert status == 200, body
    cred = body["credentials"]
    role = credentials.login_role_name(pod_uid=uid, database=scene.database_id)
    assert cred["user"] == role
    assert (cred["host"], cred["port"], cred["dbname"], cred["sslmode"]) == (
        "127.0.0.1",
        env.pg_server.port,
        scene.dbname,
        "disable",
    )
    assert cred["caPem"] is None and cred["database"] == scene.database
    assert cred["policies"] == [scene.policy]
    # the hash key stays with the operator and the database's masking views: never in a pod
    key = _mask_key(env)
    assert "maskKey" not in cred and len(key) >= 32 and key not in json.dumps(body)
    valid_until = _time(cred["validUntil"])
    assert (
        before + TTL - datetime.timedelta(seconds=5)
        <= valid_until
        <= before + TTL + datetime.timedelta(seconds=60)
    )
    assert _time(cred["renewAt"]) == valid_until - TTL / 3

    with _admin(env, scene) as admin:
        (stored,) = admin.execute(
            "SELECT rolvaliduntil, rolcanlogin FROM pg_roles WHERE rolname = %s", (role,)
        ).fetchall()
        assert stored[1] is True
        assert abs(stored[0] - valid_until) < datetime.timedelta(seconds=1)
        # Exactly the policy's compiled grants on the group role, and the login is in it.
        group = credentials.group_role_name(
            namespace=scene.namespace, policy=scene.policy, database=scene.database_id
        )
        compiled = policy_compile.compile_policy(_spec(scene.database), mask_key=key)
        expected = grants.compile_grants(compiled, pgapply.read_catalog(admin), group_role=group)
        state = pgapply.read_state(admin)
        assert state.privileges[group] == expected.privileges
        (login,) = [r for r in state.roles if r.name == role]
        assert login.member_of == {group}

    with _login(env, scene, cred) as conn:
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
        assert conn.execute("SELECT name FROM shop.customers ORDER BY id").fetchall() == [("Ada",), ("Bob",)]
        for blocked in (
            "SELECT * FROM shop.secrets",
            "DELETE FROM shop.orders",
            "SELECT email FROM shop.customers",  # a masked column, from the base table
            "SELECT * FROM shop.customers",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(blocked)
        (view,) = [v for v in expected.views if v.source.name == "customers"]
        rows = conn.execute(f'SELECT email, ssn FROM dbgov_masked."{view.name}" ORDER BY id').fetchall()
    rules = {m.column: m for m in compiled.masks}
    assert rows == [
        (
            mask.mask_text(rules["email"], "ada@example.com", key=key),
            mask.mask_text(rules["ssn"], "123-45-6789", key=key),
        ),
        (
            mask.mask_text(rules["email"], "bob@mail.example", key=key),
            mask.mask_text(rules["ssn"], "987-65-4321", key=key),
        ),
    ]
    assert rows[0][0] != "ada@example.com" and rows[0][1] != "123-45-6789"
    issued = wait_for("the issue audit line", lambda: _audit(env, "credential_issued", role))
    assert issued["reason"] == "issued" and issued["owner"]["pod_uid"] == uid
    assert cred["password"] not in env.installed.operator.all_logs()


def test_presenting_again_renews_rotates_and_keeps_open_sessions(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-2")
    token = bound_token(env.cluster, scene.namespace, pod="orders-2", uid=uid)
    first = _issue(env, token)
    stored = _valid_until(env, scene, first["user"])
    with _login(env, scene, first) as open_session:
        second = _issue(env, token)
        assert second["user"] == first["user"]  # the same role, renewed
        assert second["password"] != first["password"]
        assert _time(second["validUntil"]) >= _time(first["validUntil"])  # the answer has seconds
        assert _valid_until(env, scene, first["user"]) > stored  # VALID UNTIL moved
        assert open_session.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _login(env, scene, first)
    with _login(env, scene, second) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with _admin(env, scene) as admin:
        count = admin.execute(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'dbgov_w_%%' AND "
            "shobj_description(oid, 'pg_authid') LIKE %s",
            (f"%{uid}%",),
        ).fetchone()
        assert count == (1,)
    renewed = wait_for("the renew audit line", lambda: _audit(env, "credential_renewed", first["user"]))
    assert renewed["rotated"] is True and renewed["reason"] == "renewed"


# --------------------------------------------------------------------------------------------
# revocation
# --------------------------------------------------------------------------------------------


def test_deleting_the_pod_revokes_its_role_and_ends_its_sessions(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-3")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-3", uid=uid))
    with _login(env, scene, cred) as session:
        env.core.delete_namespaced_pod("orders-3", scene.namespace, grace_period_seconds=0)
        wait_for("the role to be dropped", lambda: not _role_exists(env, scene, cred["user"]), timeout=15)
        with pytest.raises(psycopg.OperationalError):
            session.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        _login(env, scene, cred)
    line = wait_for(
        "the revoke audit line", lambda: _audit(env, "credential_revoked", cred["user"], "DropRole")
    )
    assert line["reason"] == "pod-deleted"


def test_unbinding_the_policy_revokes(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-4")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-4", uid=uid))
    patch = {"spec": {"subjects": {"serviceAccounts": ["someone-else"]}}}
    env.custom.patch_namespaced_custom_object(GROUP, VERSION, scene.namespace, PLURAL, scene.policy, patch)
    wait_for("the unbound role to be dropped", lambda: not _role_exists(env, scene, cred["user"]), timeout=20)
    line = wait_for(
        "the revoke audit line", lambda: _audit(env, "credential_revoked", cred["user"], "DropRole")
    )
    assert line["reason"] == "policy-unbound"
    # And the group of a policy nobody is bound to goes too.
    group = credentials.group_role_name(
        namespace=scene.namespace, policy=scene.policy, database=scene.database_id
    )
    wait_for("the unused group to be dropped", lambda: not _role_exists(env, scene, group), timeout=20)
    status, body = env.endpoint.post(bound_token(env.cluster, scene.namespace, pod="orders-4", uid=uid))
    assert (status, body["error"]["code"]) == (409, "no_policy")


def test_deleting_the_policy_revokes_and_a_changed_policy_changes_the_grants(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-7")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-7", uid=uid))
    patch = {"spec": {"rules": [RULES[0]]}}  # no more INSERT on shop.orders
    env.custom.patch_namespaced_custom_object(GROUP, VERSION, scene.namespace, PLURAL, scene.policy, patch)

    def insert_refused() -> bool:
        with _login(env, scene, cred) as conn:
            try:
                conn.execute("INSERT INTO shop.orders (customer_id, qty) VALUES (1, 1)")
            except psycopg.errors.InsufficientPrivilege:
                return True
        return False

    wait_for("the changed grants", insert_refused, timeout=20)
    env.custom.delete_namespaced_custom_object(GROUP, VERSION, scene.namespace, PLURAL, scene.policy)
    wait_for("the role to be dropped", lambda: not _role_exists(env, scene, cred["user"]), timeout=20)
    line = wait_for(
        "the revoke audit line", lambda: _audit(env, "credential_revoked", cred["user"], "DropRole")
    )
    assert line["reason"] == "policy-unbound"


def test_deleting_the_database_revokes_its_roles_and_groups(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-8")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-8", uid=uid))
    group = credentials.group_role_name(
        namespace=scene.namespace, policy=scene.policy, database=scene.database_id
    )
    assert _role_exists(env, scene, group)
    env.custom.delete_namespaced_custom_object(GROUP, VERSION, scene.namespace, "databases", scene.database)
    wait_for("the login role to be dropped", lambda: not _role_exists(env, scene, cred["user"]), timeout=20)
    wait_for("the group role to be dropped", lambda: not _role_exists(env, scene, group), timeout=20)


def test_an_expired_role_is_reaped(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-5")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-5", uid=uid))
    with _admin(env, scene) as admin:  # time passes: its VALID UNTIL is behind us
        admin.execute(f"ALTER ROLE \"{cred['user']}\" VALID UNTIL '2000-01-01 00:00:00+00'")
    wait_for("the expired role to be reaped", lambda: not _role_exists(env, scene, cred["user"]), timeout=20)
    line = wait_for(
        "the revoke audit line", lambda: _audit(env, "credential_revoked", cred["user"], "DropRole")
    )
    assert line["reason"] == "expired"
    again = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-5", uid=uid))
    assert again["user"] == cred["user"] and _role_exists(env, scene, again["user"])


def test_roles_left_while_the_operator_was_stopped_are_reaped_after_a_restart(env: Env, scene: Scene) -> None:
    uid = _pod(env, scene.namespace, "orders-6")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="orders-6", uid=uid))
    stray = "dbgov_w_" + uuid.uuid4().hex  # named like a minted role, but no COMMENT proves it
    operator = env.installed.operator
    operator.stop()
    try:
        env.core.delete_namespaced_pod("orders-6", scene.namespace, grace_period_seconds=0)
        with _admin(env, scene) as admin:
            admin.execute(f'CREATE ROLE "{stray}" LOGIN')  # a dbgov_ role naming no owner
    finally:
        operator.start()
        wait_served(env.installed)
    wait_for(
        "the dead pod's role to be reaped", lambda: not _role_exists(env, scene, cred["user"]), timeout=30
    )
    # A dbgov_ role the operator cannot prove it made is never touched (attack F6), only logged.
    wait_for(
        "the stray role to be logged",
        lambda: f"Role {stray} is named like a dbgov role" in operator.all_logs(),
    )
    try:
        with _admin(env, scene) as admin:
            assert admin.execute(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (stray,)
            ).fetchone() == (True,)
        assert _audit(env, "credential_revoked", stray) is None
    finally:
        with _admin(env, scene) as admin:
            admin.execute(f'DROP ROLE IF EXISTS "{stray}"')


# --------------------------------------------------------------------------------------------
# attack findings on revocation (F1, F5, F6)
# --------------------------------------------------------------------------------------------


def test_a_revoked_migrations_view_and_definer_function_give_the_next_pod_nothing(
    env: Env, scene: Scene
) -> None:
    """F1: the admin (a superuser) received a revoked role's objects; the next pod read masked
    columns raw through a view and became superuser through a SECURITY DEFINER function."""
    ddl = {"name": "migrate", "verdict": "allow", "statements": ["create"], "tables": ["shop.*"]}
    patch = {"spec": {"rules": [*RULES, ddl]}}
    env.custom.patch_namespaced_custom_object(GROUP, VERSION, scene.namespace, PLURAL, scene.policy, patch)
    uid = _pod(env, scene.namespace, "mig-1")
    first = _issue(env, bound_token(env.cluster, scene.namespace, pod="mig-1", uid=uid))
    with _login(env, scene, first) as conn:
        conn.execute("CREATE VIEW shop.leak AS SELECT id, email, ssn FROM shop.customers")
        conn.execute("GRANT SELECT ON shop.leak TO PUBLIC")
        conn.execute(
            "CREATE FUNCTION shop.run(q text) RETURNS text LANGUAGE plpgsql SECURITY DEFINER "
            "AS $$ DECLARE r text; BEGIN EXECUTE q INTO r; RETURN r; END $$"
        )
        conn.execute("GRANT EXECUTE ON FUNCTION shop.run(text) TO PUBLIC")
    env.core.delete_namespaced_pod("mig-1", scene.namespace, grace_period_seconds=0)
    wait_for("the role to be dropped", lambda: not _role_exists(env, scene, first["user"]), timeout=20)
    uid2 = _pod(env, scene.namespace, "mig-2")
    second = _issue(env, bound_token(env.cluster, scene.namespace, pod="mig-2", uid=uid2))
    with _login(env, scene, second) as conn:
        for leak in ("SELECT * FROM shop.leak", "SELECT email FROM shop.leak"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(leak)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT shop.run(%s)", (f'ALTER ROLE "{second["user"]}" SUPERUSER',))
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone() == (
            False,
        )
    with _admin(env, scene) as admin:
        owners = admin.execute(
            "SELECT r.rolsuper FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = 'shop.leak'::regclass "
            "UNION ALL SELECT r.rolsuper FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
            "WHERE p.oid = 'shop.run(text)'::regprocedure"
        ).fetchall()
    assert owners == [(False,), (False,)]
    line = wait_for(
        "the revoke audit line", lambda: _audit(env, "credential_revoked", first["user"], "DropRole")
    )
    assert line["reassignTo"].startswith(credentials.GROUP_PREFIX)


def test_a_role_with_objects_in_another_database_blocks_no_other_pod(env: Env, scene: Scene) -> None:
    """F5: a large object in another database made the revoked role's DROP fail, and the whole
    plan with it: every other pod of the Database got 503 database_unavailable."""
    uid = _pod(env, scene.namespace, "lo-1")
    cred = _issue(env, bound_token(env.cluster, scene.namespace, pod="lo-1", uid=uid))
    with pg.scratch_database(env.pg_server, "elsewhere", "") as elsewhere:
        with _login(env, scene, {**cred, "dbname": elsewhere}) as conn:
            conn.execute("SELECT lo_create(0)")
        with _admin(env, scene) as admin:  # the operator cannot clean up there: reported, retried
            admin.execute(f'ALTER DATABASE "{elsewhere}" ALLOW_CONNECTIONS false')
        env.core.delete_namespaced_pod("lo-1", scene.namespace, grace_period_seconds=0)

        def disabled() -> bool:
            with _admin(env, scene) as admin:
                found = admin.execute(
                    "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (cred["user"],)
                ).fetchone()
            return found == (False,)

        wait_for("the revoked role to be NOLOGIN", disabled, timeout=20)
        # Another pod of the Database still gets credentials (it got 503 database_unavailable).
        uid2 = _pod(env, scene.namespace, "lo-2")
        other = _issue(env, bound_token(env.cluster, scene.namespace, pod="lo-2", uid=uid2))
        with _login(env, scene, other) as conn:
            assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
        failed = wait_for(
            "the revoke-failed audit line",
            lambda: _audit(env, "credential_revoke_failed", cred["user"]),
            timeout=20,
        )
        assert failed["databases"] == [elsewhere] and elsewhere in failed["error"]
        assert _role_exists(env, scene, cred["user"]) and disabled()  # it stays, NOLOGIN, retried
        with _admin(env, scene) as admin:
            admin.execute(f'ALTER DATABASE "{elsewhere}" ALLOW_CONNECTIONS true')
        wait_for("the role to be dropped", lambda: not _role_exists(env, scene, cred["user"]), timeout=20)


def test_a_dbas_dbgov_named_role_is_left_alone(env: Env, scene: Scene) -> None:
    """F6: any dbgov_ role without a dbgov COMMENT was an orphan of every Database: a DBA's
    dbgov_dba was set NOLOGIN, its sessions killed, and its failing DROP broke every tenant."""
    dba = f"dbgov_dba_{uuid.uuid4().hex[:8]}"
    with _admin(env, scene) as admin:
        admin.execute(f"CREATE ROLE \"{dba}\" LOGIN PASSWORD 'dba-pw'")
        admin.execute(f"COMMENT ON ROLE \"{dba}\" IS 'human DBA account for the dbgov team'")
        admin.execute(f'CREATE TABLE public.important (x int); ALTER TABLE public.important OWNER TO "{dba}"')
    try:
        session = psycopg.connect(
            env.pg_server.dsn(user=dba, password="dba-pw", dbname=scene.dbname), autocommit=True
        )
        with session:
            uid = _pod(env, scene.namespace, "dba-1")
            _issue(env, bound_token(env.cluster, scene.namespace, pod="dba-1", uid=uid))
            env.core.delete_namespaced_pod("dba-1", scene.namespace, grace_period_seconds=0)  # a reap runs
            wait_for(
                "a reap",
                lambda: _audit(
                    env,
                    "credential_revoked",
                    credentials.login_role_name(pod_uid=uid, database=scene.database_id),
                    "DropRole",
                ),
                timeout=20,
            )
            assert session.execute("SELECT count(*) FROM public.important").fetchone() == (0,)
        with _admin(env, scene) as admin:
            assert admin.execute(
                "SELECT rolcanlogin FROM pg_roles WHERE rolname = %s", (dba,)
            ).fetchone() == (True,)
            owner = admin.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'important'").fetchone()
        assert owner == (dba,)
        logs = env.installed.operator.all_logs
        wait_for("the DBA role to be logged", lambda: f"Role {dba} is named like a dbgov role" in logs())
        assert logs().count(f"Role {dba} is named like a dbgov role") == 1
        assert _audit(env, "credential_revoked", dba) is None
    finally:
        with _admin(env, scene) as admin:
            admin.execute(f'DROP TABLE IF EXISTS public.important; DROP ROLE IF EXISTS "{dba}"')


# --------------------------------------------------------------------------------------------
# refusals and validation
# --------------------------------------------------------------------------------------------


def test_refusals_name_their_reason_and_give_no_credentials(env: Env, namespace: str) -> None:
    # Not enrolled: the validating webhook refuses dbgov.io/ annotation changes on enrolled pods,
    # and this test flips dbgov.io/database on one pod (minting reads it whatever the label).
    uid = _pod(env, namespace, "lonely", labels={})
    token = bound_token(env.cluster, namespace, pod="lonely", uid=uid)
    assert _refused(env, token) == (409, "no_policy")
    _policy(env, namespace, name="p-missing", database="nowhere")
    assert _refused(env, token) == (409, "database_missing")
    _policy(env, namespace, name="p-other", database="elsewhere")
    assert _refused(env, token) == (409, "database_ambiguous")
    env.core.patch_namespaced_pod(
        "lonely", namespace, {"metadata": {"annotations": {"dbgov.io/database": "third"}}}
    )
    assert _refused(env, token) == (409, "database_not_bound")
    env.core.patch_namespaced_pod(
        "lonely", namespace, {"metadata": {"annotations": {"dbgov.io/database": "elsewhere"}}}
    )
    _secret(env, namespace, "pg-admin", username="postgres", password=embedded_pg.SUPERUSER_PASSWORD)
    (closed,) = kube.free_ports(1)
    _database(env, namespace, name="elsewhere", dbname="shop", port=closed)
    assert _refused(env, token) == (503, "database_unavailable")
    _database(env, namespace, name="nowhere", dbname="shop", secret="absent")
    env.core.patch_namespaced_pod(
        "lonely", namespace, {"metadata": {"annotations": {"dbgov.io/database": "nowhere"}}}
    )
    assert _refused(env, token) == (409, "database_not_ready")
    # Bound, its database reachable and ready: still no credentials for a pod the webhook never
    # injected (its sidecar would not be there to see what they are used for).
    _database(env, namespace, name="reachable", dbname="shop")
    _policy(env, namespace, name="p-reachable", database="reachable")
    env.core.patch_namespaced_pod(
        "lonely", namespace, {"metadata": {"annotations": {"dbgov.io/database": "reachable"}}}
    )
    assert _refused(env, token) == (403, "pod_not_injected")


def test_the_webhook_refuses_bad_credentials_settings_with_every_path(env: Env, namespace: str) -> None:
    body = _policy_body("bad-ttl", database="orders-db")
    body["spec"]["credentials"] = {"ttl": "30s", "renewBefore": "soon", "rotate": True}
    with pytest.raises(ApiException) as caught:
        env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    message = json.loads(str(caught.value.body))["message"]
    assert "spec.credentials.ttl: must be between 1m and 24h" in message
    assert "spec.credentials.renewBefore: must be a duration" in message
    assert "spec.credentials.rotate: unknown field" in message


def test_the_mask_key_secret_is_created_once_and_never_empty(env: Env) -> None:
    secret = env.core.read_namespaced_secret("dbgov-mask-key", env.installed.namespace)
    assert secret.immutable is True
    key = base64.b64decode(secret.data["maskKey"]).decode()
    assert len(key) >= 32
    # What a second replica does on start: find it, never replace it.
    assert (
        minting.ensure_mask_key(
            env.cluster.api_client(), namespace=env.installed.namespace, name="dbgov-mask-key"
        )
        == key
    )


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _secret(env: Env, namespace: str, name: str, **data: str) -> None:
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    )
    env.core.create_namespaced_secret(namespace, body)


def _database(
    env: Env, namespace: str, *, name: str, dbname: str, port: int | None = None, secret: str = "pg-admin"
) -> str:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": name},
        "spec": {
            "host": "127.0.0.1",
            "port": port or env.pg_server.port,
            "dbname": dbname,
            "sslmode": "disable",
            "adminSecretRef": {"name": secret},
        },
    }
    env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "databases", body)
    return name


def _spec(database: str) -> dict[str, Any]:
    return {
        "subjects": {"serviceAccounts": [ACCOUNT]},
        "databaseRef": {"name": database},
        "default": "block",
        "rules": RULES,
        "masks": MASKS,
        "credentials": {"ttl": "15m"},
    }


def _policy_body(name: str, *, database: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DatabaseAccessPolicy",
        "metadata": {"name": name},
        "spec": _spec(database),
    }


def _policy(env: Env, namespace: str, *, name: str, database: str) -> str:
    body = _policy_body(name, database=database)
    env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return name


def _pod(env: Env, namespace: str, name: str, *, labels: dict[str, str] | None = None) -> str:
    try:
        env.cluster.create_service_account(namespace=namespace, name=ACCOUNT)
    except ApiException as err:
        if err.status != 409:
            raise
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": ENROLLED if labels is None else labels},
        "spec": {"serviceAccountName": ACCOUNT, "containers": [{"name": "app", "image": "example/app:1"}]},
    }
    return str(env.core.create_namespaced_pod(namespace, body).metadata.uid)


def _issue(env: Env, token: str) -> dict[str, Any]:
    status, body = env.endpoint.post(token)
    assert status == 200, body
    issued: dict[str, Any] = body["credentials"]
    return issued


def _refused(env: Env, token: str) -> tuple[int, str]:
    status, body = env.endpoint.post(token)
    assert set(body) == {"error"}, body
    return status, body["error"]["code"]


def _time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def _mask_key(env: Env) -> str:
    secret = env.core.read_namespaced_secret("dbgov-mask-key", env.installed.namespace)
    return base64.b64decode(secret.data["maskKey"]).decode()


def _admin(env: Env, scene: Scene) -> psycopg.Connection[Any]:
    return psycopg.connect(env.pg_server.dsn(user="postgres", dbname=scene.dbname), autocommit=True)


def _login(env: Env, scene: Scene, cred: dict[str, Any]) -> psycopg.Connection[Any]:
    return psycopg.connect(
        host="127.0.0.1",
        port=cred["port"],
        dbname=cred["dbname"],
        user=cred["user"],
        password=cred["password"],
        sslmode=cred["sslmode"],
        autocommit=True,
        connect_timeout=5,
    )


def _valid_until(env: Env, scene: Scene, role: str) -> datetime.datetime:
    with _admin(env, scene) as admin:
        row = admin.execute("SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
    assert row is not None, role
    found: datetime.datetime = row[0]
    return found


def _role_exists(env: Env, scene: Scene, role: str) -> bool:
    with _admin(env, scene) as admin:
        return admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is not None


def _audit(env: Env, kind: str, role: str, action: str = "") -> dict[str, Any] | None:
    for line in env.installed.operator.all_logs().splitlines():
        if line.startswith("{") and f'"type":"{kind}"' in line and role in line:
            event: dict[str, Any] = json.loads(line)
            if event.get("role") == role and (not action or event.get("action") == action):
                return event
    return None


def _drop_roles(env: Env, scene: Scene) -> None:
    """Drop the roles minted for this scene's database (cluster-wide objects outlive it)."""
    with _admin(env, scene) as admin:
        # The operator's reaper may be revoking the same roles: take its lock, as it does, so the
        # two never drop one role at once (a deadlock on pg_class otherwise).
        admin.execute("SELECT pg_catalog.pg_advisory_lock(%s)", (minting.LOCK_KEY,))
        names = [
            row[0]
            for row in admin.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE 'dbgov\\_%%' "
                "AND shobj_description(oid, 'pg_authid') LIKE %s",
                (f'%"database":"{scene.database_id}"%',),
            )
        ]
        for name in sorted(names, reverse=True):  # logins (w) before groups (g)
            admin.execute(f'DROP OWNED BY "{name}"')
            admin.execute(f'DROP ROLE "{name}"')
