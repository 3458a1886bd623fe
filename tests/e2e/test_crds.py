"""The dbgov.io CRDs against a real kube-apiserver: schema, CEL rules, status, printer columns."""

from __future__ import annotations

import copy
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from dbgov_policy import compile as policy_compile

from . import kube

GROUP, VERSION = "dbgov.io", "v1alpha1"


@pytest.fixture
def api(kube_cluster: kube.KubeCluster, dbgov_crds: list[str]) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube_cluster.api_client())


def policy(name: str = "orders-readonly", **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DatabaseAccessPolicy",
        "metadata": {"name": name},
        "spec": {
            "databaseRef": {"name": "orders"},
            "subjects": {
                "serviceAccounts": ["orders-api"],
                "podSelector": {"matchLabels": {"app": "orders"}},
            },
            "default": "block",
            "rules": [
                {
                    "name": "read",
                    "verdict": "allow",
                    "statements": ["select"],
                    "tables": ["public.*"],
                },
                {"name": "writes", "verdict": "approve", "statements": ["insert", "update"]},
            ],
            "guardrails": {
                "requireWhere": ["update", "delete"],
                "maxRowsAffected": 100,
                "maxRowsReturned": 10000,
                "deniedFunctions": ["pg_sleep"],
                "allowedFunctions": ["public.safe_fn"],
                "allowedSettings": {"search_path": ["public"]},
            },
            "masks": [
                {"table": "public.customers", "column": "email", "strategy": "email"},
                {
                    "table": "public.customers",
                    "column": "card",
                    "strategy": "partial",
                    "keepLast": 4,
                },
                {"table": "public.customers", "column": "ssn", "strategy": "null"},
            ],
        },
    }
    body["spec"].update(spec)
    return body


def database(name: str = "orders", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Database",
        "metadata": {"name": name},
        "spec": {
            "host": "orders-db.example.svc",
            "dbname": "orders",
            "adminSecretRef": {"name": "orders-admin"},
            **spec,
        },
    }


def access_request(name: str = "req", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AccessRequest",
        "metadata": {"name": name},
        "spec": {
            "type": "Statement",
            "requester": "system:serviceaccount:shop:orders-api",
            "policyRef": {"name": "orders-readonly"},
            "statement": {"sql": "DELETE FROM orders WHERE id = 7"},
            "expiresAt": "2030-01-01T00:00:00Z",
            **spec,
        },
    }


def create(api: client.CustomObjectsApi, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    plural = {"DatabaseAccessPolicy": "databaseaccesspolicies", "Database": "databases"}.get(
        body["kind"], "accessrequests"
    )
    created: dict[str, Any] = api.create_namespaced_custom_object(GROUP, VERSION, namespace, plural, body)
    return created


def rejected(call: Any) -> str:
    """Run `call`, assert the apiserver refused it as invalid (422), return its message."""
    with pytest.raises(ApiException) as info:
        call()
    assert info.value.status == 422, info.value.body
    message: str = json.loads(info.value.body)["message"]
    return message


# --- installation ---------------------------------------------------------------------------


def test_crds_are_established_and_discoverable(kube_cluster: kube.KubeCluster, dbgov_crds: list[str]) -> None:
    ext = client.ApiextensionsV1Api(kube_cluster.api_client())
    for name in dbgov_crds:
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in crd.status.conditions}
        assert conditions["Established"] == "True", name
        assert conditions["NamesAccepted"] == "True", name
        # A non-structural schema or a CEL rule over budget shows up as a condition.
        assert conditions.get("NonStructuralSchema", "False") == "False", name
    resources = client.CustomObjectsApi(kube_cluster.api_client()).get_api_resources(GROUP, VERSION)
    by_name = {r.name: r for r in resources.resources}
    assert by_name["databaseaccesspolicies"].short_names == ["dap"]
    assert by_name["databaseaccesspolicies"].namespaced is True
    assert {"databases", "accessrequests", "databaseaccesspolicies/status"} <= set(by_name)


# --- DatabaseAccessPolicy ---------------------------------------------------------------------


def test_valid_policy_is_accepted_with_defaults(api: client.CustomObjectsApi, namespace: str) -> None:
    created = create(api, namespace, policy())
    assert created["spec"]["mode"] == "enforce"  # schema default
    assert created["spec"]["masks"][1]["keepLast"] == 4
    assert created["spec"]["guardrails"]["allowedSettings"] == {"search_path": ["public"]}
    stored = api.get_namespaced_custom_object(
        GROUP, VERSION, namespace, "databaseaccesspolicies", "orders-readonly"
    )
    assert stored["spec"]["rules"][0]["tables"] == ["public.*"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"rules": [{"name": "r", "verdict": "maybe"}]}, "spec.rules[0].verdict"),
        ({"mode": "audit"}, "spec.mode"),
        ({"default": "deny"}, "spec.default"),
        ({"masks": [{"table": "t", "column": "c", "strategy": "scramble"}]}, "spec.masks[0].strategy"),
        ({"guardrails": {"maxRowsReturned": 0}}, "spec.guardrails.maxRowsReturned"),
        ({"rules": [{"name": "r"}]}, "spec.rules[0].verdict"),
        ({"rules": [{"name": "r", "verdict": "allow"}, {"name": "r", "verdict": "block"}]}, "spec.rules[1]"),
        (
            {"masks": [{"table": "t", "column": "c", "strategy": "redact", "keepLast": 2}]},
            "spec.masks[0].keepLast",
        ),
    ],
)
def test_what_the_compiler_judges_the_schema_leaves_to_it(
    api: client.CustomObjectsApi, namespace: str, change: dict[str, Any], field: str
) -> None:
    """The schema does not split the answer: a problem the compiler reports is not refused by the
    schema first (the operator's validating webhook refuses it, with every other problem, in one
    answer; tests/e2e/test_composition.py), so without the operator it is stored as given."""
    create(api, namespace, policy(**change))
    with pytest.raises(policy_compile.PolicyInvalid) as problems:
        policy_compile.compile_policy(policy(**change))
    assert any(str(p).startswith(field) for p in problems.value.problems), problems.value


@pytest.mark.parametrize(
    "local_file",
    [
        kube.REPO_ROOT / "examples" / "policy.yaml",
        kube.REPO_ROOT / "tests" / "unit" / "policy" / "policy.yaml",
    ],
    ids=lambda p: str(p.relative_to(kube.REPO_ROOT)),
)
def test_a_local_policy_file_works_unchanged_in_the_cluster(
    api: client.CustomObjectsApi, namespace: str, local_file: Path
) -> None:
    """The laptop policy is the spec: stored as-is (nothing pruned) and compiled identically."""
    local = yaml.safe_load(local_file.read_text())
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "DatabaseAccessPolicy",
        "metadata": {"name": "from-file"},
        "spec": {
            **copy.deepcopy(local),
            "subjects": {"serviceAccounts": ["app"]},
            "databaseRef": {"name": "shop"},
        },
    }
    stored = create(api, namespace, body)
    spec = {k: v for k, v in stored["spec"].items() if k not in {"subjects", "databaseRef"}}
    assert spec == {"mode": "enforce", **local}  # only the schema default may be added
    assert policy_compile.compile_policy(stored) == policy_compile.compile_policy(local)


def test_unknown_fields_are_kept_for_the_compiler_not_pruned(
    api: client.CustomObjectsApi, namespace: str
) -> None:
    """A misspelt field is kept (pruned, ``tabels`` would make a rule match every table), so the
    operator's webhook sees it and refuses it with its path (tests/e2e/test_composition.py)."""
    body = policy()
    body["spec"]["rules"][0]["verdcit"] = "block"
    stored = create(api, namespace, body)
    assert stored["spec"]["rules"][0]["verdcit"] == "block"
    with pytest.raises(policy_compile.PolicyInvalid) as problems:
        policy_compile.compile_policy(stored)
    assert "spec.rules[0].verdcit: unknown field" in str(problems.value)


def test_database_ref_is_immutable(api: client.CustomObjectsApi, namespace: str) -> None:
    create(api, namespace, policy())
    args = (GROUP, VERSION, namespace, "databaseaccesspolicies", "orders-readonly")
    message = rejected(
        lambda: api.patch_namespaced_custom_object(*args, {"spec": {"databaseRef": {"name": "billing"}}})
    )
    assert "databaseRef is immutable" in message
    # Other fields stay editable: the rule is about databaseRef only.
    patched = api.patch_namespaced_custom_object(*args, {"spec": {"mode": "dry-run"}})
    assert patched["spec"]["mode"] == "dry-run"
    assert patched["metadata"]["generation"] == 2


def test_status_is_a_subresource_with_conditions_keyed_by_type(
    api: client.CustomObjectsApi, namespace: str
) -> None:
    create(api, namespace, policy())
    args = (GROUP, VERSION, namespace, "databaseaccesspolicies", "orders-readonly")
    ready = {
        "type": "Ready",
        "status": "True",
        "reason": "Compiled",
        "message": "policy compiled",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
        "observedGeneration": 1,
    }
    # Writes to the main resource ignore status.
    api.patch_namespaced_custom_object(*args, {"status": {"boundWorkloads": 3}})
    assert "status" not in api.get_namespaced_custom_object(*args)
    status = {"observedGeneration": 1, "boundWorkloads": 2, "conditions": [ready]}
    stored = api.patch_namespaced_custom_object_status(*args, {"status": status})
    assert stored["status"]["conditions"][0]["reason"] == "Compiled"
    assert stored["metadata"]["generation"] == 1  # status writes don't bump the generation
    duplicate = {"status": {"conditions": [ready, {**ready, "status": "False"}]}}
    message = rejected(lambda: api.patch_namespaced_custom_object_status(*args, duplicate))
    assert "Duplicate value" in message
    bad_reason = {"status": {"conditions": [{**ready, "reason": "not a reason!"}]}}
    assert "reason" in rejected(lambda: api.patch_namespaced_custom_object_status(*args, bad_reason))


def test_printer_columns(
    kube_cluster: kube.KubeCluster, api: client.CustomObjectsApi, namespace: str
) -> None:
    create(api, namespace, policy())
    api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, "databaseaccesspolicies", "orders-readonly",
        {"status": {"boundWorkloads": 2, "conditions": [{
            "type": "Ready", "status": "True", "reason": "Compiled", "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }]}},
    )  # fmt: skip
    request = urllib.request.Request(
        f"{kube_cluster.server}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/databaseaccesspolicies",
        headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
    )
    with urllib.request.urlopen(request, context=kube_cluster.ssl_context(), timeout=10) as resp:
        table = json.load(resp)
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names[:4] == ["Name", "Ready", "Mode", "Database"]
    assert {"Workloads", "Age"} <= set(names)
    row = dict(zip(names, table["rows"][0]["cells"], strict=True))
    assert (row["Name"], row["Ready"], row["Mode"], row["Workloads"]) == (
        "orders-readonly", "True", "enforce", 2,
    )  # fmt: skip


# --- Database -------------------------------------------------------------------------------


def test_database_defaults_and_immutable_host_and_dbname(
    api: client.CustomObjectsApi, namespace: str
) -> None:
    created = create(api, namespace, database())
    assert created["spec"]["port"] == 5432
    assert created["spec"]["sslmode"] == "verify-full"
    assert created["spec"]["adminSecretRef"] == {
        "name": "orders-admin",
        "usernameKey": "username",
        "passwordKey": "password",
    }
    args = (GROUP, VERSION, namespace, "databases", "orders")
    assert "host is immutable" in rejected(
        lambda: api.patch_namespaced_custom_object(*args, {"spec": {"host": "elsewhere"}})
    )
    assert "dbname is immutable" in rejected(
        lambda: api.patch_namespaced_custom_object(*args, {"spec": {"dbname": "other"}})
    )
    moved = api.patch_namespaced_custom_object(*args, {"spec": {"port": 6432, "sslmode": "require"}})
    assert (moved["spec"]["port"], moved["spec"]["sslmode"]) == (6432, "require")


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        ({"sslmode": "on"}, "spec.sslmode"),
        ({"port": 0}, "spec.port"),
        ({"adminSecretRef": {}}, "spec.adminSecretRef.name"),
    ],
)
def test_invalid_database_is_rejected(
    api: client.CustomObjectsApi, namespace: str, change: dict[str, Any], expect: str
) -> None:
    assert expect in rejected(lambda: create(api, namespace, database(**change)))


def test_database_requires_host_and_dbname(api: client.CustomObjectsApi, namespace: str) -> None:
    body = database()
    del body["spec"]["host"], body["spec"]["dbname"]
    message = rejected(lambda: create(api, namespace, body))
    assert "spec.host: Required value" in message
    assert "spec.dbname: Required value" in message


# --- AccessRequest ----------------------------------------------------------------------------


def test_access_request_spec_is_immutable_and_shape_checked(
    api: client.CustomObjectsApi, namespace: str
) -> None:
    create(api, namespace, access_request())
    args = (GROUP, VERSION, namespace, "accessrequests", "req")
    assert "spec is immutable" in rejected(
        lambda: api.patch_namespaced_custom_object(*args, {"spec": {"reason": "please"}})
    )
    elevation_without_body = access_request("req2", type="Elevation")
    assert "type Elevation needs elevation" in rejected(
        lambda: create(api, namespace, elevation_without_body)
    )
    elevated = access_request("req3", type="Elevation", elevation={"rules": ["writes"]})
    assert create(api, namespace, elevated)["spec"]["elevation"] == {"rules": ["writes"]}


def test_access_request_approval_rules(api: client.CustomObjectsApi, namespace: str) -> None:
    create(api, namespace, access_request())
    args = (GROUP, VERSION, namespace, "accessrequests", "req")
    requester = "system:serviceaccount:shop:orders-api"
    self_approval = {"status": {"phase": "Approved", "approver": requester}}
    assert "cannot approve or deny their own request" in rejected(
        lambda: api.patch_namespaced_custom_object_status(*args, self_approval)
    )
    api.patch_namespaced_custom_object_status(*args, {"status": {"phase": "Pending"}})
    approved = api.patch_namespaced_custom_object_status(
        *args,
        {"status": {"phase": "Approved", "approver": "alice", "decidedAt": "2026-01-01T00:00:00Z"}},
    )
    assert approved["status"]["phase"] == "Approved"
    back = {"status": {"phase": "Pending"}}
    assert "cannot return to Pending" in rejected(
        lambda: api.patch_namespaced_custom_object_status(*args, back)
    )
    expired = api.patch_namespaced_custom_object_status(*args, {"status": {"phase": "Expired"}})
    assert expired["status"]["phase"] == "Expired"
    bogus = copy.deepcopy(back)
    bogus["status"]["phase"] = "Maybe"
    assert "Unsupported value" in rejected(lambda: api.patch_namespaced_custom_object_status(*args, bogus))
