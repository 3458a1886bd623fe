"""Install, upgrade and uninstall leave nothing behind, with real helm against a real apiserver
(issue 12).

The chart's defaults are used (two replicas with kopf peering, a PDB): the operator runs as a
replica of that peering, and an upgrade with a changed value keeps the peering object and what
the operator wrote, while the uninstall removes every object of the release but the CRDs.

There is no kube-controller-manager here (kube.py), so no garbage collector: the webhook
configurations must go with ``helm uninstall`` itself, which they do because the chart creates
them and the operator only fills them in. The ownerReference to the chart's ClusterRole (for a
configuration the operator re-created) is checked as written, not as collected.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import kube, operator_proc
from .operator_proc import CHART, GROUP, PLURAL, VERSION, Operator


def _helm(cluster: kube.KubeCluster, tools: kube.Tools, home: Path, *args: str) -> str:
    return kube.helm(tools, *args, "--kubeconfig", cluster.kubeconfig, home=home).stdout


def _left_behind(cluster: kube.KubeCluster, docs: list[dict[str, Any]], namespace: str) -> list[str]:
    """The release's objects still in the cluster, CRDs aside (helm keeps them on purpose)."""
    dynamic = cluster.dynamic()
    left = []
    for doc in docs:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        where = {"namespace": namespace} if resource.namespaced else {}
        if not _gone(
            lambda resource=resource, where=where, doc=doc: resource.get(
                name=doc["metadata"]["name"], **where
            )
        ):
            left.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return left


def _gone(read: Any) -> bool:
    try:
        read()
    except ApiException as err:
        return bool(err.status == 404)
    return False


@pytest.fixture
def release(kube_cluster: kube.KubeCluster) -> Iterator[tuple[str, str]]:
    namespace = kube_cluster.create_namespace("rel")
    yield f"r{uuid.uuid4().hex[:6]}", namespace
    kube_cluster.delete_namespace(namespace)


def test_crds_applied_first_then_helm_install_works(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    helm_home: Path,
    dbgov_crds: list[str],
    release: tuple[str, str],
) -> None:
    # dbgov_crds applied crds/ as `kubectl apply -f crds/` would: not the release's objects.
    name, namespace = release
    configuration = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"
    common = ("--namespace", namespace, "--set", f"webhook.configurationName={configuration}")
    assert "STATUS: deployed" in _helm(
        kube_cluster, kube_tools, helm_home, "install", name, str(CHART), *common
    )
    ext: Any = client.ApiextensionsV1Api(kube_cluster.api_client())
    for crd in dbgov_crds:  # left to whoever applied them, before and after the uninstall
        annotations = ext.read_custom_resource_definition(crd).metadata.annotations or {}
        assert "meta.helm.sh/release-name" not in annotations
    _helm(kube_cluster, kube_tools, helm_home, "uninstall", name, "--namespace", namespace)
    assert all(ext.read_custom_resource_definition(crd) for crd in dbgov_crds)


@pytest.mark.usefixtures("dbgov_crds")
def test_uninstall_leaves_no_webhook_configuration_and_policies_no_finalizer(  # noqa: PLR0917 -- fixtures
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    helm_home: Path,
    release: tuple[str, str],
    tmp_path: Path,
    namespace: str,
) -> None:
    name, release_ns = release
    configuration = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"
    sets = ("--set", f"webhook.configurationName={configuration}")  # otherwise the defaults
    _helm(kube_cluster, kube_tools, helm_home, "install", name, str(CHART), "--namespace", release_ns, *sets)
    manifest = kube.yaml_documents(
        _helm(kube_cluster, kube_tools, helm_home, "get", "manifest", name, "--namespace", release_ns)
    )
    account = peering = f"{name}-dbgov"  # the peering is named after the release by default
    token = kube_cluster.service_account_token(
        namespace=release_ns, name=account, audiences=(kube_cluster.server,), expiration_seconds=3600
    )
    (port,) = kube.free_ports(1)
    operator = Operator(
        workdir=tmp_path,
        env={
            **os.environ,
            "KUBECONFIG": str(
                operator_proc.token_kubeconfig(kube_cluster, token=token, path=tmp_path / "kc")
            ),
            "DBGOV_NAMESPACE": release_ns,
            **operator_proc.loopback_webhook_env(
                port=port, cert_dir=tmp_path / "certs", configuration=configuration
            ),
            "DBGOV_WEBHOOK_CERT_SECRET": f"{name}-dbgov-webhook-tls",
            "DBGOV_WEBHOOK_OWNER_CLUSTERROLE": account,
            # as the chart's Deployment sets them: a replica of the default peering
            "DBGOV_PEERING": peering,
            "POD_ID": f"{name}-dbgov-6b7f9c-x1",
        },
    )
    env = operator_proc.installed(
        kube_cluster,
        operator=operator,
        namespace=release_ns,
        service_account=account,
        configuration=configuration,
        token=token,
    )
    rbac: Any = client.RbacAuthorizationV1Api(kube_cluster.api_client())
    operator.start()
    try:
        operator_proc.wait_for(
            "the operator to fill in the chart's configurations", lambda: operator_proc.validating_served(env)
        )
        role_uid = rbac.read_cluster_role(account).metadata.uid
        configs: tuple[Any, ...] = (
            env.admission.read_mutating_webhook_configuration(configuration),
            env.admission.read_validating_webhook_configuration(configuration),
        )
        for config in configs:
            assert config.metadata.labels["app.kubernetes.io/managed-by"] in ("Helm", "dbgov")
            owners = [(o.kind, o.name, o.uid) for o in config.metadata.owner_references or []]
            assert ("ClusterRole", account, role_uid) in owners
        operator_proc.create_policy(env, namespace, operator_proc.policy("orders-read"))
        ready = operator_proc.wait_ready(env, namespace, "orders-read")
        assert not ready["metadata"].get("finalizers")
        peering_uid = env.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)[
            "metadata"
        ]["uid"]
        # An upgrade with a changed value keeps what the operator wrote into the configurations
        # (helm's three-way merge), the peering object and its keep-alives.
        upgrade = (*sets, "--set", "operator.logLevel=DEBUG")
        _helm(
            kube_cluster,
            kube_tools,
            helm_home,
            "upgrade",
            name,
            str(CHART),
            "--namespace",
            release_ns,
            *upgrade,
        )
        assert operator_proc.validating_served(env)
        kept = env.custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", peering)
        assert kept["metadata"]["uid"] == peering_uid
        assert operator.env["POD_ID"] in (kept.get("status") or {})
        assert not operator_proc.get_policy(env, namespace, "orders-read")["metadata"].get("finalizers")
        _helm(kube_cluster, kube_tools, helm_home, "uninstall", name, "--namespace", release_ns)
        left = [
            kind
            for kind, read in (
                ("mutating", env.admission.read_mutating_webhook_configuration),
                ("validating", env.admission.read_validating_webhook_configuration),
            )
            if not _gone(lambda read=read: read(configuration))
        ]
    finally:
        operator.stop()
        operator_proc.delete_webhook_configurations(env.admission, configuration)  # only on failure
    # helm deleted them with the release, before the operator stopped.
    assert left == []
    assert _left_behind(kube_cluster, manifest, release_ns) == []
    assert {d["kind"] for d in manifest} >= {"ClusterKopfPeering", "PodDisruptionBudget", "Deployment"}
    assert "Reconfiguring the validating webhook" in operator.log_text()
    assert _gone(lambda: rbac.read_cluster_role(account))
    # Without an operator, a policy deletes at once: no finalizer waits for one.
    env.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders-read")
    assert _gone(
        lambda: env.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders-read")
    )
