"""The operator as a subprocess against a real kube-apiserver, as the chart's ServiceAccount.

The operator authenticates with a TokenRequest token for the ServiceAccount the chart renders,
bound by the chart's own RBAC, so every test here also proves that RBAC is enough. The
apiserver calls its webhooks over TLS at 127.0.0.1 (url form: no Service routing here).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime
import os
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dbgov_operator import certs
from dbgov_policy import compile as policy_compile
from dbgov_sidecar import policies

from . import kube, operator_proc
from .operator_proc import (
    CERT_SECRET,
    CHART,
    GROUP,
    PLURAL,
    VERSION,
    Installed,
    Operator,
    create_policy,
    delete_webhook_configurations,
    get_policy,
    loopback_webhook_env,
    policy,
    token_kubeconfig,
    wait_for,
    wait_ready,
)


@contextlib.contextmanager
def deployed(
    cluster: kube.KubeCluster,
    tools: kube.Tools,
    *,
    helm_home: Path,
    workdir: Path,
    env: dict[str, str] | None = None,
    start: bool = True,
) -> Iterator[Installed]:
    """Apply the chart's ServiceAccount and RBAC in a fresh release namespace and run the
    operator with a TokenRequest token for it; stop it and remove its webhooks afterwards."""
    release_ns = cluster.create_namespace("dbgov")
    # The chart's RBAC lets the operator update its webhook configurations by name only.
    configuration = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"
    docs = kube.helm_template(
        tools,
        CHART,
        home=helm_home,
        release=f"op-{uuid.uuid4().hex[:6]}",
        namespace=release_ns,
        sets=(f"webhook.configurationName={configuration}",),
        show_only=("templates/serviceaccount.yaml", "templates/rbac.yaml"),
    )
    cluster.apply_documents(docs, namespace=release_ns)
    (account,) = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
    token = cluster.service_account_token(
        namespace=release_ns, name=account, audiences=(cluster.server,), expiration_seconds=3600
    )
    kubeconfig = token_kubeconfig(cluster, token=token, path=workdir / "kubeconfig")
    (port,) = kube.free_ports(1)
    operator_env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "DBGOV_NAMESPACE": release_ns,
        **loopback_webhook_env(port=port, cert_dir=workdir / "certs", configuration=configuration),
        "DBGOV_WEBHOOK_ROTATION_CHECK_SECONDS": "2",
        "DBGOV_LOG_LEVEL": "INFO",
        **(env or {}),
    }
    found = operator_proc.installed(
        cluster,
        operator=Operator(env=operator_env, workdir=workdir),
        namespace=release_ns,
        service_account=account,
        configuration=configuration,
        token=token,
    )
    try:
        if start:
            _start(found)
        yield found
    finally:
        found.operator.stop()
        delete_webhook_configurations(found.admission, configuration)
        cluster.delete_namespace(release_ns)


@pytest.fixture(scope="module")
def installed(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    """The chart's ServiceAccount and RBAC applied, and the operator running with its token."""
    workdir = tmp_path_factory.mktemp("operator")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir) as found:
        yield found


def _start(found: Installed) -> None:
    """Start the operator and wait until the apiserver can call both webhooks."""
    found.operator.start()
    wait_served(found)


def wait_served(found: Installed) -> None:
    """Wait until the webhook configurations name the running operator with a caBundle.

    They are persistent, so after a restart the previous process's configurations are still
    there: wait for this process to have published its own (kopf creates a missing one first),
    or a test that deletes them next would race with that.
    """

    def published() -> bool:
        log = found.operator.log_text()
        kinds = ("validating", "mutating")
        return all(f"Reconfiguring the {kind} webhook {found.configuration}." in log for kind in kinds)

    def served() -> bool:
        assert found.operator.process is not None
        found.operator.process.check_alive()
        try:
            mutating = found.admission.read_mutating_webhook_configuration(found.configuration)
            validating = found.admission.read_validating_webhook_configuration(found.configuration)
        except ApiException:
            return False
        hooks = [*(mutating.webhooks or []), *(validating.webhooks or [])]
        # pods of enforced namespaces, labelled pods elsewhere, policies, cluster policies,
        # Databases, enrolled pods' updates
        return len(hooks) == 6 and all(h.client_config.ca_bundle for h in hooks)

    wait_for("this operator process to publish its webhook configurations", published)
    wait_for("the operator's webhook configurations", served)
    url = found.admission.read_mutating_webhook_configuration(found.configuration)
    address = url.webhooks[0].client_config.url.removeprefix("https://").split("/")[0]
    host, _, port = address.rpartition(":")
    wait_for("the webhook server to accept TLS", lambda: _tls_ok(host, int(port)))


def _tls_ok(host: str, port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=2) as sock,
            context.wrap_socket(sock) as tls,
        ):
            return tls.version() is not None
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def bundle(env: Installed, namespace: str, account: str) -> client.V1ConfigMap | None:
    try:
        return env.core.read_namespaced_config_map(f"dbgov-policy-{account}", namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def service_account(env: Installed, namespace: str, name: str = "orders") -> client.V1ServiceAccount:
    """Create a ServiceAccount: bundles are written only for ServiceAccounts that exist, and this
    apiserver runs no controller-manager (not even ``default`` exists)."""
    return env.core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})


def events_for(env: Installed, namespace: str, name: str) -> list[tuple[str, str]]:
    listed = env.core.list_namespaced_event(namespace)
    return sorted(
        (e.reason, e.message)
        for e in listed.items
        if e.involved_object.name == name and e.involved_object.kind == "DatabaseAccessPolicy"
    )


def pod(name: str, *, labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}, **meta},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}]},
    }


ENROLLED = {"dbgov.io/inject": "true"}


def rejection(call: Callable[[], object]) -> ApiException:
    with pytest.raises(ApiException) as caught:
        call()
    return caught.value


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_operator_runs_as_the_charts_service_account(installed: Installed) -> None:
    user = client.ApiClient(_token_configuration(installed))
    review = client.AuthenticationV1Api(user).create_self_subject_review(client.V1SelfSubjectReview())
    expected = f"system:serviceaccount:{installed.namespace}:{installed.service_account}"
    assert review.status.user_info.username == expected
    # Least privilege, not admin: it cannot read Secrets outside its own namespace.
    access = client.AuthorizationV1Api(user).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb="list", resource="secrets", namespace="default"
                )
            )
        )
    )
    assert access.status.allowed is False


def _token_configuration(env: Installed) -> client.Configuration:
    kubeconfig = yaml.safe_load(Path(env.operator.env["KUBECONFIG"]).read_text())
    cluster = kubeconfig["clusters"][0]["cluster"]
    configuration = client.Configuration()
    configuration.host = cluster["server"]
    configuration.ssl_ca_cert = cluster["certificate-authority"]
    configuration.api_key = {"authorization": f"Bearer {env.token}"}
    return configuration


def test_webhook_ca_bundle_is_the_shared_secrets_ca(installed: Installed) -> None:
    secret = installed.core.read_namespaced_secret(CERT_SECRET, installed.namespace)
    ca = base64.b64decode(secret.data["ca.crt"])
    for config in (
        installed.admission.read_mutating_webhook_configuration(installed.configuration),
        installed.admission.read_validating_webhook_configuration(installed.configuration),
    ):
        for hook in config.webhooks:
            assert base64.b64decode(hook.client_config.ca_bundle) == ca
            assert hook.failure_policy == "Fail"
            assert hook.client_config.url.startswith("https://127.0.0.1:")


def served_certificate(env: Installed) -> bytes:
    """The DER certificate the webhook server presents right now."""
    url = env.admission.read_mutating_webhook_configuration(env.configuration).webhooks[0]
    host, _, port = url.client_config.url.removeprefix("https://").split("/")[0].rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def served_or_empty(env: Installed) -> bytes:
    try:
        return served_certificate(env)
    except OSError:  # the listener restarts when its certificate files change
        return b""


def test_serving_certificate_due_for_renewal_is_replaced_while_serving(
    installed: Installed, namespace: str
) -> None:
    secret = installed.core.read_namespaced_secret(CERT_SECRET, installed.namespace)
    data = dict(secret.data)
    ca = certs.KeyPair(cert_pem=base64.b64decode(data["ca.crt"]), key_pem=base64.b64decode(data["ca.key"]))
    now = datetime.datetime.now(datetime.UTC)
    # A serving certificate from the same CA that expires within the renewal window.
    short = certs.make_serving(ca=ca, hostnames=("127.0.0.1",), now=now, validity=datetime.timedelta(hours=1))
    data["tls.crt"] = base64.b64encode(short.cert_pem).decode()
    data["tls.key"] = base64.b64encode(short.key_pem).decode()
    secret.data = data
    installed.core.replace_namespaced_secret(CERT_SECRET, installed.namespace, secret)

    def renewed() -> bytes | None:
        current = installed.core.read_namespaced_secret(CERT_SECRET, installed.namespace)
        pem = base64.b64decode(current.data["tls.crt"])
        fresh = pem != short.cert_pem and certs.not_after(pem) > now + datetime.timedelta(days=60)
        return pem if fresh else None

    pem = wait_for("the operator to renew the serving certificate", renewed)
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    wait_for("the server to present the renewed certificate", lambda: served_or_empty(installed) == der)
    config = installed.admission.read_mutating_webhook_configuration(installed.configuration)
    assert base64.b64decode(config.webhooks[0].client_config.ca_bundle) == ca.cert_pem
    created = installed.core.create_namespaced_pod(namespace, pod("after-renewal", labels=ENROLLED))
    assert [c.name for c in created.spec.init_containers] == ["dbgov-proxy"]


def test_valid_policy_becomes_ready_and_writes_the_bundle(installed: Installed, namespace: str) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("orders-read"))
    body = wait_ready(installed, namespace, "orders-read")
    status = body["status"]
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "PolicyValid": "True",
        "Ready": "True",
    }
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    assert status["boundWorkloads"] == 1
    assert status["workloads"] == [{"kind": "ServiceAccount", "name": "orders", "serviceAccount": "orders"}]
    config_map = wait_for("the orders bundle", lambda: bundle(installed, namespace, "orders"))
    # One database: the per-database file and the default file carry the same policy.
    # Each file signed by the operator (tests/e2e/test_bundle_integrity.py).
    assert set(config_map.data) == {
        "policy.yaml",
        "policy.yaml.sig",
        "policy.orders-db.yaml",
        "policy.orders-db.yaml.sig",
    }
    assert config_map.data["policy.yaml"] == config_map.data["policy.orders-db.yaml"]
    shipped = yaml.safe_load(config_map.data["policy.yaml"])
    # Every binding policy by name, for the sidecar to compose (never a merged rule list), without
    # the fields only the operator reads.
    assert shipped == {
        "policies": [
            {
                "name": "orders-read",
                "spec": {
                    "default": "block",
                    "mode": "enforce",  # the CRD's default
                    "rules": [{"name": "read", "verdict": "allow", "statements": ["select"]}],
                },
            }
        ]
    }
    assert config_map.metadata.annotations["dbgov.io/policies"] == "orders-read"
    reasons = wait_for(
        "PolicyReady and BundleUpdated events",
        lambda: (
            {r for r, _ in events_for(installed, namespace, "orders-read")}
            >= {"PolicyReady", "BundleUpdated"}
        ),
    )
    assert reasons


SERVICE_ACCOUNT_BUNDLE_SECONDS = 5.0
"""How soon a ServiceAccount created after its policy has its bundle (a watch event, then one
coalesced reconcile: well under a second when idle)."""


def test_a_service_account_created_after_its_policy_gets_its_bundle_within_seconds(
    installed: Installed, namespace: str
) -> None:
    create_policy(installed, namespace, policy("orders-read"))
    status = wait_ready(installed, namespace, "orders-read")["status"]
    # Reconciled (the status is written) with no ServiceAccount orders: no bundle, nothing bound.
    assert status["boundWorkloads"] == 0
    assert bundle(installed, namespace, "orders") is None

    start = time.monotonic()
    account = service_account(installed, namespace)
    found = wait_for(
        "the bundle of the new ServiceAccount",
        lambda: (
            (cm := bundle(installed, namespace, "orders")) is not None and "policy.yaml.sig" in cm.data and cm
        ),
        timeout=SERVICE_ACCOUNT_BUNDLE_SECONDS * 2,
    )
    took = time.monotonic() - start
    print(f"bundle of a new ServiceAccount written in {took:.2f}s")
    assert took < SERVICE_ACCOUNT_BUNDLE_SECONDS
    owners = [(o.api_version, o.kind, o.name, o.uid) for o in found.metadata.owner_references or []]
    assert owners == [("v1", "ServiceAccount", "orders", account.metadata.uid)]
    assert found.metadata.annotations["dbgov.io/policies"] == "orders-read"
    wait_for(
        "the policy to list the new ServiceAccount",
        lambda: get_policy(installed, namespace, "orders-read")["status"].get("boundWorkloads") == 1,
    )


def test_invalid_policy_is_rejected_at_apply_time_with_field_paths(
    installed: Installed, namespace: str
) -> None:
    bad = policy(
        "broken",
        rules=[{"name": "r", "verdict": "allow", "statements": ["selekt"]}],
        guardrails={"requireWhere": ["select"]},
    )
    error = rejection(lambda: create_policy(installed, namespace, bad))
    assert error.status == 422
    message = str(error.body)
    assert "spec.rules[0].statements[0]" in message
    assert "spec.guardrails.requireWhere[0]" in message
    assert "2 problem(s)" in message
    assert rejection(lambda: get_policy(installed, namespace, "broken")).status == 404


def test_invalid_update_is_rejected_and_the_old_spec_stays(installed: Installed, namespace: str) -> None:
    create_policy(installed, namespace, policy("orders-read"))
    wait_ready(installed, namespace, "orders-read")
    patch = {"spec": {"rules": [{"name": "r", "verdict": "allow", "tables": ["a.b.c.d"]}]}}
    error = rejection(
        lambda: installed.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "orders-read", patch
        )
    )
    assert error.status in (400, 422)
    assert "spec.rules[0].tables[0]" in str(error.body)
    assert get_policy(installed, namespace, "orders-read")["metadata"]["generation"] == 1


def test_policy_change_updates_the_bundle(installed: Installed, namespace: str) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("orders-read"))
    wait_ready(installed, namespace, "orders-read")
    before = wait_for("the bundle", lambda: bundle(installed, namespace, "orders"))
    rules = [
        {"name": "read", "verdict": "allow", "statements": ["select"]},
        {"name": "writes", "verdict": "approve", "statements": ["insert", "update"]},
    ]
    installed.custom.patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "orders-read", {"spec": {"rules": rules}}
    )
    body = wait_ready(installed, namespace, "orders-read")
    assert body["status"]["observedGeneration"] == 2

    def updated() -> client.V1ConfigMap | None:
        found = bundle(installed, namespace, "orders")
        changed = found is not None and "name: writes" in found.data["policy.yaml"]
        return found if changed else None

    after = wait_for("the bundle to carry the new rule", updated)
    assert after.metadata.resource_version != before.metadata.resource_version
    (shipped,) = yaml.safe_load(after.data["policy.yaml"])["policies"]
    assert [r["name"] for r in shipped["spec"]["rules"]] == ["read", "writes"]


def test_deleting_a_policy_leaves_a_blocking_bundle(installed: Installed, namespace: str) -> None:
    # While an enrolled pod runs as the ServiceAccount its bundle stays (the kubelet would keep a
    # deleted ConfigMap's last content in the pod) and refuses everything; without one it goes
    # (tests/e2e/test_bundle_integrity.py).
    running = pod("orders-app", labels=ENROLLED)
    running["spec"]["serviceAccountName"] = "orders"
    service_account(installed, namespace)
    installed.core.create_namespaced_pod(namespace, running)
    create_policy(installed, namespace, policy("orders-read"))
    wait_ready(installed, namespace, "orders-read")
    installed.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders-read")

    def gone() -> bool:
        try:
            get_policy(installed, namespace, "orders-read")
        except ApiException as err:
            return err.status == 404
        return False

    wait_for("the policy to be gone", gone)

    def refusing() -> bool:
        found = bundle(installed, namespace, "orders")
        assert found is not None
        loaded = policy_compile.load_text(found.data["policy.yaml"])
        decide = policies.build(loaded)
        return decide.decide("SELECT 1", decide.new_context()).verdict == "block"

    wait_for("the bundle to refuse everything", refusing)


def test_pod_selector_binds_the_service_account_of_a_new_pod(installed: Installed, namespace: str) -> None:
    selector = {"podSelector": {"matchLabels": {"team": "ai"}}}
    create_policy(installed, namespace, policy("agents", subjects=selector))
    wait_ready(installed, namespace, "agents")
    agent = pod("agent-1", labels={**ENROLLED, "team": "ai"})
    agent["spec"]["serviceAccountName"] = "agent"
    service_account(installed, namespace, "agent")
    installed.core.create_namespaced_pod(namespace, agent)
    found = wait_for("the agent bundle", lambda: bundle(installed, namespace, "agent"))
    assert found.metadata.annotations["dbgov.io/policies"] == "agents"

    def bound() -> list[dict[str, Any]] | None:
        workloads = get_policy(installed, namespace, "agents").get("status", {}).get("workloads")
        return workloads or None

    assert wait_for("the agents status to list the agent", bound) == [
        {"kind": "ServiceAccount", "name": "agent", "serviceAccount": "agent"}
    ]


def test_restart_resumes_without_duplicate_work(installed: Installed, namespace: str) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("orders-read"))
    wait_ready(installed, namespace, "orders-read")
    wait_for(
        "events",
        lambda: (
            {r for r, _ in events_for(installed, namespace, "orders-read")}
            >= {"PolicyReady", "BundleUpdated"}
        ),
    )
    # ... and kopf has recorded the creation as handled (its diff base), which it writes once
    # the handler's reconcile is done: that may be a later one than the reconcile that wrote
    # the status (the ServiceAccount's own event asked for one first), and a restart before it
    # would only find the creation unhandled.
    handled = "dbgov.io/last-handled-configuration"
    wait_for(
        "kopf to record the creation as handled",
        lambda: (
            handled in (get_policy(installed, namespace, "orders-read")["metadata"].get("annotations") or {})
        ),
    )
    before_bundle = bundle(installed, namespace, "orders")
    before_policy = get_policy(installed, namespace, "orders-read")
    before_events = events_for(installed, namespace, "orders-read")

    installed.operator.stop()
    _start(installed)
    marker = f"Reconciled {namespace}"
    line = wait_for(
        "the restarted operator to resume the namespace",
        lambda: next((ln for ln in installed.operator.log_text().splitlines() if marker in ln), None),
    )
    assert "bundles [], statuses []" in line
    after_bundle = bundle(installed, namespace, "orders")
    assert after_bundle is not None and before_bundle is not None
    assert after_bundle.metadata.resource_version == before_bundle.metadata.resource_version
    after_policy = get_policy(installed, namespace, "orders-read")
    assert after_policy["status"] == before_policy["status"]
    # Not even kopf's own bookkeeping wrote to the policy.
    assert after_policy["metadata"]["resourceVersion"] == before_policy["metadata"]["resourceVersion"]
    assert events_for(installed, namespace, "orders-read") == before_events


def test_policy_stored_while_validation_was_off_is_reported_and_still_deletable(
    installed: Installed, namespace: str
) -> None:
    # As if the policy predates the webhook, or a stricter compiler release: switch the
    # validating webhook off, store an invalid policy, then let a restart put the webhook back.
    bad = policy("stale", rules=[{"name": "r", "verdict": "allow", "statements": ["selekt"]}])
    service_account(installed, namespace)

    def stored() -> bool:
        # The operator writes its webhook configurations back when it checks its certificate
        # (every 2 s here): delete and create at once, again until the create slips through.
        with contextlib.suppress(ApiException):
            installed.admission.delete_validating_webhook_configuration(installed.configuration)
        try:
            create_policy(installed, namespace, bad)
        except ApiException as err:
            if err.status != 422:
                raise
            return False
        return True

    wait_for("the invalid policy stored while validation was off", stored)

    def reported() -> dict[str, Any] | None:
        status = get_policy(installed, namespace, "stale").get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        valid = conditions.get("PolicyValid", {})
        return valid if valid.get("status") == "False" else None

    valid = wait_for("PolicyValid=False on the stored policy", reported)
    assert valid["message"].startswith("spec.rules[0].statements[0]: unknown statement class")
    # kopf posts events in the background, after the status it reports them with.
    wait_for(
        "the PolicyInvalid event",
        lambda: ("PolicyInvalid", valid["message"]) in events_for(installed, namespace, "stale"),
    )
    # A composition with an invalid policy does not compile: its ServiceAccount's bundle
    # refuses every statement and says why (issue 12, F3: fail closed, never frozen).
    refusing = wait_for("the refusing bundle of orders", lambda: bundle(installed, namespace, "orders"))
    assert (
        "generated by the operator from: dbgov:composition-invalid\n" in (refusing.data or {})["policy.yaml"]
    )

    installed.operator.stop()
    _start(installed)  # kopf re-creates the validating configuration it manages
    installed.admission.read_validating_webhook_configuration(installed.configuration)
    installed.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "stale")

    def gone() -> bool:
        try:
            get_policy(installed, namespace, "stale")
        except ApiException as err:
            return err.status == 404
        return False

    # Releasing the finalizer is a metadata-only update the webhook must let through.
    wait_for("the stale policy to be deleted", gone)


def test_labeled_pod_comes_back_with_the_sidecar(installed: Installed, namespace: str) -> None:
    app = pod(
        "orders-web",
        labels=ENROLLED,
        annotations={"dbgov.io/database-url-env": "DATABASE_URL"},
    )
    app["spec"]["serviceAccountName"] = "orders"
    app["spec"]["containers"][0]["env"] = [
        {"name": "DATABASE_URL", "value": "postgresql://orders@db.prod:5432/orders"}
    ]
    created = installed.core.create_namespaced_pod(namespace, app)
    stored = installed.core.read_namespaced_pod("orders-web", namespace)
    for seen in (created, stored):
        (sidecar,) = seen.spec.init_containers
        assert (sidecar.name, sidecar.restart_policy) == ("dbgov-proxy", "Always")
        assert seen.metadata.annotations["dbgov.io/status"] == "injected"
        volumes = {v.name: v for v in seen.spec.volumes}
        assert volumes["dbgov-policy"].config_map.name == "dbgov-policy-orders"
        assert volumes["dbgov-policy"].config_map.optional is False
        assert [i.key for i in volumes["dbgov-policy"].config_map.items] == ["policy.yaml", "policy.yaml.sig"]
        projected = volumes["dbgov-token"].projected.sources[0].service_account_token
        assert projected.audience == "dbgov"
        env = {e.name: e.value for e in seen.spec.containers[0].env}
        assert env["PGHOST"] == "127.0.0.1"
        assert env["DATABASE_URL"] == "postgresql://orders@127.0.0.1:5432/orders"
        upstream = {e.name: e.value for e in sidecar.env}
        assert upstream["DBGOV_UPSTREAM"] == "postgresql://orders@db.prod:5432/orders"


def test_with_minted_credentials_the_sidecar_gets_no_app_tls_mounts(
    installed: Installed, namespace: str
) -> None:
    """The operator mints: the sidecar trusts only its answer and opens none of the app's TLS
    files, so none of the app's volumes enters it (an app could have named a path inside the
    sidecar's own code; the webhook would have mounted its volume there). The static-credential
    form, which carries them, is in tests/unit/operator (injection golden files)."""
    url = (
        "postgresql://orders@db.prod:5432/orders?sslmode=verify-full&sslrootcert=/etc/db-ca/ca.crt"
        "&sslcert=/etc/db-client/tls.crt&sslkey=/etc/db-client/tls.key"
    )
    app = pod("tls-app", labels=ENROLLED, annotations={"dbgov.io/database-url-env": "DATABASE_URL"})
    app["spec"]["containers"][0]["env"] = [{"name": "DATABASE_URL", "value": url}]
    app["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "db-ca", "mountPath": "/etc/db-ca/ca.crt", "subPath": "ca.crt"},
        {"name": "db-client", "mountPath": "/etc/db-client"},
    ]
    app["spec"]["volumes"] = [
        {"name": "db-ca", "secret": {"secretName": "orders-db-ca"}},
        {"name": "db-client", "secret": {"secretName": "orders-db-client"}},
    ]
    created = installed.core.create_namespaced_pod(namespace, app)
    stored = installed.core.api_client.sanitize_for_serialization(
        installed.core.read_namespaced_pod("tls-app", namespace)
    )
    assert stored["spec"]["initContainers"][0]["volumeMounts"][2:] == []
    assert [m.name for m in created.spec.init_containers[0].volume_mounts] == ["dbgov-token", "dbgov-policy"]
    # Created again from the stored pod (its sidecar, volumes and status annotation included): a
    # pod cannot arrive claiming what only the webhook adds (controllers create from templates).
    again = copy.deepcopy(stored)
    again["metadata"] = {k: stored["metadata"][k] for k in ("labels", "annotations")} | {"name": "tls-again"}
    again.pop("status", None)
    error = rejection(lambda: installed.core.create_namespaced_pod(namespace, again))
    assert error.status == 400 and "only the dbgov webhook writes it" in error.body


def test_a_tls_file_only_the_app_has_does_not_matter_with_minted_credentials(
    installed: Installed, namespace: str
) -> None:
    url = "postgresql://db.prod/orders?sslmode=verify-full&sslrootcert=/app/ca.pem"  # in the image
    app = pod("tls-baked", labels=ENROLLED, annotations={"dbgov.io/database-url-env": "DATABASE_URL"})
    app["spec"]["containers"][0]["env"] = [{"name": "DATABASE_URL", "value": url}]
    created = installed.core.create_namespaced_pod(namespace, app)
    assert [m.name for m in created.spec.init_containers[0].volume_mounts] == ["dbgov-token", "dbgov-policy"]


def test_pg_tls_variables_reach_the_sidecar_and_the_app_gets_disable(
    installed: Installed, namespace: str
) -> None:
    app = pod("pgenv-app", labels=ENROLLED)
    app["spec"]["containers"][0]["env"] = [
        {"name": "PGHOST", "value": "db.prod"},
        {"name": "PGSSLMODE", "valueFrom": {"configMapKeyRef": {"name": "db-settings", "key": "sslmode"}}},
        {"name": "PGCHANNELBINDING", "value": "require"},
        {"name": "PGSSLROOTCERT", "value": "/etc/db-ca/ca.crt"},
    ]
    app["spec"]["containers"][0]["volumeMounts"] = [{"name": "db-ca", "mountPath": "/etc/db-ca"}]
    app["spec"]["volumes"] = [{"name": "db-ca", "secret": {"secretName": "db-ca"}}]
    installed.core.create_namespaced_pod(namespace, app)
    stored = installed.core.api_client.sanitize_for_serialization(
        installed.core.read_namespaced_pod("pgenv-app", namespace)
    )
    sidecar = stored["spec"]["initContainers"][0]
    upstream = {e["name"]: e for e in sidecar["env"] if e["name"].startswith("DBGOV_UPSTREAM")}
    assert list(upstream) == [
        "DBGOV_UPSTREAM_PGHOST",
        "DBGOV_UPSTREAM_PGPORT",
        "DBGOV_UPSTREAM_PGSSLMODE",
        "DBGOV_UPSTREAM",
    ]
    assert upstream["DBGOV_UPSTREAM_PGSSLMODE"]["valueFrom"] == {
        "configMapKeyRef": {"name": "db-settings", "key": "sslmode"}
    }
    assert upstream["DBGOV_UPSTREAM"]["value"] == (
        "postgresql://$(DBGOV_UPSTREAM_PGHOST):$(DBGOV_UPSTREAM_PGPORT)"
        "?sslmode=$(DBGOV_UPSTREAM_PGSSLMODE)&channel_binding=require&sslrootcert=/etc/db-ca/ca.crt"
    )
    assert sidecar["volumeMounts"][2:] == []  # minted: the sidecar opens none of the app's files
    env = {e["name"]: e for e in stored["spec"]["containers"][0]["env"]}
    assert env["PGSSLMODE"] == {"name": "PGSSLMODE", "value": "disable"}
    assert env["PGCHANNELBINDING"] == {"name": "PGCHANNELBINDING", "value": "disable"}
    assert (env["PGHOST"]["value"], env["PGPORT"]["value"]) == ("127.0.0.1", "5432")


def test_an_unmounted_pgsslrootcert_is_no_matter_with_minted_credentials(
    installed: Installed, namespace: str
) -> None:
    app = pod("pgenv-baked", labels=ENROLLED)
    app["spec"]["containers"][0]["env"] = [
        {"name": "PGHOST", "value": "db.prod"},
        {"name": "PGSSLMODE", "value": "verify-full"},
        {"name": "PGSSLROOTCERT", "value": "/app/ca.pem"},  # in the image
    ]
    created = installed.core.create_namespaced_pod(namespace, app)
    assert [m.name for m in created.spec.init_containers[0].volume_mounts] == ["dbgov-token", "dbgov-policy"]


def test_apiserver_accepts_the_native_sidecars_probes(installed: Installed, namespace: str) -> None:
    installed.core.create_namespaced_pod(namespace, pod("probed", labels=ENROLLED))
    stored = installed.core.api_client.sanitize_for_serialization(
        installed.core.read_namespaced_pod("probed", namespace)
    )
    sidecar = stored["spec"]["initContainers"][0]
    assert sidecar["ports"] == [{"name": "dbgov-metrics", "containerPort": 9187, "protocol": "TCP"}]
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["DBGOV_METRICS"] == "*:9187"
    probes = {
        kind: (p["httpGet"]["path"], p["httpGet"]["port"], p["periodSeconds"], p["failureThreshold"])
        for kind, p in sidecar.items()
        if kind.endswith("Probe")
    }
    assert probes == {
        "startupProbe": ("/readyz", "dbgov-metrics", 1, 120),
        "readinessProbe": ("/readyz", "dbgov-metrics", 5, 2),
        "livenessProbe": ("/healthz", "dbgov-metrics", 10, 3),
    }
    # Stored with the apiserver's defaults filled in: it parsed them, not just kept the JSON.
    assert sidecar["livenessProbe"]["httpGet"]["scheme"] == "HTTP"
    assert sidecar["livenessProbe"]["timeoutSeconds"] == 1
    # It does check probes on init containers: the same container without restartPolicy: Always
    # (not a sidecar) is refused, so the acceptance above is the validation passing.
    plain = pod("probed-plain")
    plain["spec"]["initContainers"] = [{k: v for k, v in sidecar.items() if k != "restartPolicy"}]
    plain["spec"]["volumes"] = stored["spec"]["volumes"]
    error = rejection(lambda: installed.core.create_namespaced_pod(namespace, plain))
    assert error.status == 422
    assert "livenessProbe" in str(error.body) and "restartPolicy" in str(error.body)


def test_pod_declaring_the_metrics_port_is_refused_with_the_override_to_use(
    installed: Installed, namespace: str
) -> None:
    clash = pod("clash", labels=ENROLLED)
    clash["spec"]["containers"][0]["ports"] = [{"name": "metrics", "containerPort": 9187}]
    error = rejection(lambda: installed.core.create_namespaced_pod(namespace, clash))
    assert error.status == 400
    assert "dbgov.io/sidecar-metrics-port" in str(error.body)
    assert "container 'app'" in str(error.body)
    clash["metadata"]["annotations"] = {"dbgov.io/sidecar-metrics-port": "9188"}
    created = installed.core.create_namespaced_pod(namespace, clash)
    assert [p.container_port for p in created.spec.init_containers[0].ports] == [9188]


def test_a_new_pod_gets_the_bundle_file_it_mounts(installed: Installed, namespace: str) -> None:
    # A pod may name only a database a policy binding it is about (enrollment, issue 12); the
    # file its volume mounts is written for it, signed, whatever else the ServiceAccount has.
    reports = policy(
        "reports-read", subjects={"serviceAccounts": ["reporting"]}, databaseRef={"name": "reports-db"}
    )
    create_policy(installed, namespace, reports)
    wait_ready(installed, namespace, "reports-read")
    app = pod("reports", labels=ENROLLED, annotations={"dbgov.io/database": "reports-db"})
    app["spec"]["serviceAccountName"] = "reporting"
    service_account(installed, namespace, "reporting")
    created = installed.core.create_namespaced_pod(namespace, app)
    volume = next(v for v in created.spec.volumes if v.name == "dbgov-policy")
    assert [i.key for i in volume.config_map.items] == [
        "policy.reports-db.yaml",
        "policy.reports-db.yaml.sig",
    ]
    found = wait_for("the reporting bundle", lambda: bundle(installed, namespace, "reporting"))
    assert {"policy.reports-db.yaml", "policy.reports-db.yaml.sig"} <= set(found.data)
    shipped = yaml.safe_load(found.data["policy.reports-db.yaml"])
    assert [p["name"] for p in shipped["policies"]] == ["reports-read"]


def test_a_copy_of_an_injected_pod_is_refused(installed: Installed, namespace: str) -> None:
    # The webhook runs once per CREATE, so a pod arriving with its sidecar and status annotation
    # made them itself (issue 12, attack finding F2): refused, never trusted as injected.
    first = installed.core.create_namespaced_pod(namespace, pod("once", labels=ENROLLED))
    again = installed.core.api_client.sanitize_for_serialization(first)
    again["metadata"] = {
        "name": "once-again",
        "labels": again["metadata"]["labels"],
        "annotations": again["metadata"]["annotations"],
    }
    again.pop("status", None)
    with pytest.raises(ApiException) as caught:
        installed.core.create_namespaced_pod(namespace, copy.deepcopy(again))
    message = str(caught.value.body)
    assert "annotation dbgov.io/status='injected'" in message
    assert "init container 'dbgov-proxy': the name is the dbgov sidecar's" in message


def test_unlabeled_pod_is_untouched(installed: Installed, namespace: str) -> None:
    created = installed.core.create_namespaced_pod(namespace, pod("plain"))
    assert not created.spec.init_containers
    assert "dbgov.io/status" not in (created.metadata.annotations or {})
    assert created.spec.containers[0].env is None


def test_labeled_pod_in_kube_system_is_untouched(installed: Installed, namespace: str) -> None:
    name = f"dbgov-e2e-{uuid.uuid4().hex[:6]}"
    created = installed.core.create_namespaced_pod("kube-system", pod(name, labels=ENROLLED))
    try:
        assert not created.spec.init_containers
        assert "dbgov.io/status" not in (created.metadata.annotations or {})
        # Nor does a pod there make the operator write anything into kube-system: by the time
        # a later pod elsewhere has its bundle, the kube-system pod's event was handled too.
        later = pod("later", labels=ENROLLED)
        later["spec"]["serviceAccountName"] = "later"
        service_account(installed, namespace, "later")
        installed.core.create_namespaced_pod(namespace, later)
        wait_for("the later pod's bundle", lambda: bundle(installed, namespace, "later"))
        managed = installed.core.list_namespaced_config_map(
            "kube-system", label_selector="app.kubernetes.io/managed-by=dbgov"
        )
        assert managed.items == []
    finally:
        installed.core.delete_namespaced_pod(name, "kube-system", grace_period_seconds=0)


def test_bad_override_annotation_refuses_the_pod(installed: Installed, namespace: str) -> None:
    bad = pod("bad", labels=ENROLLED, annotations={"dbgov.io/sidecar-resources": "{nope"})
    error = rejection(lambda: installed.core.create_namespaced_pod(namespace, bad))
    assert error.status == 400
    assert "dbgov.io/sidecar-resources" in str(error.body)


def test_operator_log_shows_no_permission_errors(installed: Installed) -> None:
    # An event posted while a test's namespace is being deleted is refused as Forbidden with
    # reason NamespaceTerminating: not a permission the chart lacks.
    logs = "\n".join(
        line for line in installed.operator.all_logs().splitlines() if "NamespaceTerminating" not in line
    )
    account = f"system:serviceaccount:{installed.namespace}:{installed.service_account}"
    assert f'User \\"{account}\\" cannot' not in logs
    assert f'User "{account}" cannot' not in logs
    assert "Forbidden" not in logs
    assert " 403" not in logs
    assert "Traceback" not in logs
