"""A ServiceAccount whose name takes (almost) all 253 characters an object name may have, against
a real kube-apiserver and the operator under the chart's RBAC (issue 12, F2). Its bundle name
``dbgov-policy-<name>`` would pass the limit: the write was refused (422) and the namespace's
reconcile stopped there, so a tightened baseline never reached the other bundles of the
namespace while the baseline's status claimed them. The bundle name is bounded now, and every
bundle gets the tightened baseline, which says so honestly.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from dbgov_operator import bundle as bundles

from . import kube, test_operator
from .operator_proc import GROUP, VERSION, Installed, create_policy, policy, wait_for
from .test_operator import deployed

CLUSTER_PLURAL = "clusterdatabaseaccesspolicies"
LONG = "agent-" + "x" * 239
"""245 characters, sorted before ``orders``: the old reconcile stopped at it before writing orders'."""
RUN_LABEL = "dbgov.io/e2e-run"


@pytest.fixture(scope="module")
def installed(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("long-names")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir) as found:
        yield found


def _baseline(name: str, *, run: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterDatabaseAccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "subjects": {"namespaceSelector": {"matchLabels": {RUN_LABEL: run}}},
            "default": "allow",
            "rules": rules,
        },
    }


def _bundle_text(env: Installed, namespace: str, account: str) -> str:
    name = bundles.bundle_name("dbgov-policy-", account)
    try:
        found = env.core.read_namespaced_config_map(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return ""
        raise
    return str((found.data or {}).get("policy.yaml") or "")


def _wait_rule(env: Installed, namespace: str, rule: str) -> None:
    """Wait until the bundles of both ServiceAccounts hold the baseline's ``rule``."""
    for account in ("orders", LONG):

        def holds(account: str = account) -> bool:
            return f"name: {rule}" in _bundle_text(env, namespace, account)

        wait_for(f"the bundle of {account[:16]}... with the baseline's rule {rule}", holds)


def test_a_245_character_service_account_holds_back_no_bundle_and_the_status_is_honest(
    installed: Installed, namespace: str
) -> None:
    run = uuid.uuid4().hex[:10]
    name = f"baseline-long-{run}"
    installed.core.patch_namespace(namespace, {"metadata": {"labels": {RUN_LABEL: run}}})
    for account in (LONG, "orders"):
        test_operator.service_account(installed, namespace, account)
    everything = [{"name": "anything", "verdict": "allow"}]
    create_policy(
        installed,
        namespace,
        policy("team", default="allow", rules=everything, subjects={"serviceAccounts": [LONG, "orders"]}),
    )
    no_ddl = {"name": "no-ddl", "verdict": "block", "statements": ["ddl"]}
    installed.custom.create_cluster_custom_object(
        GROUP, VERSION, CLUSTER_PLURAL, _baseline(name, run=run, rules=[no_ddl])
    )
    try:
        _wait_rule(installed, namespace, "no-ddl")
        long_bundle = installed.core.read_namespaced_config_map(
            bundles.bundle_name("dbgov-policy-", LONG), namespace
        )
        assert len(long_bundle.metadata.name) <= 253
        assert long_bundle.metadata.name.startswith("dbgov-policy-agent-")
        assert long_bundle.metadata.annotations["dbgov.io/service-account"] == LONG
        assert [o.name for o in long_bundle.metadata.owner_references or []] == [LONG]

        # Tighten the baseline: every bundle of the namespace gets it.
        no_deletes = {"name": "no-deletes", "verdict": "block", "statements": ["delete"]}
        installed.custom.patch_cluster_custom_object(
            GROUP, VERSION, CLUSTER_PLURAL, name, {"spec": {"rules": [no_ddl, no_deletes]}}
        )
        _wait_rule(installed, namespace, "no-deletes")

        def reported() -> dict[str, Any] | None:
            found: Any = installed.custom.get_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
            status = dict(found.get("status") or {})
            ready = {c["type"]: c for c in status.get("conditions") or []}.get("Ready", {})
            current = status.get("observedGeneration") == found["metadata"]["generation"] == 2
            return status if current and ready.get("status") == "True" else None

        status = wait_for(f"{name} Ready at generation 2", reported)
        assert sorted(w["name"] for w in status["workloads"]) == sorted([LONG, "orders"])
        assert "could not be written" not in str(status)
        log = installed.operator.log_text()
        assert f"Reconciling {namespace} failed" not in log
        assert "Writing the bundle" not in log
    finally:
        installed.custom.delete_cluster_custom_object(GROUP, VERSION, CLUSTER_PLURAL, name)
