"""Policy binding and bundle planning, as data."""

from typing import Any

import pytest
import yaml

from dbgov_operator import bundle
from dbgov_policy import compile as policy_compile
from dbgov_sidecar import policies

READ_ORDERS: dict[str, Any] = {
    "subjects": {"serviceAccounts": ["orders"]},
    "mode": "enforce",
    "default": "block",
    "rules": [{"name": "read", "verdict": "allow", "statements": ["select"], "tables": ["orders"]}],
}
AGENTS: dict[str, Any] = {
    "subjects": {"podSelector": {"matchLabels": {"team": "ai"}}},
    "default": "block",
    "rules": [{"name": "read", "verdict": "allow", "statements": ["select"]}],
    "masks": [{"table": "customers", "column": "email", "strategy": "redact"}],
}


def _policy(name: str, spec: dict[str, Any], *, valid: bool = True) -> bundle.Policy:
    return bundle.Policy(name=name, spec=spec, valid=valid)


def test_service_account_subject_binds_even_before_pods_exist() -> None:
    plan = bundle.plan([_policy("read-orders", READ_ORDERS)], [], prefix="dbgov-policy-")
    (only,) = plan.bundles
    assert (only.service_account, only.config_map) == ("orders", "dbgov-policy-orders")
    assert only.policies == ("read-orders",)
    assert plan.bound == {"read-orders": ("orders",)}
    composed = yaml.safe_load(only.files["policy.yaml"])
    assert [p["name"] for p in composed["policies"]] == ["read-orders"]
    assert composed["policies"][0]["spec"]["rules"][0]["name"] == "read"
    assert "subjects" not in composed["policies"][0]["spec"]  # (the operator's, not the sidecar's)


def test_pod_selector_binds_the_service_accounts_of_matching_pods() -> None:
    pods = [
        bundle.Workload(service_account="agent", labels={"team": "ai"}),
        bundle.Workload(service_account="web", labels={"team": "web"}),
    ]
    plan = bundle.plan([_policy("agents", AGENTS)], pods, prefix="p-")
    by_account = {b.service_account: b for b in plan.bundles}
    assert by_account["agent"].policies == ("agents",)
    assert by_account["web"].policies == ()
    assert plan.bound == {"agents": ("agent",)}


def test_several_policies_are_shipped_as_components_never_merged() -> None:
    agents = {**AGENTS, "subjects": {"serviceAccounts": ["orders"]}}
    plan = bundle.plan([_policy("zz-agents", agents), _policy("read-orders", READ_ORDERS)], [], prefix="p-")
    (only,) = plan.bundles
    assert only.policies == ("read-orders", "zz-agents")
    composed = yaml.safe_load(only.files["policy.yaml"])
    assert [p["name"] for p in composed["policies"]] == ["read-orders", "zz-agents"]
    assert composed["policies"][1]["spec"]["masks"] == AGENTS["masks"]
    assert "rules" not in composed


def test_a_composition_that_does_not_compile_fails_closed_and_names_every_policy() -> None:
    clash = {
        "subjects": {"serviceAccounts": ["orders"]},
        "rules": [{"name": "r", "verdict": "allow", "tabels": ["orders"]}],
    }
    plan = bundle.plan([_policy("read-orders", READ_ORDERS), _policy("typo", clash)], [], prefix="p-")
    (only,) = plan.bundles
    assert only.problems
    assert [p.path for p in only.problems] == ["typo.rules[0].tabels"]
    for name, other in (("read-orders", "typo"), ("typo", "read-orders")):
        (problem,) = plan.problems[name]
        assert f"({name} with {other}) does not compile, so it refuses every statement" in problem.message
        assert "typo.rules[0].tabels" in problem.message
    loaded = policies.build(policy_compile.load_text(only.files["policy.yaml"]))
    decision = loaded.decide("SELECT id FROM orders", loaded.new_context())
    assert decision.verdict == "block"
    assert decision.rule is not None and decision.rule.startswith(bundle.REFUSING + "/")
    for said in ("read-orders, typo", "typo.rules[0].tabels: unknown field", "fix or delete one of them"):
        assert said in decision.reason, decision.reason


def test_known_accounts_bound_by_nothing_fall_back_to_block() -> None:
    plan = bundle.plan([], [], known_service_accounts=["orders"], prefix="p-")
    (only,) = plan.bundles
    assert only.policies == ()
    assert yaml.safe_load(only.files["policy.yaml"]) == {"policies": []}
    assert "no policy binds" in only.files["policy.yaml"]


def test_a_policy_with_unreadable_subjects_binds_nothing() -> None:
    broken = {**READ_ORDERS, "subjects": {"serviceAcounts": ["orders"]}}
    plan = bundle.plan([_policy("read-orders", broken)], [], known_service_accounts=["orders"], prefix="p-")
    (only,) = plan.bundles
    assert only.policies == () and plan.bound == {"read-orders": ()}


def test_render_is_deterministic() -> None:
    first = bundle.plan([_policy("a", READ_ORDERS)], [], prefix="p-")
    again = bundle.plan([_policy("a", dict(reversed(READ_ORDERS.items())))], [], prefix="p-")
    assert first == again


def test_config_map_and_is_current() -> None:
    (item,) = bundle.plan([_policy("read-orders", READ_ORDERS)], [], prefix="p-").bundles
    body = bundle.config_map(item, namespace="apps")
    assert body["metadata"]["labels"]["dbgov.io/service-account"] == "orders"
    assert body["metadata"]["annotations"]["dbgov.io/policies"] == "read-orders"
    existing = {**body, "metadata": {**body["metadata"], "resourceVersion": "7"}}
    assert bundle.is_current(existing, body)
    assert not bundle.is_current({**existing, "data": {"policy.yaml": "old"}}, body)


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
            {"a": "2"},
            True,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
            {"a": "1"},
            False,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": ""}, False),
    ],
)
def test_selector_matches(selector: dict[str, Any], labels: dict[str, str], expected: bool) -> None:
    assert bundle.selector_matches(selector, labels) is expected


@pytest.mark.parametrize(
    ("raw", "paths"),
    [
        (None, ["subjects"]),
        ({}, ["subjects"]),
        ({"serviceAccounts": "orders"}, ["subjects.serviceAccounts", "subjects"]),
        ({"serviceAccounts": ["ok", ""]}, ["subjects.serviceAccounts[1]"]),
        ({"serviceAccount": ["x"]}, ["subjects.serviceAccount", "subjects"]),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals"}]}},
            ["subjects.podSelector.matchExpressions[0].operator"],
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
            ["subjects.podSelector.matchExpressions[0].values"],
        ),
        ({"serviceAccounts": ["a"], "podSelector": {"matchLabels": {"a": "1"}}}, []),
    ],
)
def test_subject_problems_have_field_paths(raw: Any, paths: list[str]) -> None:
    spec = {} if raw is None else {"subjects": raw}
    _, problems = bundle.subjects(spec)
    assert [p.path for p in problems] == paths


def _on(database: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {**spec, "databaseRef": {"name": database}}


def test_one_database_fills_both_files() -> None:
    plan = bundle.plan([_policy("read-orders", _on("orders-db", READ_ORDERS))], [], prefix="p-")
    (only,) = plan.bundles
    assert set(only.files) == {"policy.yaml", "policy.orders-db.yaml"}
    assert only.files["policy.yaml"] == only.files["policy.orders-db.yaml"]


def test_several_databases_get_a_file_each_and_policy_yaml_composes_them_all() -> None:
    analytics = _on("analytics", {**AGENTS, "subjects": {"serviceAccounts": ["orders"]}})
    plan = bundle.plan(
        [_policy("read-orders", _on("orders-db", READ_ORDERS)), _policy("analytics", analytics)],
        [],
        prefix="p-",
    )
    (only,) = plan.bundles
    assert set(only.files) == {"policy.yaml", "policy.orders-db.yaml", "policy.analytics.yaml"}
    orders = yaml.safe_load(only.files["policy.orders-db.yaml"])
    assert [p["name"] for p in orders["policies"]] == ["read-orders"]
    analytics_file = yaml.safe_load(only.files["policy.analytics.yaml"])
    assert [p["name"] for p in analytics_file["policies"]] == ["analytics"]
    fallback = only.files["policy.yaml"]
    assert "several databases (analytics, orders-db)" in fallback
    assert [p["name"] for p in yaml.safe_load(fallback)["policies"]] == ["analytics", "read-orders"]


def test_a_policy_without_database_applies_to_every_database_file() -> None:
    generic = {**AGENTS, "subjects": {"serviceAccounts": ["orders"]}}
    plan = bundle.plan(
        [
            _policy("read-orders", _on("orders-db", READ_ORDERS)),
            _policy("analytics", _on("analytics", READ_ORDERS)),
            _policy("everywhere", generic),
        ],
        [],
        prefix="p-",
    )
    (only,) = plan.bundles
    for key in ("policy.orders-db.yaml", "policy.analytics.yaml", "policy.yaml"):
        assert "everywhere" in [p["name"] for p in yaml.safe_load(only.files[key])["policies"]], key


def test_injection_names_the_same_database_file() -> None:
    from dbgov_operator import injection

    assert injection._policy_file("orders-db") == bundle.database_key("orders-db")
    assert injection._policy_file(None) == bundle.BUNDLE_KEY


def test_pods_get_a_file_for_the_database_they_name() -> None:
    pods = [bundle.Workload(service_account="orders", database="reports")]
    plan = bundle.plan([_policy("read-orders", _on("orders-db", READ_ORDERS))], pods, prefix="p-")
    (only,) = plan.bundles
    assert set(only.files) == {"policy.yaml", "policy.orders-db.yaml", "policy.reports.yaml"}
    assert yaml.safe_load(only.files["policy.reports.yaml"]) == {"policies": []}
    assert yaml.safe_load(only.files["policy.yaml"])["policies"] != []
