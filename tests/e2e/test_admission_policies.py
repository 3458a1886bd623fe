"""The chart's ValidatingAdmissionPolicies against a real kube-apiserver: the governed cannot
ungovern through a bundle ConfigMap or a TokenRequest.

The operator runs as a process with the chart's ServiceAccount and RBAC; the policies are the
chart's own template, rendered for that ServiceAccount and applied for this module only (they
are cluster-wide: other modules of the same cluster edit bundles as admin to prove the repair,
so the module removes them and waits until they no longer hold). The namespace user is a
ServiceAccount with edit-like rights on ConfigMaps, pods and ServiceAccount tokens in its
namespace; each refusal is the policy's (its message), never RBAC's, and the control test shows
the same user succeeding once the binding is gone.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from dbgov_operator import identity

from . import images, kube, node
from .operator_proc import GROUP, PLURAL, VERSION, Installed, token_kubeconfig, wait_for
from .test_bundle_integrity import LAX, _bundle, _signed_bundle, _verifies
from .test_operator import CHART, _start, deployed

AUDIENCE = "dbgov"
BUNDLE = "dbgov-policy-orders"
BUNDLE_REFUSAL = "is written only by the dbgov operator"
TOKEN_REFUSAL = "are minted only by the"
EXEC_REFUSAL = "container of pod"
ENFORCED_TIMEOUT = 30.0
"""A policy or binding holds once the apiserver's informer has compiled it (about a second)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policies:
    """The operator and the admission policies rendered for it."""

    installed: Installed
    documents: list[dict[str, Any]]
    credential_url: str
    ca_pem: str

    def bindings(self) -> list[dict[str, Any]]:
        return [d for d in self.documents if d["kind"] == "ValidatingAdmissionPolicyBinding"]


def _status(call: Callable[[], Any]) -> tuple[int, str]:
    """(200, "") when ``call`` succeeds, else the apiserver's status code and message."""
    try:
        call()
    except ApiException as err:
        body = json.loads(err.body or "{}")
        return err.status, str(body.get("message", err.body))
    return 200, ""


def _refused(call: Callable[[], Any], words: str = BUNDLE_REFUSAL) -> str:
    """Assert ``call`` is refused by one of our policies (not by RBAC); return the message."""
    status, message = _status(call)
    assert status == 403, f"expected the admission policy to refuse, got {status} {message}"
    assert words in message, message
    assert "ValidatingAdmissionPolicy" in message, message
    return message


def _probe_bundle(cluster: kube.KubeCluster, namespace: str) -> int:
    """As cluster admin, a dry-run create of a ConfigMap named like a bundle: 403 while the
    bundle policy holds, 200 when it does not (nothing is stored either way)."""
    core = client.CoreV1Api(cluster.api_client())
    body = {"metadata": {"name": f"dbgov-policy-probe-{uuid.uuid4().hex[:6]}"}, "data": {}}
    return _status(lambda: core.create_namespaced_config_map(namespace, body, dry_run="All"))[0]


PROBE_POD = "vap-probe"
"""A pod in the release namespace (which the webhooks never touch) that probe tokens are bound to."""


def _probe_token(cluster: kube.KubeCluster, namespace: str, account: str) -> int:
    """As cluster admin, a dbgov-audience TokenRequest bound to PROBE_POD: 403 while the token
    policy holds."""
    core = client.CoreV1Api(cluster.api_client())
    pod = core.read_namespaced_pod(PROBE_POD, namespace)
    bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=PROBE_POD, uid=pod.metadata.uid)
    spec = client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=600, bound_object_ref=bound)
    request = client.AuthenticationV1TokenRequest(spec=spec)
    return _status(lambda: core.create_namespaced_service_account_token(account, namespace, request))[0]


def _wait_enforced(env: Installed, cluster: kube.KubeCluster, *, enforced: bool) -> None:
    want = 403 if enforced else 200
    state = "hold" if enforced else "stop holding"
    wait_for(
        f"the admission policies to {state}",
        lambda: (
            _probe_bundle(cluster, env.namespace) == want
            and _probe_token(cluster, env.namespace, env.service_account) == want
        ),
        timeout=ENFORCED_TIMEOUT,
    )


def _delete(cluster: kube.KubeCluster, docs: list[dict[str, Any]]) -> None:
    api = client.AdmissionregistrationV1Api(cluster.api_client())
    for doc in docs:
        delete = (
            api.delete_validating_admission_policy_binding
            if doc["kind"] == "ValidatingAdmissionPolicyBinding"
            else api.delete_validating_admission_policy
        )
        with contextlib.suppress(ApiException):
            delete(doc["metadata"]["name"])


@pytest.fixture(scope="module")
def policies(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Policies]:
    workdir = tmp_path_factory.mktemp("admission-operator")
    (port,) = kube.free_ports(1)
    env = {"DBGOV_CREDENTIAL_PORT": str(port)}
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=env) as found:
        docs = kube.helm_template(
            kube_tools,
            CHART,
            home=helm_home,
            release=f"vap-{uuid.uuid4().hex[:6]}",
            namespace=found.namespace,
            sets=(f"serviceAccount.name={found.service_account}",),
            show_only=("templates/admissionpolicies.yaml",),
        )
        assert (
            sorted(d["kind"] for d in docs)
            == ["ValidatingAdmissionPolicy"] * 3 + ["ValidatingAdmissionPolicyBinding"] * 3
        )
        probe = {
            "metadata": {"name": PROBE_POD},
            "spec": {
                "serviceAccountName": found.service_account,
                "containers": [{"name": "probe", "image": "example/probe:1"}],
            },
        }
        found.core.create_namespaced_pod(found.namespace, probe)
        try:
            kube_cluster.apply_documents(docs, namespace=found.namespace)
            _wait_enforced(found, kube_cluster, enforced=True)
            yield Policies(
                installed=found,
                documents=docs,
                credential_url=f"https://127.0.0.1:{port}/v1/credentials",
                ca_pem=(workdir / "certs" / "ca.crt").read_text(),
            )
        finally:
            _delete(kube_cluster, docs)
            _wait_enforced(found, kube_cluster, enforced=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class User:
    """A namespace user: a ServiceAccount that may edit ConfigMaps and pods and request
    ServiceAccount tokens in its namespace (as an app team's deployer can)."""

    name: str
    core: Any


@pytest.fixture
def user(kube_cluster: kube.KubeCluster, namespace: str, tmp_path: Path) -> Iterator[User]:
    rbac = client.RbacAuthorizationV1Api(kube_cluster.api_client())
    kube_cluster.create_service_account(namespace=namespace, name="dev")
    rules = [
        {"apiGroups": [""], "resources": ["configmaps", "pods", "serviceaccounts"], "verbs": ["*"]},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
    ]
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "dev"}, "rules": rules})
    rbac.create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "dev"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dev"},
            "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": namespace}],
        },
    )
    token = kube_cluster.service_account_token(
        namespace=namespace, name="dev", audiences=(kube_cluster.server,), expiration_seconds=3600
    )
    path = token_kubeconfig(kube_cluster, token=token, path=tmp_path / "dev.kubeconfig")
    api = config.new_client_from_config(config_file=str(path))  # type: ignore[no-untyped-call]
    try:
        yield User(name=f"system:serviceaccount:{namespace}:dev", core=client.CoreV1Api(api))
    finally:
        api.close()


def _cert_client(cluster: kube.KubeCluster, *, user: str, groups: list[str], directory: Path) -> Any:
    """An ApiClient authenticated by a client certificate (a node's, here)."""
    name = user.replace(":", "-")
    credentials = cluster.client_certificate(name=name, user=user, groups=groups)
    path = cluster.write_kubeconfig(path=directory / f"{name}.kubeconfig", user=user, credentials=credentials)
    return config.new_client_from_config(config_file=str(path))  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------------------------
# bundles
# --------------------------------------------------------------------------------------------


def test_a_namespace_user_cannot_write_delete_or_fake_a_bundle(
    policies: Policies, kube_cluster: kube.KubeCluster, namespace: str, user: User
) -> None:
    env = policies.installed
    original = _signed_bundle(env, namespace)  # created by the operator under the policy
    patch = {"data": {"policy.yaml": LAX}}
    message = _refused(lambda: user.core.patch_namespaced_config_map(BUNDLE, namespace, patch))
    assert f"{namespace}/{BUNDLE}" in message and user.name in message and "DatabaseAccessPolicy" in message
    assert "may not update" in message
    assert "may not delete" in _refused(lambda: user.core.delete_namespaced_config_map(BUNDLE, namespace))
    unlabel = {
        "metadata": {"labels": {"app.kubernetes.io/managed-by": None, "dbgov.io/service-account": None}}
    }
    _refused(lambda: user.core.patch_namespaced_config_map(BUNDLE, namespace, unlabel))
    # Cluster admins too: the deliberate way around is deleting the binding.
    admin = client.CoreV1Api(kube_cluster.api_client())
    _refused(lambda: admin.patch_namespaced_config_map(BUNDLE, namespace, patch))
    # ConfigMaps that look like a bundle, by name, label or annotation.
    lookalikes = [
        {"metadata": {"name": "dbgov-policy-billing"}, "data": {"policy.yaml": LAX}},
        {"metadata": {"generateName": "dbgov-policy-"}, "data": {"policy.yaml": LAX}},
        {"metadata": {"name": "a1", "labels": {"app.kubernetes.io/managed-by": "dbgov"}}},
        {"metadata": {"name": "a2", "labels": {"dbgov.io/service-account": "orders"}}},
        {"metadata": {"name": "a3", "annotations": {"dbgov.io/policies": "orders-read"}}},
    ]
    for body in lookalikes:
        assert "may not create" in _refused(
            lambda b=body: user.core.create_namespaced_config_map(namespace, b)
        )
    # Any other ConfigMap is the user's to write, but not to turn into a bundle.
    plain = {"metadata": {"name": "app"}}
    assert _status(lambda: user.core.create_namespaced_config_map(namespace, plain)) == (200, "")
    relabel = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "dbgov"}}}
    _refused(lambda: user.core.patch_namespaced_config_map("app", namespace, relabel))
    assert _status(lambda: user.core.patch_namespaced_config_map("app", namespace, {"data": {"k": "v"}})) == (
        200,
        "",
    )
    assert _status(lambda: user.core.delete_namespaced_config_map("app", namespace)) == (200, "")
    found = _bundle(env, namespace)
    assert found is not None and dict(found.data) == original


def test_an_older_signed_bundle_cannot_be_put_back(
    policies: Policies, kube_cluster: kube.KubeCluster, namespace: str, user: User
) -> None:
    env = policies.installed
    older = _signed_bundle(env, namespace)
    # The policy is tightened; the operator rewrites and re-signs the bundle (under the policy).
    env.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "orders-read", {"spec": {"rules": []}}
    )

    def newer() -> dict[str, str] | None:
        found = _bundle(env, namespace)
        data = dict((found.data if found else None) or {})
        return (
            data
            if data.get("policy.yaml") != older["policy.yaml"] and _verifies(env, namespace, data)
            else None
        )

    current = wait_for("the operator to rewrite the bundle", newer)
    # The older bundle verifies (a fresh sidecar would load it): only admission stops the replay.
    assert _verifies(env, namespace, older)
    replay = {"data": older}
    _refused(lambda: user.core.patch_namespaced_config_map(BUNDLE, namespace, replay))
    admin = client.CoreV1Api(kube_cluster.api_client())
    _refused(
        lambda: admin.replace_namespaced_config_map(
            BUNDLE, namespace, {**_body(env, namespace), "data": older}
        )
    )
    found = _bundle(env, namespace)
    assert found is not None and dict(found.data) == current


def _body(env: Installed, namespace: str) -> dict[str, Any]:
    found = env.core.read_namespaced_config_map(BUNDLE, namespace)
    return dict(env.core.api_client.sanitize_for_serialization(found))


def test_without_the_binding_the_user_could_and_the_operator_repairs_under_it(
    policies: Policies, kube_cluster: kube.KubeCluster, namespace: str, user: User
) -> None:
    """The control: the same user's patch goes through once the binding is deleted (so the
    refusals above are the policy's, not RBAC's), and the operator repairs the drift with the
    binding back in place (its own writes are allowed)."""
    env = policies.installed
    original = _signed_bundle(env, namespace)
    env.operator.stop()  # so the drift stays until the binding is back
    try:
        bindings = policies.bindings()
        _delete(kube_cluster, bindings)
        _wait_enforced(env, kube_cluster, enforced=False)
        try:
            patch = {"data": {"policy.yaml": LAX}}
            assert _status(lambda: user.core.patch_namespaced_config_map(BUNDLE, namespace, patch)) == (
                200,
                "",
            )
        finally:
            kube_cluster.apply_documents(bindings, namespace=env.namespace)
            _wait_enforced(env, kube_cluster, enforced=True)
    finally:
        _start(env)

    def repaired() -> bool:
        found = _bundle(env, namespace)
        data = dict((found.data if found else None) or {})
        return data.get("policy.yaml") == original["policy.yaml"] and _verifies(env, namespace, data)

    wait_for("the operator to repair the bundle under the policy", repaired)
    # The operator deletes a bundle nothing needs, under the policy too.
    env.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders-read")
    wait_for("the unneeded bundle to be deleted", lambda: _bundle(env, namespace) is None)


# --------------------------------------------------------------------------------------------
# TokenRequests for the dbgov audience
# --------------------------------------------------------------------------------------------


def _pod(cluster: kube.KubeCluster, namespace: str, name: str, *, node: str = "") -> str:
    core = client.CoreV1Api(cluster.api_client())
    with contextlib.suppress(ApiException):
        cluster.create_service_account(namespace=namespace, name="orders")
    spec: dict[str, Any] = {
        "serviceAccountName": "orders",
        "containers": [{"name": "app", "image": "example/app:1"}],
    }
    if node:
        spec["nodeName"] = node
        # NodeRestriction lets a node ask only for the audiences its pod projects, as the
        # injected sidecar's token volume does.
        token = {"serviceAccountToken": {"audience": AUDIENCE, "path": "token"}}
        spec["volumes"] = [{"name": "dbgov-token", "projected": {"sources": [token]}}]
    created = core.create_namespaced_pod(namespace, {"metadata": {"name": name}, "spec": spec})
    return str(created.metadata.uid)


def _token_request(
    core: Any, namespace: str, *, pod: str | None, uid: str | None, audiences: list[str]
) -> Any:
    bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=uid) if pod else None
    spec = client.V1TokenRequestSpec(audiences=audiences, expiration_seconds=600, bound_object_ref=bound)
    return core.create_namespaced_service_account_token(
        "orders", namespace, client.AuthenticationV1TokenRequest(spec=spec)
    )


def _credentials(policies: Policies, token: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        policies.credential_url,
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    context = ssl.create_default_context(cadata=policies.ca_pem)
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_a_namespace_user_cannot_request_a_dbgov_token_for_a_pod(
    policies: Policies, kube_cluster: kube.KubeCluster, namespace: str, user: User
) -> None:
    uid = _pod(kube_cluster, namespace, "orders-1")
    message = _refused(
        lambda: _token_request(user.core, namespace, pod="orders-1", uid=uid, audiences=[AUDIENCE]),
        TOKEN_REFUSAL,
    )
    assert user.name in message and f"{namespace}/orders" in message
    _refused(
        lambda: _token_request(user.core, namespace, pod="orders-1", uid=uid, audiences=["vault", AUDIENCE]),
        TOKEN_REFUSAL,
    )
    admin = client.CoreV1Api(kube_cluster.api_client())
    _refused(
        lambda: _token_request(admin, namespace, pod="orders-1", uid=uid, audiences=[AUDIENCE]), TOKEN_REFUSAL
    )
    # Other audiences are the user's business.
    other = _token_request(user.core, namespace, pod="orders-1", uid=uid, audiences=["vault"])
    assert jwt.decode(other.status.token, options={"verify_signature": False})["aud"] == ["vault"]
    # No audience means the apiserver's own (--api-audiences): the policy sees the defaulted
    # list, so a pod-bound token carries dbgov only from a node.
    status, message = _status(
        lambda: _token_request(user.core, namespace, pod="orders-1", uid=uid, audiences=[])
    )
    if status == 200:
        default = _token_request(user.core, namespace, pod="orders-1", uid=uid, audiences=[])
        assert AUDIENCE not in jwt.decode(default.status.token, options={"verify_signature": False})["aud"]
    else:
        assert (status, TOKEN_REFUSAL in message) == (403, True), message
    # A dbgov token bound to no pod is the user's to get (kube-controller-manager asks for unbound
    # tokens with the default audiences), and the operator gives nothing for it.
    unbound = _token_request(user.core, namespace, pod=None, uid=None, audiences=[AUDIENCE])
    status, body = _credentials(policies, unbound.status.token)
    assert (status, body["error"]["code"]) == (403, "not_pod_bound"), body


def test_a_node_gets_dbgov_tokens_for_its_own_pods_only(
    policies: Policies, kube_cluster: kube.KubeCluster, namespace: str, tmp_path: Path
) -> None:
    core = client.CoreV1Api(kube_cluster.api_client())
    node_name = f"vap-node-{uuid.uuid4().hex[:6]}"
    # A Node object, as a registered kubelet has: the apiserver puts its name into the token.
    core.create_node({"metadata": {"name": node_name}})
    node = _cert_client(
        kube_cluster, user=f"system:node:{node_name}", groups=["system:nodes"], directory=tmp_path
    )
    stranger = _cert_client(
        kube_cluster, user="system:node:elsewhere", groups=["system:nodes"], directory=tmp_path
    )
    try:
        uid = _pod(kube_cluster, namespace, "orders-2", node=node_name)
        answer = _token_request(
            client.CoreV1Api(node), namespace, pod="orders-2", uid=uid, audiences=[AUDIENCE]
        )
        claims = jwt.decode(answer.status.token, options={"verify_signature": False})
        assert claims["aud"] == [AUDIENCE]
        assert claims["kubernetes.io"]["node"]["name"] == node_name
        # The operator verifies it as the pod's (what it answers next, no policy or no injection,
        # comes only after the identity check passed).
        status, body = _credentials(policies, answer.status.token)
        assert body.get("error", {}).get("code") not in identity.REASONS, (status, body)
        # Another node may not get one for this pod (Node authorizer and NodeRestriction; CEL
        # sees only the pod's name and uid, not its node).
        status, message = _status(
            lambda: _token_request(
                client.CoreV1Api(stranger), namespace, pod="orders-2", uid=uid, audiences=[AUDIENCE]
            )
        )
        assert status == 403 and "elsewhere" in message, message
    finally:
        node.close()
        stranger.close()
        with contextlib.suppress(ApiException):
            core.delete_node(node_name)


def test_the_real_kubelet_still_mints_the_sidecar_token_under_the_policy(
    policies: Policies,
    kube_cluster: kube.KubeCluster,
    namespace: str,
    e2e_node: node.Node,
    pod_images: dict[str, images.Image],
) -> None:
    """The kubelet, as system:node:<name>, fills a projected dbgov-audience token volume (what
    the injected sidecar reads) with the policy in force; as admin it would be refused."""
    core = client.CoreV1Api(kube_cluster.api_client())
    kube_cluster.create_service_account(namespace=namespace, name="orders")
    token = {"serviceAccountToken": {"audience": AUDIENCE, "path": "token", "expirationSeconds": 3600}}
    pod = {
        "metadata": {"name": "token-reader"},
        "spec": {
            "nodeName": e2e_node.name,
            "serviceAccountName": "orders",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "app",
                    "image": pod_images["app"].ref,
                    "imagePullPolicy": "Never",
                    "args": ["test -s /var/run/dbgov/token"],
                    "volumeMounts": [
                        {"name": "dbgov-token", "mountPath": "/var/run/dbgov", "readOnly": True}
                    ],
                }
            ],
            "volumes": [{"name": "dbgov-token", "projected": {"sources": [token]}}],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    def done() -> str | None:
        phase = core.read_namespaced_pod("token-reader", namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    try:
        phase = wait_for("the pod to run to completion", done, timeout=90)
    except AssertionError:
        events = core.list_namespaced_event(namespace).items
        raise AssertionError([e.message for e in events]) from None
    assert phase == "Succeeded"


# --------------------------------------------------------------------------------------------
# the garbage collector and the namespace controller (a real kube-controller-manager)
# --------------------------------------------------------------------------------------------


def test_the_collector_and_the_namespace_controller_still_delete_bundles(
    policies: Policies, kube_cluster: kube.KubeCluster, controller_manager: kube.Process
) -> None:
    """A bundle is owned by its ServiceAccount: deleting that collects it, and deleting the
    namespace deletes the rest, with the bundle policy in force (allowedDeleters)."""
    env = policies.installed
    core = client.CoreV1Api(kube_cluster.api_client())
    namespace = kube_cluster.create_namespace("vap-gc")
    for account in ("orders", "billing"):
        kube_cluster.create_service_account(namespace=namespace, name=account)
    _signed_bundle(env, namespace)
    accounts = {"serviceAccounts": ["orders", "billing"]}
    env.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "orders-read", {"spec": {"subjects": accounts}}
    )
    wait_for("the billing bundle", lambda: _bundle(env, namespace, "billing"))
    core.delete_namespaced_service_account("orders", namespace)
    wait_for("the collector to delete the orders bundle", lambda: _bundle(env, namespace) is None, 60)
    assert _bundle(env, namespace, "billing") is not None
    core.delete_namespace(namespace)

    def gone() -> bool:
        return _status(lambda: core.read_namespace(namespace))[0] == 404

    wait_for(f"namespace {namespace} (and the billing bundle) to be deleted", gone, 120)
    log = controller_manager.log.read_text(errors="replace")
    assert "ValidatingAdmissionPolicy" not in log, "a controller's delete was refused by the policy"


GARBAGE_COLLECTOR = "system:serviceaccount:kube-system:generic-garbage-collector"


def _as_collector(cluster: kube.KubeCluster) -> Any:
    """A CoreV1Api of the cluster admin impersonating the garbage collector's ServiceAccount
    (its bootstrap RBAC lets it update any object)."""
    impersonating = config.new_client_from_config(config_file=str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
    impersonating.set_default_header("Impersonate-User", GARBAGE_COLLECTOR)
    return client.CoreV1Api(impersonating)


def test_an_orphaning_delete_of_a_service_account_completes_under_the_bundle_policy(
    policies: Policies, kube_cluster: kube.KubeCluster, controller_manager: kube.Process
) -> None:
    """``kubectl delete sa orders --cascade=orphan``: the garbage collector removes the bundle's
    ownerReference (an UPDATE) before it lets the ServiceAccount go; the bundle policy allows it
    that update and nothing more (issue 12, F6: the deletion hung)."""
    env = policies.installed
    core = client.CoreV1Api(kube_cluster.api_client())
    namespace = kube_cluster.create_namespace("vap-orphan")
    try:
        _signed_bundle(env, namespace)
        owned = wait_for(
            "the bundle owned", lambda: (cm := _bundle(env, namespace)) and cm.metadata.owner_references
        )
        assert [o.name for o in owned] == ["orders"]
        # As the collector: changing the data is refused, removing the ownerReference is not.
        collector = _as_collector(kube_cluster)
        message = _refused(
            lambda: collector.patch_namespaced_config_map(BUNDLE, namespace, {"data": {"policy.yaml": LAX}})
        )
        assert GARBAGE_COLLECTOR in message
        _refused(
            lambda: collector.patch_namespaced_config_map(
                BUNDLE, namespace, {"metadata": {"ownerReferences": None, "labels": {"x": "y"}}}
            )
        )
        core.delete_namespaced_service_account("orders", namespace, propagation_policy="Orphan")

        def gone() -> bool:
            return _status(lambda: core.read_namespaced_service_account("orders", namespace))[0] == 404

        wait_for("the orphaning delete of ServiceAccount orders to complete", gone, 60)
        log = controller_manager.log.read_text(errors="replace")
        assert "ValidatingAdmissionPolicy" not in log, "the collector's update was refused by the policy"
    finally:
        kube_cluster.delete_namespace(namespace)


def _exec(
    cluster: kube.KubeCluster, namespace: str, pod: str, *, container: str, attach: bool = False
) -> tuple[int, str]:
    """A plain (not upgraded) exec or attach request: admission judges it before the pod is
    even looked up, so a stored pod is enough to tell a refusal from the way on."""
    core = client.CoreV1Api(cluster.api_client())
    if attach:
        return _status(
            lambda: core.connect_post_namespaced_pod_attach(pod, namespace, container=container, stdin=True)
        )
    return _status(
        lambda: core.connect_post_namespaced_pod_exec(pod, namespace, container=container, command=["sh"])
    )


def test_nobody_execs_into_or_attaches_to_the_sidecar(
    policies: Policies, kube_cluster: kube.KubeCluster
) -> None:
    """A shell in dbgov-proxy reads its projected token (the operator answers it with the pod's
    database credentials) and the proxy's memory: refused, cluster admins included."""
    namespace = policies.installed.namespace
    for attach in (False, True):
        status, message = _exec(kube_cluster, namespace, PROBE_POD, container="dbgov-proxy", attach=attach)
        assert status == 403 and EXEC_REFUSAL in message and "ValidatingAdmissionPolicy" in message, message
        assert ("attach" if attach else "exec") in message
        # the app container: past admission (the stored pod has no node to run it on)
        status, message = _exec(kube_cluster, namespace, PROBE_POD, container="probe", attach=attach)
        assert status != 403 and EXEC_REFUSAL not in message, (status, message)
