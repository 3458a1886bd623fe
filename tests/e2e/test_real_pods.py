"""Real pods on a real node: what only a kubelet can prove about the injected sidecar.

The kubelet-less operator tests check the pod the webhook writes; these run it. A node
(node.py: containerd + kubelet) registered to this session's apiserver runs enrolled pods whose
sidecar is the image Dockerfile.sidecar builds (images.py, no registry) and whose app is psql.
The operator runs as a process under the chart's RBAC (test_operator.deployed); the test
PostgreSQL stays on 127.0.0.1 and pods reach it through a relay on the node bridge's address,
the upstream the app names. The operator's webhook and credential endpoint listen on that
address too, so the apiserver and the sidecars reach the same process.
"""

from __future__ import annotations

import base64
import datetime
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import pg

from . import images, kube, node
from .operator_proc import Installed, create_policy, policy, wait_for, wait_ready
from .test_operator import deployed

ACCOUNT = "orders"
SIDECAR = "dbgov-proxy"
POD_TIMEOUT_S = 90.0
FIRST_EMAIL = "SELECT email FROM shop.customers WHERE id = 1"


@pytest.fixture(scope="module")
def pg_relay(pg_server: pg.PgServer, e2e_node: node.Node) -> Iterator[node.Relay]:
    """The test PostgreSQL, reachable from pods at the bridge's address (it listens on loopback)."""
    relay = node.Relay.start(target=(pg_server.host, pg_server.port))
    try:
        yield relay
    finally:
        relay.close()


@pytest.fixture(scope="module")
def operator(
    *,
    e2e_node: node.Node,
    pod_images: dict[str, images.Image],
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    """The operator, injecting the built sidecar image; webhook and credential endpoint on the
    bridge's address (the apiserver and the pods both reach it there)."""
    env = {
        "DBGOV_SIDECAR_IMAGE": pod_images["sidecar"].ref,
        "DBGOV_WEBHOOK_LISTEN_ADDR": node.GATEWAY,
        "DBGOV_WEBHOOK_URL_HOST": node.GATEWAY,
        "DBGOV_CREDENTIAL_LISTEN_ADDR": node.GATEWAY,
    }
    workdir = tmp_path_factory.mktemp("operator")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=env) as found:
        yield found


@pytest.fixture
def governed(operator: Installed, namespace: str, pg_relay: node.Relay) -> str:
    """A namespace with the app's ServiceAccount (no controller creates it here), the Database
    its policy names (the test PostgreSQL, through the relay; the operator mints the sidecar's
    login there) and a policy: selects on shop.customers allowed, email masked, all else blocked."""
    operator.core.create_namespaced_service_account(namespace, {"metadata": {"name": ACCOUNT}})
    admin = {"username": "postgres", "password": pg.SUPERUSER_PASSWORD}
    operator.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "orders-db-admin"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in admin.items()},
        },
    )
    database = {
        "apiVersion": "dbgov.io/v1alpha1",
        "kind": "Database",
        "metadata": {"name": "orders-db"},
        "spec": {
            "host": node.GATEWAY,
            "port": pg_relay.port,
            "dbname": "shop",
            "sslmode": "disable",
            "adminSecretRef": {"name": "orders-db-admin"},
        },
    }
    operator.custom.create_namespaced_custom_object("dbgov.io", "v1alpha1", namespace, "databases", database)
    body = policy(
        "orders-read",
        rules=[{"name": "read", "verdict": "allow", "statements": ["select"], "tables": ["shop.customers"]}],
        masks=[{"table": "shop.customers", "column": "email", "strategy": "email"}],
    )
    create_policy(operator, namespace, body)
    wait_ready(operator, namespace, "orders-read")
    return namespace


def app_pod(name: str, *, script: str, app: images.Image, relay: node.Relay) -> dict[str, Any]:
    """An enrolled pod on the node whose app runs ``script`` (sh -c) with psql pointed at the
    database as an app would be: PGHOST/PGPORT name the upstream; the webhook repoints them."""
    env = {
        "PGHOST": node.GATEWAY,
        "PGPORT": str(relay.port),
        "PGUSER": "app",
        "PGPASSWORD": pg.APP_PASSWORD,
        "PGDATABASE": "shop",
        "PGCONNECT_TIMEOUT": "3",
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"dbgov.io/inject": "true"}},
        "spec": {
            "nodeName": node.NODE_NAME,
            "serviceAccountName": ACCOUNT,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "app",
                    "image": app.ref,
                    "imagePullPolicy": "Never",
                    "args": [script],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                }
            ],
        },
    }


def finished(core: client.CoreV1Api, namespace: str, name: str, e2e_node: node.Node) -> client.V1Pod:
    def done() -> client.V1Pod | None:
        found = core.read_namespaced_pod(name, namespace)
        return found if found.status.phase in ("Succeeded", "Failed") else None

    try:
        return wait_for(f"pod {namespace}/{name} to finish", done, timeout=POD_TIMEOUT_S)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{explain(core, namespace, name, e2e_node)}") from None


def logs(core: client.CoreV1Api, namespace: str, name: str, container: str) -> str:
    text: str = core.read_namespaced_pod_log(name, namespace, container=container)
    return text


def explain(core: client.CoreV1Api, namespace: str, name: str, e2e_node: node.Node) -> str:
    """What to look at when a pod did not do what a test expected."""
    parts = []
    for container in ("app", SIDECAR):
        try:
            parts.append(f"--- {container} log:\n{logs(core, namespace, name, container)}")
        except ApiException as err:
            parts.append(f"--- {container} log unavailable: {err.reason}")
    events = core.list_namespaced_event(namespace).items
    parts.append("--- events:\n" + "\n".join(f"{e.reason}: {e.message}" for e in events))
    parts.append("--- kubelet:\n" + node.tail(e2e_node.workdir / "kubelet.log", 20))
    return "\n".join(parts)


def test_enrolled_pods_app_reaches_postgres_only_through_its_sidecar(
    *,
    operator: Installed,
    governed: str,
    e2e_node: node.Node,
    pod_images: dict[str, images.Image],
    pg_relay: node.Relay,
    pg_server: pg.PgServer,
) -> None:
    real = pg_server.psql(FIRST_EMAIL, user="app", dbname="shop").strip()
    script = f'echo "host=$PGHOST:$PGPORT"; psql -XAt -c "{FIRST_EMAIL}"; psql -XAt -c "DROP TABLE shop.orders"; echo "drop=$?"'
    operator.core.create_namespaced_pod(
        governed, app_pod("app", script=script, app=pod_images["app"], relay=pg_relay)
    )
    done = finished(operator.core, governed, "app", e2e_node)
    why = explain(operator.core, governed, "app", e2e_node)
    assert done.status.phase == "Succeeded", why
    out = logs(operator.core, governed, "app", "app").splitlines()
    # the webhook repointed the app at its in-pod proxy; the proxy holds the real upstream
    assert out[0] == "host=127.0.0.1:5432", why
    masked = "*" * real.index("@") + real[real.index("@") :]
    assert real != masked
    assert out[1] == masked, why
    assert out[-1] == "drop=1", why
    assert pg_server.psql("SELECT count(*) FROM shop.orders", user="app", dbname="shop").strip() != "0"
    audit = logs(operator.core, governed, "app", SIDECAR)
    assert FIRST_EMAIL in audit, why
    assert "DROP TABLE shop.orders" in audit, why
    (sidecar,) = done.spec.init_containers
    assert sidecar.image == pod_images["sidecar"].ref


def _started(status: client.V1ContainerStatus) -> datetime.datetime:
    state = status.state
    when = (state.running or state.terminated).started_at
    assert isinstance(when, datetime.datetime)
    return when


def test_startup_probe_holds_the_app_until_the_proxy_is_ready(
    operator: Installed,
    governed: str,
    e2e_node: node.Node,
    pod_images: dict[str, images.Image],
    pg_relay: node.Relay,
) -> None:
    # One attempt, no retry: it succeeds only if the proxy already listens and has its policy.
    script = 'date +%s.%N; psql -XAt -c "SELECT 1"'
    operator.core.create_namespaced_pod(
        governed, app_pod("first", script=script, app=pod_images["app"], relay=pg_relay)
    )
    done = finished(operator.core, governed, "first", e2e_node)
    why = explain(operator.core, governed, "first", e2e_node)
    assert done.status.phase == "Succeeded", why
    first_statement = float(logs(operator.core, governed, "first", "app").splitlines()[0])
    (proxy,) = done.status.init_container_statuses
    (app,) = done.status.container_statuses
    assert _started(proxy) <= _started(app)
    sidecar_log = logs(operator.core, governed, "first", SIDECAR)
    assert "SELECT 1" in sidecar_log, why
    assert first_statement > 0


def test_policy_change_reaches_the_running_sidecar(
    operator: Installed,
    governed: str,
    e2e_node: node.Node,
    pod_images: dict[str, images.Image],
    pg_relay: node.Relay,
) -> None:
    # The app asks for shop.orders every half second; the policy allows only shop.customers.
    script = (
        "for i in $(seq 1 240); do "
        'if n=$(psql -XAt -c "SELECT count(*) FROM shop.orders" 2>/dev/null); then echo "orders=$n"; exit 0; fi; '
        "echo refused; sleep 0.5; done; exit 1"
    )
    operator.core.create_namespaced_pod(
        governed, app_pod("poller", script=script, app=pod_images["app"], relay=pg_relay)
    )

    def refused_once() -> bool:
        try:
            return "refused" in logs(operator.core, governed, "poller", "app")
        except ApiException:
            return False

    wait_for("the app to be refused shop.orders", refused_once, timeout=POD_TIMEOUT_S)
    began = time.monotonic()
    rules = [
        {
            "name": "read",
            "verdict": "allow",
            "statements": ["select"],
            "tables": ["shop.customers", "shop.orders"],
        }
    ]
    operator.custom.patch_namespaced_custom_object(
        "dbgov.io", "v1alpha1", governed, "databaseaccesspolicies", "orders-read", {"spec": {"rules": rules}}
    )
    done = finished(operator.core, governed, "poller", e2e_node)
    why = explain(operator.core, governed, "poller", e2e_node)
    assert done.status.phase == "Succeeded", why
    out = logs(operator.core, governed, "poller", "app").splitlines()
    assert out[-1] == "orders=200", why
    assert "reloaded" in logs(operator.core, governed, "poller", SIDECAR), why
    # the same container all along: the sidecar reloaded, nothing restarted
    (proxy,) = done.status.init_container_statuses
    assert proxy.restart_count == 0
    print(f"policy change reached the running sidecar in {time.monotonic() - began:.1f}s")


def test_node_timings_are_reported(e2e_node: node.Node) -> None:
    """Not a proof: prints the node's start and import times for the CI budget (issue 12)."""
    assert e2e_node.timings["ready"] < node.START_TIMEOUT_S * 2
    print({k: round(v, 1) for k, v in e2e_node.timings.items()})
