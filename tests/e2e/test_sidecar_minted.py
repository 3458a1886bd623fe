"""The sidecar with minted credentials end to end (issue 11): a real kube-apiserver, the operator
as a process under the chart's RBAC (its webhook injects, its credential endpoint mints), a real
PostgreSQL, and a real `dbgov proxy` process configured only from the environment the webhook
injected into the stored pod.

No kubelet runs here, so this test does the kubelet's part for the sidecar container: it
resolves the injected env (fieldRefs, $(VAR) references), writes the projected token
(TokenRequest bound to the pod, as the kubelet gets it) and the bundle ConfigMap's files where
the env points, and gives the proxy a free loopback port (a pod would have its own network
namespace). Everything else — upstream host, database, role and password, the mask key — the
proxy gets from the operator's answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pg
from dbgov_sidecar import embedded_pg

from . import kube
from .operator_proc import wait_for
from .test_identity import ACCOUNT, bound_token
from .test_minting import SCHEMA, Env, Scene, _database, _drop_roles, _policy, _secret
from .test_operator import deployed

APP = "orders-app"
ENROLLED = {"dbgov.io/inject": "true"}


@pytest.fixture(scope="module")
def env(  # noqa: PLR0917 -- pytest fixtures are positional
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: pg.PgServer,
) -> Iterator[Env]:
    from .test_identity import Endpoint

    workdir = tmp_path_factory.mktemp("sidecar-minted")
    (port,) = kube.free_ports(1)
    settings = {"DBGOV_CREDENTIAL_PORT": str(port), "DBGOV_REAP_SECONDS": "5"}
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=settings) as found:
        ca = (workdir / "certs" / "ca.crt").read_text()
        endpoint = Endpoint(installed=found, url=f"https://127.0.0.1:{port}/v1/credentials", ca_pem=ca)
        yield Env(endpoint=endpoint, installed=found, cluster=kube_cluster, pg_server=pg_server)


@dataclass(frozen=True, slots=True, kw_only=True)
class Injected:
    """The stored pod after injection: its sidecar's env and volumes, and the app's env."""

    pod: dict[str, Any]

    @property
    def sidecar(self) -> dict[str, Any]:
        (found,) = [c for c in self.pod["spec"]["initContainers"] if c["name"] == "dbgov-proxy"]
        return found

    @property
    def app(self) -> dict[str, Any]:
        (found,) = [c for c in self.pod["spec"]["containers"] if c["name"] == "app"]
        return found

    def field(self, path: str) -> str:
        """A downward-API fieldRef, as the kubelet resolves it."""
        value: Any = self.pod
        for part in path.split("."):
            value = value[part]
        return str(value)

    def resolved_env(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's env as its process sees it: fieldRefs read, $(VAR) expanded."""
        out: dict[str, str] = {}
        for var in container.get("env", []):
            if "valueFrom" in var:
                source = var["valueFrom"]
                assert set(source) == {"fieldRef"}, f"{var['name']}: only fieldRefs expected, got {source}"
                out[var["name"]] = self.field(source["fieldRef"]["fieldPath"])
                continue
            out[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: out.get(m.group(1), m.group(0)),
                str(var.get("value", "")),
            )
        return out

    def volume(self, name: str) -> dict[str, Any]:
        (found,) = [v for v in self.pod["spec"]["volumes"] if v["name"] == name]
        return found

    def mount(self, name: str) -> str:
        (found,) = [m for m in self.sidecar["volumeMounts"] if m["name"] == name]
        return str(found["mountPath"])


def _enrolled_pod(env: Env, namespace: str, *, dbname: str) -> Injected:
    with contextlib.suppress(Exception):
        env.cluster.create_service_account(namespace=namespace, name=ACCOUNT)
    app_env = [
        {"name": "PGHOST", "value": "127.0.0.1"},
        {"name": "PGPORT", "value": str(env.pg_server.port)},
        {"name": "PGDATABASE", "value": dbname},
        {"name": "PGUSER", "value": "app"},
        {"name": "PGSSLMODE", "value": "disable"},
    ]
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": APP, "labels": ENROLLED},
        "spec": {
            "serviceAccountName": ACCOUNT,
            "containers": [{"name": "app", "image": "example/app:1", "env": app_env}],
        },
    }
    created = env.core.create_namespaced_pod(namespace, body)
    stored = env.core.api_client.sanitize_for_serialization(created)
    assert stored["metadata"]["annotations"]["dbgov.io/status"] == "injected", stored["metadata"]
    return Injected(pod=stored)


def _kubelet_files(env: Env, namespace: str, injected: Injected, root: Path) -> dict[str, str]:
    """Write what the kubelet would mount for the sidecar under ``root``; returns the mount
    path → local directory map."""
    token_volume = next(v for v in injected.pod["spec"]["volumes"] if "projected" in v)
    (source,) = token_volume["projected"]["sources"]
    request = source["serviceAccountToken"]
    token_dir = root / "token"
    token_dir.mkdir()
    token = bound_token(
        env.cluster,
        namespace,
        pod=injected.pod["metadata"]["name"],
        uid=injected.pod["metadata"]["uid"],
        audiences=(request["audience"],),
        expiration_seconds=int(request.get("expirationSeconds") or 3600),
    )
    (token_dir / request["path"]).write_text(token)
    policy_volume = injected.volume("dbgov-policy")["configMap"]
    policy_dir = root / "policy"
    policy_dir.mkdir()

    def bundle_written() -> bool:
        try:
            found = env.core.read_namespaced_config_map(policy_volume["name"], namespace)
        except Exception:
            return False
        data = found.data or {}
        if not all(item["key"] in data for item in policy_volume["items"]):
            return False
        for item in policy_volume["items"]:
            (policy_dir / item["path"]).write_text(data[item["key"]])
        return True

    wait_for("the operator to write the pod's policy bundle", bundle_written, timeout=60)
    return {
        injected.mount(token_volume["name"]): str(token_dir),
        injected.mount("dbgov-policy"): str(policy_dir),
    }


@contextlib.contextmanager
def _proxy(env_vars: dict[str, str], workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path]]:
    stdout, stderr = workdir / "audit.jsonl", workdir / "proxy.log"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DBGOV_", "PG"))}
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbgov_sidecar.proxy_cli"],
            env={**clean, **env_vars},
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
        try:
            yield proc, stdout, stderr
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_a_client_through_the_injected_sidecar_uses_the_minted_role(
    env: Env, namespace: str, tmp_path: Path
) -> None:
    with pg.scratch_database(env.pg_server, "sidecar", SCHEMA) as dbname:
        _secret(env, namespace, "pg-admin", username="postgres", password=embedded_pg.SUPERUSER_PASSWORD)
        database = _database(env, namespace, name="orders-db", dbname=dbname)
        policy = _policy(env, namespace, name="orders-read", database=database)
        scene = Scene(namespace=namespace, dbname=dbname, database=database, policy=policy)
        try:
            injected = _enrolled_pod(env, namespace, dbname=dbname)
            _run_through_the_sidecar(env, namespace, injected, tmp_path, dbname=dbname)
        finally:
            _drop_roles(env, scene)


def _run_through_the_sidecar(
    env: Env, namespace: str, injected: Injected, tmp_path: Path, *, dbname: str
) -> None:
    app_env = injected.resolved_env(injected.app)
    # The app's own env has no password: it logs in to the sidecar on loopback, nothing else.
    assert not [name for name in app_env if "PASSW" in name.upper() or name == "PGPASSFILE"], app_env
    assert (app_env["PGHOST"], app_env["PGUSER"], app_env["PGDATABASE"]) == ("127.0.0.1", "app", dbname)
    sidecar_env = injected.resolved_env(injected.sidecar)
    assert not [name for name in sidecar_env if "PASSW" in name.upper()], sidecar_env
    assert {"DBGOV_CREDENTIAL_URL", "DBGOV_CREDENTIAL_CA", "DBGOV_TOKEN_FILE", "DBGOV_POD_UID"} <= set(
        sidecar_env
    )
    # The app's env alone cannot reach the database: its user has no password there.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(
            host="127.0.0.1", port=env.pg_server.port, user="app", dbname=dbname, connect_timeout=5
        ).close()

    # The kubelet's part: mounts under tmp_path, a pod network namespace of its own.
    mounts = _kubelet_files(env, namespace, injected, tmp_path)
    proxy_env = dict(sidecar_env)
    for key in ("DBGOV_TOKEN_FILE", "DBGOV_POLICY"):
        mount = next(m for m in mounts if proxy_env[key].startswith(m + "/"))
        proxy_env[key] = mounts[mount] + proxy_env[key][len(mount) :]
    port = pg.free_port()
    assert proxy_env["DBGOV_LISTEN"] == f"127.0.0.1:{app_env['PGPORT']}"
    proxy_env["DBGOV_LISTEN"] = f"127.0.0.1:{port}"
    proxy_env["DBGOV_METRICS"] = ""  # (the pod IP's probe port; nothing probes here)

    dsn = f"host=127.0.0.1 port={port} user={app_env['PGUSER']} dbname={dbname} sslmode=disable connect_timeout=5"
    with _proxy(proxy_env, tmp_path) as (proc, audit_file, log_file):

        def served() -> bool:
            assert proc.poll() is None, log_file.read_text()
            try:
                with psycopg.connect(dsn, autocommit=True) as conn:
                    return conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
            except psycopg.OperationalError:
                return False

        wait_for("the sidecar to serve with minted credentials", served, timeout=60)
        with psycopg.connect(dsn, autocommit=True) as conn:
            (role,) = conn.execute("SELECT current_user").fetchone() or ("",)
            assert role.startswith("dbgov_w_")
            rows = conn.execute("SELECT name, email, ssn FROM shop.customers ORDER BY id").fetchall()
            assert [r[0] for r in rows] == ["Ada", "Bob"]
            assert rows[0][1] == "***@example.com" and rows[1][1] == "***@mail.example"
            assert rows[0][2] not in (None, "123-45-6789") and len(rows[0][2]) == len("123-45-6789")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute("SELECT note FROM shop.secrets")
            assert "dbgov" in str(refused.value)  # refused by the proxy, before PostgreSQL
            assert conn.execute("SELECT qty FROM shop.orders ORDER BY id").fetchall() == [(2,), (5,)]
        proc.terminate()
        proc.wait(timeout=30)
    events = [json.loads(line) for line in audit_file.read_text().splitlines() if line.startswith("{")]
    received = [e for e in events if e["type"] == "credentials_received"]
    assert received and received[0]["db_user"] == role and received[0]["workload"]["pod"] == APP
    statements = [e for e in events if e["type"] == "statement"]
    assert statements and {e["db_user"] for e in statements} == {role}
    assert any(e["enforced"] == "block" and "secrets" in e["statement"] for e in statements)
    assert all(e["workload"]["podUid"] == injected.pod["metadata"]["uid"] for e in statements)
