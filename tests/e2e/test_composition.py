"""Several policies binding one workload, against a real kube-apiserver with the operator as a
process under the chart's RBAC: none can loosen another, whatever they are called; and a policy
with a misspelt field is refused at apply time with every problem in one answer. A composition
that does not compile (refused at apply time, or fail closed when it happens anyway) is
test_composition_failclosed.py's.

Each bundle is judged with the sidecar's own loader (``policies.build``), so "the sidecar would
refuse this bundle" and "this bundle lets DROP TABLE through" are what is tested.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from dbgov_policy import compile as policy_compile
from dbgov_sidecar import policies, policy_port

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
from .test_operator import bundle, deployed, service_account

NO_DDL: dict[str, Any] = {"name": "no-ddl", "verdict": "block", "statements": ["ddl", "dcl"]}


@pytest.fixture(scope="module")
def installed(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Installed]:
    workdir = tmp_path_factory.mktemp("composition")
    with deployed(kube_cluster, kube_tools, helm_home=helm_home, workdir=workdir) as found:
        yield found


def _sidecar_policy(
    env: Installed, namespace: str, *, names: set[str], key: str = "policy.yaml"
) -> policy_port.Policy:
    """The policy a sidecar of ServiceAccount ``orders`` loads once the bundle holds ``names``."""

    def current() -> str | None:
        found = bundle(env, namespace, "orders")
        text = (found.data or {}).get(key) if found is not None else None
        if text is None:
            return None
        header = text.splitlines()[0]
        return text if all(name in header for name in names) else None

    text = wait_for(f"the bundle of orders with {sorted(names)}", current)
    return policies.build(policy_compile.load_text(text, source=key))


def _decide(loaded: policy_port.Policy, sql: str) -> policy_port.Decision:
    return loaded.decide(sql, loaded.new_context())


def test_a_namespace_users_aaa_policy_cannot_override_the_security_baseline(
    installed: Installed, namespace: str
) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("baseline-security", default="allow", rules=[NO_DDL]))
    everything = [{"name": "anything", "verdict": "allow"}]
    create_policy(installed, namespace, policy("aaa-override", default="allow", rules=everything))
    loaded = _sidecar_policy(installed, namespace, names={"baseline-security", "aaa-override"})
    decision = _decide(loaded, "DROP TABLE shop.orders")
    assert (decision.verdict, decision.rule) == ("block", "baseline-security/no-ddl")
    assert _decide(loaded, "SELECT 1").verdict == "allow"


def test_a_policy_for_another_database_does_not_turn_policy_yaml_into_refuse_all(
    installed: Installed, namespace: str
) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("orders-read", default="allow", rules=[NO_DDL]))
    analytics = policy("analytics-read", default="allow", rules=[], databaseRef={"name": "analytics"})
    create_policy(installed, namespace, analytics)
    loaded = _sidecar_policy(installed, namespace, names={"orders-read", "analytics-read"})
    assert _decide(loaded, "SELECT id FROM shop.orders").verdict == "allow"
    assert _decide(loaded, "DROP TABLE shop.orders").verdict == "block"
    own = _sidecar_policy(installed, namespace, names={"orders-read"}, key="policy.orders-db.yaml")
    assert _decide(own, "SELECT id FROM shop.orders").verdict == "allow"


def test_a_baseline_and_an_app_policy_with_its_own_no_ddl_rule_load_in_the_sidecar(
    installed: Installed, namespace: str
) -> None:
    service_account(installed, namespace)
    create_policy(installed, namespace, policy("baseline-security", default="allow", rules=[NO_DDL]))
    app_rules = [
        {"name": "no-ddl", "verdict": "block", "statements": ["ddl"]},
        {"name": "read", "verdict": "allow"},
    ]
    create_policy(installed, namespace, policy("app", rules=app_rules))
    wait_ready(installed, namespace, "baseline-security")
    wait_ready(installed, namespace, "app")
    loaded = _sidecar_policy(installed, namespace, names={"baseline-security", "app"})
    assert _decide(loaded, "GRANT SELECT ON shop.orders TO PUBLIC").rule == "baseline-security/no-ddl"
    assert _decide(loaded, "SELECT 1").verdict == "allow"


def _refusal(installed: Installed, namespace: str, body: dict[str, Any]) -> str:
    with pytest.raises(ApiException) as err:
        create_policy(installed, namespace, body)
    assert err.value.status in (400, 422)
    return str(err.value.body)


def test_a_misspelt_field_is_refused_at_apply_time_naming_its_path(
    installed: Installed, namespace: str
) -> None:
    typo = policy("typo", rules=[{"name": "r", "verdict": "allow", "tabels": ["shop.orders"]}])
    message = _refusal(installed, namespace, typo)
    assert "spec.rules[0].tabels: unknown field" in message
    with pytest.raises(ApiException) as gone:
        installed.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "typo")
    assert gone.value.status == 404


def test_schema_and_compiler_problems_come_back_in_one_answer(installed: Installed, namespace: str) -> None:
    broken = policy(
        "broken",
        rules=[{"name": "r", "verdict": "permit", "tabels": ["shop.orders"]}],
        masks=[{"table": "shop.customers", "column": "email", "strategy": "scramble"}],
    )
    message = _refusal(installed, namespace, broken)
    for path in ("spec.rules[0].verdict", "spec.rules[0].tabels", "spec.masks[0].strategy"):
        assert path in message, message
    assert "3 problem(s)" in message
