"""Owners and garbage collection, proven with a real kube-controller-manager (issue 12).

The rest of the e2e suite runs no controller-manager, so an ownerReference there is only
"written"; here the garbage collector and the namespace controller act on them. Every
ownerReference the operator writes is covered: a bundle ConfigMap (its signatures are keys in the
same ConfigMap) is owned by its ServiceAccount, and the two webhook configurations by the chart's
ClusterRole. Each test fails if that reference were missing (nothing would be collected) or named
a wrong uid (the collector deletes such a dependent at once, which the first test shows).

The controller-manager runs for this module only, against this worker's apiserver: other modules
keep ownerless and owner-dangling objects on purpose, and deleted namespaces Terminating.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import kube
from .operator_proc import GROUP, PLURAL, VERSION, Installed, create_policy, policy, wait_for, wait_ready
from .test_operator import _start, deployed

COLLECT_SECONDS = 60.0
"""How long the collector may take (it reacts to watch events; seconds here, more under load)."""
STAYS_GONE_SECONDS = 8.0
"""How long a collected bundle must stay gone while the operator reconciles its namespace."""
FINALIZER = "dbgov.io/finalizer"


@pytest.fixture(scope="module")
def installed(
    controller_manager: kube.Process,
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    """The operator under the chart's RBAC (the CRDs come with `controller_manager`), naming the chart's ClusterRole as the owner of its
    webhook configurations as the chart's Deployment does (DBGOV_WEBHOOK_OWNER_CLUSTERROLE)."""
    workdir = tmp_path_factory.mktemp("gc-operator")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, start=False) as found:
        found.operator.env["DBGOV_WEBHOOK_OWNER_CLUSTERROLE"] = _chart_cluster_role(kube_cluster, found)
        _start(found)
        yield found


def _chart_cluster_role(cluster: kube.KubeCluster, env: Installed) -> str:
    """The ClusterRole the chart binds to the operator's ServiceAccount."""
    rbac = client.RbacAuthorizationV1Api(cluster.api_client())
    (name,) = [
        b.role_ref.name
        for b in rbac.list_cluster_role_binding().items
        if b.role_ref.kind == "ClusterRole"
        and any(
            s.kind == "ServiceAccount" and s.name == env.service_account and s.namespace == env.namespace
            for s in b.subjects or []
        )
    ]
    return str(name)


@pytest.fixture
def gc_namespace(kube_cluster: kube.KubeCluster, controller_manager: kube.Process) -> Iterator[str]:
    """A fresh namespace; deleted afterwards (and really gone: the namespace controller runs)."""
    name = kube_cluster.create_namespace("gc")
    try:
        yield name
    finally:
        kube_cluster.delete_namespace(name)


def _bundle(env: Installed, namespace: str, account: str = "orders") -> client.V1ConfigMap | None:
    try:
        return env.core.read_namespaced_config_map(f"dbgov-policy-{account}", namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _owners(meta: Any) -> list[tuple[str, str, str, str]]:
    """(apiVersion, kind, name, uid) of each ownerReference of an object's metadata."""
    return [(o.api_version, o.kind, o.name, o.uid) for o in meta.owner_references or []]


def _signed_bundle(env: Installed, namespace: str) -> client.V1ConfigMap:
    return wait_for(
        "a signed orders bundle",
        lambda: (cm := _bundle(env, namespace)) is not None and "policy.yaml.sig" in (cm.data or {}) and cm,
    )


def _stays_gone(env: Installed, namespace: str) -> None:
    """The bundle is not recreated: the operator does not fight the collector."""
    deadline = time.monotonic() + STAYS_GONE_SECONDS
    while time.monotonic() < deadline:
        found = _bundle(env, namespace)
        assert found is None, (
            f"the operator recreated the collected bundle, owned by {_owners(found.metadata)}"
        )
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------
# the collector itself
# --------------------------------------------------------------------------------------------


def test_the_collector_deletes_dependents_of_a_gone_or_wrong_owner(
    kube_cluster: kube.KubeCluster, controller_manager: kube.Process, gc_namespace: str
) -> None:
    """What the other tests rely on: this worker's apiserver has a working collector, and an
    ownerReference is honoured only with the owner's current uid."""
    argv = " ".join(str(a) for a in controller_manager.popen.args)  # type: ignore[union-attr]
    kubeconfig = next(a.split("=", 1)[1] for a in argv.split() if a.startswith("--kubeconfig="))
    assert kube_cluster.server in Path(kubeconfig).read_text()  # this worker's apiserver, no other
    core = client.CoreV1Api(kube_cluster.api_client())
    owner = core.create_namespaced_config_map(gc_namespace, {"metadata": {"name": "owner"}})

    def dependent(name: str, uid: str) -> None:
        ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
        core.create_namespaced_config_map(
            gc_namespace, {"metadata": {"name": name, "ownerReferences": [ref]}}
        )

    def gone(name: str) -> bool:
        try:
            core.read_namespaced_config_map(name, gc_namespace)
        except ApiException as err:
            return err.status == 404
        return False

    dependent("wrong-uid", str(uuid.uuid4()))
    dependent("right-uid", owner.metadata.uid)
    wait_for("the dependent naming a wrong uid to be collected", lambda: gone("wrong-uid"), COLLECT_SECONDS)
    assert not gone("right-uid")  # its owner is there with that uid
    core.delete_namespaced_config_map("owner", gc_namespace)
    wait_for("the dependent of a deleted owner to be collected", lambda: gone("right-uid"), COLLECT_SECONDS)


# --------------------------------------------------------------------------------------------
# bundles: owned by their ServiceAccount
# --------------------------------------------------------------------------------------------


def test_deleting_a_service_account_collects_its_bundle_and_the_operator_lets_it_go(
    installed: Installed, gc_namespace: str
) -> None:
    account = installed.core.create_namespaced_service_account(gc_namespace, {"metadata": {"name": "orders"}})
    create_policy(installed, gc_namespace, policy("orders-read"))
    wait_ready(installed, gc_namespace, "orders-read")
    found = _signed_bundle(installed, gc_namespace)
    # Exactly one owner, with the ServiceAccount's current uid (a wrong one is collected at once).
    assert _owners(found.metadata) == [("v1", "ServiceAccount", "orders", account.metadata.uid)]
    assert not any(o.block_owner_deletion for o in found.metadata.owner_references)

    installed.core.delete_namespaced_service_account("orders", gc_namespace)
    wait_for(
        "the collector to delete the bundle of the deleted ServiceAccount",
        lambda: _bundle(installed, gc_namespace) is None,
        COLLECT_SECONDS,
    )
    # The policy still names "orders", and the bundle's deletion made the operator reconcile the
    # namespace: it must not put an ownerless bundle back for a ServiceAccount that is gone.
    _stays_gone(installed, gc_namespace)


def test_a_collected_bundle_stays_gone_after_a_policy_edit_and_an_operator_restart(
    installed: Installed, gc_namespace: str
) -> None:
    """Not only at the moment of collection: every later reconcile (a policy edit, a restart's
    resume) writes bundles only for ServiceAccounts that exist, so none comes back ownerless."""
    installed.core.create_namespaced_service_account(gc_namespace, {"metadata": {"name": "orders"}})
    create_policy(installed, gc_namespace, policy("orders-read"))
    wait_ready(installed, gc_namespace, "orders-read")
    _signed_bundle(installed, gc_namespace)
    installed.core.delete_namespaced_service_account("orders", gc_namespace)
    wait_for(
        "the collector to delete the bundle",
        lambda: _bundle(installed, gc_namespace) is None,
        COLLECT_SECONDS,
    )

    # The policy still names orders; editing it reconciles the namespace (observedGeneration 2).
    installed.custom.patch_namespaced_custom_object(
        GROUP, VERSION, gc_namespace, PLURAL, "orders-read", {"spec": {"default": "approve"}}
    )
    edited = wait_ready(installed, gc_namespace, "orders-read")
    assert edited["status"]["observedGeneration"] == 2
    assert edited["status"]["boundWorkloads"] == 0
    _stays_gone(installed, gc_namespace)

    # A restart resumes every policy and reconciles the namespace from a fresh read.
    installed.operator.stop()
    _start(installed)
    wait_for(
        "the restarted operator to reconcile the namespace",
        lambda: f"Reconciled {gc_namespace}" in installed.operator.log_text(),
    )
    _stays_gone(installed, gc_namespace)


def test_a_service_account_recreated_under_its_name_gets_a_bundle_owned_by_its_new_uid(
    installed: Installed, gc_namespace: str
) -> None:
    first = installed.core.create_namespaced_service_account(gc_namespace, {"metadata": {"name": "orders"}})
    create_policy(installed, gc_namespace, policy("orders-read"))
    wait_ready(installed, gc_namespace, "orders-read")
    old = _signed_bundle(installed, gc_namespace)
    assert _owners(old.metadata) == [("v1", "ServiceAccount", "orders", first.metadata.uid)]
    # An application redeployed: its ServiceAccount deleted and created again, a new uid.
    installed.core.delete_namespaced_service_account("orders", gc_namespace)
    second = installed.core.create_namespaced_service_account(gc_namespace, {"metadata": {"name": "orders"}})
    assert second.metadata.uid != first.metadata.uid

    def owned_by_the_new_uid() -> client.V1ConfigMap | None:
        found = _bundle(installed, gc_namespace)
        if found is None or found.metadata.uid == old.metadata.uid:
            return None  # the old bundle (the collector has not deleted it yet) or none yet
        return found

    # A policy change reconciles the namespace (as an enrolled pod of the new account would).
    installed.custom.patch_namespaced_custom_object(
        GROUP, VERSION, gc_namespace, PLURAL, "orders-read", {"spec": {"default": "approve"}}
    )
    new = wait_for("a bundle owned by the recreated ServiceAccount", owned_by_the_new_uid, COLLECT_SECONDS)
    assert _owners(new.metadata) == [("v1", "ServiceAccount", "orders", second.metadata.uid)]
    assert "policy.yaml.sig" in (new.data or {})


# --------------------------------------------------------------------------------------------
# webhook configurations: owned by the chart's ClusterRole
# --------------------------------------------------------------------------------------------


def test_uninstall_collects_the_webhook_configurations_the_operator_wrote(
    kube_cluster: kube.KubeCluster, installed: Installed
) -> None:
    """helm deletes the chart's ClusterRole; the configurations the operator wrote (or re-wrote
    while being uninstalled) go with it, or every labelled pod and policy change would stay
    refused cluster-wide by webhooks nobody serves."""
    rbac = client.RbacAuthorizationV1Api(kube_cluster.api_client())
    name = installed.operator.env["DBGOV_WEBHOOK_OWNER_CLUSTERROLE"]
    role = rbac.read_cluster_role(name)
    expected = [("rbac.authorization.k8s.io/v1", "ClusterRole", name, role.metadata.uid)]
    admission = installed.admission
    reads = (admission.read_mutating_webhook_configuration, admission.read_validating_webhook_configuration)
    for read in reads:
        assert _owners(read(installed.configuration).metadata) == expected

    def collected() -> bool:
        for read in reads:
            try:
                read(installed.configuration)
            except ApiException as err:
                if err.status != 404:
                    raise
            else:
                return False
        return True

    body = kube_cluster.api_client().sanitize_for_serialization(role)
    rbac.delete_cluster_role(name)  # the operator still runs, as while helm uninstalls
    try:
        wait_for(
            "both webhook configurations to be collected with the ClusterRole", collected, COLLECT_SECONDS
        )
    finally:
        # Put the release back for the tests after this one: the same ClusterRole (a new uid),
        # and an operator restarted so it writes configurations owned by that uid.
        installed.operator.stop()
        meta = body["metadata"]
        body["metadata"] = {k: meta[k] for k in ("name", "labels", "annotations") if k in meta}
        restored = rbac.create_cluster_role(body)
        _start(installed)
    renewed = [("rbac.authorization.k8s.io/v1", "ClusterRole", name, restored.metadata.uid)]
    for read in reads:
        assert _owners(read(installed.configuration).metadata) == renewed


# --------------------------------------------------------------------------------------------
# namespaces: deletion completes while the operator runs
# --------------------------------------------------------------------------------------------


def test_deleting_an_enforced_namespace_completes_with_no_finalizer_of_ours_left(
    kube_cluster: kube.KubeCluster, installed: Installed, controller_manager: kube.Process
) -> None:
    core = installed.core
    name = f"gc-enforced-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name, "labels": {"dbgov.io/enforce": "true"}}})
    core.create_namespaced_service_account(name, {"metadata": {"name": "orders"}})
    create_policy(installed, name, policy("orders-read"))
    wait_ready(installed, name, "orders-read")
    _signed_bundle(installed, name)
    # A Database, which the operator checks at once and then on its timers: kopf puts its
    # finalizer on whatever a timer watches, unless told otherwise (kopf_timers).
    database = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": "orders-db"},
        "spec": {"host": "127.0.0.1", "port": 5432, "dbname": "shop", "adminSecretRef": {"name": "none"}},
    }
    installed.custom.create_namespaced_custom_object(GROUP, VERSION, name, "databases", database)
    _handled_without_finalizer(installed, name)
    policy_body = installed.custom.get_namespaced_custom_object(GROUP, VERSION, name, PLURAL, "orders-read")
    assert FINALIZER not in (policy_body["metadata"].get("finalizers") or [])  # policies carry none

    _delete_namespace(installed, name)


def _delete_namespace(env: Installed, name: str) -> None:
    """Delete namespace ``name`` and wait until it is gone (the namespace controller empties it)."""
    env.core.delete_namespace(name)

    def namespace_gone() -> bool:
        try:
            env.core.read_namespace(name)
        except ApiException as err:
            if err.status == 404:
                return True
            raise
        return False

    try:
        wait_for(f"namespace {name} to be deleted", namespace_gone, COLLECT_SECONDS * 2)
    except AssertionError as err:
        raise AssertionError(f"{err}; left in it: {_leftovers(env, name)}") from err


def _handled_without_finalizer(env: Installed, namespace: str) -> None:
    """The operator checked the Database (its Ready condition) and its timers ran over it for a
    while (they tick every second), and it holds no finalizer of ours."""

    def checked() -> bool:
        found = env.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "databases", "orders-db")
        return bool((found.get("status") or {}).get("conditions"))

    wait_for("the operator's check of the Database", checked)
    time.sleep(3.0)
    found = env.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "databases", "orders-db")
    assert FINALIZER not in (found["metadata"].get("finalizers") or []), found["metadata"]


def test_a_namespace_with_a_database_goes_while_the_operator_is_stopped(
    kube_cluster: kube.KubeCluster, installed: Installed, controller_manager: kube.Process
) -> None:
    """Uninstalled (or stopped) first, the operator must not leave a Database that cannot be
    deleted: nothing of ours holds it."""
    core = installed.core
    name = f"gc-stopped-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    database = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": "orders-db"},
        "spec": {"host": "127.0.0.1", "port": 5432, "dbname": "shop", "adminSecretRef": {"name": "none"}},
    }
    installed.custom.create_namespaced_custom_object(GROUP, VERSION, name, "databases", database)
    _handled_without_finalizer(installed, name)
    installed.operator.stop()
    try:
        _delete_namespace(installed, name)
    finally:
        _start(installed)


def _leftovers(env: Installed, namespace: str) -> list[tuple[str, str, list[str]]]:
    """(kind, name, finalizers) of the dbgov objects still in a namespace that will not go."""
    out: list[tuple[str, str, list[str]]] = []
    for plural in (PLURAL, "databases"):
        listed: dict[str, Any] = env.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        for item in listed["items"]:
            out.append((item["kind"], item["metadata"]["name"], item["metadata"].get("finalizers") or []))
    return out
