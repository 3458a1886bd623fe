"""The Database controller against a real kube-apiserver and a real PostgreSQL (issue 11).

The operator runs as a process under the chart's RBAC; it reads the admin Secret a Database
names, connects to the test's PostgreSQL and reports whether it can mint credentials there:
Ready with a reason that says what is wrong and what to do.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

import pg
from dbgov_sidecar import embedded_pg

from . import kube
from .operator_proc import GROUP, VERSION, Installed, wait_for
from .test_operator import deployed

PLURAL = "databases"


@pytest.fixture(scope="module")
def operator_env(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("databases")
    env = {"DBGOV_DATABASE_CHECK_SECONDS": "2"}
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=env) as found:
        yield found


def _secret(env: Installed, namespace: str, name: str, **data: str) -> None:
    body = client.V1Secret(
        metadata=client.V1ObjectMeta(name=name),
        data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    )
    env.core.create_namespaced_secret(namespace, body)


def _database(env: Installed, namespace: str, *, port: int, secret: str, dbname: str = "shop") -> str:
    name = f"db-{uuid.uuid4().hex[:6]}"
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": name},
        "spec": {
            "host": "127.0.0.1",
            "port": port,
            "dbname": dbname,
            "sslmode": "disable",
            "adminSecretRef": {"name": secret},
        },
    }
    env.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    return name


def _ready(env: Installed, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        body: dict[str, Any] = env.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        ready = [c for c in (body.get("status") or {}).get("conditions") or [] if c["type"] == "Ready"]
        return body if ready and ready[0]["reason"] == reason else None

    return wait_for(f"Database {name} Ready reason {reason}", probe)


def _condition(body: dict[str, Any]) -> dict[str, Any]:
    (ready,) = [c for c in body["status"]["conditions"] if c["type"] == "Ready"]
    return ready


def test_a_reachable_database_with_a_privileged_admin_is_ready(
    operator_env: Installed, namespace: str, pg_server: pg.PgServer
) -> None:
    _secret(operator_env, namespace, "admin", username="postgres", password=embedded_pg.SUPERUSER_PASSWORD)
    name = _database(operator_env, namespace, port=pg_server.port, secret="admin")
    body = _ready(operator_env, namespace, name, "Connected")
    ready = _condition(body)
    assert ready["status"] == "True" and ready["observedGeneration"] == 1
    assert body["status"]["serverVersion"].startswith("16")


def test_problems_name_their_cause_and_clear_when_fixed(
    operator_env: Installed, namespace: str, pg_server: pg.PgServer
) -> None:
    name = _database(operator_env, namespace, port=pg_server.port, secret="later")
    ready = _condition(_ready(operator_env, namespace, name, "AdminSecretMissing"))
    assert ready["status"] == "False" and "'later'" in ready["message"]
    # The periodic check sees the Secret appear without any change to the Database.
    _secret(operator_env, namespace, "later", username="postgres", password="wrong")
    ready = _condition(_ready(operator_env, namespace, name, "AuthenticationFailed"))
    assert "password" in ready["message"] and "wrong" not in ready["message"]
    secret = client.V1Secret(
        data={"password": base64.b64encode(embedded_pg.SUPERUSER_PASSWORD.encode()).decode()}
    )
    operator_env.core.patch_namespaced_secret("later", namespace, secret)
    assert _condition(_ready(operator_env, namespace, name, "Connected"))["status"] == "True"


def test_an_admin_that_cannot_create_roles_is_not_ready(
    operator_env: Installed, namespace: str, pg_server: pg.PgServer
) -> None:
    _secret(operator_env, namespace, "app", username="app", password=embedded_pg.APP_PASSWORD)
    name = _database(operator_env, namespace, port=pg_server.port, secret="app")
    ready = _condition(_ready(operator_env, namespace, name, "AdminNotPrivileged"))
    assert "CREATEROLE" in ready["message"]


def test_an_unreachable_server_and_a_missing_database_are_named(
    operator_env: Installed, namespace: str, pg_server: pg.PgServer
) -> None:
    _secret(operator_env, namespace, "admin", username="postgres", password=embedded_pg.SUPERUSER_PASSWORD)
    (closed,) = kube.free_ports(1)
    gone = _database(operator_env, namespace, port=closed, secret="admin")
    assert "spec.host" in _condition(_ready(operator_env, namespace, gone, "Unreachable"))["message"]
    missing = _database(operator_env, namespace, port=pg_server.port, secret="admin", dbname="nope")
    assert "spec.dbname" in _condition(_ready(operator_env, namespace, missing, "DatabaseMissing"))["message"]
