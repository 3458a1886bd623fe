"""Enrollment the platform team owns, through a real kube-apiserver (issue 12).

The operator runs as the chart's ServiceAccount with the chart's RBAC (test_operator.deployed);
each test is one bypass a namespace user had: dropping the inject label, naming busybox as the
sidecar image, loading another database's laxer policy with ``dbgov.io/database``, and a
PodSecurity ``restricted`` namespace refusing every enrolled pod.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dbgov_operator import webhook

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
