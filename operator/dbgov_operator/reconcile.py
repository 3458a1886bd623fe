"""Bring one namespace's policy bundles and policy statuses in line with its policies and pods.

Level-triggered: every policy event (create, update, resume, delete) and every enrolled pod
reconciles the whole namespace from a fresh read, and writes only what differs. So an operator
restart re-reads everything and, when nothing changed, writes nothing and says nothing.
"""

import datetime
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from dbgov_operator import bundle, conditions, kubeapi, settings
from dbgov_operator.kubetypes import BoundWorkload
from dbgov_policy import compile as policy_compile

EventType = Literal["Normal", "Warning"]
Emit = Callable[[Mapping[str, Any], EventType, str, str], None]
"""Posts an event on an object: (body, type, reason, message)."""

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a reconcile wrote (empty when the namespace was already current)."""

    bundles_written: tuple[str, ...]
    statuses_written: tuple[str, ...]


def problems(spec: Mapping[str, Any]) -> tuple[policy_compile.Problem, ...]:
    """Every problem with a policy spec: the shared compiler's, then the operator's subjects."""
    found: list[policy_compile.Problem] = []
    try:
        policy_compile.compile_policy(dict(spec))
    except policy_compile.PolicyInvalid as err:
        found.extend(err.problems)
    found.extend(bundle.subjects(spec)[1])
    return tuple(found)


def reconcile_namespace(
    api: kubeapi.Api,
    *,
    namespace: str,
    config: settings.Settings,
    now: datetime.datetime,
    emit: Emit,
) -> Outcome:
    """Reconcile ``namespace``; one at a time per namespace within this process."""
    with _lock(namespace):
        return _reconcile(api, namespace=namespace, config=config, now=now, emit=emit)


def _reconcile(
    api: kubeapi.Api,
    *,
    namespace: str,
    config: settings.Settings,
    now: datetime.datetime,
    emit: Emit,
) -> Outcome:
    live = [p for p in api.list_policies(namespace) if not p.deleting]
    judged = {p.name: problems(p.spec) for p in live}
    existing = api.list_bundles(namespace)
    plan = bundle.plan(
        [bundle.Policy(name=p.name, spec=p.spec, valid=not judged[p.name]) for p in live],
        api.list_workloads(namespace),
        known_service_accounts=[
            account
            for account in map(kubeapi.bundle_service_account, existing.values())
            if account is not None
        ],
        prefix=config.sidecar.bundle_prefix,
    )
    shippable = [b for b in plan.bundles if not b.problems]  # (one that does not compile keeps its content)
    written = _write_bundles(api, shippable, existing=existing, namespace=namespace)
    statuses = []
    for policy in live:
        bound = plan.bound.get(policy.name, ())
        composition = plan.problems.get(policy.name, ())
        if _write_status(
            api,
            policy,
            problems=judged[policy.name],
            composition=composition,
            bound=bound,
            now=now,
            emit=emit,
        ):
            statuses.append(policy.name)
        changed = sorted(set(bound) & set(written))
        if changed:
            message = f"policy bundle updated for ServiceAccount(s): {', '.join(changed)}"
            emit(policy.body, "Normal", "BundleUpdated", message)
    return Outcome(bundles_written=tuple(written), statuses_written=tuple(statuses))


def _write_bundles(
    api: kubeapi.Api,
    bundles: Sequence[bundle.Bundle],
    *,
    existing: Mapping[str, Mapping[str, Any]],
    namespace: str,
) -> list[str]:
    """Write the bundles that differ; return the ServiceAccounts whose bundle was written."""
    written = []
    for item in bundles:
        desired = bundle.config_map(item, namespace=namespace)
        current = existing.get(item.config_map)
        if current is not None and bundle.is_current(current, desired):
            continue
        api.write_bundle(desired, existing=current)
        written.append(item.service_account)
    return written


def _write_status(
    api: kubeapi.Api,
    policy: kubeapi.PolicyObject,
    *,
    problems: Sequence[policy_compile.Problem],
    composition: Sequence[policy_compile.Problem] = (),
    bound: Sequence[str],
    now: datetime.datetime,
    emit: Emit,
) -> bool:
    workloads: list[BoundWorkload] = [
        {"kind": "ServiceAccount", "name": account, "serviceAccount": account} for account in bound
    ]
    status = conditions.policy_status(
        generation=policy.generation,
        problems=problems,
        bound=workloads,
        previous=policy.status,
        now=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        composition=composition,
    )
    if conditions.same(policy.status, status):
        return False
    api.patch_policy_status(namespace=_namespace(policy), name=policy.name, status=status)
    ready = {c["type"]: c for c in status["conditions"]}[conditions.READY]
    before = {c.get("type"): c for c in policy.status.get("conditions") or []}
    if (before.get(conditions.READY) or {}).get("status") != ready["status"]:
        if problems:
            message = "; ".join(map(conditions.describe, problems))
            emit(policy.body, "Warning", "PolicyInvalid", message)
        elif composition:
            emit(policy.body, "Warning", conditions.COMPOSITION_INVALID, ready["message"])
        else:
            emit(policy.body, "Normal", "PolicyReady", ready["message"])
    return True


def _namespace(policy: kubeapi.PolicyObject) -> str:
    return str(policy.body["metadata"]["namespace"])


def _lock(namespace: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(namespace, threading.Lock())
