"""The admin Secret kept out of the workload's namespace (issue 12, attack finding F2), against a
real kube-apiserver, the operator as a process under the chart's RBAC, and a real PostgreSQL.

A namespace user with Kubernetes' `edit` role reads every Secret of their namespace, so an admin
Secret there hands them the superuser the operator mints with. Here the platform keeps it in a
namespace of its own, granted to one team and pinned to one server, and the chart's RBAC is the
least-privilege setup the docs recommend (rbac.sameNamespaceDatabaseSecrets=false, the platform
namespace in rbac.platformSecretsNamespace): the operator may read Secrets there and in its own
namespace only. What is proven: the granted team mints and logs in; a team it is not granted to
and a Database pointed at another server are refused at apply time by the operator's validating
webhook with the reason their status would carry, and, stored anyway (as a Database that predates
the webhook), refused by the controller, which never connects there (a listening socket records
every connection); a grant taken back is noticed at use; the password is never logged.
"""

import base64
import contextlib
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import pg
from dbgov_operator import annotations
from dbgov_sidecar import embedded_pg

from . import kube
from .operator_proc import CHART, GROUP, VERSION, wait_for
from .test_identity import Endpoint, bound_token
from .test_minting import (
    SCHEMA,
    Env,
    Scene,
    _drop_roles,
    _issue,
    _login,
    _pod,
    _policy,
    _refused,
)
from .test_operator import _start, deployed

DATABASES = "databases"


@dataclass(frozen=True, slots=True, kw_only=True)
class Platform:
    env: Env
    namespace: str
    """Where the platform keeps the admin Secrets (rbac.platformSecretsNamespace)."""


@pytest.fixture(scope="module")
def platform(  # noqa: PLR0917 -- pytest fixtures are positional
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: pg.PgServer,
) -> Iterator[Platform]:
    workdir = tmp_path_factory.mktemp("database-secrets")
    secrets_ns = kube_cluster.create_namespace("platform")
    (port,) = kube.free_ports(1)
    settings = {
        "DBGOV_CREDENTIAL_PORT": str(port),
        "DBGOV_REAP_SECONDS": "2",
        "DBGOV_DATABASE_CHECK_SECONDS": "2",
    }
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=settings) as found:
        _least_privilege(kube_cluster, kube_tools, helm_home=helm_home, found=found, secrets_ns=secrets_ns)
        ca = (workdir / "certs" / "ca.crt").read_text()
        endpoint = Endpoint(installed=found, url=f"https://127.0.0.1:{port}/v1/credentials", ca_pem=ca)
        env = Env(endpoint=endpoint, installed=found, cluster=kube_cluster, pg_server=pg_server)
        try:
            yield Platform(env=env, namespace=secrets_ns)
        finally:
            assert embedded_pg.SUPERUSER_PASSWORD not in found.operator.all_logs()
            kube_cluster.delete_namespace(secrets_ns)


def _least_privilege(
    cluster: kube.KubeCluster, tools: kube.Tools, *, helm_home: Path, found: Any, secrets_ns: str
) -> None:
    """Re-apply the chart's RBAC as `helm upgrade` with the recommended values would: Secrets
    are read in the platform namespace and the operator's own, nowhere else."""
    release = found.service_account.removesuffix("-dbgov")
    docs = kube.helm_template(
        tools,
        CHART,
        home=helm_home,
        release=release,
        namespace=found.namespace,
        sets=(
            f"webhook.configurationName={found.configuration}",
            f"rbac.platformSecretsNamespace={secrets_ns}",
            "rbac.sameNamespaceDatabaseSecrets=false",
        ),
        show_only=("templates/rbac.yaml",),
    )
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert not [r for r in role["rules"] if "secrets" in r["resources"]], role["rules"]
    assert {(d["kind"], d["metadata"].get("namespace")) for d in docs} >= {
        ("Role", secrets_ns),
        ("RoleBinding", secrets_ns),
    }
    cluster.apply_documents(docs, namespace=found.namespace)


@dataclass(slots=True)
class Trap:
    """A TCP listener on 127.0.0.1 that records every connection made to it."""

    port: int
    accepted: list[tuple[str, int]]


@contextlib.contextmanager
def _trap() -> Iterator[Trap]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    trap = Trap(port=listener.getsockname()[1], accepted=[])
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            trap.accepted.append(peer)
            conn.close()

    thread = threading.Thread(target=serve, name="trap", daemon=True)
    thread.start()
    try:
        yield trap
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def _admin_secret(platform: Platform, *, grant: str, dbname: str, port: int | None = None) -> str:
    """The platform's admin Secret for `dbname` on the test server, granted to `grant`."""
    name = f"admin-{uuid.uuid4().hex[:6]}"
    notes = {
        annotations.SECRET_ALLOWED_NAMESPACES: grant,
        annotations.SECRET_HOST: "127.0.0.1",
        annotations.SECRET_PORT: str(port or platform.env.pg_server.port),
        annotations.SECRET_DBNAME: dbname,
        annotations.SECRET_MIN_SSLMODE: "disable",  # the test server speaks no TLS
    }
    data = {"username": "postgres", "password": embedded_pg.SUPERUSER_PASSWORD}
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name, annotations=notes),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    )
    platform.env.core.create_namespaced_secret(platform.namespace, body)
    return name


def _database(
    platform: Platform, namespace: str, *, secret: str, dbname: str, port: int | None = None
) -> str:
    body = _database_body(platform, secret=secret, dbname=dbname, port=port)
    platform.env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, DATABASES, body)
    return str(body["metadata"]["name"])


def _database_body(
    platform: Platform, *, secret: str, dbname: str, port: int | None = None
) -> dict[str, Any]:
    name = f"db-{uuid.uuid4().hex[:6]}"
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": name},
        "spec": {
            "host": "127.0.0.1",
            "port": port or platform.env.pg_server.port,
            "dbname": dbname,
            "sslmode": "disable",
            "adminSecretRef": {"name": secret, "namespace": platform.namespace},
        },
    }


def _refused_at_apply(call: Any, reason: str) -> str:
    """The validating webhook's refusal of ``call`` (a create or patch of a Database)."""
    with pytest.raises(ApiException) as caught:
        call()
    message = str(caught.value.body)
    assert caught.value.status == 403 and f"({reason})" in message, message
    assert embedded_pg.SUPERUSER_PASSWORD not in message
    return message


def _stored_unvalidated(platform: Platform, namespace: str, body: dict[str, Any]) -> str:
    """Store a Database past the validating webhook, as one that predates it (stored by an
    older release): its configuration deleted, the Database created, the operator restarted
    (which publishes the configuration again)."""
    installed = platform.env.installed

    def stored() -> bool:
        # The apiserver notices a deleted configuration a moment later, and the operator may
        # write it back meanwhile: delete and create at once, again until the create slips through.
        with contextlib.suppress(ApiException):
            installed.admission.delete_validating_webhook_configuration(installed.configuration)
        try:
            platform.env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, DATABASES, body)
        except ApiException as err:
            if err.status != 403:
                raise
            return False
        return True

    try:
        wait_for("the Database stored while validation was off", stored)
    finally:
        installed.operator.stop()
        _start(installed)
    return str(body["metadata"]["name"])


def _ready(platform: Platform, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body = platform.env.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, DATABASES, name)
        found = [c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
        return found[0] if found and found[0]["reason"] == reason else None

    ready: dict[str, Any] = wait_for(f"Database {namespace}/{name} Ready reason {reason}", probe)
    assert embedded_pg.SUPERUSER_PASSWORD not in ready["message"]
    return ready


def _annotate(platform: Platform, secret: str, **notes: str) -> None:
    body = {"metadata": {"annotations": notes}}
    platform.env.core.patch_namespaced_secret(secret, platform.namespace, body)


@contextlib.contextmanager
def _scene(platform: Platform, namespace: str, dbname: str, database: str) -> Iterator[Scene]:
    policy = _policy(platform.env, namespace, name="orders-read", database=database)
    found = Scene(namespace=namespace, dbname=dbname, database=database, policy=policy)
    try:
        yield found
    finally:
        _drop_roles(platform.env, found)


def test_a_granted_platform_secret_mints_for_the_granted_namespace(
    platform: Platform, namespace: str
) -> None:
    env = platform.env
    with pg.scratch_database(env.pg_server, "plat", SCHEMA) as dbname:
        secret = _admin_secret(platform, grant=f"other, {namespace}", dbname=dbname)
        database = _database(platform, namespace, secret=secret, dbname=dbname)
        ready = _ready(platform, namespace, database, "Connected")
        assert ready["status"] == "True"
        with _scene(platform, namespace, dbname, database) as scene:
            uid = _pod(env, namespace, "orders-1")
            cred = _issue(env, bound_token(env.cluster, namespace, pod="orders-1", uid=uid))
            assert (cred["database"], cred["dbname"], cred["port"]) == (database, dbname, env.pg_server.port)
            assert cred["user"].startswith("dbgov_w_")
            with _login(env, scene, cred) as conn:
                assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
            assert cred["password"] not in env.installed.operator.all_logs()
    assert embedded_pg.SUPERUSER_PASSWORD not in env.installed.operator.all_logs()


def test_the_workload_namespace_keeps_no_secret_the_operator_reads(
    platform: Platform, namespace: str
) -> None:
    """Least privilege: with the recommended values a same-namespace Secret is not read at all."""
    env = platform.env
    env.core.create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="local-admin"), string_data={"username": "x"}),
    )
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": "local"},
        "spec": {
            "host": "127.0.0.1",
            "port": env.pg_server.port,
            "dbname": "postgres",
            "sslmode": "disable",
            "adminSecretRef": {"name": "local-admin"},
        },
    }
    # Not readable at admission either: admitted with a warning, the controller reports it.
    _, status, headers = env.custom.create_namespaced_custom_object_with_http_info(
        GROUP, VERSION, namespace, DATABASES, body
    )
    assert status == 201
    warning = str(headers.get("Warning") or "")
    assert f"may not read the Secret {namespace}/local-admin" in warning, headers
    ready = _ready(platform, namespace, "local", "SecretNotReadable")
    assert f"{namespace}/local-admin" in ready["message"] and "rbac." in ready["message"]


def test_a_secret_not_granted_to_the_namespace_is_refused_until_the_platform_grants_it(
    platform: Platform, namespace: str
) -> None:
    env = platform.env
    with pg.scratch_database(env.pg_server, "plat", SCHEMA) as dbname:
        secret = _admin_secret(platform, grant="someone-else", dbname=dbname)
        body = _database_body(platform, secret=secret, dbname=dbname)

        def create() -> None:
            env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, DATABASES, body)

        # Refused at apply time, with the reason and message the controller would report.
        message = _refused_at_apply(create, "SecretNotGranted")
        assert annotations.SECRET_ALLOWED_NAMESPACES in message and repr(namespace) in message
        assert f"{platform.namespace}/{secret}" in message
        # The platform grants it: admitted, and the check and the first request use it.
        _annotate(platform, secret, **{annotations.SECRET_ALLOWED_NAMESPACES: namespace})
        create()
        database = str(body["metadata"]["name"])
        _ready(platform, namespace, database, "Connected")
        with _scene(platform, namespace, dbname, database):
            uid = _pod(env, namespace, "orders-2")
            token = bound_token(env.cluster, namespace, pod="orders-2", uid=uid)
            assert _issue(env, token)["user"].startswith("dbgov_w_")
            # ... and takes the grant back: checked again at use, not remembered.
            _annotate(platform, secret, **{annotations.SECRET_ALLOWED_NAMESPACES: "someone-else"})
            assert _refused(env, token) == (409, "database_not_ready")
            ready = _ready(platform, namespace, database, "SecretNotGranted")
            assert ready["status"] == "False" and annotations.SECRET_ALLOWED_NAMESPACES in ready["message"]


def test_a_database_pointed_at_another_server_is_refused_and_never_connected(
    platform: Platform, namespace: str
) -> None:
    env = platform.env
    with pg.scratch_database(env.pg_server, "plat", SCHEMA) as dbname, _trap() as trap:
        secret = _admin_secret(platform, grant=namespace, dbname=dbname)
        # A Database created against the trap is refused at apply time...
        direct = _database_body(platform, secret=secret, dbname=dbname, port=trap.port)
        message = _refused_at_apply(
            lambda: env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, DATABASES, direct),
            "TargetMismatch",
        )
        assert "spec.port" in message and str(trap.port) in message
        # ... and so is moving one that is Ready there: it keeps pointing at its server.
        moved = _database(platform, namespace, secret=secret, dbname=dbname)
        _ready(platform, namespace, moved, "Connected")
        with _scene(platform, namespace, dbname, moved):
            uid = _pod(env, namespace, "orders-3")
            token = bound_token(env.cluster, namespace, pod="orders-3", uid=uid)
            assert _issue(env, token)["port"] == env.pg_server.port
            patch = {"spec": {"port": trap.port}}
            _refused_at_apply(
                lambda: env.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, DATABASES, moved, patch
                ),
                "TargetMismatch",
            )
            kept = env.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, DATABASES, moved)
            assert kept["spec"]["port"] == env.pg_server.port
            assert _issue(env, token)["port"] == env.pg_server.port
        # Stored anyway (it predates the webhook): the controller refuses it and never connects.
        stored = _stored_unvalidated(platform, namespace, direct)
        ready = _ready(platform, namespace, stored, "TargetMismatch")
        assert "spec.port" in ready["message"] and str(trap.port) in ready["message"]
        # The reaper uses the Database every 2 s: let it try twice (refused both times).
        failed = f"Reaping Database {namespace}/{stored} failed"
        wait_for("two refused reaps", lambda: env.installed.operator.all_logs().count(failed) >= 2)
        assert trap.accepted == []


def test_another_team_cannot_use_a_grant_made_to_one(
    platform: Platform, namespace: str, kube_cluster: kube.KubeCluster
) -> None:
    env = platform.env
    team_b = kube_cluster.create_namespace("team-b")
    try:
        with pg.scratch_database(env.pg_server, "plat", SCHEMA) as dbname:
            secret = _admin_secret(platform, grant=namespace, dbname=dbname)
            body = _database_body(platform, secret=secret, dbname=dbname)
            message = _refused_at_apply(
                lambda: env.custom.create_namespaced_custom_object(GROUP, VERSION, team_b, DATABASES, body),
                "SecretNotGranted",
            )
            assert repr(team_b) in message and f"{platform.namespace}/{secret}" in message
            # Stored anyway (it predates the webhook): refused by the controller, and at use.
            theirs = _stored_unvalidated(platform, team_b, body)
            ready = _ready(platform, team_b, theirs, "SecretNotGranted")
            assert repr(team_b) in ready["message"] and f"{platform.namespace}/{secret}" in ready["message"]
            with _scene(platform, team_b, dbname, theirs):
                uid = _pod(env, team_b, "thief-1")
                token = bound_token(env.cluster, team_b, pod="thief-1", uid=uid)
                assert _refused(env, token) == (409, "database_not_ready")
            # The team it is granted to still uses it.
            _ready(
                platform, namespace, _database(platform, namespace, secret=secret, dbname=dbname), "Connected"
            )
    finally:
        kube_cluster.delete_namespace(team_b)
