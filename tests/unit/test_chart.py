"""Static checks of the Helm chart and the CRDs that need no cluster and no helm binary."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dbgov"
CRDS = REPO / "crds"
CHART_CRDS = CHART / "files" / "crds"


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_values_yaml_validates_against_the_schema() -> None:
    errors = [e.message for e in _validator().iter_errors(_values())]
    assert errors == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("operator", "replicaCount"), 2),  # a typo of replicas
        (("bogus",), True),
        (("webhook", "certManager", "issuerRef", "nmae"), "x"),
        (("image", "operator", "pullPolicy"), "Sometimes"),
        (("sidecar", "proxyPort"), 70000),
        (("sidecar", "metricsPort"), 0),
        (("sidecar", "metricsPort"), "9187"),
        (("sidecar", "tokenExpirationSeconds"), 60),
        (("webhook", "certManager", "duration"), "90 days"),
        (("operator", "peering"), ""),  # standalone with the default two replicas
        (("operator", "peering"), "Not_A_Name"),
        (("operator", "topologySpreadConstraints"), {"maxSkew": 1}),  # a list of them
        (("webhook", "rotationCheckSeconds"), 0),
    ],
)
def test_schema_rejects_unknown_keys_and_bad_values(path: tuple[str, ...], value: Any) -> None:
    values = copy.deepcopy(_values())
    node = values
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert list(_validator().iter_errors(values)), f"{'.'.join(path)}={value!r} was accepted"


def test_defaults_are_highly_available_and_standalone_is_an_explicit_opt_out() -> None:
    """Two replicas with peering named after the release (null) and a PDB by default, so an
    upgrade or drain never leaves the fail-closed webhooks unanswered; one standalone replica
    only when asked for, and never several without peering."""
    operator = _values()["operator"]
    assert (operator["replicas"], operator["peering"]) == (2, None)
    assert _values()["podDisruptionBudget"] == {"enabled": True, "minAvailable": 1}

    def errors(**changes: Any) -> list[str]:
        values = copy.deepcopy(_values())
        values["operator"].update(changes)
        return [e.message for e in _validator().iter_errors(values)]

    assert errors(peering="", replicas=1) == []
    assert errors(peering="shared-peers", replicas=3) == []
    assert errors(peering=None, replicas=1) == []
    assert errors(peering="", replicas=2)
    without = copy.deepcopy(_values())
    del without["operator"]["peering"]  # `--set operator.peering=null` removes the key
    assert list(_validator().iter_errors(without)) == []


def test_every_object_in_the_schema_is_closed() -> None:
    """Strictness: every object with declared properties forbids undeclared ones."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(where or "/")
            for key, child in node.items():
                if key not in {"if", "then"}:  # conditions on an object, not objects
                    walk(child, f"{where}/{key}")
        elif isinstance(node, list):
            for i, child in enumerate(node):
                walk(child, f"{where}/{i}")

    walk(schema, "")
    # extraEnv items are Kubernetes EnvVars: only `name` is checked here, the API does the rest.
    assert open_objects == ["/properties/operator/properties/extraEnv/items"]


def test_every_value_is_commented() -> None:
    """Each value in values.yaml has a comment line right above it.

    A mapping without a comment only groups values, so each of its keys needs one; a commented
    mapping (resources, say) is one documented value and its keys are examples.
    """
    lines = (CHART / "values.yaml").read_text().splitlines()
    key_re = re.compile(r"^(\s*)([A-Za-z][A-Za-z0-9]*):(.*)$")
    documented_indents: list[int] = []  # indents of commented mappings we are inside
    uncommented = []
    for i, line in enumerate(lines):
        match = key_re.match(line)
        if not match:
            continue
        indent = len(match.group(1))
        documented_indents = [d for d in documented_indents if d < indent]
        if documented_indents:
            continue
        commented = i > 0 and lines[i - 1].strip().startswith("#")
        nxt = next((n for n in lines[i + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        is_mapping = match.group(3).strip() == "" and len(nxt) - len(nxt.lstrip()) > indent
        if is_mapping and commented:
            documented_indents.append(indent)
        elif not is_mapping and not commented:
            uncommented.append(match.group(2))
    assert uncommented == []


def test_chart_crds_are_the_canonical_crds() -> None:
    """charts/dbgov/files/crds is a copy of crds/; run `make crds` after editing crds/."""
    canonical = {p.name: p.read_bytes() for p in CRDS.glob("*.yaml")}
    in_chart = {p.name: p.read_bytes() for p in CHART_CRDS.glob("*.yaml")}
    assert sorted(in_chart) == sorted(canonical)
    stale = [name for name in canonical if canonical[name] != in_chart[name]]
    assert stale == [], "run `make crds`"


def _crds() -> dict[str, dict[str, Any]]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))}


def test_one_crd_per_kind_named_after_it() -> None:
    kinds = {}
    for name, crd in _crds().items():
        spec = crd["spec"]
        assert crd["kind"] == "CustomResourceDefinition"
        assert spec["group"] == "dbgov.io"
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.dbgov.io"
        assert name == f"dbgov.io_{spec['names']['plural']}.yaml"
        assert [v["name"] for v in spec["versions"]] == ["v1alpha1"]
        kinds[spec["names"]["kind"]] = spec
    assert sorted(kinds) == [
        "AccessRequest",
        "ClusterDatabaseAccessPolicy",
        "Database",
        "DatabaseAccessPolicy",
    ]
    assert kinds["DatabaseAccessPolicy"]["names"]["shortNames"] == ["dap"]
    assert kinds["ClusterDatabaseAccessPolicy"]["names"]["shortNames"] == ["cdap"]
    assert kinds["ClusterDatabaseAccessPolicy"]["scope"] == "Cluster"


def _untyped_nodes(schema: dict[str, Any], where: str) -> list[str]:
    """Structural schema: every node has a type unless it preserves unknown fields."""
    bad = []
    if "type" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        bad.append(where)
    for key, child in schema.get("properties", {}).items():
        bad += _untyped_nodes(child, f"{where}.{key}")
    if isinstance(schema.get("items"), dict):
        bad += _untyped_nodes(schema["items"], f"{where}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        bad += _untyped_nodes(schema["additionalProperties"], f"{where}.*")
    return bad


@pytest.mark.parametrize("name", sorted(p.name for p in CRDS.glob("*.yaml")))
def test_crd_schema_is_structural_with_status_and_conditions(name: str) -> None:
    version = _crds()[name]["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    assert _untyped_nodes(schema, "") == []
    assert version["subresources"] == {"status": {}}
    status = schema["properties"]["status"]["properties"]
    assert status["observedGeneration"]["type"] == "integer"
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert set(conditions["items"]["required"]) >= {"type", "status", "reason", "message"}
    assert "observedGeneration" in conditions["items"]["properties"]


def test_policy_printer_columns() -> None:
    version = _crds()["dbgov.io_databaseaccesspolicies.yaml"]["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Mode"] == ".spec.mode"
    assert columns["Workloads"] == ".status.boundWorkloads"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_policy_spec_covers_the_policy_engine_fields() -> None:
    """The CRD must not prune a field the policy compiler accepts (same document everywhere)."""
    from dbgov_policy import compile as compile_mod

    props = _crds()["dbgov.io_databaseaccesspolicies.yaml"]["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"
    ]["properties"]["spec"]["properties"]
    assert set(props) == set(compile_mod.SPEC_FIELDS | compile_mod.CLUSTER_FIELDS)
    assert set(props["rules"]["items"]["properties"]) == set(compile_mod.RULE_FIELDS)
    assert set(props["guardrails"]["properties"]) == set(compile_mod.GUARDRAIL_FIELDS)
    assert set(props["masks"]["items"]["properties"]) == set(compile_mod.MASK_FIELDS)


def test_pinned_tool_versions_match_the_tool_modules() -> None:
    """hack/tools/versions.env names the cache directory; go.mod decides what gets built."""
    tools = REPO / "hack" / "tools"
    versions = dict(
        line.split("=", 1)
        for line in (tools / "versions.env").read_text().splitlines()
        if line and not line.startswith("#")
    )

    def required(module_dir: str, module: str) -> str:
        match = re.search(
            rf"^require {re.escape(module)} (\S+)$", (tools / module_dir / "go.mod").read_text(), re.M
        )
        assert match, f"{module_dir}/go.mod must require {module} on one line"
        return match.group(1)

    assert required("kube-apiserver", "k8s.io/kubernetes") == versions["KUBE_VERSION"]
    assert required("etcd", "go.etcd.io/etcd/server/v3") == versions["ETCD_VERSION"]
    assert required("helm", "helm.sh/helm/v3") == versions["HELM_VERSION"]
    # Every staging module points at the tag that matches the release (v1.34.4 -> v0.34.4).
    staging = "v0." + versions["KUBE_VERSION"].split(".", 1)[1]
    replaces = re.findall(
        r"^\t(k8s\.io/\S+) => (k8s\.io/\S+) (\S+)$", (tools / "kube-apiserver" / "go.mod").read_text(), re.M
    )
    assert len(replaces) >= 29
    assert [r for r in replaces if r[0] != r[1] or r[2] != staging] == []
    # go.sum is committed so a fresh machine builds with -mod=readonly.
    for module_dir in ("kube-apiserver", "etcd", "helm"):
        assert (tools / module_dir / "go.sum").stat().st_size > 0
