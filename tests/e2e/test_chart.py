"""The Helm chart with the pinned helm, applied to a real kube-apiserver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import kube

CHART = kube.REPO_ROOT / "charts" / "dbgov"


def render(
    tools: kube.Tools,
    home: Path,
    *,
    namespace: str,
    release: str = "dbgov",
    sets: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    return kube.helm_template(tools, CHART, home=home, release=release, namespace=namespace, sets=sets)


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def test_helm_lint_strict_is_clean(kube_tools: kube.Tools, helm_home: Path) -> None:
    result = kube.helm(kube_tools, "lint", "--strict", CHART, home=helm_home)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize(
    ("value", "expect", "lint_fails"),
    [
        ("operator.replicaCount=2", "additional properties 'replicaCount' not allowed", True),
        ("sidecar.proxyPort=0", "minimum", True),
        ("sidecar.metricsPort=70000", "maximum", True),
        # Standalone with the default two replicas: schema if/then (the template fails too).
        ("operator.peering=", "/operator/peering", True),
        # Cross-field: only the template can check it, and helm lint reports a template `fail`
        # as [INFO], so only install/template refuse it.
        ("webhook.selfSigned.renewBeforeDays=90", "must be less than validityDays", False),
        ("sidecar.metricsPort=5432", "sidecar.metricsPort must differ from sidecar.proxyPort", False),
    ],
)
def test_bad_values_fail_lint_and_template(
    kube_tools: kube.Tools, helm_home: Path, value: str, expect: str, lint_fails: bool
) -> None:
    lint = kube.helm(kube_tools, "lint", "--strict", CHART, "--set", value, home=helm_home, check=False)
    assert (lint.returncode != 0) is lint_fails
    template = kube.helm(kube_tools, "template", "x", CHART, "--set", value, home=helm_home, check=False)
    assert template.returncode != 0
    assert expect in template.stderr


def test_template_renders_the_operator_objects(kube_tools: kube.Tools, helm_home: Path) -> None:
    docs = render(kube_tools, helm_home, namespace="dbgov-system")
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "Deployment",
            # two replicas by default: kopf peering (its CRD is in crds/) and a disruption budget
            "ClusterKopfPeering",
            "PodDisruptionBudget",
            # bundles and dbgov-audience tokens (templates/admissionpolicies.yaml)
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicyBinding",
            "ValidatingAdmissionPolicyBinding",
            # the chart owns them, so helm uninstall deletes them; the operator fills them in
            "MutatingWebhookConfiguration",
            "ValidatingWebhookConfiguration",
        ]
        # policies, cluster policies, databases, access requests
        + ["CustomResourceDefinition"] * 4
    )
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "dbgov_operator"]
    assert container["image"] == "ghcr.io/dbgov/dbgov-operator:0.1.0"
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["DBGOV_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["DBGOV_SIDECAR_IMAGE"] == "ghcr.io/dbgov/dbgov-sidecar:0.1.0"
    assert json.loads(env["DBGOV_SIDECAR_RESOURCES"])["limits"] == {"memory": "256Mi"}
    assert env["DBGOV_WEBHOOK_SERVICE"] == "dbgov-webhook"
    assert env["DBGOV_WEBHOOK_PORT"] == "9443"
    assert env["DBGOV_WEBHOOK_CERT_SECRET"] == "dbgov-webhook-tls"
    assert env["DBGOV_WEBHOOK_CERT_SOURCE"] == "operator"
    assert env["DBGOV_LOG_LEVEL"] == "INFO"
    assert (env["DBGOV_WEBHOOK_CERT_VALIDITY_DAYS"], env["DBGOV_WEBHOOK_RENEW_BEFORE_DAYS"]) == ("90", "30")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # Highly available by default: a rollout starts the new replica before an old one goes.
    assert deploy["spec"]["replicas"] == 2
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert env["DBGOV_PEERING"] == "dbgov"  # the release's full name
    selector = deploy["spec"]["selector"]["matchLabels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"] == {
        "topologyKey": "kubernetes.io/hostname",
        "labelSelector": {"matchLabels": selector},
    }
    (spread,) = pod["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"], spread["maxSkew"]) == (
        "kubernetes.io/hostname",
        "ScheduleAnyway",
        1,
    )
    assert spread["labelSelector"] == {"matchLabels": selector}
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}
    (service,) = by_kind(docs, "Service")
    assert service["spec"]["selector"] == deploy["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"


def test_standalone_is_an_explicit_opt_out(kube_tools: kube.Tools, helm_home: Path) -> None:
    docs = render(kube_tools, helm_home, namespace="ns", sets=("operator.peering=", "operator.replicas=1"))
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}  # never two operators side by side
    pod = deploy["spec"]["template"]["spec"]
    assert "affinity" not in pod and "topologySpreadConstraints" not in pod
    assert by_kind(docs, "PodDisruptionBudget") == [] and by_kind(docs, "ClusterKopfPeering") == []
    # Values set replace the spreading defaults; a named peering is used as given.
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    spread = [
        {"maxSkew": 2, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
    ]
    custom = kube.yaml_documents(
        kube.helm(
            kube_tools,
            "template",
            "dbgov",
            CHART,
            *("--set", "operator.peering=shared", "--set", "operator.replicas=3"),
            *("--set", "podDisruptionBudget.minAvailable=2"),
            *("--set-json", f"operator.affinity={json.dumps(affinity)}"),
            *("--set-json", f"operator.topologySpreadConstraints={json.dumps(spread)}"),
            home=helm_home,
        ).stdout
    )
    (deploy,) = by_kind(custom, "Deployment")
    assert deploy["spec"]["replicas"] == 3
    assert deploy["spec"]["template"]["spec"]["affinity"] == affinity
    assert deploy["spec"]["template"]["spec"]["topologySpreadConstraints"] == spread
    assert by_kind(custom, "PodDisruptionBudget")[0]["spec"]["minAvailable"] == 2
    assert by_kind(custom, "ClusterKopfPeering")[0]["metadata"]["name"] == "shared"


def test_crds_in_the_chart_equal_crds_dir_and_are_gated(kube_tools: kube.Tools, helm_home: Path) -> None:
    canonical = {c["metadata"]["name"]: c for c in kube.load_crds()}
    rendered = by_kind(render(kube_tools, helm_home, namespace="ns"), "CustomResourceDefinition")
    assert {c["metadata"]["name"] for c in rendered} == set(canonical)
    for crd in rendered:
        assert crd["spec"] == canonical[crd["metadata"]["name"]]["spec"]
        assert crd["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dbgov"
    unkept = render(kube_tools, helm_home, namespace="ns", sets=("crds.keep=false",))
    assert all("annotations" not in c["metadata"] for c in by_kind(unkept, "CustomResourceDefinition"))
    without = render(kube_tools, helm_home, namespace="ns", sets=("crds.install=false",))
    assert by_kind(without, "CustomResourceDefinition") == []


def test_cert_manager_option(kube_tools: kube.Tools, helm_home: Path) -> None:
    docs = render(kube_tools, helm_home, namespace="ops", sets=("webhook.certManager.enabled=true",))
    certs = {c["metadata"]["name"]: c["spec"] for c in by_kind(docs, "Certificate")}
    serving = certs["dbgov-webhook"]
    assert serving["secretName"] == "dbgov-webhook-tls"
    assert serving["dnsNames"] == ["dbgov-webhook.ops.svc", "dbgov-webhook.ops.svc.cluster.local"]
    assert serving["issuerRef"]["name"] == "dbgov-webhook-ca"
    assert certs["dbgov-webhook-ca"]["isCA"] is True
    (container,) = by_kind(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DBGOV_WEBHOOK_CERT_SOURCE"] == "cert-manager"
    external = render(
        kube_tools,
        helm_home,
        namespace="ops",
        sets=(
            "webhook.certManager.enabled=true",
            "webhook.certManager.issuerRef.kind=ClusterIssuer",
            "webhook.certManager.issuerRef.name=corp-ca",
        ),
    )
    assert [c["metadata"]["name"] for c in by_kind(external, "Certificate")] == ["dbgov-webhook"]
    assert by_kind(external, "Issuer") == []
    assert by_kind(external, "Certificate")[0]["spec"]["issuerRef"] == {
        "kind": "ClusterIssuer",
        "name": "corp-ca",
    }


def test_rbac_is_least_privilege(kube_tools: kube.Tools, helm_home: Path) -> None:
    docs = render(kube_tools, helm_home, namespace="dbgov-system")
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], (role["kind"], rule)
    (cluster_role,) = by_kind(docs, "ClusterRole")
    secret_verbs = [r["verbs"] for r in cluster_role["rules"] if "secrets" in r["resources"]]
    assert secret_verbs == [["get"]]  # named admin secrets only; never list/watch cluster-wide
    # kopf peering, on by default: its own ClusterKopfPeering only, every verb by name.
    (peering,) = [r for r in cluster_role["rules"] if "kopf.dev" in r["apiGroups"]]
    assert peering["resourceNames"] == ["dbgov"]
    assert peering["verbs"] == ["get", "list", "watch", "patch"]
    standalone = render(
        kube_tools, helm_home, namespace="x", sets=("operator.peering=", "operator.replicas=1")
    )
    assert not any("kopf.dev" in r["apiGroups"] for r in by_kind(standalone, "ClusterRole")[0]["rules"])


def test_chart_kube_version_constraint(kube_tools: kube.Tools, helm_home: Path) -> None:
    old = kube.helm(
        kube_tools, "template", "x", CHART, "--kube-version", "1.28.0", home=helm_home, check=False
    )
    assert old.returncode != 0
    assert "kubeVersion" in old.stderr or "incompatible" in old.stderr
    # The pinned helm is linked with the test cluster's version, so it renders by default.
    assert kube.helm(kube_tools, "version", home=helm_home).stdout.startswith("version.BuildInfo")


def test_rendered_chart_applies_with_server_side_dry_run(
    kube_cluster: kube.KubeCluster, kube_tools: kube.Tools, helm_home: Path, namespace: str
) -> None:
    docs = render(kube_tools, helm_home, namespace=namespace, release=f"r{namespace}")
    # helm creates crds/ (kopf's peering CRD) for real before it builds the templates; so does
    # this test, or the dry-run could not map the ClusterKopfPeering.
    with_crds = kube.helm_template(
        kube_tools, CHART, home=helm_home, release="x", namespace="x", include_crds=True
    )
    kube_cluster.install_crds(
        [d for d in by_kind(with_crds, "CustomResourceDefinition") if d["spec"]["group"] == "kopf.dev"]
    )
    applied = [kube_cluster.apply_manifest(doc, namespace=namespace, dry_run=True) for doc in docs]
    assert [a.kind for a in applied] == [d["kind"] for d in docs]
    deploy = next(a for a in applied if a.kind == "Deployment")
    # Server-side defaulting ran: this went through the real API machinery.
    assert deploy.spec.template.spec.containers[0].terminationMessagePath == "/dev/termination-log"
    # ... and nothing was stored.
    with pytest.raises(ApiException) as info:
        client.AppsV1Api(kube_cluster.api_client()).read_namespaced_deployment(
            deploy.metadata.name, namespace
        )
    assert info.value.status == 404


def test_chart_crds_install_and_become_established(
    kube_cluster: kube.KubeCluster, kube_tools: kube.Tools, helm_home: Path, dbgov_crds: list[str]
) -> None:
    """The chart's CRD objects (labels, keep annotation) apply for real over the canonical ones."""
    docs = render(kube_tools, helm_home, namespace="dbgov-system")
    crds = by_kind(docs, "CustomResourceDefinition")
    kube_cluster.install_crds(crds)
    ext = client.ApiextensionsV1Api(kube_cluster.api_client())
    for crd in crds:
        stored = ext.read_custom_resource_definition(crd["metadata"]["name"])
        assert stored.metadata.annotations["helm.sh/resource-policy"] == "keep"
        assert {c.type: c.status for c in stored.status.conditions}["Established"] == "True"


def test_operator_rbac_grants_what_it_needs_and_no_more(
    kube_cluster: kube.KubeCluster, kube_tools: kube.Tools, helm_home: Path, namespace: str
) -> None:
    """Apply the RBAC objects for real and ask the authorizer (SubjectAccessReview)."""
    release = f"r{namespace}"
    docs = render(kube_tools, helm_home, namespace=namespace, release=release)
    for doc in docs:
        if doc["kind"] in {
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
        }:
            kube_cluster.apply_manifest(doc, namespace=namespace)
    user = f"system:serviceaccount:{namespace}:{release}-dbgov"
    authz = client.AuthorizationV1Api(kube_cluster.api_client())

    def allowed(
        verb: str,
        resource: str,
        *,
        group: str = "",
        ns: str | None = "shop",
        sub: str | None = None,
    ) -> bool:
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user,
                groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
                resource_attributes=client.V1ResourceAttributes(
                    verb=verb, resource=resource, group=group, namespace=ns, subresource=sub
                ),
            )
        )
        return bool(authz.create_subject_access_review(review).status.allowed)

    try:
        assert allowed("watch", "databaseaccesspolicies", group="dbgov.io")
        assert allowed("patch", "databaseaccesspolicies", group="dbgov.io", sub="status")
        assert allowed("update", "accessrequests", group="dbgov.io", sub="status")
        assert allowed("create", "configmaps")
        assert allowed("list", "pods")
        assert allowed("create", "events")
        assert allowed("get", "secrets")
        assert allowed(
            "create", "mutatingwebhookconfigurations", group="admissionregistration.k8s.io", ns=None
        )
        assert allowed("create", "secrets", ns=namespace)  # its own webhook certificate
        # ... and no more:
        assert not allowed("list", "secrets")
        assert not allowed("create", "secrets")
        assert not allowed("delete", "databaseaccesspolicies", group="dbgov.io")
        assert not allowed("create", "pods")
        assert not allowed("create", "serviceaccounts", sub="token")
        assert not allowed(
            "delete", "mutatingwebhookconfigurations", group="admissionregistration.k8s.io", ns=None
        )
        assert not allowed("create", "clusterroles", group="rbac.authorization.k8s.io", ns=None)
    finally:
        rbac = client.RbacAuthorizationV1Api(kube_cluster.api_client())
        for delete, name in (
            (rbac.delete_cluster_role_binding, f"{release}-dbgov"),
            (rbac.delete_cluster_role, f"{release}-dbgov"),
        ):
            try:
                delete(name)
            except ApiException as err:
                if err.status != 404:
                    raise


def test_helm_install_and_uninstall_keep_the_crds(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    helm_home: Path,
    namespace: str,
    dbgov_crds: list[str],
) -> None:
    """helm itself against the apiserver: install, NOTES, status, uninstall with crds.keep."""
    release = f"r{namespace}"
    common = ("--namespace", namespace, "--kubeconfig", kube_cluster.kubeconfig)
    # --take-ownership: the session's CRDs already exist (installed by the dbgov_crds fixture).
    installed = kube.helm(kube_tools, "install", release, CHART, *common, "--take-ownership", home=helm_home)
    assert "STATUS: deployed" in installed.stdout
    assert 'dbgov.io/inject: "true"' in installed.stdout  # NOTES.txt rendered
    status = json.loads(
        kube.helm(kube_tools, "status", release, *common, "-o", "json", home=helm_home).stdout
    )
    assert status["info"]["status"] == "deployed"
    apps = client.AppsV1Api(kube_cluster.api_client())
    rbac = client.RbacAuthorizationV1Api(kube_cluster.api_client())
    assert apps.read_namespaced_deployment(f"{release}-dbgov", namespace).spec.replicas == 2
    assert rbac.read_cluster_role(f"{release}-dbgov").rules
    custom = client.CustomObjectsApi(kube_cluster.api_client())
    disruption = client.PolicyV1Api(kube_cluster.api_client())
    assert custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", f"{release}-dbgov")
    assert (
        disruption.read_namespaced_pod_disruption_budget(f"{release}-dbgov", namespace).spec.min_available
        == 1
    )

    # The session's CRDs were applied before the chart and are not the release's: helm leaves
    # them alone (templates/crds.yaml), and they outlive the uninstall.
    kube.helm(kube_tools, "uninstall", release, *common, home=helm_home)
    for read in (
        lambda: apps.read_namespaced_deployment(f"{release}-dbgov", namespace),
        lambda: rbac.read_cluster_role(f"{release}-dbgov"),
        lambda: custom.get_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", f"{release}-dbgov"),
        lambda: disruption.read_namespaced_pod_disruption_budget(f"{release}-dbgov", namespace),
    ):
        with pytest.raises(ApiException) as info:
            read()
        assert info.value.status == 404
    ext = client.ApiextensionsV1Api(kube_cluster.api_client())
    for name in dbgov_crds:  # policies survive an uninstall
        conditions = ext.read_custom_resource_definition(name).status.conditions
        assert {c.type: c.status for c in conditions}["Established"] == "True"
