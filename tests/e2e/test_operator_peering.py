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

import pytest
from kubernetes import client

from . import kube, operator_proc
from .operator_proc import Installed, Operator, active, reconciled


@dataclass(frozen=True, slots=True, kw_only=True)
class Replicas:
    first: Operator
    second: Operator
    env: Installed
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
    configuration = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"  # the chart's RBAC names it
    # The peering CRD and object come from the chart, as helm would install them, nowhere else.
    docs = kube.helm_template(
        kube_tools,
        operator_proc.CHART,
        home=helm_home,
        release=f"peer-{uuid.uuid4().hex[:6]}",
        namespace=release_ns,
        sets=(
            f"operator.peering={peering}",
            "operator.replicas=2",
            f"webhook.configurationName={configuration}",
        ),
        include_crds=True,
    )
    kube_cluster.apply_documents(docs, namespace=release_ns)
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    token = kube_cluster.service_account_token(
        namespace=release_ns, name=account, audiences=(kube_cluster.server,), expiration_seconds=3600
    )
    kubeconfig = operator_proc.token_kubeconfig(kube_cluster, token=token, path=workdir / "kubeconfig")

    def operator(replica: str) -> Operator:
        (port,) = kube.free_ports(1)
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "POD_ID": replica,
            "DBGOV_NAMESPACE": release_ns,
            "DBGOV_PEERING": peering,
            **operator_proc.loopback_webhook_env(
                port=port, cert_dir=workdir / replica / "certs", configuration=configuration
            ),
        }
        (workdir / replica).mkdir()
        return Operator(env=env, workdir=workdir / replica)

    first, second = operator("replica-a"), operator("replica-b")
    shared = operator_proc.installed(
        kube_cluster,
        operator=first,
        namespace=release_ns,
        service_account=account,
        configuration=configuration,
        token=token,
    )
    try:
        first.start()
        second.start()
        operator_proc.wait_for(
            "both replicas up",
            lambda: set(operator_proc.peers(kube_cluster, peering)) >= {"replica-a", "replica-b"},
        )
        yield Replicas(first=first, second=second, env=shared)
    finally:
        first.stop()
        second.stop()
        operator_proc.delete_webhook_configurations(shared.admission, configuration)
        shared.custom.delete_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
        operator_proc.delete_cluster_scoped(kube_cluster, docs)
        kube_cluster.delete_namespace(release_ns)


def test_one_replica_reconciles_and_the_other_takes_over(replicas: Replicas) -> None:
    env = replicas.env
    first_ns = (
        client.CoreV1Api(env.core.api_client)
        .create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=f"t-{uuid.uuid4().hex[:8]}")))
        .metadata.name
    )
    operator_proc.wait_for("the validating webhook", lambda: operator_proc.validating_served(env))
    both = (replicas.first, replicas.second)
    # Each starts paused; one may run alone for a moment before it sees the other's priority.
    operator_proc.wait_for("one active replica", lambda: sorted(map(active, both)) == [False, True])
    operator_proc.create_policy(env, first_ns, operator_proc.policy("orders-read"))
    operator_proc.wait_ready(env, first_ns, "orders-read")
    workers = [op for op in both if reconciled(op, first_ns)]
    assert len(workers) == 1, "exactly one replica may reconcile"
    (leader,) = workers
    standby = replicas.second if leader is replicas.first else replicas.first
    assert active(leader)
    assert not active(standby)

    leader.stop()
    second_ns = (
        client.CoreV1Api(env.core.api_client)
        .create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=f"t-{uuid.uuid4().hex[:8]}")))
        .metadata.name
    )
    # The webhook configuration may still name the stopped replica's URL (url form in tests;
    # a Service in a cluster): create the policy with the webhook out of the way.
    _point_validation_at(env, standby)
    operator_proc.wait_for("the standby's validating webhook", lambda: operator_proc.validating_served(env))
    operator_proc.create_policy(env, second_ns, operator_proc.policy("orders-read"))
    operator_proc.wait_ready(env, second_ns, "orders-read")
    assert reconciled(standby, second_ns)
    assert active(standby)


def test_replicas_share_one_webhook_certificate(replicas: Replicas) -> None:
    env = replicas.env
    secret = env.core.read_namespaced_secret(operator_proc.CERT_SECRET, env.namespace)
    served = {
        Path(op.env["DBGOV_WEBHOOK_CERT_DIR"], "tls.crt").read_bytes()
        for op in (replicas.first, replicas.second)
    }
    assert served == {base64.b64decode(secret.data["tls.crt"])}


def _point_validation_at(env: Installed, operator: Operator) -> None:
    port = operator.env["DBGOV_WEBHOOK_PORT"]
    config = env.admission.read_validating_webhook_configuration(env.configuration)
    for hook in config.webhooks:
        path = hook.client_config.url.split("/", 3)[3]
        hook.client_config.url = f"https://127.0.0.1:{port}/{path}"
    env.admission.replace_validating_webhook_configuration(env.configuration, config)
