"""Policy binding and bundle planning, as data."""

from typing import Any

import pytest
import yaml

from dbgov_operator import bundle

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
    merged = yaml.safe_load(only.files["policy.yaml"])
    assert merged["rules"][0]["name"] == "read-orders/read"


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


def test_several_policies_merge_in_name_order() -> None:
    agents = {**AGENTS, "subjects": {"serviceAccounts": ["orders"]}}
    plan = bundle.plan([_policy("zz-agents", agents), _policy("read-orders", READ_ORDERS)], [], prefix="p-")
    (only,) = plan.bundles
    assert only.policies == ("read-orders", "zz-agents")
    merged = yaml.safe_load(only.files["policy.yaml"])
    assert [r["name"] for r in merged["rules"]] == ["read-orders/read", "zz-agents/read"]
    assert merged["masks"] == AGENTS["masks"]


def test_invalid_policy_binds_nothing_and_known_accounts_fall_back_to_block() -> None:
    plan = bundle.plan(
        [_policy("read-orders", READ_ORDERS, valid=False)],
        [],
        known_service_accounts=["orders"],
        prefix="p-",
    )
    (only,) = plan.bundles
    assert only.policies == ()
    assert yaml.safe_load(only.files["policy.yaml"])["default"] == "block"
    assert "no policy binds" in only.files["policy.yaml"]
    assert plan.bound == {"read-orders": ()}


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


def test_several_databases_get_a_file_each_and_policy_yaml_blocks() -> None:
    analytics = _on("analytics", {**AGENTS, "subjects": {"serviceAccounts": ["orders"]}})
    plan = bundle.plan(
        [_policy("read-orders", _on("orders-db", READ_ORDERS)), _policy("analytics", analytics)],
        [],
        prefix="p-",
    )
    (only,) = plan.bundles
    assert set(only.files) == {"policy.yaml", "policy.orders-db.yaml", "policy.analytics.yaml"}
    orders = yaml.safe_load(only.files["policy.orders-db.yaml"])
    assert [r["name"] for r in orders["rules"]] == ["read-orders/read"]
    assert orders["masks"] == []
    analytics_file = yaml.safe_load(only.files["policy.analytics.yaml"])
    assert [r["name"] for r in analytics_file["rules"]] == ["analytics/read"]
    fallback = only.files["policy.yaml"]
    assert "several databases (analytics, orders-db)" in fallback
    assert (yaml.safe_load(fallback)["default"], yaml.safe_load(fallback)["rules"]) == ("block", [])


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
        assert "everywhere/read" in only.files[key], key


def test_injection_names_the_same_database_file() -> None:
    from dbgov_operator import injection

    assert injection._policy_file("orders-db") == bundle.database_key("orders-db")
    assert injection._policy_file(None) == bundle.BUNDLE_KEY


def test_pods_get_a_file_for_the_database_they_name() -> None:
    pods = [bundle.Workload(service_account="orders", database="reports")]
    plan = bundle.plan([_policy("read-orders", _on("orders-db", READ_ORDERS))], pods, prefix="p-")
    (only,) = plan.bundles
    assert set(only.files) == {"policy.yaml", "policy.orders-db.yaml", "policy.reports.yaml"}
    reports = yaml.safe_load(only.files["policy.reports.yaml"])
    assert (reports["default"], reports["rules"]) == ("block", [])
    assert yaml.safe_load(only.files["policy.yaml"])["rules"] != []
