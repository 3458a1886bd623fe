"""Two operator replicas from the chart's defaults: kopf's peering CRD (crds/), the
ClusterKopfPeering named after the release, the RBAC for it, and ``POD_ID`` as the peer id.

The rendered chart (default values) is applied server-side to the test apiserver (no test-side
peering CRD), and two operators run with the Deployment's own environment (downward API resolved
as the kubelet would) and a token for the chart's ServiceAccount: exactly one of them runs
handlers, both answer the webhook and the credential endpoint, and when the active one stops the
other takes over well within the peering's lifetime. A default ``helm install`` on an empty
cluster shows the chart installs in one go, highly available; ``helm upgrade`` leaves the
replicas' keep-alives alone and ``helm uninstall`` leaves nothing but the CRDs.
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import kube, operator_proc
from .operator_proc import CHART, GROUP, PLURAL, VERSION, Installed, Operator

PEERING_CRD = "clusterkopfpeerings.kopf.dev"


def _render(tools: kube.Tools, home: Path, *sets: str, include_crds: bool = False) -> list[dict[str, Any]]:
    return kube.helm_template(
        tools, CHART, home=home, release="rel", namespace="ns", sets=sets, include_crds=include_crds
    )


def _kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _kopf_rules(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in role["rules"] if "kopf.dev" in r["apiGroups"]]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = _kinds(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


STANDALONE = ("operator.peering=", "operator.replicas=1")
"""The explicit opt-out: one replica, no peering."""


def test_peering_object_by_default_named_after_the_release_and_its_crd_from_crds_dir(
    kube_tools: kube.Tools, helm_home: Path
) -> None:
    (default,) = _kinds(_render(kube_tools, helm_home), "ClusterKopfPeering")
    assert default["metadata"]["name"] == "rel-dbgov"  # the release's full name
    assert default["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    assert "annotations" not in default["metadata"]  # a release object, not a hook helm re-creates

    standalone = _render(kube_tools, helm_home, *STANDALONE)
    assert _kinds(standalone, "ClusterKopfPeering") == []
    assert all(
        _kopf_rules(role) == [] for role in _kinds(standalone, "ClusterRole") + _kinds(standalone, "Role")
    )
    assert {e["name"]: e.get("value") for e in _container(standalone)["env"]}["DBGOV_PEERING"] == ""

    peering = ("operator.peering=dbgov-peers",)
    (body,) = _kinds(_render(kube_tools, helm_home, *peering), "ClusterKopfPeering")
    assert body["metadata"]["name"] == "dbgov-peers"
    # The CRD is no template: helm must have created it before it builds the peering object.
    templated = _kinds(_render(kube_tools, helm_home, *peering), "CustomResourceDefinition")
    assert PEERING_CRD not in {c["metadata"]["name"] for c in templated}
    crds = {
        c["metadata"]["name"]: c
        for c in _kinds(
            _render(kube_tools, helm_home, *peering, include_crds=True), "CustomResourceDefinition"
        )
    }
    spec = crds[PEERING_CRD]["spec"]
    assert (spec["scope"], spec["group"], spec["names"]["kind"]) == (
        "Cluster",
        "kopf.dev",
        "ClusterKopfPeering",
    )
    assert spec["names"]["plural"] == "clusterkopfpeerings"
    (version,) = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1", True, True)
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


@pytest.mark.parametrize(
    ("sets", "name"), [((), "rel-dbgov"), (("operator.peering=dbgov-peers",), "dbgov-peers")]
)
def test_peering_rbac_and_environment(
    kube_tools: kube.Tools, helm_home: Path, sets: tuple[str, ...], name: str
) -> None:
    docs = _render(kube_tools, helm_home, *sets)
    (cluster_role,) = _kinds(docs, "ClusterRole")
    # Every verb kopf peering uses, on the one object (the operator lists and watches it with a
    # field selector on its name, which is what lets RBAC name it for list and watch).
    assert _kopf_rules(cluster_role) == [
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["clusterkopfpeerings"],
            "resourceNames": [name],
            "verbs": ["get", "list", "watch", "patch"],
        },
    ]
    (role,) = _kinds(docs, "Role")
    assert _kopf_rules(role) == []  # no namespaced kopfpeerings: the operator is cluster-wide
    env = {e["name"]: e for e in _container(docs)["env"]}
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["DBGOV_PEERING"]["value"] == name
    assert env["DBGOV_WEBHOOK_ROTATION_CHECK_SECONDS"]["value"] == "300"


# --------------------------------------------------------------------------------------------
# the rendered chart on the test apiserver, two replicas
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Peered:
    release: str
    peering: str
    docs: list[dict[str, Any]]
    env: Installed
    """API handles; its ``operator`` is the first replica."""
    replicas: tuple[Operator, Operator]


def _pod_env(docs: list[dict[str, Any]], *, pod: str, namespace: str) -> dict[str, str]:
    """The operator container's environment as the kubelet would give it in pod ``pod``."""
    fields = {"metadata.name": pod, "metadata.namespace": namespace}
    env: dict[str, str] = {}
    for var in _container(docs)["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.fixture(scope="module")
def peered(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Peered]:
    workdir = tmp_path_factory.mktemp("chart-peering")
    namespace = kube_cluster.create_namespace("dbgov")
    release = f"p{uuid.uuid4().hex[:6]}"
    peering = f"{release}-dbgov"  # by default, named after the release
    configuration = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"  # the chart creates it, the operator fills it in
    docs = kube.helm_template(
        kube_tools,
        CHART,
        home=helm_home,
        release=release,
        namespace=namespace,
        sets=(f"webhook.configurationName={configuration}",),  # otherwise the defaults
        include_crds=True,
    )
    assert _kinds(docs, "Deployment")[0]["spec"]["replicas"] == 2
    kube_cluster.apply_documents(docs, namespace=namespace)
    (account,) = [d["metadata"]["name"] for d in _kinds(docs, "ServiceAccount")]
    token = kube_cluster.service_account_token(
        namespace=namespace, name=account, audiences=(kube_cluster.server,), expiration_seconds=3600
    )
    kubeconfig = operator_proc.token_kubeconfig(kube_cluster, token=token, path=workdir / "kubeconfig")
    (deployment,) = _kinds(docs, "Deployment")

    def replica(suffix: str) -> Operator:
        pod = f"{deployment['metadata']['name']}-5d8f6c7b9-{suffix}"
        chart_env = _pod_env(docs, pod=pod, namespace=namespace)
        (port,) = kube.free_ports(1)
        local = operator_proc.loopback_webhook_env(
            port=port, cert_dir=workdir / pod / "certs", configuration=configuration
        )
        (workdir / pod).mkdir()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            **chart_env,
            **local,
            "DBGOV_WEBHOOK_CERT_SECRET": chart_env["DBGOV_WEBHOOK_CERT_SECRET"],
        }
        return Operator(env=env, workdir=workdir / pod)

    first, second = replica("x2kq8"), replica("m7w4n")
    env = operator_proc.installed(
        kube_cluster,
        operator=first,
        namespace=namespace,
        service_account=account,
        configuration=configuration,
        token=token,
    )
    try:
        first.start()
        second.start()
        yield Peered(release=release, peering=peering, docs=docs, env=env, replicas=(first, second))
    finally:
        first.stop()
        second.stop()
        # Every cluster-scoped object the chart made (webhook configurations, RBAC, the peering,
        # admission policies), as helm uninstall would; the CRDs stay, as helm leaves them.
        operator_proc.delete_cluster_scoped(kube_cluster, docs)
        kube_cluster.delete_namespace(namespace)


def test_applied_chart_establishes_the_peering_crd_and_object(
    kube_cluster: kube.KubeCluster, peered: Peered
) -> None:
    ext = client.ApiextensionsV1Api(kube_cluster.api_client())
    crd = ext.read_custom_resource_definition(PEERING_CRD)
    assert {c.type: c.status for c in crd.status.conditions}["Established"] == "True"
    # No test installs the peering CRD any other way than from the chart's crds/.
    (rendered,) = [
        d for d in _kinds(peered.docs, "CustomResourceDefinition") if d["metadata"]["name"] == PEERING_CRD
    ]
    served = kube_cluster.api_client().sanitize_for_serialization(crd.spec.versions[0].schema)
    assert served == rendered["spec"]["versions"][0]["schema"]
    body = peered.env.custom.get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", peered.peering
    )
    assert body["metadata"]["labels"]["app.kubernetes.io/instance"] == peered.release


def test_chart_rbac_covers_its_own_peering_object_only(
    kube_cluster: kube.KubeCluster, peered: Peered
) -> None:
    authz = client.AuthorizationV1Api(kube_cluster.api_client())
    user = f"system:serviceaccount:{peered.env.namespace}:{peered.env.service_account}"

    def allowed(verb: str, name: str | None = None) -> bool:
        attributes = client.V1ResourceAttributes(
            verb=verb, group="kopf.dev", resource="clusterkopfpeerings", name=name
        )
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(user=user, resource_attributes=attributes)
        )
        return bool(authz.create_subject_access_review(review).status.allowed)

    # list and watch with fieldSelector=metadata.name=<peering> carry the name (that is how the
    # operator asks); without it they are refused, so other operators' peerings stay unread.
    for verb in ("get", "list", "watch", "patch"):
        assert allowed(verb, peered.peering), verb
        assert not allowed(verb, "someone-elses-peering"), verb
    assert not allowed("list") and not allowed("watch")
    assert not allowed("create") and not allowed("delete", peered.peering)


def _leader_and_standby(kube_cluster: kube.KubeCluster, peered: Peered) -> tuple[Operator, Operator]:
    """Once both keep-alives are in the peering and the election has settled."""
    first, second = peered.replicas
    pods = {op.env["POD_ID"]: op for op in peered.replicas if op.process is not None}
    assert len(pods) == 2

    def both_keeping_alive() -> dict[str, dict[str, Any]] | None:
        found = operator_proc.peers(kube_cluster, peered.peering)
        return found if set(found) == set(pods) else None

    status = operator_proc.wait_for("both replicas' keep-alives in the peering", both_keeping_alive)
    # kopf lets the highest priority work. Each replica starts paused, and the lower one may run
    # alone for a moment before it sees the higher one's keep-alive; then it pauses.
    leader = pods[max(status, key=lambda pod: int(status[pod]["priority"]))]
    standby = second if leader is first else first

    def settled() -> bool:
        # A standby that has not yet seen the leader's keep-alive logs nothing, looks paused, and
        # may still resume for a moment: the state must hold for a while, not just once.
        for _ in range(2):
            if not (operator_proc.active(leader) and not operator_proc.active(standby)):
                return False
            time.sleep(2.0)
        return True

    operator_proc.wait_for("the highest-priority replica alone to be active", settled)
    return leader, standby


def test_two_replicas_from_the_chart_one_is_active(kube_cluster: kube.KubeCluster, peered: Peered) -> None:
    leader, standby = _leader_and_standby(kube_cluster, peered)
    env = peered.env
    namespace = kube_cluster.create_namespace()
    try:
        operator_proc.wait_for("the validating webhook", lambda: operator_proc.validating_served(env))
        # Two policies, one after the other: by the time the leader has reconciled the second,
        # an active standby would have reconciled the first.
        for name in ("orders-read", "orders-audit"):
            operator_proc.create_policy(env, namespace, operator_proc.policy(name))
            operator_proc.wait_ready(env, namespace, name)
        marker = f"Reconciled {namespace}"
        # The operator logs a reconcile after its last write, so after the status is Ready.
        operator_proc.wait_for("the leader's reconciles", lambda: leader.log_text().count(marker) >= 2)
        assert marker not in standby.all_logs()
        assert operator_proc.active(leader) and not operator_proc.active(standby)
    finally:
        kube_cluster.delete_namespace(namespace)
    for op in peered.replicas:
        assert op.process is not None
        op.process.check_alive()
        logs = _own_problems(op.all_logs())
        assert "Forbidden" not in logs and " 403" not in logs and "Traceback" not in logs


def _own_problems(logs: str) -> str:
    """The log without two known lines of noise: an event posted into the deleted test namespace
    (refused as NamespaceTerminating), and kopf's own traceback when a standby replica pauses its
    watch streams (`request_cancel_callback`'s `assert task is not None`, kopf 1.45: a stream that
    finished as it was cancelled; the watch is retried)."""
    kept: list[str] = []
    skipping = False
    for line in logs.splitlines():
        if "request_cancel_callback" in line and "Exception in callback" in line:
            skipping = True
        if not skipping and "NamespaceTerminating" not in line:
            kept.append(line)
        if skipping and line.startswith("AssertionError"):
            skipping = False
    return "\n".join(kept)


def _tls_to(env: Installed) -> ssl.SSLContext:
    """Trust the CA the replicas publish in the webhook configuration (their shared Secret's)."""
    config = env.admission.read_validating_webhook_configuration(env.configuration)
    return ssl.create_default_context(
        cadata=base64.b64decode(config.webhooks[0].client_config.ca_bundle).decode()
    )


def _post(url: str, body: dict[str, Any], *, tls: ssl.SSLContext, token: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, context=tls, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _policy_review(namespace: str) -> dict[str, Any]:
    """An AdmissionReview of a policy with a misspelt field, as the apiserver would send it."""
    body = operator_proc.policy("misspelt", rules=[{"name": "r", "verdict": "allow", "tabels": ["t"]}])
    body["metadata"]["namespace"] = namespace
    gvr = {"group": GROUP, "version": VERSION}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {**gvr, "kind": "DatabaseAccessPolicy"},
            "resource": {**gvr, "resource": PLURAL},
            "requestKind": {**gvr, "kind": "DatabaseAccessPolicy"},
            "requestResource": {**gvr, "resource": PLURAL},
            "name": "misspelt",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "e2e"},
            "object": body,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _credential_port(op: Operator) -> int:
    found = re.search(r"Credential endpoint listening on (\d+) ", op.log_text())
    return int(found.group(1)) if found else 0


def test_both_replicas_answer_the_webhook_and_the_credential_endpoint(
    kube_cluster: kube.KubeCluster, peered: Peered
) -> None:
    """The standby pauses handlers only: the apiserver may call either replica (a Service in a
    cluster), and either must judge the request, not just accept the connection."""
    leader, standby = _leader_and_standby(kube_cluster, peered)
    env = peered.env
    operator_proc.wait_for("the validating webhook", lambda: operator_proc.validating_served(env))
    tls = _tls_to(env)
    hooks = env.admission.read_validating_webhook_configuration(env.configuration).webhooks
    (policy_hook,) = [h for h in hooks if PLURAL in h.rules[0].resources]
    path = urllib.parse.urlsplit(policy_hook.client_config.url).path
    # A real ServiceAccount token, for another audience (the chart's admission policy lets only
    # nodes request dbgov-audience tokens): judged through TokenReview, and refused.
    unbound = kube_cluster.service_account_token(
        namespace=env.namespace, name=env.service_account, audiences=("e2e-other",), expiration_seconds=600
    )
    for op in (leader, standby):
        status, review = _post(
            f"https://127.0.0.1:{op.env['DBGOV_WEBHOOK_PORT']}{path}", _policy_review("shop"), tls=tls
        )
        assert status == 200, review
        assert review["response"]["allowed"] is False
        assert "rules[0].tabels" in review["response"]["status"]["message"]
        port = operator_proc.wait_for("the credential endpoint", lambda op=op: _credential_port(op))
        status, answer = _post(f"https://127.0.0.1:{port}/v1/credentials", {}, tls=tls, token=unbound)
        assert (status, answer["error"]["code"]) == (401, "wrong_audience"), answer
    assert operator_proc.active(leader) and not operator_proc.active(standby)


def test_the_standby_takes_over_when_the_leader_stops(kube_cluster: kube.KubeCluster, peered: Peered) -> None:
    """A rolling update or drain stops the active replica (SIGTERM): kopf removes its keep-alive
    on the way out and the standby resumes handlers, well within the peering's lifetime (the
    bound for a replica that dies without saying so). It stops a replica: the next test starts
    it again."""
    leader, standby = _leader_and_standby(kube_cluster, peered)
    lifetime = int(operator_proc.peers(kube_cluster, peered.peering)[standby.env["POD_ID"]]["lifetime"])
    stopped = time.monotonic()
    leader.stop()  # returns once the process has exited (kopf says goodbye to the peering first)
    operator_proc.wait_for(
        "the standby to resume", lambda: operator_proc.active(standby), timeout=lifetime + 10
    )
    took = time.monotonic() - stopped
    assert took < lifetime, f"took over after {took:.1f}s, the peering's lifetime is {lifetime}s"
    assert leader.env["POD_ID"] not in operator_proc.peers(kube_cluster, peered.peering)

    env = peered.env
    namespace = kube_cluster.create_namespace()
    try:
        # In a cluster the Service routes to the replica left; here the configuration names each
        # replica's own URL, so point it at the standby's.
        _point_validation_at(env, standby)
        operator_proc.wait_for(
            "the standby's validating webhook", lambda: operator_proc.validating_served(env)
        )
        operator_proc.create_policy(env, namespace, operator_proc.policy("orders-read"))
        operator_proc.wait_ready(env, namespace, "orders-read")
        assert operator_proc.reconciled(standby, namespace)
    finally:
        kube_cluster.delete_namespace(namespace)
    print(f"takeover after SIGTERM of the active replica: {took:.2f}s (lifetime {lifetime}s)")


def test_a_killed_leader_is_replaced_within_the_peering_lifetime(
    kube_cluster: kube.KubeCluster, peered: Peered
) -> None:
    """A replica that dies without a word (SIGKILL, a lost node) leaves its keep-alive behind:
    the standby resumes when it expires, at most the peering's lifetime later. Runs after the
    SIGTERM test and starts the replica that one stopped again first."""
    for op in peered.replicas:
        if op.process is None:
            op.start()
    leader, standby = _leader_and_standby(kube_cluster, peered)
    lifetime = int(operator_proc.peers(kube_cluster, peered.peering)[leader.env["POD_ID"]]["lifetime"])
    assert leader.process is not None
    killed = time.monotonic()
    leader.process.popen.kill()  # the process this test module started, by PID
    leader.process.popen.wait(timeout=10)
    leader.process = None
    operator_proc.wait_for(
        "the standby to resume", lambda: operator_proc.active(standby), timeout=lifetime + 30
    )
    took = time.monotonic() - killed
    assert took <= lifetime + 5, f"took over {took:.1f}s after SIGKILL, the peering's lifetime is {lifetime}s"
    namespace = kube_cluster.create_namespace()
    try:
        _point_validation_at(peered.env, standby)
        operator_proc.wait_for("the standby's webhook", lambda: operator_proc.validating_served(peered.env))
        operator_proc.create_policy(peered.env, namespace, operator_proc.policy("orders-read"))
        operator_proc.wait_ready(peered.env, namespace, "orders-read")
        assert operator_proc.reconciled(standby, namespace)
    finally:
        kube_cluster.delete_namespace(namespace)
    print(f"takeover after SIGKILL of the active replica: {took:.2f}s (lifetime {lifetime}s)")


def _point_validation_at(env: Installed, operator: Operator) -> None:
    port = operator.env["DBGOV_WEBHOOK_PORT"]
    config = env.admission.read_validating_webhook_configuration(env.configuration)
    for hook in config.webhooks:
        path = hook.client_config.url.split("/", 3)[3]
        hook.client_config.url = f"https://127.0.0.1:{port}/{path}"
    env.admission.replace_validating_webhook_configuration(env.configuration, config)


# --------------------------------------------------------------------------------------------
# helm itself, on an apiserver that has never seen kopf
# --------------------------------------------------------------------------------------------


def _operator_pods_selected(cluster: kube.KubeCluster, docs: list[dict[str, Any]], namespace: str) -> None:
    """The PDB selects exactly the operator pods. No controller makes pods here, so two are made
    from the Deployment's template (as its ReplicaSet would, pod-template-hash added), beside
    neighbours that share some of its labels: another component of the release, and the
    operator of another release."""
    (deployment,) = _kinds(docs, "Deployment")
    template = deployment["spec"]["template"]
    labels = dict(template["metadata"]["labels"])
    core = client.CoreV1Api(cluster.api_client())

    def pod(name: str, pod_labels: dict[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": pod_labels}}
        core.create_namespaced_pod(namespace, {**body, "spec": template["spec"]})

    for name in ("dbgov-7c9d-a", "dbgov-7c9d-b"):
        pod(name, {**labels, "pod-template-hash": "7c9d"})
    pod("dbgov-neighbour", {**labels, "app.kubernetes.io/component": "cleanup-job"})
    pod("other-operator", {**labels, "app.kubernetes.io/instance": "other"})
    pdb = client.PolicyV1Api(cluster.api_client()).read_namespaced_pod_disruption_budget(
        deployment["metadata"]["name"], namespace
    )
    assert pdb.spec.min_available == 1
    selector = ",".join(f"{k}={v}" for k, v in sorted(pdb.spec.selector.match_labels.items()))
    assert pdb.spec.selector.match_labels == deployment["spec"]["selector"]["matchLabels"]
    selected = {p.metadata.name for p in core.list_namespaced_pod(namespace, label_selector=selector).items}
    assert selected == {"dbgov-7c9d-a", "dbgov-7c9d-b"}
    for name in (*selected, "dbgov-neighbour", "other-operator"):
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def _left_behind(cluster: kube.KubeCluster, docs: list[dict[str, Any]], namespace: str) -> list[str]:
    """The release's objects still in the cluster, CRDs aside (kept on purpose)."""
    dynamic = cluster.dynamic()
    left = []
    for doc in docs:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        where = {"namespace": namespace} if resource.namespaced else {}
        try:
            resource.get(name=doc["metadata"]["name"], **where)
        except ApiException as err:
            if err.status == 404:
                continue
            raise
        left.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return left


def test_default_helm_install_on_an_empty_cluster_is_highly_available(
    kube_tools: kube.Tools, helm_home: Path, tmp_path: Path
) -> None:
    """A plain `helm install` gives two replicas rolling with maxUnavailable 0, a PDB over the
    operator pods, and the peering with its CRD, in one go: helm builds every templated object
    before it creates any, so the peering object installs only because its CRD comes from crds/.
    An upgrade with a changed value must not re-create the peering (that would drop the
    keep-alives and let a standby resume next to the active replica); uninstall leaves nothing
    but the CRDs."""
    with kube.running_cluster(tmp_path / "cluster") as cluster:
        namespace = "dbgov-system"
        release = ("--namespace", namespace, "--kubeconfig", cluster.kubeconfig)
        installed = kube.helm(
            kube_tools, "install", "dbgov", CHART, *release, "--create-namespace", home=helm_home
        )
        assert "STATUS: deployed" in installed.stdout
        manifest = kube.yaml_documents(
            kube.helm(kube_tools, "get", "manifest", "dbgov", *release, home=helm_home).stdout
        )
        deploy = client.AppsV1Api(cluster.api_client()).read_namespaced_deployment("dbgov", namespace)
        assert deploy.spec.replicas == 2
        assert deploy.spec.strategy.type == "RollingUpdate"
        assert (
            deploy.spec.strategy.rolling_update.max_unavailable,
            deploy.spec.strategy.rolling_update.max_surge,
        ) == (0, 1)
        spread = deploy.spec.template.spec.topology_spread_constraints
        assert [(c.topology_key, c.when_unsatisfiable) for c in spread] == [
            ("kubernetes.io/hostname", "ScheduleAnyway")
        ]
        (term,) = (
            deploy.spec.template.spec.affinity.pod_anti_affinity.preferred_during_scheduling_ignored_during_execution
        )
        assert term.pod_affinity_term.topology_key == "kubernetes.io/hostname"
        _operator_pods_selected(cluster, manifest, namespace)
        ext = client.ApiextensionsV1Api(cluster.api_client())
        conditions = ext.read_custom_resource_definition(PEERING_CRD).status.conditions
        assert {c.type: c.status for c in conditions}["Established"] == "True"
        custom = client.CustomObjectsApi(cluster.api_client())
        before = custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "dbgov")
        env = {e.name: e.value for e in deploy.spec.template.spec.containers[0].env}
        assert env["DBGOV_PEERING"] == "dbgov"
        keepalive = {"status": {"pod-a": {"priority": 7, "lifetime": 60}}}
        custom.patch_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "dbgov", keepalive)

        kube.helm(
            kube_tools,
            "upgrade",
            "dbgov",
            CHART,
            *release,
            "--set",
            "operator.logLevel=DEBUG",
            home=helm_home,
        )
        upgraded = client.AppsV1Api(cluster.api_client()).read_namespaced_deployment("dbgov", namespace)
        env = {e.name: e.value for e in upgraded.spec.template.spec.containers[0].env}
        assert (env["DBGOV_LOG_LEVEL"], upgraded.spec.replicas) == ("DEBUG", 2)
        after = custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "dbgov")
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        assert after["status"] == keepalive["status"]
        admission = client.AdmissionregistrationV1Api(cluster.api_client())
        assert admission.read_validating_webhook_configuration("dbgov.io").metadata.name == "dbgov.io"

        kube.helm(kube_tools, "uninstall", "dbgov", *release, home=helm_home)
        assert _left_behind(cluster, manifest, namespace) == []
        assert {k["kind"] for k in manifest} >= {
            "ClusterKopfPeering",
            "PodDisruptionBudget",
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        }
        # helm never deletes crds/: other kopf operators in the cluster may peer through it.
        assert ext.read_custom_resource_definition(PEERING_CRD).metadata.name == PEERING_CRD

        # A release installed standalone without crds/ (or by a chart without peering) and then
        # upgraded to the defaults (--reset-values: without values helm reuses the release's):
        # helm upgrade never installs crds/, so the chart says what to do.
        ext.delete_custom_resource_definition(PEERING_CRD)
        operator_proc.wait_for(
            "the peering CRD to go", lambda: _gone(lambda: ext.read_custom_resource_definition(PEERING_CRD))
        )
        other = ("--namespace", "ha-system", "--kubeconfig", cluster.kubeconfig)
        standalone = ("--set", "operator.peering=", "--set", "operator.replicas=1")
        kube.helm(
            kube_tools,
            "install",
            "ha",
            CHART,
            *other,
            "--create-namespace",
            "--skip-crds",
            *standalone,
            home=helm_home,
        )
        refused = kube.helm(
            kube_tools, "upgrade", "ha", CHART, *other, "--reset-values", home=helm_home, check=False
        )
        assert refused.returncode != 0
        assert 'operator peering "ha-dbgov" needs the CRD clusterkopfpeerings.kopf.dev' in refused.stderr
        assert "kubectl apply -f charts/dbgov/crds/clusterkopfpeerings.kopf.dev.yaml" in refused.stderr
        crds = kube.helm_template(
            kube_tools, CHART, home=helm_home, release="ha", namespace="ha-system", include_crds=True
        )
        cluster.install_crds(
            [c for c in _kinds(crds, "CustomResourceDefinition") if c["metadata"]["name"] == PEERING_CRD]
        )
        kube.helm(kube_tools, "upgrade", "ha", CHART, *other, "--reset-values", home=helm_home)
        assert (
            client.AppsV1Api(cluster.api_client())
            .read_namespaced_deployment("ha-dbgov", "ha-system")
            .spec.replicas
            == 2
        )
        assert custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", "ha-dbgov")
        kube.helm(kube_tools, "uninstall", "ha", *other, home=helm_home)


def _gone(read: Any) -> bool:
    try:
        read()
    except ApiException as err:
        return bool(err.status == 404)
    return False
