"""Which policies bind which ServiceAccount, and the policy bundle each sidecar loads.

A bundle is one ConfigMap per ServiceAccount holding every policy that binds it, each by name
with its spec, for the sidecar to compose (``dbgov_policy.compose``: each policy judges every
statement on its own and the strictest answer wins; rules are never merged, so neither a
policy's name nor anyone's order decides). A composition that does not compile fails closed:
the bundle is replaced by one that refuses every statement, saying which policies do not compose
and why, beside the cluster baselines that bind the ServiceAccount, and every policy involved
reports why. Keeping the previous content instead would freeze the bundle: no later baseline
would reach it and a replayed older bundle would never be repaired (issue 12, F3). The
ServiceAccount is the unit because it is what the sidecar proves with its
projected token; a policy's ``podSelector`` is a convenience that names the ServiceAccounts of
the pods it selects. Policies govern one database each (``databaseRef``), so the bundle has a
file per database (``policy.<database>.yaml``, what a pod annotated ``dbgov.io/database`` loads)
and ``policy.yaml`` for pods that name none: the composition of every policy that binds the
ServiceAccount, whatever database it is about (composition only ever narrows, so a policy for
another database can add refusals but never grants). Pure: the handlers list the
objects and apply the plan.
"""

import functools
import hashlib
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import yaml

from dbgov_operator import annotations
from dbgov_operator.kubetypes import ConfigMap
from dbgov_policy import compile as policy_compile
from dbgov_policy import compose
from dbgov_sidecar import bundle_signature

BUNDLE_KEY = "policy.yaml"
CLUSTER_PREFIX = compose.CLUSTER_PREFIX
"""How a ClusterDatabaseAccessPolicy is named among a bundle's components (no namespaced policy
can take such a name: ``:`` is not allowed in object names); the composition tells baselines
apart by it."""
REFUSING = "dbgov:composition-invalid"
"""The component of a bundle whose composition does not compile: one rule, named after why,
blocks every statement (no policy can take this name either)."""
_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
NAME_MAX = 253
"""The longest object name (a DNS subdomain): a ServiceAccount's name may take all of it."""
LABEL_VALUE_MAX = 63
"""The longest label value."""
_DIGEST_CHARS = 10
RENDER_CACHE_SIZE = 1024
"""Compositions whose rendered (compiled) bundle file is kept: every ServiceAccount bound by
the same policies has the same composition, and a policy webhook request plans every bundle of
its namespace twice (issue 12, F4)."""


def bounded(prefix: str, name: str, *, limit: int) -> str:
    """``prefix + name`` when it fits in ``limit`` characters; else as much of it as fits
    beside ``-`` and a digest of ``name``: stable, distinct for distinct names, still starting
    with ``prefix`` and ending with an alphanumeric (valid as an object name and a label value)."""
    whole = prefix + name
    if len(whole) <= limit:
        return whole
    digest = hashlib.sha256(name.encode()).hexdigest()[:_DIGEST_CHARS]
    kept = name[: max(limit - len(prefix) - _DIGEST_CHARS - 1, 0)].rstrip("-.")
    return f"{prefix}{kept}-{digest}"


def bundle_name(prefix: str, service_account: str) -> str:
    """The name of the bundle ConfigMap of ``service_account``: ``prefix`` + its name, shortened
    with a digest when that would pass the 253-character limit (issue 12, F2: a ServiceAccount
    name may be 253 characters long; the write was refused and the namespace's reconcile with it)."""
    return bounded(prefix, service_account, limit=NAME_MAX)


def service_account_label(service_account: str) -> str:
    """The value of the bundle's ServiceAccount label: its name, shortened with a digest past
    the 63 characters a label value may hold (the full name is then in the annotation of the
    same key)."""
    return bounded("", service_account, limit=LABEL_VALUE_MAX)


def bundle_service_account(metadata: Mapping[str, Any]) -> str | None:
    """The ServiceAccount a bundle ConfigMap (its ``metadata``) is for: the annotation, written
    when the name does not fit in the label, else the label."""
    notes = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    value = notes.get(annotations.BUNDLE_SERVICE_ACCOUNT) or labels.get(annotations.BUNDLE_SERVICE_ACCOUNT)
    return str(value) if value else None


@dataclass(frozen=True, slots=True, kw_only=True)
class Subjects:
    """Who a policy binds."""

    service_accounts: frozenset[str] = frozenset()
    """ServiceAccount names (same namespace)."""
    pod_selector: Mapping[str, Any] | None = None
    """A label selector (``matchLabels`` / ``matchExpressions``) over enrolled pods."""
    namespace_selector: Mapping[str, Any] | None = None
    """A cluster policy's label selector over namespaces (None for a namespaced policy)."""
    every: bool = False
    """A cluster policy naming neither serviceAccounts nor a podSelector: it binds every
    ServiceAccount that has a bundle in the namespaces it selects."""


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
    problems: tuple[policy_compile.Problem, ...] = ()
    """Why the composition does not compile; then ``files`` refuse every statement and say why
    (:func:`refusing_files`): a bundle the sidecar loads, never one it would refuse."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """Every bundle in a namespace, and which ServiceAccounts each policy binds."""

    bundles: tuple[Bundle, ...]
    bound: Mapping[str, tuple[str, ...]]
    problems: Mapping[str, tuple[policy_compile.Problem, ...]] = field(default_factory=dict)
    """Policy name -> why a composition it is part of does not compile (naming the others)."""


def subjects(
    spec: Mapping[str, Any], *, cluster: bool = False
) -> tuple[Subjects, tuple[policy_compile.Problem, ...]]:
    """Read ``spec.subjects``; problems carry field paths like the policy compiler's. A
    ``cluster`` policy (ClusterDatabaseAccessPolicy) must say which namespaces it selects
    (``namespaceSelector``, ``{}`` for all) and, naming no workloads, binds every one there."""
    raw = spec.get("subjects")
    problems: list[policy_compile.Problem] = []
    known = ("serviceAccounts", "podSelector", *(("namespaceSelector",) if cluster else ()))

    def problem(path: str, message: str) -> None:
        problems.append(policy_compile.Problem(path=path, message=message))

    if raw is None:
        wanted = "a namespaceSelector" if cluster else "serviceAccounts and/or a podSelector"
        problem("subjects", f"required: name {wanted}")
        return Subjects(), tuple(problems)
    if not isinstance(raw, Mapping):
        problem("subjects", "must be a mapping")
        return Subjects(), tuple(problems)
    for key in sorted(set(raw) - set(known)):
        problem(f"subjects.{key}", f"unknown field (expected {', '.join(known)})")
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
    namespaces = raw.get("namespaceSelector")
    if cluster and namespaces is None:
        problem("subjects.namespaceSelector", "required: the namespaces this policy applies in ({} for all)")
    elif namespaces is not None:
        problems.extend(_selector_problems(namespaces, "subjects.namespaceSelector"))
    if not cluster and not names and selector is None:
        problem("subjects", "binds nothing: name serviceAccounts and/or a podSelector")
    found = Subjects(
        service_accounts=frozenset(n for n in names if isinstance(n, str) and n),
        pod_selector=selector if isinstance(selector, Mapping) else None,
        namespace_selector=namespaces if cluster and isinstance(namespaces, Mapping) else None,
        every=cluster and not names and selector is None,
    )
    return found, tuple(problems)


def selects_namespace(spec: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a cluster policy applies in a namespace with ``labels``: its namespaceSelector
    matches them (a cluster policy whose subjects cannot be read selects no namespace)."""
    found, problems = subjects(spec, cluster=True)
    return (
        not problems
        and found.namespace_selector is not None
        and selector_matches(found.namespace_selector, labels)
    )


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
    if policy_subjects.every or service_account in policy_subjects.service_accounts:
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
    existing: Collection[str] | None = None,
    prefix: str,
    cluster: Sequence[Policy] = (),
) -> Plan:
    """Bundles for every ServiceAccount that a policy names, an enrolled pod runs as, or that
    already has a bundle (``known_service_accounts``); one bound by nothing gets the empty
    bundle, which refuses every statement. ``existing``: the ServiceAccounts of the namespace;
    only they get a bundle and are bound (a bundle is owned by its ServiceAccount, so one for a
    ServiceAccount that does not exist would be ownerless: nothing would ever collect it, and it
    would be waiting for whoever creates the name). None takes every name to exist (what a new
    policy would do once they do). A policy whose subjects can be read binds even when
    the rest of it is invalid: the compositions it is part of then do not compile, their
    bundles refuse every statement (:func:`refusing_files`), and ``Plan.problems`` says so on
    every policy involved.

    ``cluster``: the cluster policies that select this namespace, each named
    ``cluster:<name>`` (:func:`cluster_component`). They join the composition of every
    ServiceAccount they bind as components like any other (so the strictest answer wins and
    their names decide nothing); they add no ServiceAccount of their own to the namespace."""
    readable = [p for p in policies if not subjects(p.spec)[1]]
    readable += [p for p in cluster if not subjects(p.spec, cluster=True)[1]]
    valid = sorted(readable, key=lambda p: p.name)
    parsed = {p.name: subjects(p.spec, cluster=p.name.startswith(CLUSTER_PREFIX))[0] for p in valid}
    accounts = set(known_service_accounts) | {w.service_account for w in workloads}
    for name, found in parsed.items():
        if not name.startswith(CLUSTER_PREFIX):
            accounts |= found.service_accounts
    if existing is not None:
        accounts &= set(existing)
    bundles = []
    bound: dict[str, list[str]] = {p.name: [] for p in (*policies, *cluster)}
    failed: dict[str, list[policy_compile.Problem]] = {}
    for account in sorted(accounts):
        names = tuple(p.name for p in valid if binds(parsed[p.name], service_account=account, pods=workloads))
        for name in names:
            bound[name].append(account)
        binding = [p for p in valid if p.name in names]
        wanted = {w.database for w in workloads if w.service_account == account}
        try:
            files = _files(binding, wanted=wanted)
            trouble: tuple[policy_compile.Problem, ...] = ()
        except policy_compile.PolicyInvalid as err:
            trouble = err.problems
            files = refusing_files(binding, account=account, problems=trouble, wanted=wanted)
            for name in names:
                failed.setdefault(name, []).append(_involved(name, account, names, trouble))
        bundles.append(
            Bundle(
                service_account=account,
                config_map=bundle_name(prefix, account),
                policies=names,
                files=files,
                problems=trouble,
            )
        )
    return Plan(
        bundles=tuple(bundles),
        bound={k: tuple(v) for k, v in bound.items()},
        problems={k: tuple(v) for k, v in failed.items()},
    )


def cluster_component(name: str) -> str:
    """The component name of the ClusterDatabaseAccessPolicy ``name`` in bundles and plans."""
    return CLUSTER_PREFIX + name


def _involved(
    name: str, account: str, names: Sequence[str], found: Sequence[policy_compile.Problem]
) -> policy_compile.Problem:
    """What a policy reports when a composition it is part of does not compile."""
    others = [n for n in names if n != name]
    listing = "; ".join(str(p) for p in found)
    beside = f" with {', '.join(others)}" if others else ""
    message = (
        f"the bundle of ServiceAccount {account} ({name}{beside}) does not compile, so it refuses "
        f"every statement until this is fixed: {listing}"
    )
    return policy_compile.Problem(path="", message=message)


def refusing_files(
    binding: Sequence[Policy],
    *,
    account: str,
    problems: Sequence[policy_compile.Problem],
    wanted: Iterable[str] = (),
) -> dict[str, str]:
    """The files of a bundle whose composition does not compile: the same files as
    :func:`_files` would write, each the composition of a component that blocks every statement
    (its one rule is named after which policies do not compose, why, and what to do, so a
    refused client reads it in the error) with the cluster baselines that bind the
    ServiceAccount, so no baseline is ever absent from what the sidecar enforces. If the
    baselines cannot be composed either, the refusing component stands alone: it is stricter
    than any of them."""
    names = [p.name for p in binding]
    listing = "; ".join(str(p) for p in problems)
    own = [n for n in names if not n.startswith(CLUSTER_PREFIX)]
    fix = (
        f"fix or delete one of them (kubectl describe databaseaccesspolicy {' '.join(own)})"
        if own
        else "fix one of the ClusterDatabaseAccessPolicies"
    )
    reason = (
        f"the policies binding ServiceAccount {account} ({', '.join(names) or 'none'}) do not compose, "
        f"so every statement is refused until they do: {listing}; {fix}"
    )
    refuse = Policy(
        name=REFUSING,
        spec={"mode": "enforce", "default": "block", "rules": [{"name": reason, "verdict": "block"}]},
        valid=True,
    )
    baselines = [p for p in binding if p.name.startswith(CLUSTER_PREFIX)]
    governed = {database(p.spec) for p in binding} - {""}
    note = f"the composition of {', '.join(names)} does not compile: every statement is refused"
    files = {}
    for key, db in [(database_key(d), d) for d in sorted(governed | (set(wanted) - {""}))] + [
        (BUNDLE_KEY, "")
    ]:
        beside = [p for p in baselines if not db or database(p.spec) in ("", db)]
        try:
            files[key] = _render([refuse, *beside], note=note)
        except policy_compile.PolicyInvalid:
            files[key] = _render([refuse], note=note)
    return files


def database_key(database: str) -> str:
    """The bundle file for pods that name ``database`` (annotation ``dbgov.io/database``)."""
    return f"policy.{database}.yaml"


def database(spec: Mapping[str, Any]) -> str:
    """The name in a policy's ``databaseRef`` ("" if it has none)."""
    ref = spec.get("databaseRef")
    return str(ref.get("name") or "") if isinstance(ref, Mapping) else ""


def _files(binding: Sequence[Policy], *, wanted: Iterable[str] = ()) -> dict[str, str]:
    """Bundle files for the policies (sorted by name) that bind one ServiceAccount, with a file
    for every database in ``wanted`` (what its pods name) even if no policy is about it.
    Raises ``PolicyInvalid`` (paths name the policy) when a composition does not compile."""
    governed = {database(p.spec) for p in binding} - {""}
    files = {
        database_key(db): _render([p for p in binding if database(p.spec) in ("", db)])
        for db in sorted(governed | (set(wanted) - {""}))
    }
    databases = sorted(governed)
    note = ""
    if len(databases) > 1:
        note = (
            f"policies for several databases ({', '.join(databases)}) bind this ServiceAccount: "
            "pods that name no database (dbgov.io/database) are judged by all of them"
        )
    files[BUNDLE_KEY] = _render(binding, note=note)
    return files


def _render(policies: Sequence[Policy], *, note: str = "") -> str:
    # Keyed by content (names and specs), so an edited policy never meets its old rendering.
    key = json.dumps([[p.name, _sidecar_spec(p.spec)] for p in policies], sort_keys=True, default=_plain)
    rendered = _render_cached(key, note)
    if isinstance(rendered, policy_compile.PolicyInvalid):
        raise policy_compile.PolicyInvalid(rendered.problems, source=rendered.source)
    return rendered


def _plain(value: object) -> object:
    """JSON for the mappings and sequences of a spec that are not dicts and lists."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"a policy spec holds {type(value).__name__}, which is not JSON")


@functools.lru_cache(maxsize=RENDER_CACHE_SIZE)
def _render_cached(key: str, note: str) -> str | policy_compile.PolicyInvalid:
    """A bundle file, or why its composition does not compile (kept too: it is as costly)."""
    specs = [(str(name), dict(spec)) for name, spec in json.loads(key)]
    try:
        policy_compile.compile_components(specs, source="the bundle")  # never ship what would not load
    except policy_compile.PolicyInvalid as err:
        return err
    return render(policy_compile.bundle_document(specs), policies=[name for name, _ in specs], note=note)


def _sidecar_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A policy spec without the fields only the operator reads (anything else stays, so an
    unknown field fails the composition as it fails the policy)."""
    return {k: v for k, v in spec.items() if k not in policy_compile.CLUSTER_FIELDS}


def render(merged: Mapping[str, Any], *, policies: Sequence[str], note: str = "") -> str:
    """A bundle file: deterministic YAML, so an unchanged input never rewrites a ConfigMap."""
    header = "# dbgov policy bundle, generated by the operator from: "
    header += ", ".join(policies) if policies else "(no policy binds this ServiceAccount)"
    if note:
        header += f"\n# {note}"
    return header + "\n" + yaml.safe_dump(dict(merged), sort_keys=True)


class Signs(Protocol):
    """The operator's signing key as the bundler uses it (``signing.Signer``)."""

    def sign(self, content: str, *, namespace: str, service_account: str, file: str, generation: int) -> str:
        """The ``.sig`` text of one bundle file."""
        ...

    def verifies(
        self, content: str, signature_text: str | None, *, namespace: str, service_account: str, file: str
    ) -> int | None:
        """The generation of a valid signature of this key over ``content``, or None."""
        ...


def config_map(
    item: Bundle,
    *,
    namespace: str,
    signer: Signs | None = None,
    generation: int = 0,
    owner: Mapping[str, str] | None = None,
) -> ConfigMap:
    """The ConfigMap body for a bundle: every file signed by ``signer`` at ``generation`` (a
    ``<file>.sig`` key beside it), owned by ``owner`` (the ServiceAccount's ``name`` and ``uid``)
    so that deleting the ServiceAccount collects its bundle."""
    data = dict(item.files)
    if signer is not None:
        for key, content in item.files.items():
            data[key + bundle_signature.SUFFIX] = signer.sign(
                content,
                namespace=namespace,
                service_account=item.service_account,
                file=key,
                generation=generation,
            )
    body: ConfigMap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": item.config_map,
            "namespace": namespace,
            "labels": {
                annotations.MANAGED_BY_LABEL: annotations.MANAGED_BY_VALUE,
                annotations.BUNDLE_SERVICE_ACCOUNT: service_account_label(item.service_account),
            },
            "annotations": {annotations.BUNDLE_POLICIES: ",".join(item.policies)},
        },
        "data": data,
    }
    if service_account_label(item.service_account) != item.service_account:
        body["metadata"]["annotations"][annotations.BUNDLE_SERVICE_ACCOUNT] = item.service_account
    if owner is not None:
        # No blockOwnerDeletion: setting it needs the right to update the ServiceAccount's
        # finalizers, and nothing needs the ServiceAccount to wait for its bundle.
        body["metadata"]["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "name": owner["name"], "uid": owner["uid"]}
        ]
    return body


def signed_generation(existing: Mapping[str, Any], *, signer: Signs, namespace: str) -> int | None:
    """The newest generation among the valid signatures of ours in an existing bundle ConfigMap
    (None if there is none): a rewrite must sign above it, or sidecars would take it for a
    rollback."""
    data = existing.get("data") or {}
    account = bundle_service_account(existing.get("metadata") or {})
    found = [
        signer.verifies(
            content,
            data.get(key + bundle_signature.SUFFIX),
            namespace=namespace,
            service_account=str(account or ""),
            file=key,
        )
        for key, content in data.items()
        if not key.endswith(bundle_signature.SUFFIX)
    ]
    generations = [g for g in found if g is not None]
    return max(generations) if generations else None


def is_current(existing: Mapping[str, Any], desired: ConfigMap, *, signer: Signs | None = None) -> bool:
    """Whether an existing ConfigMap already holds ``desired`` (so no write is needed): the same
    files and no other keys, each file with a valid signature of ``signer`` for this bundle (the
    signatures themselves differ by generation), our labels, annotations and owner."""
    meta = existing.get("metadata") or {}
    labels = meta.get("labels") or {}
    notes = meta.get("annotations") or {}
    want = desired["metadata"]
    data = existing.get("data") or {}
    if set(data) != set(desired["data"]) or not all(
        data[key] == value
        for key, value in desired["data"].items()
        if not key.endswith(bundle_signature.SUFFIX)
    ):
        return False
    if signer is not None:
        for key, content in data.items():
            if key.endswith(bundle_signature.SUFFIX):
                continue
            generation = signer.verifies(
                content,
                data.get(key + bundle_signature.SUFFIX),
                namespace=want["namespace"],
                service_account=bundle_service_account(want) or "",
                file=key,
            )
            if generation is None:
                return False
    owners = [(o.get("uid"), o.get("kind")) for o in meta.get("ownerReferences") or []]
    return (
        all(labels.get(k) == v for k, v in want["labels"].items())
        and all(notes.get(k) == v for k, v in want["annotations"].items())
        and all((o["uid"], o["kind"]) in owners for o in want.get("ownerReferences", []))
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
