"""The operator as a subprocess against the test apiserver, and what tests need to drive it.

Shared by the operator tests (one replica, cert-manager, kopf peering): start and stop
``python -m dbgov_operator`` by PID, give it a token kubeconfig for the chart's ServiceAccount,
point its webhook at a loopback port, create policies and wait for them, and read which replica
kopf peering lets work.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import kube

CHART = kube.REPO_ROOT / "charts" / "dbgov"
GROUP, VERSION, PLURAL = "dbgov.io", "v1alpha1", "databaseaccesspolicies"
CERT_SECRET = "dbgov-webhook-cert"
T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 45.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@dataclass(slots=True, kw_only=True)
class Operator:
    """``python -m dbgov_operator`` in a subprocess; restartable; stopped by PID."""

    env: dict[str, str]
    workdir: Path
    process: kube.Process | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        log = self.workdir / f"operator-{self.starts}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "dbgov_operator"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.process = kube.Process(name="dbgov-operator", popen=popen, log=log)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=30)
            self.process = None

    def log_text(self) -> str:
        return self.logs[-1].read_text(errors="replace") if self.logs else ""

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs)


@dataclass(frozen=True, slots=True, kw_only=True)
class Installed:
    """The running operator and what the tests need to reach it."""

    operator: Operator
    namespace: str
    service_account: str
    configuration: str
    token: str
    core: client.CoreV1Api
    custom: client.CustomObjectsApi
    admission: client.AdmissionregistrationV1Api


def installed(
    cluster: kube.KubeCluster,
    *,
    operator: Operator,
    namespace: str,
    service_account: str,
    configuration: str,
    token: str,
) -> Installed:
    """An `Installed` with admin API clients for `cluster`."""
    api = cluster.api_client()
    return Installed(
        operator=operator,
        namespace=namespace,
        service_account=service_account,
        configuration=configuration,
        token=token,
        core=client.CoreV1Api(api),
        custom=client.CustomObjectsApi(api),
        admission=client.AdmissionregistrationV1Api(api),
    )


def token_kubeconfig(cluster: kube.KubeCluster, *, token: str, path: Path) -> Path:
    """A kubeconfig that authenticates with ``token`` (a ServiceAccount's, from TokenRequest)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "e2e",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority": str(cluster.pki.serving_ca.path),
                },
            }
        ],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "operator"}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def loopback_webhook_env(*, port: int, cert_dir: Path, configuration: str) -> dict[str, str]:
    """Webhook settings for an operator outside the cluster: the apiserver calls it by URL at
    127.0.0.1 (no Service routing here), under a configuration name of the test's own."""
    return {
        "DBGOV_WEBHOOK_SERVICE": "",
        "DBGOV_WEBHOOK_LISTEN_ADDR": "127.0.0.1",
        "DBGOV_WEBHOOK_URL_HOST": "127.0.0.1",
        "DBGOV_WEBHOOK_PORT": str(port),
        "DBGOV_WEBHOOK_CERT_DIR": str(cert_dir),
        "DBGOV_WEBHOOK_CERT_SECRET": CERT_SECRET,
        "DBGOV_WEBHOOK_CONFIGURATION": configuration,
        # Several operators on one machine: each binds its credential endpoint to a free port
        # and tells sidecars that one (in a cluster each replica has the pod's own 9444).
        "DBGOV_CREDENTIAL_PORT": "0",
    }


def delete_cluster_scoped(cluster: kube.KubeCluster, docs: Sequence[Mapping[str, Any]]) -> None:
    """Delete the cluster-scoped objects among applied chart ``docs`` (CRDs stay, as helm
    leaves them): a release's admission policies, ClusterRoles and webhook configurations left
    behind would judge every later test module in this apiserver (its bundle policy lets only
    that release's operator write bundles)."""
    dynamic = cluster.dynamic()
    for doc in docs:
        if doc["kind"] == "CustomResourceDefinition":
            continue
        resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        if resource.namespaced:
            continue
        try:
            resource.delete(name=doc["metadata"]["name"])
        except ApiException as err:
            if err.status != 404:
                raise


def delete_webhook_configurations(admission: client.AdmissionregistrationV1Api, name: str) -> None:
    """Remove an operator's webhook configurations once it is gone.

    They are persistent and fail closed while no operator answers; the test session must not
    keep them after the operator that served them stopped.
    """
    for delete in (
        admission.delete_mutating_webhook_configuration,
        admission.delete_validating_webhook_configuration,
    ):
        try:
            delete(name)
        except ApiException as err:
            if err.status != 404:
                raise


def validating_served(env: Installed) -> bool:
    """Whether the validating webhook configuration is published with a caBundle and the server
    it names accepts connections, so policies can be created (any replica answers). kopf may
    publish the configuration before its server listens."""
    try:
        hooks = env.admission.read_validating_webhook_configuration(env.configuration).webhooks
    except ApiException:
        return False
    return bool(hooks) and all(h.client_config.ca_bundle and _listening(h.client_config.url) for h in hooks)


def _listening(url: str | None) -> bool:
    """A URL-form webhook's server accepts TCP connections (a Service-form one is not checked)."""
    if not url:
        return True
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 443), timeout=1):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# policies
# --------------------------------------------------------------------------------------------


def policy(name: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subjects": {"serviceAccounts": ["orders"]},
        "databaseRef": {"name": "orders-db"},
        "default": "block",
        "rules": [{"name": "read", "verdict": "allow", "statements": ["select"]}],
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DatabaseAccessPolicy",
        "metadata": {"name": name},
        "spec": body,
    }


def create_policy(env: Installed, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = env.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return created


def get_policy(env: Installed, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = env.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    return found


def wait_ready(env: Installed, namespace: str, name: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        body = get_policy(env, namespace, name)
        status = body.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        generation = body["metadata"]["generation"]
        current = status.get("observedGeneration") == generation
        if current and conditions.get("Ready", {}).get("status") == "True":
            return body
        return None

    return wait_for(f"policy {namespace}/{name} Ready", ready)


# --------------------------------------------------------------------------------------------
# kopf peering
# --------------------------------------------------------------------------------------------


def peers(cluster: kube.KubeCluster, peering: str) -> dict[str, dict[str, Any]]:
    """The keep-alives in a ClusterKopfPeering: peer id (POD_ID) -> priority, lifetime, lastseen."""
    body = client.CustomObjectsApi(cluster.api_client()).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", peering
    )
    return dict(body.get("status") or {})


def active(operator: Operator) -> bool:
    """Whether kopf peering last let this replica handle resources (it starts paused)."""
    states = [
        "Resuming" in line
        for line in operator.log_text().splitlines()
        if "kopf._core.engines.peering" in line and ("Resuming" in line or "Pausing" in line)
    ]
    return bool(states) and states[-1]


def reconciled(operator: Operator, namespace: str) -> bool:
    """Whether this replica reconciled ``namespace`` (the operator logs each reconcile)."""
    return f"Reconciled {namespace}" in operator.log_text()
