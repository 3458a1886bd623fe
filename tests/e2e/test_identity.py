"""Workload identity against a real kube-apiserver: the operator's credential endpoint checks
projected-style tokens with TokenReview and the bound Pod, and a real `dbgov proxy` in cluster
mode refuses clients until the operator verified it, then audits every statement with it.

The operator runs as a process with the chart's ServiceAccount and RBAC (so TokenReview create
and pods get are proven enough). Pods are stored, never run (no kubelet): tokens bound to them
come from TokenRequest, as the kubelet gets them for a projected volume.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import pg

from . import kube
from .operator_proc import Installed, wait_for
from .test_operator import deployed

AUDIENCE = "dbgov"
ACCOUNT = "orders"


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """The running operator and how to reach its credential endpoint."""

    installed: Installed
    url: str
    ca_pem: str

    def post(self, token: str | None, *, body: bytes = b"{}") -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.url, data=body, method="POST", headers=headers)
        context = ssl.create_default_context(cadata=self.ca_pem)  # verifies the operator
        try:
            with urllib.request.urlopen(request, timeout=15, context=context) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def endpoint(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Endpoint]:
    workdir = tmp_path_factory.mktemp("identity-operator")
    (port,) = kube.free_ports(1)
    env = {"DBGOV_CREDENTIAL_PORT": str(port)}
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=env) as found:
        ca = (workdir / "certs" / "ca.crt").read_text()
        yield Endpoint(installed=found, url=f"https://127.0.0.1:{port}/v1/credentials", ca_pem=ca)


def _core(cluster: kube.KubeCluster) -> Any:
    return client.CoreV1Api(cluster.api_client())  # models out, held untyped as the operator does


def make_pod(
    cluster: kube.KubeCluster, namespace: str, name: str, *, finalizers: list[str] | None = None
) -> str:
    """Create (ServiceAccount and) a Pod running as ACCOUNT; return the pod's uid."""
    with contextlib.suppress(ApiException):  # 409: the test's second pod
        cluster.create_service_account(namespace=namespace, name=ACCOUNT)
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "finalizers": finalizers or []},
        "spec": {"serviceAccountName": ACCOUNT, "containers": [{"name": "app", "image": "example/app:1"}]},
    }
    created = _core(cluster).create_namespaced_pod(namespace, body)
    return str(created.metadata.uid)


def delete_pod(cluster: kube.KubeCluster, namespace: str, name: str) -> None:
    _core(cluster).delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def bound_token(
    cluster: kube.KubeCluster,
    namespace: str,
    *,
    pod: str | None,
    uid: str | None,
    audiences: tuple[str, ...] = (AUDIENCE,),
    expiration_seconds: int = 600,
) -> str:
    """A token for ACCOUNT from TokenRequest, bound to the pod as a projected volume's is."""
    bound = None
    if pod is not None:
        bound = client.V1BoundObjectReference(kind="Pod", api_version="v1", name=pod, uid=uid)
    spec = client.V1TokenRequestSpec(
        audiences=list(audiences), expiration_seconds=expiration_seconds, bound_object_ref=bound
    )
    answer = _core(cluster).create_namespaced_service_account_token(
        ACCOUNT, namespace, client.AuthenticationV1TokenRequest(spec=spec)
    )
    return str(answer.status.token)


def _claims(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return header, claims


def resigned(token: str, *, key: Any, **changes: Any) -> str:
    """The token's own claims with ``changes``, signed with ``key`` (RS256, same kid)."""
    header, claims = _claims(token)
    claims.update(changes)
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": header.get("kid", "")})


def refused(endpoint: Endpoint, token: str | None) -> tuple[int, str]:
    status, body = endpoint.post(token)
    assert set(body) == {"error"}, body  # no identity, no credentials
    assert set(body["error"]) == {"code", "message"}, body
    return status, body["error"]["code"]


# --------------------------------------------------------------------------------------------
# the endpoint
# --------------------------------------------------------------------------------------------


def verified(endpoint: Endpoint, token: str) -> bool:
    """The token passed TokenReview and the pod checks: credentials (200), or the refusal that
    comes only after them, no policy binding the pod (409 no_policy: these pods have none)."""
    status, body = endpoint.post(token)
    return status == 200 or (status == 409 and body.get("error", {}).get("code") == "no_policy")


def test_a_pod_bound_token_gets_that_pods_identity(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    uid = make_pod(kube_cluster, namespace, "orders-1")
    token = bound_token(kube_cluster, namespace, pod="orders-1", uid=uid)
    status, body = endpoint.post(token)
    # Verified, and then refused credentials: no policy binds the pod (minting: test_minting.py).
    assert (status, body["error"]["code"]) == (409, "no_policy"), body
    line = wait_for("the refusal audit line", lambda: _audit_line(endpoint, "credential_refusal", uid))
    assert line["code"] == "no_policy"
    assert line["workload"] == {
        "namespace": namespace,
        "serviceAccount": ACCOUNT,
        "pod": "orders-1",
        "podUid": uid,
        "node": "",  # stored, never scheduled
    }


def test_no_token_a_forged_one_and_an_unbound_one_are_refused(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    uid = make_pod(kube_cluster, namespace, "orders-2")
    real = bound_token(kube_cluster, namespace, pod="orders-2", uid=uid)
    assert refused(endpoint, None) == (401, "missing_token")
    # Same claims and kid, signed by a key the apiserver never saw.
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(endpoint, resigned(real, key=forger)) == (401, "token_invalid")
    assert refused(endpoint, real[:-4] + "AAAA") == (401, "token_invalid")  # a tampered signature
    # A valid ServiceAccount token for the right audience, bound to no pod.
    unbound = bound_token(kube_cluster, namespace, pod=None, uid=None)
    assert refused(endpoint, unbound) == (403, "not_pod_bound")
    line = wait_for(
        "the refusal audit line", lambda: _audit_line(endpoint, "credential_refusal", "not_pod_bound")
    )
    assert line["workload"] is None and f"system:serviceaccount:{namespace}:{ACCOUNT}" in line["detail"]


def test_wrong_audience_is_refused(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    uid = make_pod(kube_cluster, namespace, "orders-3")
    # An audience the apiserver itself accepts (its own): only the dbgov check refuses it.
    token = bound_token(kube_cluster, namespace, pod="orders-3", uid=uid, audiences=(kube_cluster.server,))
    assert refused(endpoint, token) == (401, "wrong_audience")


def test_a_token_for_dbgov_and_other_audiences_is_refused(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    """Every pod holds a token for the apiserver's default audiences (kube-api-access); where a
    cluster lists dbgov among them, as this test apiserver does, the app container's own token
    would pass the TokenReview for dbgov: only the sidecar's dbgov-only token may."""
    uid = make_pod(kube_cluster, namespace, "orders-7")
    both = bound_token(
        kube_cluster, namespace, pod="orders-7", uid=uid, audiences=(AUDIENCE, kube_cluster.server)
    )
    assert refused(endpoint, both) == (401, "audience_not_exclusive")
    defaults = bound_token(kube_cluster, namespace, pod="orders-7", uid=uid, audiences=())
    assert AUDIENCE in _claims(defaults)[1]["aud"]  # the apiserver's defaults name dbgov here
    assert refused(endpoint, defaults) == (401, "audience_not_exclusive")
    assert verified(endpoint, bound_token(kube_cluster, namespace, pod="orders-7", uid=uid))


def test_an_expired_token_is_refused(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    """Signed with the apiserver's own ServiceAccount signing key (the fixture made it), so only
    its expiry is wrong; TokenRequest's minimum lifetime is 10 minutes, too long to wait out."""
    uid = make_pod(kube_cluster, namespace, "orders-4")
    real = bound_token(kube_cluster, namespace, pod="orders-4", uid=uid)
    key = serialization.load_pem_private_key(kube_cluster.pki.sa_private.read_bytes(), password=None)
    now = int(time.time())
    still_good = resigned(real, key=key)  # proves the re-signing itself is accepted
    assert verified(endpoint, still_good)
    expired = resigned(real, key=key, iat=now - 1200, nbf=now - 1200, exp=now - 600)
    assert refused(endpoint, expired) == (401, "token_expired")


def test_a_token_of_a_deleted_pod_is_refused(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    uid = make_pod(kube_cluster, namespace, "orders-5")
    token = bound_token(kube_cluster, namespace, pod="orders-5", uid=uid)
    assert verified(endpoint, token)
    delete_pod(kube_cluster, namespace, "orders-5")
    wait_for("the pod to be gone", lambda: _gone(kube_cluster, namespace, "orders-5"))
    # The apiserver checks the bound object too, from its own informer cache, which may still
    # hold the pod for a moment: then its review passes and the operator's lookup refuses.
    assert refused(endpoint, token) in {(403, "pod_not_found"), (401, "token_invalid")}
    # Recreated under the same name: a new uid, and the old token still gets nothing.
    new_uid = make_pod(kube_cluster, namespace, "orders-5")
    assert new_uid != uid
    assert refused(endpoint, token) in {(403, "pod_uid_mismatch"), (401, "token_invalid")}
    assert verified(endpoint, bound_token(kube_cluster, namespace, pod="orders-5", uid=new_uid))


def test_a_token_of_a_terminating_pod_is_refused(
    endpoint: Endpoint, kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    """A finalizer keeps the deleted pod stored with a deletionTimestamp; the apiserver still
    authenticates its token for a while (graceful shutdown), the operator's own check refuses."""
    finalizer = "dbgov.io/test-hold"
    uid = make_pod(kube_cluster, namespace, "orders-6", finalizers=[finalizer])
    token = bound_token(kube_cluster, namespace, pod="orders-6", uid=uid)
    try:
        _core(kube_cluster).delete_namespaced_pod("orders-6", namespace)
        wait_for(
            "the deletionTimestamp",
            lambda: (
                _core(kube_cluster).read_namespaced_pod("orders-6", namespace).metadata.deletion_timestamp
            ),
        )
        assert refused(endpoint, token) == (403, "pod_terminating")
    finally:
        _core(kube_cluster).patch_namespaced_pod("orders-6", namespace, {"metadata": {"finalizers": None}})


def test_a_large_request_is_refused_before_any_review(endpoint: Endpoint) -> None:
    status, body = endpoint.post("x.y.z", body=b"{" + b" " * 10_000 + b"}")
    assert (status, body["error"]["code"]) == (413, "request_too_large")


def _gone(cluster: kube.KubeCluster, namespace: str, name: str) -> bool:
    try:
        _core(cluster).read_namespaced_pod(name, namespace)
    except ApiException as err:
        return bool(err.status == 404)
    return False


def _audit_line(endpoint: Endpoint, kind: str, needle: str) -> dict[str, Any] | None:
    for line in endpoint.installed.operator.log_text().splitlines():
        if line.startswith("{") and f'"type":"{kind}"' in line and needle in line:
            found: dict[str, Any] = json.loads(line)
            return found
    return None


# --------------------------------------------------------------------------------------------
# a real `dbgov proxy` in cluster mode
# --------------------------------------------------------------------------------------------


def test_the_proxy_serves_no_one_before_its_identity_is_verified_and_credentials_minted(
    endpoint: Endpoint,
    kube_cluster: kube.KubeCluster,
    namespace: str,
    pg_server: pg.PgServer,
    tmp_path: Path,
) -> None:
    uid = make_pod(kube_cluster, namespace, "orders-proxy")
    token = bound_token(kube_cluster, namespace, pod="orders-proxy", uid=uid)
    token_file = tmp_path / "token"
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token_file.write_text(resigned(token, key=forger))  # not yet a token the apiserver accepts
    policy = tmp_path / "policy.yaml"
    policy.write_text("mode: enforce\ndefault: allow\n")
    audit_file, log_file = tmp_path / "audit.jsonl", tmp_path / "proxy.log"
    port = pg.free_port()
    env = {
        **os.environ,
        # As injection sets them (the CA as PEM text in the environment):
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": pg.APP_PASSWORD,
        "DBGOV_POLICY": str(policy),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": "",
        "DBGOV_TOKEN_FILE": str(token_file),
        "DBGOV_TOKEN_AUDIENCE": AUDIENCE,
        "DBGOV_POD_NAME": "orders-proxy",
        "DBGOV_POD_NAMESPACE": namespace,
        "DBGOV_POD_UID": uid,
        "DBGOV_SERVICE_ACCOUNT": ACCOUNT,
        "DBGOV_CREDENTIAL_URL": endpoint.url,
        "DBGOV_CREDENTIAL_CA": endpoint.ca_pem,
    }
    dsn = f"host=127.0.0.1 port={port} user=cli dbname=shop sslmode=disable connect_timeout=5"
    with (
        log_file.open("wb") as log,
        _process([sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env, log) as proc,
    ):

        def refusal() -> str | None:
            assert proc.poll() is None, log_file.read_text()
            try:
                psycopg.connect(dsn).close()
            except psycopg.OperationalError as err:
                return str(err) if "workload identity" in str(err) else None
            raise AssertionError("a client was served before the workload identity was verified")

        message = wait_for("the FATAL of an unverified sidecar", refusal, timeout=30)
        assert "has not verified its workload identity" in message
        wait_for("the reason in the proxy's log", lambda: "token_invalid" in log_file.read_text())

        token_file.write_text(token)  # the kubelet rotates the token: the next attempt reads it

        # The token passes now, but no policy binds the pod, so the operator answers no_policy
        # and mints nothing: the sidecar goes on refusing every client and never falls back to
        # the static upstream login (served with minted credentials: test_sidecar_minted.py).
        wait_for("the operator's no_policy in the proxy's log", lambda: "no_policy" in log_file.read_text())
        assert "refused" in refusal_of(dsn, proc, log_file)
    events = [json.loads(line) for line in audit_file.read_text().splitlines()] if audit_file.exists() else []
    assert not [e for e in events if e["type"] == "statement"], events


def refusal_of(dsn: str, proc: subprocess.Popen[bytes], log_file: Path) -> str:
    """The FATAL a client gets (the test fails if it is served)."""
    assert proc.poll() is None, log_file.read_text()
    try:
        psycopg.connect(dsn).close()
    except psycopg.OperationalError as err:
        return f"refused: {err}"
    raise AssertionError("a client was served without a verified identity and minted credentials")


@contextlib.contextmanager
def _process(argv: list[str], env: dict[str, str], log: Any) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
