"""Bundles the namespace cannot edit, against a real kube-apiserver and a real `dbgov proxy`.

The operator runs as a process with the chart's ServiceAccount and RBAC. A namespace user's
patch or deletion of a bundle ConfigMap is repaired within seconds (the operator watches them);
a bundle nothing needs is deleted and the others are owned by their ServiceAccount. The proxy
loads the bundle as the kubelet mounts it (each ConfigMap key a file, ``policy.yaml.sig``
beside ``policy.yaml``) with the operator's public key, as injection configures it, and refuses
a tampered, replayed or misplaced bundle while the last good one keeps enforcing.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

import pg
from dbgov_sidecar import bundle_signature

from . import kube
from .operator_proc import (
    GROUP,
    PLURAL,
    VERSION,
    Installed,
    create_policy,
    policy,
    wait_for,
    wait_ready,
)
from .test_operator import deployed

SIGNING_SECRET = "dbgov-bundle-signing-key"
LAX = "# dbgov policy bundle\ndefault: allow\nmode: dry-run\n"
REPAIR_SECONDS = 10.0
"""How fast drift must be repaired ("within seconds"); measured times are printed."""


@pytest.fixture(scope="module")
def installed(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("bundle-operator")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir) as found:
        yield found


def _bundle(env: Installed, namespace: str, account: str = "orders") -> client.V1ConfigMap | None:
    try:
        return env.core.read_namespaced_config_map(f"dbgov-policy-{account}", namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _public_key(env: Installed) -> str:
    secret = env.core.read_namespaced_secret(SIGNING_SECRET, env.namespace)
    return base64.b64decode(secret.data["ed25519.pub"]).decode()


def _verifies(env: Installed, namespace: str, data: dict[str, str], account: str = "orders") -> bool:
    raw = bundle_signature.public_key(_public_key(env))
    expected = bundle_signature.Expected(namespace=namespace, service_account=account, file="policy.yaml")
    try:
        bundle_signature.verify(
            data["policy.yaml"].encode(),
            data.get("policy.yaml.sig"),
            keys={bundle_signature.key_id(raw): raw},
            expected=expected,
        )
    except bundle_signature.BundleRejected:
        return False
    return True


def _signed_bundle(env: Installed, namespace: str) -> dict[str, str]:
    """The orders-read policy and its ServiceAccount orders (bundles are written only for
    ServiceAccounts that exist; a test may create it first), and the bundle, once signed."""
    try:
        env.core.create_namespaced_service_account(namespace, {"metadata": {"name": "orders"}})
    except ApiException as err:
        if err.status != 409:  # 409: the test created it first (for its uid)
            raise
    create_policy(env, namespace, policy("orders-read"))
    wait_ready(env, namespace, "orders-read")
    found = wait_for(
        "a signed orders bundle",
        lambda: (cm := _bundle(env, namespace)) is not None and "policy.yaml.sig" in (cm.data or {}) and cm,
    )
    data = dict(found.data)
    assert _verifies(env, namespace, data)
    return data


def _repaired(env: Installed, namespace: str, original: dict[str, str], what: str) -> float:
    start = time.monotonic()

    def back() -> bool:
        found = _bundle(env, namespace)
        if found is None:
            return False
        data = dict(found.data or {})
        return data.get("policy.yaml") == original["policy.yaml"] and _verifies(env, namespace, data)

    wait_for(f"the operator to repair the {what} bundle", back, timeout=REPAIR_SECONDS)
    took = time.monotonic() - start
    print(f"{what} bundle repaired in {took:.2f}s")
    return took


def test_a_patched_bundle_is_repaired_within_seconds(installed: Installed, namespace: str) -> None:
    original = _signed_bundle(installed, namespace)
    # What the issue did by hand: the workload's namespace loosens its own bundle.
    installed.core.patch_namespaced_config_map(
        "dbgov-policy-orders", namespace, {"data": {"policy.yaml": LAX, "policy.orders-db.yaml": LAX}}
    )
    assert _repaired(installed, namespace, original, "patched") < REPAIR_SECONDS
    # A signature copied over from another file does not make the bundle current either.
    found = _bundle(installed, namespace)
    assert found is not None
    stolen = found.data["policy.orders-db.yaml.sig"]
    installed.core.patch_namespaced_config_map(
        "dbgov-policy-orders", namespace, {"data": {"policy.yaml.sig": stolen}}
    )

    def resigned() -> bool:
        data = dict((_bundle(installed, namespace) or client.V1ConfigMap()).data or {})
        return data.get("policy.yaml.sig") not in (None, stolen) and _verifies(installed, namespace, data)

    wait_for("the stolen signature to be replaced", resigned, timeout=REPAIR_SECONDS)


def test_a_deleted_bundle_comes_back(installed: Installed, namespace: str) -> None:
    original = _signed_bundle(installed, namespace)
    installed.core.delete_namespaced_config_map("dbgov-policy-orders", namespace)
    assert _repaired(installed, namespace, original, "deleted") < REPAIR_SECONDS


def test_a_bundle_stripped_of_its_labels_is_taken_back(installed: Installed, namespace: str) -> None:
    original = _signed_bundle(installed, namespace)
    installed.core.patch_namespaced_config_map(
        "dbgov-policy-orders",
        namespace,
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}, "data": {"policy.yaml": LAX}},
    )
    assert _repaired(installed, namespace, original, "unlabelled") < REPAIR_SECONDS
    found = _bundle(installed, namespace)
    assert found is not None and found.metadata.labels["app.kubernetes.io/managed-by"] == "dbgov"


def test_bundles_are_owned_by_their_service_account_and_deleted_when_unneeded(
    installed: Installed, namespace: str
) -> None:
    account = installed.core.create_namespaced_service_account(namespace, {"metadata": {"name": "orders"}})
    _signed_bundle(installed, namespace)
    found = _bundle(installed, namespace)
    assert found is not None and found.metadata is not None and account.metadata is not None
    owners = [(o.kind, o.name, o.uid) for o in found.metadata.owner_references or []]
    assert owners == [("ServiceAccount", "orders", account.metadata.uid)]
    # No policy names "orders" any more and no enrolled pod runs as it: the bundle goes.
    installed.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "orders-read")
    wait_for("the unneeded bundle to be deleted", lambda: _bundle(installed, namespace) is None)


def test_the_signing_key_is_kept_across_restarts(installed: Installed) -> None:
    before = _public_key(installed)
    installed.operator.stop()
    from .test_operator import _start

    _start(installed)
    assert _public_key(installed) == before


# --------------------------------------------------------------------------------------------
# a real proxy loading the bundle as mounted
# --------------------------------------------------------------------------------------------


def _mount(directory: Path, data: dict[str, str]) -> None:
    """Write a ConfigMap's data as the kubelet's atomic writer does: the files in a fresh
    timestamped directory, ``..data`` swapped to it by one rename, each key a symlink through it."""
    fresh = directory / f"..{time.time_ns()}"
    fresh.mkdir()
    for key, value in data.items():
        (fresh / key).write_text(value)
    link = directory / "..data_tmp"
    link.symlink_to(fresh.name)
    link.replace(directory / "..data")
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(f"..data/{key}")


def _events(audit_file: Path) -> list[dict[str, Any]]:
    if not audit_file.exists():
        return []
    return [json.loads(line) for line in audit_file.read_text().splitlines() if line.strip()]


def _rejections(audit_file: Path) -> list[str]:
    return [e["reason"] for e in _events(audit_file) if e.get("type") == "bundle_rejected"]


def _readyz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@contextlib.contextmanager
def _proxy(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbgov_sidecar.proxy_cli"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _verdict(dsn: str, sql: str) -> str:
    """ "allowed", or the SQLSTATE of the refusal."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        try:
            conn.execute(sql)
        except psycopg.errors.InsufficientPrivilege as err:
            return str(err.sqlstate)
    return "allowed"


def test_a_tampered_bundle_is_refused_and_audited_while_the_last_good_one_enforces(
    installed: Installed,
    kube_cluster: kube.KubeCluster,
    namespace: str,
    pg_server: pg.PgServer,
    tmp_path: Path,
) -> None:
    good = _signed_bundle(installed, namespace)
    mount = tmp_path / "policy"
    mount.mkdir()
    _mount(mount, good)
    audit_file, log = tmp_path / "audit.jsonl", tmp_path / "proxy.log"
    port, metrics_port = pg.free_port(), pg.free_port()
    env = {
        **os.environ,
        # As injection configures the sidecar:
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": pg.APP_PASSWORD,
        "DBGOV_POLICY": str(mount / "policy.yaml"),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
        "DBGOV_POD_NAMESPACE": namespace,
        "DBGOV_SERVICE_ACCOUNT": "orders",
        "DBGOV_BUNDLE_KEY": _public_key(installed),
    }
    dsn = f"host=127.0.0.1 port={port} user=app dbname=shop sslmode=disable connect_timeout=5"
    ddl = "CREATE TEMP TABLE bypass (id int)"
    with _proxy(env, log) as proc:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return _readyz(metrics_port)[0] == 200
            except OSError:
                return False

        wait_for("the proxy to load the signed bundle", ready, timeout=30)
        assert _verdict(dsn, "SELECT 1") == "allowed"
        assert _verdict(dsn, ddl) == "42501"

        # The loosened bundle, with the signature left as it was.
        _mount(mount, {**good, "policy.yaml": LAX})
        wait_for("bundle_rejected bad_signature", lambda: "bad_signature" in _rejections(audit_file))
        assert _verdict(dsn, ddl) == "42501"  # the last good bundle still enforces
        assert _verdict(dsn, "SELECT 1") == "allowed"

        # Another namespace's valid bundle, replayed here.
        other_namespace = kube_cluster.create_namespace()
        try:
            other = _signed_bundle(installed, other_namespace)
        finally:
            kube_cluster.delete_namespace(other_namespace)
        _mount(mount, other)
        wait_for("bundle_rejected wrong_namespace", lambda: "wrong_namespace" in _rejections(audit_file))
        assert _verdict(dsn, ddl) == "42501"

        # The operator changes the policy; the sidecar takes the newer bundle ...
        installed.custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            "orders-read",
            {"spec": {"rules": [{"name": "read", "verdict": "allow", "statements": ["select", "ddl"]}]}},
        )

        def changed() -> dict[str, str] | None:
            found = _bundle(installed, namespace)
            data = dict((found.data or {}) if found is not None else {})
            return data if data and data != good else None

        newer = wait_for("the newer bundle", changed)
        _mount(mount, newer)
        wait_for("the newer bundle to enforce", lambda: _verdict(dsn, ddl) == "allowed")
        # ... and refuses the older, validly signed one put back (a rollback).
        _mount(mount, good)
        wait_for("bundle_rejected rollback", lambda: "rollback" in _rejections(audit_file))
        assert _verdict(dsn, ddl) == "allowed"  # the newer one stays in force
        assert _readyz(metrics_port)[0] == 200
    events = [e for e in _events(audit_file) if e.get("type") == "bundle_rejected"]
    assert {e["reason"] for e in events} == {"bad_signature", "wrong_namespace", "rollback"}
    assert all(e["file"] == str(mount / "policy.yaml") and e["generation_in_force"] for e in events)


def test_without_a_good_bundle_the_proxy_refuses_everything_and_readyz_says_why(
    installed: Installed, namespace: str, pg_server: pg.PgServer, tmp_path: Path
) -> None:
    good = _signed_bundle(installed, namespace)
    mount = tmp_path / "policy"
    mount.mkdir()
    _mount(mount, {**good, "policy.yaml": LAX})
    audit_file, log = tmp_path / "audit.jsonl", tmp_path / "proxy.log"
    port, metrics_port = pg.free_port(), pg.free_port()
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": pg.APP_PASSWORD,
        "DBGOV_POLICY": str(mount / "policy.yaml"),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
        "DBGOV_POD_NAMESPACE": namespace,
        "DBGOV_SERVICE_ACCOUNT": "orders",
        "DBGOV_BUNDLE_KEY": _public_key(installed),
    }
    dsn = f"host=127.0.0.1 port={port} user=app dbname=shop sslmode=disable connect_timeout=5"
    with _proxy(env, log) as proc:

        def unready() -> str | None:
            assert proc.poll() is None, log.read_text()
            try:
                status, body = _readyz(metrics_port)
            except OSError:
                return None
            return body if status == 503 else None

        reason = wait_for("/readyz to say why", unready, timeout=30)
        assert "bad_signature" in reason and "refuses every statement" in reason
        assert _verdict(dsn, "SELECT 1") == "42501"
        assert _rejections(audit_file) == ["bad_signature"]
        _mount(mount, good)  # the operator's repair reaches the mount
        wait_for("the good bundle to load", lambda: _readyz(metrics_port)[0] == 200)
        assert _verdict(dsn, "SELECT 1") == "allowed"


def test_an_enrolled_pod_gets_the_public_key_and_the_signature_file(
    installed: Installed, namespace: str
) -> None:
    _signed_bundle(installed, namespace)
    app = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "orders-app", "labels": {"dbgov.io/inject": "true"}},
        "spec": {"serviceAccountName": "orders", "containers": [{"name": "app", "image": "example/app:1"}]},
    }
    created = installed.core.create_namespaced_pod(namespace, app)
    sidecar = next(c for c in created.spec.init_containers or [] if c.name == "dbgov-proxy")
    env = {e.name: e.value for e in sidecar.env or []}
    assert env["DBGOV_BUNDLE_KEY"] == _public_key(installed)
    volume = next(v for v in created.spec.volumes or [] if v.name == "dbgov-policy")
    assert [i.key for i in volume.config_map.items] == ["policy.yaml", "policy.yaml.sig"]
