"""ClusterDatabaseAccessPolicy against a real kube-apiserver, the operator a process under the
chart's RBAC: a platform baseline selecting namespaces by label joins the bundles of the
workloads there, a namespace user's own policy cannot loosen it (judged by the sidecar's own
loader), a namespace without the label is untouched, relabelling adds or removes it within
seconds, an invalid one is refused at apply time with its paths, and deleting it takes it out.

Cluster policies are cluster-wide and this module's tests share one operator, so each test's
baseline selects ``env=prod`` plus a label of its own (``dbgov.io/e2e-run``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from kubernetes.client.exceptions import ApiException

import pg
from dbgov_policy import compile as policy_compile
from dbgov_sidecar import embedded_pg, policies, policy_port

from . import kube, test_minting, test_operator
from .operator_proc import GROUP, VERSION, Installed, create_policy, policy, wait_for
from .test_identity import Endpoint, bound_token
from .test_operator import bundle, deployed

CLUSTER_PLURAL = "clusterdatabaseaccesspolicies"
NO_DDL: dict[str, Any] = {"name": "no-ddl", "verdict": "block", "statements": ["ddl", "dcl"]}
RUN_LABEL = "dbgov.io/e2e-run"
ENROLLED = {"dbgov.io/inject": "true"}


@pytest.fixture(scope="module")
def minting_env(  # noqa: PLR0917 -- pytest fixtures are positional
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
    pg_server: pg.PgServer,
) -> Iterator[test_minting.Env]:
    """The operator (with its credential endpoint) and a real PostgreSQL."""
    workdir = tmp_path_factory.mktemp("cluster-policies")
    (port,) = kube.free_ports(1)
    settings = {"DBGOV_CREDENTIAL_PORT": str(port), "DBGOV_REAP_SECONDS": "2"}
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir, env=settings) as found:
        ca = (workdir / "certs" / "ca.crt").read_text()
        endpoint = Endpoint(installed=found, url=f"https://127.0.0.1:{port}/v1/credentials", ca_pem=ca)
        yield test_minting.Env(endpoint=endpoint, installed=found, cluster=kube_cluster, pg_server=pg_server)


@pytest.fixture(scope="module")
def installed(minting_env: test_minting.Env) -> Installed:
    return minting_env.installed


@pytest.fixture
def run() -> str:
    """This test's own value of the run label (its baselines select only its namespaces)."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def baselines(installed: Installed) -> Iterator[list[str]]:
    """Names of the cluster policies a test creates; deleted afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        try:
            installed.custom.delete_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
        except ApiException as err:
            if err.status != 404:
                raise


def _baseline(name: str, *, run: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subjects": {"namespaceSelector": {"matchLabels": {"env": "prod", RUN_LABEL: run}}},
        "default": "allow",
        "rules": [NO_DDL],
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterDatabaseAccessPolicy",
        "metadata": {"name": name},
        "spec": body,
    }


def _create_baseline(installed: Installed, baselines: list[str], body: dict[str, Any]) -> None:
    installed.custom.create_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, body)
    baselines.append(body["metadata"]["name"])


def _label(installed: Installed, namespace: str, labels: dict[str, str | None]) -> None:
    installed.core.patch_namespace(namespace, {"metadata": {"labels": labels}})


def _allow_everything(installed: Installed, namespace: str) -> None:
    everything = [{"name": "anything", "verdict": "allow"}]
    create_policy(installed, namespace, policy("aaa-allow-everything", default="allow", rules=everything))


def _bundle_with(
    installed: Installed,
    namespace: str,
    *,
    present: set[str],
    absent: set[str] = frozenset(),  # type: ignore[assignment]
) -> policy_port.Policy:
    """The policy a sidecar of ServiceAccount ``orders`` loads, once its bundle's components
    (the header the operator writes) include ``present`` and none of ``absent``."""

    def current() -> str | None:
        found = bundle(installed, namespace, "orders")
        text = (found.data or {}).get("policy.yaml") if found is not None else None
        if text is None:
            return None
        header = text.splitlines()[0].split(": ", 1)[-1]
        components = {c.strip() for c in header.split(",")}
        return text if present <= components and not (absent & components) else None

    text = wait_for(
        f"the bundle of orders in {namespace} with {sorted(present)}, without {sorted(absent)}", current
    )
    return policies.build(policy_compile.load_text(text, source="policy.yaml"))


def _decide(loaded: policy_port.Policy, sql: str) -> policy_port.Decision:
    return loaded.decide(sql, loaded.new_context())


def _status(installed: Installed, name: str) -> dict[str, Any]:
    found: Any = installed.custom.get_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
    return dict(found.get("status") or {})


def test_a_baseline_joins_the_bundles_of_prod_namespaces_and_no_namespace_policy_overrides_it(
    installed: Installed, kube_cluster: kube.KubeCluster, run: str, baselines: list[str]
) -> None:
    prod = kube_cluster.create_namespace("prod")
    dev = kube_cluster.create_namespace("dev")
    try:
        _label(installed, prod, {"env": "prod", RUN_LABEL: run})
        _label(installed, dev, {RUN_LABEL: run})  # the run label alone: not env=prod
        name = f"baseline-security-{run}"
        _create_baseline(installed, baselines, _baseline(name, run=run))
        for namespace in (prod, dev):
            test_operator.service_account(installed, namespace)
            _allow_everything(installed, namespace)
        component = f"cluster:{name}"
        loaded = _bundle_with(installed, prod, present={"aaa-allow-everything", component})
        decision = _decide(loaded, "DROP TABLE shop.orders")
        assert (decision.verdict, decision.rule) == ("block", f"{component}/no-ddl")
        assert _decide(loaded, "GRANT SELECT ON shop.orders TO PUBLIC").verdict == "block"
        assert _decide(loaded, "SELECT id FROM shop.orders").verdict == "allow"
        # The unlabelled namespace: the user's own policy alone decides.
        unaffected = _bundle_with(installed, dev, present={"aaa-allow-everything"}, absent={component})
        assert _decide(unaffected, "DROP TABLE shop.orders").verdict == "allow"

        def reported() -> dict[str, Any] | None:
            status = _status(installed, name)
            ready = {c["type"]: c for c in status.get("conditions") or []}.get("Ready", {})
            return status if ready.get("status") == "True" and status.get("workloads") else None

        status = wait_for(f"{name} Ready with its workloads", reported)
        assert status["namespaces"] == [prod]
        assert status["workloads"] == [
            {"kind": "ServiceAccount", "namespace": prod, "name": "orders", "serviceAccount": "orders"}
        ]
        assert status["observedGeneration"] == 1
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "PolicyValid": "True",
            "Ready": "True",
        }
    finally:
        kube_cluster.delete_namespace(prod)
        kube_cluster.delete_namespace(dev)


def test_relabelling_a_namespace_adds_and_removes_the_baseline_within_seconds(
    installed: Installed, namespace: str, run: str, baselines: list[str]
) -> None:
    name = f"baseline-{run}"
    component = f"cluster:{name}"
    _create_baseline(installed, baselines, _baseline(name, run=run))
    test_operator.service_account(installed, namespace)
    _allow_everything(installed, namespace)
    before = _bundle_with(installed, namespace, present={"aaa-allow-everything"}, absent={component})
    assert _decide(before, "DROP TABLE shop.orders").verdict == "allow"

    started = time.monotonic()
    _label(installed, namespace, {"env": "prod", RUN_LABEL: run})
    joined = _bundle_with(installed, namespace, present={"aaa-allow-everything", component})
    added = time.monotonic() - started
    assert _decide(joined, "DROP TABLE shop.orders").verdict == "block"

    started = time.monotonic()
    _label(installed, namespace, {"env": None})
    left = _bundle_with(installed, namespace, present={"aaa-allow-everything"}, absent={component})
    removed = time.monotonic() - started
    assert _decide(left, "DROP TABLE shop.orders").verdict == "allow"
    print(f"baseline added {added:.2f} s, removed {removed:.2f} s after the label change")
    assert added < 10 and removed < 10


def test_an_invalid_cluster_policy_is_refused_at_apply_time_with_its_paths(
    installed: Installed, run: str, baselines: list[str]
) -> None:
    body = _baseline(
        f"typo-{run}", run=run, rules=[{"name": "r", "verdict": "block", "tabels": ["shop.orders"]}]
    )
    body["spec"]["subjects"] = {"namespaceSelectr": {"matchLabels": {"env": "prod"}}}
    with pytest.raises(ApiException) as err:
        _create_baseline(installed, baselines, body)
    assert err.value.status in (400, 422)
    message = str(err.value.body)
    for path in ("spec.rules[0].tabels", "spec.subjects.namespaceSelectr", "spec.subjects.namespaceSelector"):
        assert path in message, message
    assert "ClusterDatabaseAccessPolicy is invalid (3 problem(s))" in message
    with pytest.raises(ApiException) as gone:
        installed.custom.get_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, f"typo-{run}")
    assert gone.value.status == 404


def test_deleting_the_cluster_policy_takes_it_out_of_the_bundles(
    installed: Installed, namespace: str, run: str, baselines: list[str]
) -> None:
    name = f"baseline-{run}"
    component = f"cluster:{name}"
    _label(installed, namespace, {"env": "prod", RUN_LABEL: run})
    _create_baseline(installed, baselines, _baseline(name, run=run))
    test_operator.service_account(installed, namespace)
    _allow_everything(installed, namespace)
    joined = _bundle_with(installed, namespace, present={"aaa-allow-everything", component})
    assert _decide(joined, "DROP TABLE shop.orders").verdict == "block"
    installed.custom.delete_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
    left = _bundle_with(installed, namespace, present={"aaa-allow-everything"}, absent={component})
    assert _decide(left, "DROP TABLE shop.orders").verdict == "allow"


def test_a_composition_that_cannot_compile_is_reported_on_the_baseline_and_the_namespace_policy(
    installed: Installed, namespace: str, run: str, baselines: list[str]
) -> None:
    def issuer(audience: str) -> dict[str, Any]:
        one = {"issuer": "https://idp.example", "audiences": [audience], "algorithms": ["RS256"]}
        return {"jwt": {"issuers": [{**one, "jwksUri": "https://idp.example/keys"}]}}

    _label(installed, namespace, {"env": "prod", RUN_LABEL: run})
    test_operator.service_account(installed, namespace)
    create_policy(installed, namespace, policy("app", authentication=issuer("one")))
    name = f"baseline-{run}"
    _create_baseline(installed, baselines, _baseline(name, run=run, authentication=issuer("two")))

    def invalid(read: Any) -> dict[str, Any] | None:
        status = read() or {}
        ready = {c["type"]: c for c in status.get("conditions") or []}.get("Ready", {})
        return ready if ready.get("reason") == "CompositionInvalid" else None

    def app_status() -> dict[str, Any]:
        body: Any = installed.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "databaseaccesspolicies", "app"
        )
        return dict(body.get("status") or {})

    on_app = wait_for("app: CompositionInvalid", lambda: invalid(app_status))
    assert f"with cluster:{name}" in on_app["message"]
    on_baseline = wait_for(f"{name}: CompositionInvalid", lambda: invalid(lambda: _status(installed, name)))
    assert on_baseline["status"] == "False"
    assert f"in namespace {namespace}" in on_baseline["message"]
    assert "configured differently" in on_baseline["message"]


def test_a_baseline_block_reaches_the_minted_roles_grants(
    minting_env: test_minting.Env, namespace: str, run: str, baselines: list[str]
) -> None:
    """Enforced twice: a table the baseline blocks gets no privilege on the pod's minted role,
    and DDL neither, though the namespace's own policy allows everything (real PostgreSQL,
    the credentials used directly, bypassing any proxy)."""
    env = minting_env
    with pg.scratch_database(env.pg_server, "cdap", test_minting.SCHEMA) as dbname:
        scene = test_minting.Scene(namespace=namespace, dbname=dbname, database="orders-db", policy="")
        try:
            test_minting._secret(
                env, namespace, "pg-admin", username="postgres", password=embedded_pg.SUPERUSER_PASSWORD
            )
            test_minting._database(env, namespace, name="orders-db", dbname=dbname)
            _allow_everything(env.installed, namespace)
            uid = test_minting._pod(env, namespace, "orders-1")
            token = bound_token(env.cluster, namespace, pod="orders-1", uid=uid)

            alone = test_minting._issue(env, token)
            assert alone["policies"] == ["aaa-allow-everything"]
            with test_minting._login(env, scene, alone) as conn:
                assert conn.execute("SELECT note FROM shop.secrets").fetchall() == [("launch codes",)]

            name = f"lockdown-{run}"
            secrets = {"name": "no-secrets", "verdict": "block", "tables": ["shop.secrets"]}
            _create_baseline(env.installed, baselines, _baseline(name, run=run, rules=[NO_DDL, secrets]))
            _label(env.installed, namespace, {"env": "prod", RUN_LABEL: run})
            _bundle_with(env.installed, namespace, present={"aaa-allow-everything", f"cluster:{name}"})

            under = test_minting._issue(env, token)
            assert under["policies"] == [f"aaa-allow-everything+cluster:{name}"]
            with test_minting._login(env, scene, under) as conn:
                assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (2,)
                for refused in ("SELECT note FROM shop.secrets", "CREATE TABLE shop.mine (id int)"):
                    with pytest.raises(psycopg.errors.InsufficientPrivilege):
                        conn.execute(refused)
        finally:
            test_minting._drop_roles(env, scene)


def test_a_pod_may_name_the_database_a_baseline_binding_it_is_about(
    installed: Installed, namespace: str, run: str, baselines: list[str]
) -> None:
    """``dbgov.io/database`` must name a Database a policy binding the pod is about: a
    baseline's ``databaseRef`` counts, in the namespaces it selects only."""
    name = f"reports-{run}"
    _create_baseline(installed, baselines, _baseline(name, run=run, databaseRef={"name": "reports-db"}))

    def enrolled(pod: str) -> dict[str, Any]:
        body = test_operator.pod(pod, labels=ENROLLED, annotations={"dbgov.io/database": "reports-db"})
        body["spec"]["serviceAccountName"] = "reporting"
        return body

    refused = test_operator.rejection(
        lambda: installed.core.create_namespaced_pod(namespace, enrolled("before"))
    )
    assert refused.status == 400 and "reports-db" in str(refused.body)
    _label(installed, namespace, {"env": "prod", RUN_LABEL: run})
    created = installed.core.create_namespaced_pod(namespace, enrolled("after"))
    volume = next(v for v in created.spec.volumes if v.name == "dbgov-policy")
    assert next(i.key for i in volume.config_map.items) == "policy.reports-db.yaml"
