"""Which policies bind which ServiceAccount, and the policy bundle each sidecar loads.

A bundle is one ConfigMap per ServiceAccount holding the merged spec of every valid policy that
binds it. The ServiceAccount is the unit because it is what the sidecar proves with its
projected token; a policy's ``podSelector`` is a convenience that names the ServiceAccounts of
the pods it selects. Policies govern one database each (``databaseRef``), so the bundle has a
file per database (``policy.<database>.yaml``, what a pod annotated ``dbgov.io/database`` loads)
and ``policy.yaml`` for pods that name none: the merge of everything when all of it is about one
database, and a refuse-everything spec when it is not (merging rules written for different
databases would let one database's grants leak into another). Pure: the handlers list the
objects and apply the plan.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from dbgov_operator import annotations
from dbgov_operator.kubetypes import ConfigMap
from dbgov_policy import compile as policy_compile

BUNDLE_KEY = "policy.yaml"
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True, kw_only=True)
class Subjects:
    """Who a policy binds."""

    service_accounts: frozenset[str] = frozenset()
    """ServiceAccount names (same namespace)."""
    pod_selector: Mapping[str, Any] | None = None
    """A label selector (``matchLabels`` / ``matchExpressions``) over enrolled pods."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A DatabaseAccessPolicy as the bundler sees it."""

    name: str
    spec: Mapping[str, Any]
    valid: bool
    """Invalid policies bind nothing: their rules never reach a sidecar."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """An enrolled pod: the identity it runs as, and its labels."""

    service_account: str
    labels: Mapping[str, str] = field(default_factory=dict)
    database: str = ""
    """The ``dbgov.io/database`` annotation ("" if none): its bundle file must exist."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """The desired bundle ConfigMap for one ServiceAccount."""

    service_account: str
    config_map: str
    policies: tuple[str, ...]
    files: Mapping[str, str]
    """ConfigMap key -> bundle file (YAML)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Every bundle in a namespace, and which ServiceAccounts each policy binds."""

    bundles: tuple[Bundle, ...]
    bound: Mapping[str, tuple[str, ...]]


def subjects(spec: Mapping[str, Any]) -> tuple[Subjects, tuple[policy_compile.Problem, ...]]:
    """Read ``spec.subjects``; problems carry field paths like the policy compiler's."""
    raw = spec.get("subjects")
    problems: list[policy_compile.Problem] = []

    def problem(path: str, message: str) -> None:
        problems.append(policy_compile.Problem(path=path, message=message))

    if raw is None:
        problem("subjects", "required: name serviceAccounts and/or a podSelector")
        return Subjects(), tuple(problems)
    if not isinstance(raw, Mapping):
        problem("subjects", "must be a mapping")
        return Subjects(), tuple(problems)
    for key in sorted(set(raw) - {"serviceAccounts", "podSelector"}):
        problem(f"subjects.{key}", "unknown field (expected serviceAccounts, podSelector)")
    names = raw.get("serviceAccounts", [])
    if not isinstance(names, list):
        problem("subjects.serviceAccounts", "must be a list of ServiceAccount names")
        names = []
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name:
            problem(f"subjects.serviceAccounts[{index}]", "must be a non-empty string")
    selector = raw.get("podSelector")
    if selector is not None:
        problems.extend(_selector_problems(selector, "subjects.podSelector"))
    if not names and selector is None:
        problem("subjects", "binds nothing: name serviceAccounts and/or a podSelector")
    found = Subjects(
        service_accounts=frozenset(n for n in names if isinstance(n, str) and n),
        pod_selector=selector if isinstance(selector, Mapping) else None,
    )
    return found, tuple(problems)


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector matches everything)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not matched:
            return False
    return True


def binds(policy_subjects: Subjects, *, service_account: str, pods: Iterable[Workload]) -> bool:
    """Whether a policy binds ``service_account``, given the enrolled pods running as it."""
    if service_account in policy_subjects.service_accounts:
        return True
    selector = policy_subjects.pod_selector
    return selector is not None and any(
        pod.service_account == service_account and selector_matches(selector, pod.labels) for pod in pods
    )


def plan(
    policies: Sequence[Policy],
    workloads: Sequence[Workload],
    *,
    known_service_accounts: Iterable[str] = (),
    prefix: str,
) -> Plan:
    """Bundles for every ServiceAccount that a policy names, an enrolled pod runs as, or that
    already has a bundle (``known_service_accounts``); one bound by nothing gets the empty merge,
    which refuses every statement."""
    valid = sorted((p for p in policies if p.valid), key=lambda p: p.name)
    parsed = {p.name: subjects(p.spec)[0] for p in valid}
    accounts = set(known_service_accounts) | {w.service_account for w in workloads}
    for found in parsed.values():
        accounts |= found.service_accounts
    bundles = []
    bound: dict[str, list[str]] = {p.name: [] for p in policies}
    for account in sorted(accounts):
        names = tuple(p.name for p in valid if binds(parsed[p.name], service_account=account, pods=workloads))
        for name in names:
            bound[name].append(account)
        binding = [p for p in valid if p.name in names]
        bundles.append(
            Bundle(
                service_account=account,
                config_map=prefix + account,
                policies=names,
                files=_files(binding, wanted={w.database for w in workloads if w.service_account == account}),
            )
        )
    return Plan(bundles=tuple(bundles), bound={k: tuple(v) for k, v in bound.items()})


def database_key(database: str) -> str:
    """The bundle file for pods that name ``database`` (annotation ``dbgov.io/database``)."""
    return f"policy.{database}.yaml"


def database(spec: Mapping[str, Any]) -> str:
    """The name in a policy's ``databaseRef`` ("" if it has none)."""
    ref = spec.get("databaseRef")
    return str(ref.get("name") or "") if isinstance(ref, Mapping) else ""


def _files(binding: Sequence[Policy], *, wanted: Iterable[str] = ()) -> dict[str, str]:
    """Bundle files for the policies (sorted by name) that bind one ServiceAccount, with a file
    for every database in ``wanted`` (what its pods name) even if no policy is about it."""
    generic = [p for p in binding if not database(p.spec)]
    governed = {database(p.spec) for p in binding} - {""}
    files = {
        database_key(db): _render([p for p in binding if database(p.spec) in ("", db)])
        for db in sorted(governed | (set(wanted) - {""}))
    }
    databases = sorted(governed)
    if len(databases) <= 1:
        files[BUNDLE_KEY] = _render(binding)
    else:
        note = (
            f"policies for several databases ({', '.join(databases)}) bind this ServiceAccount: "
            "a pod must name its database with the dbgov.io/database annotation"
        )
        files[BUNDLE_KEY] = _render(generic, note=note)
    return files


def _render(policies: Sequence[Policy], *, note: str = "") -> str:
    merged = policy_compile.merge_specs([(p.name, p.spec) for p in policies])
    return render(merged, policies=[p.name for p in policies], note=note)


def render(merged: Mapping[str, Any], *, policies: Sequence[str], note: str = "") -> str:
    """A bundle file: deterministic YAML, so an unchanged input never rewrites a ConfigMap."""
    header = "# dbgov policy bundle, generated by the operator from: "
    header += ", ".join(policies) if policies else "(no policy binds this ServiceAccount)"
    if note:
        header += f"\n# {note}"
    return header + "\n" + yaml.safe_dump(dict(merged), sort_keys=True)


def config_map(item: Bundle, *, namespace: str) -> ConfigMap:
    """The ConfigMap body for a bundle."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": item.config_map,
            "namespace": namespace,
            "labels": {
                annotations.MANAGED_BY_LABEL: annotations.MANAGED_BY_VALUE,
                annotations.BUNDLE_SERVICE_ACCOUNT: item.service_account,
            },
            "annotations": {annotations.BUNDLE_POLICIES: ",".join(item.policies)},
        },
        "data": dict(item.files),
    }


def is_current(existing: Mapping[str, Any], desired: ConfigMap) -> bool:
    """Whether an existing ConfigMap already holds ``desired`` (so no write is needed)."""
    meta = existing.get("metadata") or {}
    labels = meta.get("labels") or {}
    notes = meta.get("annotations") or {}
    want = desired["metadata"]
    return (
        (existing.get("data") or {}) == desired["data"]
        and all(labels.get(k) == v for k, v in want["labels"].items())
        and all(notes.get(k) == v for k, v in want["annotations"].items())
    )


def _selector_problems(selector: Any, path: str) -> list[policy_compile.Problem]:
    out: list[policy_compile.Problem] = []
    if not isinstance(selector, Mapping):
        return [policy_compile.Problem(path=path, message="must be a label selector mapping")]
    for key in sorted(set(selector) - {"matchLabels", "matchExpressions"}):
        out.append(policy_compile.Problem(path=f"{path}.{key}", message="unknown field"))
    labels = selector.get("matchLabels", {})
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        out.append(policy_compile.Problem(path=f"{path}.matchLabels", message="must map strings"))
    exprs = selector.get("matchExpressions", [])
    if not isinstance(exprs, list):
        exprs = []
        out.append(policy_compile.Problem(path=f"{path}.matchExpressions", message="must be a list"))
    for index, expr in enumerate(exprs):
        where = f"{path}.matchExpressions[{index}]"
        if not isinstance(expr, Mapping) or not isinstance(expr.get("key"), str):
            out.append(policy_compile.Problem(path=where, message="needs a string key"))
            continue
        op, values = expr.get("operator"), expr.get("values") or []
        if op not in _SELECTOR_OPERATORS:
            message = f"operator must be one of {', '.join(_SELECTOR_OPERATORS)}, got {op!r}"
            out.append(policy_compile.Problem(path=f"{where}.operator", message=message))
        elif op in ("In", "NotIn") and not values:
            out.append(policy_compile.Problem(path=f"{where}.values", message=f"{op} needs values"))
        elif op in ("Exists", "DoesNotExist") and values:
            message = f"{op} takes no values"
            out.append(policy_compile.Problem(path=f"{where}.values", message=message))
    return out
