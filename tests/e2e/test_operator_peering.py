"""Two operator replicas with kopf peering: exactly one reconciles, the other takes over.

Both run as the chart's ServiceAccount with the RBAC the chart renders for ``operator.peering``,
share the webhook certificate through one Secret, and agree through a ClusterKopfPeering.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import kube
from . import test_operator as base

PEERING_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
    "spec": {
        "scope": "Cluster",
        "group": "kopf.dev",
        "names": {
            "kind": "ClusterKopfPeering",
            "plural": "clusterkopfpeerings",
            "singular": "clusterkopfpeering",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            }
                        },
                    }
                },
            }
        ],
    },
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Replicas:
    first: base.Operator
    second: base.Operator
    env: base.Installed
    """Shared API handles (the ``operator`` field is the first replica)."""


@pytest.fixture(scope="module")
def replicas(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("peering")
    release_ns = kube_cluster.create_namespace("dbgov")
    peering = f"dbgov-{uuid.uuid4().hex[:6]}"
    rendered = kube.helm(
        kube_tools,
        "template",
        f"peer-{uuid.uuid4().hex[:6]}",
        base.CHART,
        "--namespace",
        release_ns,
        "--set",
        f"operator.peering={peering}",
        "--set",
        "operator.replicas=2",
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
        home=helm_home,
    )
    docs = kube.yaml_documents(rendered.stdout)
    for doc in docs:
        kube_cluster.apply_manifest(doc, namespace=release_ns)
    kube_cluster.install_crds([PEERING_CRD])
    kube_cluster.apply_manifest(
        {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": peering}}
    )
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    token = kube_cluster.service_account_token(
        namespace=release_ns, name=account, audiences=(kube_cluster.server,), expiration_seconds=3600
    )
    kubeconfig = base._token_kubeconfig(kube_cluster, token=token, path=workdir / "kubeconfig")
    configuration = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"

    def operator(replica: str) -> base.Operator:
        (port,) = kube.free_ports(1)
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "POD_ID": replica,
            "DBGOV_NAMESPACE": release_ns,
            "DBGOV_PEERING": peering,
            "DBGOV_WEBHOOK_LISTEN_ADDR": "127.0.0.1",
            "DBGOV_WEBHOOK_PORT": str(port),
            "DBGOV_WEBHOOK_CERT_DIR": str(workdir / replica / "certs"),
            "DBGOV_WEBHOOK_CERT_SECRET": base.CERT_SECRET,
            "DBGOV_WEBHOOK_CONFIGURATION": configuration,
        }
        (workdir / replica).mkdir()
        return base.Operator(env=env, workdir=workdir / replica)

    first, second = operator("replica-a"), operator("replica-b")
    api = kube_cluster.api_client()
    shared = base.Installed(
        operator=first,
        namespace=release_ns,
        service_account=account,
        configuration=configuration,
        token=token,
        core=client.CoreV1Api(api),
        custom=client.CustomObjectsApi(api),
        admission=client.AdmissionregistrationV1Api(api),
    )
    try:
        first.start()
        second.start()
        base.wait_for("both replicas up", lambda: _peers(kube_cluster, peering) >= {"replica-a", "replica-b"})
        yield Replicas(first=first, second=second, env=shared)
    finally:
        first.stop()
        second.stop()
        for delete in (
            shared.admission.delete_mutating_webhook_configuration,
            shared.admission.delete_validating_webhook_configuration,
        ):
            try:
                delete(configuration)
            except ApiException as err:
                if err.status != 404:
                    raise
        kube_cluster.delete_namespace(release_ns)


def _peers(cluster: kube.KubeCluster, peering: str) -> set[str]:
    body = client.CustomObjectsApi(cluster.api_client()).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", peering
    )
    return set((body.get("status") or {}).keys())


def _active(operator: base.Operator) -> bool:
    """Whether kopf peering last let this replica handle resources (it starts paused)."""
    states = [
        "Resuming" in line
        for line in operator.log_text().splitlines()
        if "kopf._core.engines.peering" in line and ("Resuming" in line or "Pausing" in line)
    ]
    return bool(states) and states[-1]


def _reconciled(operator: base.Operator, namespace: str) -> bool:
    return f"Reconciled {namespace}" in operator.log_text()


def test_one_replica_reconciles_and_the_other_takes_over(replicas: Replicas) -> None:
    env = replicas.env
    first_ns = (
        client.CoreV1Api(env.core.api_client)
        .create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=f"t-{uuid.uuid4().hex[:8]}")))
        .metadata.name
    )
    base.wait_for(
        "the validating webhook",
        lambda: _served(env),
    )
    both = (replicas.first, replicas.second)
    # Each starts paused; one may run alone for a moment before it sees the other's priority.
    base.wait_for("one active replica", lambda: sorted(map(_active, both)) == [False, True])
    base.create_policy(env, first_ns, base.policy("orders-read"))
    base.wait_ready(env, first_ns, "orders-read")
    active = [op for op in both if _reconciled(op, first_ns)]
    assert len(active) == 1, "exactly one replica may reconcile"
    (leader,) = active
    standby = replicas.second if leader is replicas.first else replicas.first
    assert _active(leader)
    assert not _active(standby)

    leader.stop()
    second_ns = (
        client.CoreV1Api(env.core.api_client)
        .create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=f"t-{uuid.uuid4().hex[:8]}")))
        .metadata.name
    )
    # The webhook configuration may still name the stopped replica's URL (url form in tests;
    # a Service in a cluster): create the policy with the webhook out of the way.
    _point_validation_at(env, standby)
    base.create_policy(env, second_ns, base.policy("orders-read"))
    base.wait_ready(env, second_ns, "orders-read")
    assert _reconciled(standby, second_ns)
    assert _active(standby)


def test_replicas_share_one_webhook_certificate(replicas: Replicas) -> None:
    env = replicas.env
    secret = env.core.read_namespaced_secret(base.CERT_SECRET, env.namespace)
    served = {
        Path(op.env["DBGOV_WEBHOOK_CERT_DIR"], "tls.crt").read_bytes()
        for op in (replicas.first, replicas.second)
    }
    assert served == {base64.b64decode(secret.data["tls.crt"])}


def _served(env: base.Installed) -> bool:
    try:
        hooks = env.admission.read_validating_webhook_configuration(env.configuration).webhooks
    except ApiException:
        return False
    return bool(hooks) and all(h.client_config.ca_bundle for h in hooks)


def _point_validation_at(env: base.Installed, operator: base.Operator) -> None:
    port = operator.env["DBGOV_WEBHOOK_PORT"]
    config = env.admission.read_validating_webhook_configuration(env.configuration)
    for hook in config.webhooks:
        path = hook.client_config.url.split("/", 3)[3]
        hook.client_config.url = f"https://127.0.0.1:{port}/{path}"
    env.admission.replace_validating_webhook_configuration(env.configuration, config)
