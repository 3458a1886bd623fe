"""Enrollment the platform team owns, through a real kube-apiserver (issue 12).

The operator runs as the chart's ServiceAccount with the chart's RBAC (test_operator.deployed);
each test is one bypass a namespace user had: dropping the inject label, naming busybox as the
sidecar image, loading another database's laxer policy with ``dbgov.io/database``, and a
PodSecurity ``restricted`` namespace refusing every enrolled pod; and the second attack round's
(F2-F4): a pod claiming ``dbgov.io/status: injected``, a container named ``dbgov-proxy``, the
sidecar's image patched after admission and an ephemeral container mounting its token.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dbgov_operator import settings, webhook

from . import kube
from .operator_proc import Installed, create_policy, policy, wait_ready
from .test_operator import deployed

ENFORCED = {"dbgov.io/enforce": "true"}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


@pytest.fixture(scope="module")
def operator(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("enrollment")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir) as found:
        yield found


def _namespace(env: Installed, labels: dict[str, str]) -> str:
    name = f"enr-{uuid.uuid4().hex[:8]}"
    env.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    return name


def _pod(
    name: str, *, labels: dict[str, str] | None = None, pod_annotations: dict[str, str] | None = None
) -> dict[str, Any]:
    """An app that reaches PostgreSQL by PGHOST, restricted-compliant on its own."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, "annotations": pod_annotations or {}},
        "spec": {
            "serviceAccountName": "orders",
            # Compliance set per container, as many charts do: the sidecar must carry its own.
            "containers": [
                {
                    "name": "app",
                    "image": "example/app:1",
                    "env": [{"name": "PGHOST", "value": "orders.db.svc"}],
                    "securityContext": {
                        "runAsNonRoot": True,
                        "seccompProfile": {"type": "RuntimeDefault"},
                        "runAsUser": 1000,
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def _create(env: Installed, namespace: str, body: dict[str, Any]) -> Any:
    core: Any = env.core  # dict bodies
    return core.create_namespaced_pod(namespace, body)


def _refused(env: Installed, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as caught:
        _create(env, namespace, body)
    assert caught.value.status in (400, 403), caught.value.body
    return str(caught.value.body)


def _sidecars(pod: Any) -> list[str]:
    return [c.name for c in pod.spec.init_containers or [] if c.name == "dbgov-proxy"]


@pytest.mark.parametrize("labels", [{}, {"dbgov.io/inject": "false"}])
def test_enforced_namespace_injects_pods_that_drop_the_label(
    operator: Installed, labels: dict[str, str]
) -> None:
    namespace = _namespace(operator, ENFORCED)
    created = _create(operator, namespace, _pod("app", labels=labels))
    assert _sidecars(created) == ["dbgov-proxy"]
    # Labelled enrolled, so the reconciler writes its bundle like any enrolled pod's.
    assert created.metadata.labels["dbgov.io/inject"] == "true"


def test_enforced_namespace_refuses_a_pod_the_sidecar_cannot_serve(operator: Installed) -> None:
    namespace = _namespace(operator, ENFORCED)
    body = _pod("nodb")
    body["spec"]["containers"][0]["env"] = []
    message = _refused(operator, namespace, body)
    assert "dbgov.io/enforce=true" in message and "names no database" in message


def test_unenforced_namespace_still_leaves_unlabelled_pods_alone(operator: Installed) -> None:
    namespace = _namespace(operator, {})
    assert _sidecars(_create(operator, namespace, _pod("plain"))) == []
    assert _sidecars(_create(operator, namespace, _pod("opted", labels={"dbgov.io/inject": "true"}))) == [
        "dbgov-proxy"
    ]


def test_busybox_as_sidecar_image_is_refused(operator: Installed) -> None:
    namespace = _namespace(operator, ENFORCED)
    body = _pod("busy", pod_annotations={"dbgov.io/sidecar-image": "busybox:1.36"})
    message = _refused(operator, namespace, body)
    assert "dbgov.io/sidecar-image" in message and "pinned by the platform" in message


def test_database_annotation_cannot_pick_another_databases_policy(operator: Installed) -> None:
    namespace = _namespace(operator, ENFORCED)
    create_policy(operator, namespace, policy("orders-read"))  # binds SA orders, orders-db
    lax = policy(
        "billing-lax",
        subjects={"serviceAccounts": ["billing"]},
        databaseRef={"name": "billing-db"},
        default="allow",
    )
    create_policy(operator, namespace, lax)
    wait_ready(operator, namespace, "orders-read")
    message = _refused(
        operator, namespace, _pod("sneaky", pod_annotations={"dbgov.io/database": "billing-db"})
    )
    assert "dbgov.io/database" in message and "billing-db" in message and "orders-db" in message
    # The database its own policy names is fine.
    allowed = _create(operator, namespace, _pod("honest", pod_annotations={"dbgov.io/database": "orders-db"}))
    assert _sidecars(allowed) == ["dbgov-proxy"]


def test_restricted_pod_security_admits_enrolled_pods(operator: Installed) -> None:
    namespace = _namespace(operator, {**ENFORCED, **RESTRICTED})
    for name, labels in (("labelled", {"dbgov.io/inject": "true"}), ("unlabelled", {})):
        created = _create(operator, namespace, _pod(name, labels=labels))
        (sidecar,) = [c for c in created.spec.init_containers if c.name == "dbgov-proxy"]
        assert sidecar.security_context.seccomp_profile.type == "RuntimeDefault"
    # The level is really enforced here: an app that is not compliant is refused by PodSecurity.
    body = _pod("privileged", labels={"dbgov.io/inject": "true"})
    body["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    assert "PodSecurity" in _refused(operator, namespace, body)


def test_webhooks_scope_by_namespace_and_answer_fast(operator: Installed) -> None:
    mutating: Any = operator.admission.read_mutating_webhook_configuration(operator.configuration)
    hooks: dict[str, Any] = {h.name: h for h in mutating.webhooks}
    assert set(hooks) == {webhook.POD_INJECTION_ID, f"enforced.{webhook.POD_INJECTION_ID}"}
    for hook in hooks.values():
        assert hook.timeout_seconds == 5
        assert hook.failure_policy == "Fail"
        (outside, enforce) = hook.namespace_selector.match_expressions
        assert outside.key == "kubernetes.io/metadata.name" and outside.operator == "NotIn"
        assert {"kube-system", operator.namespace} <= set(outside.values)
        assert enforce.key == "dbgov.io/enforce"
    assert hooks[webhook.POD_INJECTION_ID].object_selector.match_labels == {"dbgov.io/inject": "true"}
    everyone = hooks[f"enforced.{webhook.POD_INJECTION_ID}"].object_selector  # {} once stored
    assert everyone is None or not (everyone.match_labels or everyone.match_expressions)
    # Pods in the operator's own namespace never reach the webhook, enforced label or not.
    operator.core.patch_namespace(operator.namespace, {"metadata": {"labels": ENFORCED}})
    try:
        own = _create(operator, operator.namespace, _pod("own", labels={"dbgov.io/inject": "true"}))
        assert _sidecars(own) == []
    finally:
        operator.core.patch_namespace(
            operator.namespace, {"metadata": {"labels": {"dbgov.io/enforce": None}}}
        )
    guard: Any = operator.admission.read_validating_webhook_configuration(operator.configuration)
    (pods,) = [h for h in guard.webhooks if h.name == webhook.POD_GUARD_ID]
    assert {r for rule in pods.rules for r in rule.resources} == {
        "pods",
        "pods/ephemeralcontainers",
        "pods/resize",
    }
    assert pods.object_selector.match_labels == {"dbgov.io/inject": "true"}
    assert pods.failure_policy == "Fail" and pods.timeout_seconds == 5
    assert all(h.reinvocation_policy == "Never" for h in hooks.values())


# -- the pod's own claims at CREATE (F2, F3) -----------------------------------------------------


def test_f2_a_pod_claiming_to_be_injected_is_refused(operator: Installed) -> None:
    namespace = _namespace(operator, ENFORCED)
    message = _refused(operator, namespace, _pod("forged", pod_annotations={"dbgov.io/status": "injected"}))
    assert "annotation dbgov.io/status='injected': only the dbgov webhook writes it" in message
    # Outside enforcement the same holds for an enrolled pod.
    elsewhere = _namespace(operator, {})
    body = _pod("forged", labels={"dbgov.io/inject": "true"}, pod_annotations={"dbgov.io/status": "x"})
    assert "annotation dbgov.io/status='x'" in _refused(operator, elsewhere, body)


@pytest.mark.parametrize("kind", ["initContainers", "containers"])
def test_f3_a_container_named_like_the_sidecar_is_refused(operator: Installed, kind: str) -> None:
    namespace = _namespace(operator, ENFORCED)
    body = _pod("fake")
    body["spec"].setdefault(kind, []).append({"name": "dbgov-proxy", "image": "busybox", "command": ["true"]})
    message = _refused(operator, namespace, body)
    noun = "init" if kind == "initContainers" else "app"
    assert f"{noun} container 'dbgov-proxy': the name is the dbgov sidecar's" in message


def test_an_app_mounting_the_sidecars_token_volume_is_refused(operator: Installed) -> None:
    """The webhook adds volume dbgov-token; a mount naming it would resolve to the sidecar's token
    once the mutated pod is validated."""
    namespace = _namespace(operator, ENFORCED)
    body = _pod("thief")
    body["spec"]["containers"][0]["volumeMounts"] = [{"name": "dbgov-token", "mountPath": "/stolen"}]
    message = _refused(operator, namespace, body)
    assert "app container 'app' mounts volume 'dbgov-token'" in message


# -- after admission (F4) ----------------------------------------------------------------------------


def _patch_refused(call: Any) -> str:
    with pytest.raises(ApiException) as caught:
        call()
    assert caught.value.status == 403, caught.value.body
    message: str = json.loads(str(caught.value.body))["message"]
    return message


def test_f4_the_sidecars_image_cannot_be_patched(operator: Installed) -> None:
    namespace = _namespace(operator, ENFORCED)
    created = _create(operator, namespace, _pod("app"))
    (index,) = [i for i, c in enumerate(created.spec.init_containers) if c.name == "dbgov-proxy"]
    core: Any = operator.core
    swap = [{"op": "replace", "path": f"/spec/initContainers/{index}/image", "value": "evil/forwarder:1"}]
    message = _patch_refused(lambda: core.patch_namespaced_pod("app", namespace, swap))
    assert "dbgov refuses this change to an enrolled pod" in message
    assert "evil/forwarder:1" in message
    stored = core.read_namespaced_pod("app", namespace)
    assert stored.spec.init_containers[index].image == created.spec.init_containers[index].image
    # The app's own image is the app's to change.
    app = [{"op": "replace", "path": "/spec/containers/0/image", "value": "example/app:2"}]
    assert core.patch_namespaced_pod("app", namespace, app).spec.containers[0].image == "example/app:2"


def test_f4_an_ephemeral_container_cannot_mount_the_token(operator: Installed) -> None:
    namespace = _namespace(operator, {})  # debug containers are allowed here, but not this one
    _create(operator, namespace, _pod("app", labels={"dbgov.io/inject": "true"}))
    core: Any = operator.core

    def add(container: dict[str, Any]) -> Any:
        body = {"spec": {"ephemeralContainers": [container]}}
        return core.patch_namespaced_pod_ephemeralcontainers("app", namespace, body)

    thief = {
        "name": "dbg",
        "image": "evil/psql:1",
        "volumeMounts": [{"name": "dbgov-token", "mountPath": "/t"}],
    }
    assert "ephemeral container 'dbg' mounts volume 'dbgov-token'" in _patch_refused(lambda: add(thief))
    peer = {"name": "peer", "image": "busybox", "targetContainerName": "dbgov-proxy"}
    assert "targets dbgov-proxy" in _patch_refused(lambda: add(peer))
    # A debug container on the app, without the sidecar's volumes, is still allowed here.
    added = add({"name": "debug", "image": "busybox", "targetContainerName": "app"})
    assert [c.name for c in added.spec.ephemeral_containers] == ["debug"]


def test_an_enforced_namespace_admits_no_debug_container_by_default(operator: Installed) -> None:
    namespace = _namespace(operator, ENFORCED)
    _create(operator, namespace, _pod("app"))
    core: Any = operator.core
    body = {"spec": {"ephemeralContainers": [{"name": "debug", "image": "busybox"}]}}
    message = _patch_refused(lambda: core.patch_namespaced_pod_ephemeralcontainers("app", namespace, body))
    assert "sidecar.allowDebugContainers" in message


def test_enrollment_labels_and_annotations_cannot_be_removed(operator: Installed) -> None:
    namespace = _namespace(operator, {})
    _create(operator, namespace, _pod("app", labels={"dbgov.io/inject": "true"}))
    core: Any = operator.core
    unlabel = {"metadata": {"labels": {"dbgov.io/inject": None}}}
    assert "label dbgov.io/inject: 'true' -> (none)" in _patch_refused(
        lambda: core.patch_namespaced_pod("app", namespace, unlabel)
    )
    unmark = {"metadata": {"annotations": {"dbgov.io/status": None}}}
    assert "annotation dbgov.io/status: 'injected' -> (none)" in _patch_refused(
        lambda: core.patch_namespaced_pod("app", namespace, unmark)
    )
    # Other metadata is the app's (controllers and tools label pods all the time).
    other = {"metadata": {"labels": {"tier": "web"}}}
    assert core.patch_namespaced_pod("app", namespace, other).metadata.labels["tier"] == "web"


def test_the_chart_value_allowing_debug_containers_reaches_the_operator(
    kube_tools: kube.Tools, helm_home: Path
) -> None:
    from .test_operator_chart_env import _operator_env

    def allowed(*sets: str) -> bool:
        return settings.from_env(_operator_env(kube_tools, helm_home, *sets)).sidecar.allow_debug_containers

    assert not allowed()
    assert allowed("sidecar.allowDebugContainers=true")
