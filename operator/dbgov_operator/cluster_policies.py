"""ClusterDatabaseAccessPolicy: platform and security baselines a namespace cannot loosen.

Why a module of its own: a cluster policy is reconciled namespace by namespace (it joins the
compositions of the workloads it binds in every namespace its ``namespaceSelector`` matches,
through ``reconcile.reconcile_namespace``), but its status speaks for all of them at once: the
namespaces and workloads it is in the bundles of, and every composition it cannot compile
with. This module holds that aggregate (what each namespace's last reconcile found for each
cluster policy) and turns it into the status; which namespaces a policy selects is pure
(``bundle.selects_namespace``). The handlers do the I/O.

The aggregate lives in the process (the active replica): a restart resumes every cluster
policy, which reconciles every namespace it selects and so fills it again.
"""

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dbgov_operator import bundle, conditions, kubeapi, reconcile
from dbgov_operator.kubetypes import BoundWorkload
from dbgov_policy import compile as policy_compile


@dataclass(frozen=True, slots=True, kw_only=True)
class InNamespace:
    """What one namespace's reconcile found for one cluster policy."""

    bound: tuple[str, ...]
    """The ServiceAccounts whose bundles it is in."""
    composition: tuple[policy_compile.Problem, ...] = ()
    """Why a composition there it is part of does not compile."""


def selecting(
    policies: Iterable[kubeapi.PolicyObject], labels: Mapping[str, str]
) -> list[kubeapi.PolicyObject]:
    """The live cluster policies whose namespaceSelector matches a namespace's ``labels``."""
    return [p for p in policies if not p.deleting and bundle.selects_namespace(p.spec, labels)]


def matching_namespaces(spec: Mapping[str, Any], namespaces: Mapping[str, Mapping[str, str]]) -> set[str]:
    """The namespaces (name -> labels) a cluster policy's spec selects."""
    return {name for name, labels in namespaces.items() if bundle.selects_namespace(spec, labels)}


def status(
    policy: kubeapi.PolicyObject,
    *,
    found: Mapping[str, InNamespace],
    now: str,
) -> dict[str, Any]:
    """The status of a cluster policy given what each namespace it selects found (``found``)."""
    problems = reconcile.problems(policy.spec, cluster=True)
    composition = [
        policy_compile.Problem(path=p.path, message=f"in namespace {namespace}: {p.message}")
        for namespace, seen in sorted(found.items())
        for p in seen.composition
    ]
    workloads: list[BoundWorkload] = [
        {"kind": "ServiceAccount", "name": f"{namespace}/{account}", "serviceAccount": account}
        for namespace, seen in sorted(found.items())
        for account in seen.bound
    ]
    desired: dict[str, Any] = dict(
        conditions.policy_status(
            generation=policy.generation,
            problems=problems,
            bound=workloads,
            previous=policy.status,
            now=now,
            composition=composition,
        )
    )
    desired["workloads"] = [
        {"kind": "ServiceAccount", "namespace": namespace, "name": account, "serviceAccount": account}
        for namespace, seen in sorted(found.items())
        for account in seen.bound
    ]
    desired["namespaces"] = sorted(found)
    return desired


class Tracker:
    """What the last reconcile of each namespace found for each cluster policy (thread-safe:
    namespaces reconcile in parallel), and the status last written for each."""

    def __init__(self) -> None:
        self._found: dict[str, dict[str, InNamespace]] = {}
        self._written: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        """Held while a status is computed and written, so the last write has every namespace."""

    def record(
        self,
        namespace: str,
        *,
        selecting: Sequence[str],
        outcome: reconcile.Outcome | None,
    ) -> None:
        """A reconcile of ``namespace`` (None: the namespace is gone) where the cluster policies
        ``selecting`` apply; every other cluster policy is no longer in it."""
        with self.lock:
            for name, per in self._found.items():
                if name not in selecting:
                    per.pop(namespace, None)
            if outcome is None:
                return
            for name in selecting:
                self._found.setdefault(name, {})[namespace] = InNamespace(
                    bound=tuple(outcome.cluster_bound.get(name, ())),
                    composition=tuple(outcome.cluster_problems.get(name, ())),
                )

    def namespaces(self, name: str) -> set[str]:
        """The namespaces a cluster policy was last found in."""
        with self.lock:
            return set(self._found.get(name, {}))

    def policies_in(self, namespace: str) -> set[str]:
        """The cluster policies the last reconcile of ``namespace`` found applying there."""
        with self.lock:
            return {name for name, per in self._found.items() if namespace in per}

    def found(self, name: str) -> dict[str, InNamespace]:
        """A copy of what each namespace found for a cluster policy (call under ``lock``)."""
        return dict(self._found.get(name, {}))

    def needs_write(self, name: str, desired: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
        """Whether ``desired`` differs from what the policy holds and from what this process
        last wrote (a list read before a parallel write may be stale; call under ``lock``)."""
        last = self._written.get(name)
        held = current if last is None else last
        return any(held.get(key) != value for key, value in desired.items())

    def written(self, name: str, desired: Mapping[str, Any]) -> None:
        """Note the status written for a cluster policy (call under ``lock``)."""
        self._written[name] = dict(desired)

    def forget(self, name: str) -> None:
        """A cluster policy was deleted."""
        with self.lock:
            self._found.pop(name, None)
            self._written.pop(name, None)
