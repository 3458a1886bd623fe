"""The e2e harness itself (kube.py): failure without binaries, process hygiene, identity."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
from kubernetes import client

from . import kube


def test_missing_binaries_fail_the_session_never_skip(tmp_path: Path) -> None:
    env = {**os.environ, "DBGOV_TOOLS_DIR": str(tmp_path / "empty")}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0",
         f"{Path(__file__).parent / 'test_crds.py'}::test_crds_are_established_and_discoverable"],
        cwd=kube.REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "run `make tools`" in result.stdout.lower()
    assert "1 error" in result.stdout and "skipped" not in result.stdout


def test_cluster_stops_exactly_its_own_processes(kube_tools: kube.Tools, tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])  # must survive the cluster's shutdown
    try:
        with pytest.raises(RuntimeError, match="boom"), kube.running_cluster(tmp_path) as cluster:
            pids = [p.popen.pid for p in cluster.processes]
            assert len(pids) == 2
            raise RuntimeError("boom")  # a failing session still stops them
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert bystander.poll() is None
        assert not (tmp_path / "etcd-data").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_server_reports_the_pinned_version(kube_cluster: kube.KubeCluster) -> None:
    version = kube_cluster.version()
    assert version["git_version"] == kube_cluster.tools.kube_version
    major, minor = kube_cluster.tools.kube_version.lstrip("v").split(".")[:2]
    assert (version["major"], version["minor"]) == (major, minor)
    assert "$Format" not in version["git_commit"] + version["git_version"]  # stamped at link time


def test_service_account_tokens_verify_against_the_apiserver_jwks(
    kube_cluster: kube.KubeCluster, namespace: str
) -> None:
    """What the sidecar relies on: a projected-style token, verifiable offline via JWKS."""
    kube_cluster.create_service_account(namespace=namespace, name="orders-api")
    token = kube_cluster.service_account_token(namespace=namespace, name="orders-api")
    ctx = kube_cluster.ssl_context()
    discovery = jwt.PyJWKClient(f"{kube_cluster.server}/openid/v1/jwks", ssl_context=ctx)
    claims = jwt.decode(
        token,
        discovery.get_signing_key_from_jwt(token).key,
        algorithms=["RS256"],
        audience="dbgov",
        issuer=kube_cluster.server,
    )
    assert claims["sub"] == f"system:serviceaccount:{namespace}:orders-api"
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(
            token,
            discovery.get_signing_key_from_jwt(token).key,
            algorithms=["RS256"],
            audience="someone-else",
        )
    # ... and TokenReview agrees, for the same audience only.
    authn = client.AuthenticationV1Api(kube_cluster.api_client())

    def review(audience: str) -> client.V1TokenReviewStatus:
        spec = client.V1TokenReviewSpec(token=token, audiences=[audience])
        return authn.create_token_review(client.V1TokenReview(spec=spec)).status

    ok = review("dbgov")
    assert ok.authenticated is True
    assert ok.user.username == f"system:serviceaccount:{namespace}:orders-api"
    assert not review(kube_cluster.server + "/other").authenticated


def test_processes_die_with_a_killed_test_process(tmp_path: Path) -> None:
    """An xdist worker killed before its finalizers run must not leave its servers behind."""
    script = (
        "import os, sys, pathlib\n"
        "from tests.e2e import kube\n"
        "p = kube.Process.start(name='s', argv=['sleep', '60'], log=pathlib.Path(sys.argv[1]))\n"
        "print(p.popen.pid, flush=True)\n"
        "os._exit(1)  # no finalizers, no Process.stop()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "sleep.log")],
        cwd=kube.REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    child = int(result.stdout.strip())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(child, 9)
    raise AssertionError(f"child {child} outlived its parent")
