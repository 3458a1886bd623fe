"""Bring one namespace's policy bundles and policy statuses in line with its policies and pods.

Level-triggered: every policy event (create, update, resume, delete), every enrolled pod, every
new ServiceAccount and every change to a bundle ConfigMap (a namespace user's edit or deletion:
drift) reconciles the whole namespace from a fresh read (a burst of them coalesced into one:
``Coalescer``), and writes only what differs. So an operator restart
re-reads everything and, when nothing changed, writes nothing and says nothing. Bundles are
signed (a rewrite gets a newer generation than any signature of ours it replaces), and exist
only for ServiceAccounts that exist, each owned by its ServiceAccount: deleting one lets the
garbage collector take its bundle, and no later reconcile writes it back (an ownerless bundle
would never be collected, and would wait for whoever creates the name next). A bundle is
deleted once no policy names its ServiceAccount and no enrolled pod runs as it, or once its
ServiceAccount is gone. A bundle a running pod still mounts is never deleted for want of a
policy: the kubelet would keep the last content in the pod, so it gets the refuse-everything
merge instead.
"""

import concurrent.futures
import contextlib
import contextvars
import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from dbgov_operator import bundle, conditions, credentials, kubeapi, settings
from dbgov_operator.kubetypes import BoundWorkload
from dbgov_policy import compile as policy_compile

EventType = Literal["Normal", "Warning"]
Emit = Callable[[Mapping[str, Any], EventType, str, str], None]
"""Posts an event on an object: (body, type, reason, message)."""

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """What a reconcile wrote (empty when the namespace was already current)."""

    bundles_written: tuple[str, ...]
    statuses_written: tuple[str, ...]
    bundles_deleted: tuple[str, ...] = ()
    """ConfigMaps of bundles nothing needs any more."""
    cluster_bound: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """ClusterDatabaseAccessPolicy name -> the ServiceAccounts of this namespace it binds (every
    cluster policy that selects the namespace has an entry; its status aggregates them)."""
    cluster_problems: Mapping[str, tuple[policy_compile.Problem, ...]] = field(default_factory=dict)
    """ClusterDatabaseAccessPolicy name -> why a composition here it is part of does not compile,
    or why a bundle it is in could not be written."""
    bundles_failed: Mapping[str, str] = field(default_factory=dict)
    """ServiceAccount -> why its bundle could not be written (the others were: issue 12, F2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Written:
    """What writing a namespace's bundles did, each on its own."""

    written: list[str]
    failed: dict[str, str]
    """ServiceAccount -> why its bundle was not written."""
    retry: Exception | None = None
    """The first failure that may pass (a conflict, the API server unreachable): the reconcile
    fails with it after everything else was done, so it runs again. One the API server would
    refuse again (422: invalid) is reported, not retried."""


class BundleWriteFailed(Exception):
    """Some bundles of a namespace could not be written for a reason that may pass; the rest of
    the namespace was reconciled (``outcome``, whose statuses already say so)."""

    def __init__(self, message: str, *, outcome: Outcome) -> None:
        super().__init__(message)
        self.outcome = outcome


def problems(spec: Mapping[str, Any], *, cluster: bool = False) -> tuple[policy_compile.Problem, ...]:
    """Every problem with a policy spec: the shared compiler's, then the operator's subjects and
    credentials (``cluster``: a ClusterDatabaseAccessPolicy's, whose subjects name namespaces)."""
    found: list[policy_compile.Problem] = []
    try:
        policy_compile.compile_policy(dict(spec))
    except policy_compile.PolicyInvalid as err:
        found.extend(err.problems)
    found.extend(bundle.subjects(spec, cluster=cluster)[1])
    try:
        credentials.parse_credentials(spec.get("credentials"), path="credentials")
    except policy_compile.PolicyInvalid as err:
        found.extend(err.problems)
    return tuple(found)


def conflicts(
    api: kubeapi.Api,
    *,
    namespace: str,
    name: str,
    spec: Mapping[str, Any],
    prefix: str,
    cluster: Sequence[kubeapi.PolicyObject] = (),
) -> tuple[policy_compile.Problem, ...]:
    """What admitting the policy ``name`` with ``spec`` (valid alone) would break: for every
    ServiceAccount whose composition compiles now and would not with it, why, naming the other
    policies of that composition, with the field path of ``spec`` the conflict is about where
    it can be told. Compositions already broken are not this policy's doing, so not reported."""
    live = [p for p in api.list_policies(namespace) if not p.deleting and p.name != name]
    workloads = api.list_workloads(namespace)
    others = [bundle.Policy(name=p.name, spec=p.spec, valid=True) for p in live]
    baselines = [
        bundle.Policy(name=bundle.cluster_component(p.name), spec=p.spec, valid=True)
        for p in cluster
        if not p.deleting
    ]
    candidate = bundle.Policy(name=name, spec=spec, valid=True)
    before = bundle.plan(others, workloads, prefix=prefix, cluster=baselines)
    after = bundle.plan([*others, candidate], workloads, prefix=prefix, cluster=baselines)
    broken = {b.service_account for b in before.bundles if b.problems}
    found: list[policy_compile.Problem] = []
    for item in after.bundles:
        if not item.problems or name not in item.policies or item.service_account in broken:
            continue
        beside = ", ".join(p for p in item.policies if p != name)
        for problem in item.problems:
            message = (
                f"would not compose with {beside} (which bind ServiceAccount {item.service_account} "
                f"too): {problem}; its bundle would refuse every statement"
            )
            found.append(policy_compile.Problem(path=_conflict_path(name, spec, problem), message=message))
    return tuple(found)


def _conflict_path(name: str, spec: Mapping[str, Any], problem: policy_compile.Problem) -> str:
    """The field of ``spec`` a composition problem is about: a JWT issuer it names, a path
    inside this policy, else the policy as a whole ("")."""
    issuers = ((spec.get("authentication") or {}).get("jwt") or {}).get("issuers") or []
    for index, issuer in enumerate(issuers):
        url = issuer.get("issuer") if isinstance(issuer, Mapping) else None
        if isinstance(url, str) and repr(url) in problem.message:
            return f"authentication.jwt.issuers[{index}]"
    own = f"{name}."
    return problem.path[len(own) :] if problem.path.startswith(own) else ""


class _Request:
    """A reconcile asked for and not started yet: whoever asks meanwhile joins it. It runs in
    the context of the first who asked (kopf's context variables: posting events needs them)."""

    __slots__ = ("context", "future")

    def __init__(self, context: contextvars.Context) -> None:
        self.context = context
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()


class Coalescer:
    """Reconciles per namespace with nothing queueing behind them: at most one runs and at
    most one waits, and every request made while one waits joins it. A burst of events (a
    churn of patches to a bundle ConfigMap, many pods at once) thus costs at most two
    reconciles, the last of which reads everything the burst changed; without it every event
    ran a full reconcile of its own and the backlog starved the admission webhooks (issue 12,
    F5). A reconcile that fails is tried again after ``retry`` seconds (with what asked since).

    ``run(namespace)`` reconciles; it runs on this class's threads, at most
    ``parallel`` namespaces at once, each ``delay`` seconds after the request that started it
    (so the events of one burst meet in one reconcile)."""

    def __init__(
        self,
        run: Callable[[str], object],
        *,
        delay: float,
        retry: float,
        parallel: int = 2,
    ) -> None:
        self._run = run
        self._delay = delay
        self._retry = retry
        self._slots = threading.BoundedSemaphore(parallel)
        self._guard = threading.Lock()
        self._waiting: dict[str, _Request] = {}
        self._draining: set[str] = set()
        self.runs = 0
        """Reconciles run so far (what a burst cost)."""

    def request(self, namespace: str) -> concurrent.futures.Future[None]:
        """Ask for a reconcile of ``namespace`` that starts after now; its future is done when
        it is (with its error if it failed)."""
        with self._guard:
            waiting = self._waiting.get(namespace)
            if waiting is None:
                waiting = self._waiting[namespace] = _Request(contextvars.copy_context())
            if namespace not in self._draining:
                self._draining.add(namespace)
                threading.Thread(
                    target=self._drain, args=(namespace,), name=f"dbgov reconcile {namespace}", daemon=True
                ).start()
            return waiting.future

    def _drain(self, namespace: str) -> None:
        while True:
            time.sleep(self._delay)
            with self._guard:
                request = self._waiting.pop(namespace, None)
                if request is None:
                    self._draining.discard(namespace)
                    return
            with self._slots:
                self.runs += 1
                try:
                    request.context.run(self._run, namespace)
                except Exception as err:  # any failure is retried, and told to who waits
                    _log.warning("Reconciling %s failed (again in %ss): %s", namespace, self._retry, err)
                    request.future.set_exception(err)
                    self._again(namespace, request)
                    time.sleep(self._retry)
                    continue
            request.future.set_result(None)

    def _again(self, namespace: str, failed: _Request) -> None:
        with self._guard:
            self._waiting.setdefault(namespace, _Request(failed.context.copy()))


def reconcile_namespace(
    api: kubeapi.Api,
    *,
    namespace: str,
    config: settings.Settings,
    now: datetime.datetime,
    emit: Emit,
    signer: bundle.Signs | None = None,
    cluster: Sequence[kubeapi.PolicyObject] = (),
) -> Outcome:
    """Reconcile ``namespace``; one at a time per namespace within this process. ``signer``
    signs every bundle file (None only in tests of what is signed-agnostic). ``cluster``: the
    ClusterDatabaseAccessPolicies whose namespaceSelector matches the namespace; they join the
    compositions they bind, and their statuses are the caller's (they span namespaces)."""
    with _lock(namespace):
        return _reconcile(
            api,
            namespace=namespace,
            config=config,
            now=now,
            emit=emit,
            signer=signer,
            cluster=cluster,
        )


def _reconcile(
    api: kubeapi.Api,
    *,
    namespace: str,
    config: settings.Settings,
    now: datetime.datetime,
    emit: Emit,
    signer: bundle.Signs | None,
    cluster: Sequence[kubeapi.PolicyObject],
) -> Outcome:
    live = [p for p in api.list_policies(namespace) if not p.deleting]
    judged = {p.name: problems(p.spec) for p in live}
    baselines = [p for p in cluster if not p.deleting]
    # Read before the bundles: a ServiceAccount deleted after this is collected with the bundle
    # written for it (its owner's uid is gone); one created after it reconciles the namespace.
    owners = api.list_service_accounts(namespace)
    existing = api.list_bundles(namespace)
    plan = bundle.plan(
        [bundle.Policy(name=p.name, spec=p.spec, valid=not judged[p.name]) for p in live],
        api.list_workloads(namespace),
        existing=owners,
        prefix=config.sidecar.bundle_prefix,
        cluster=[
            bundle.Policy(
                name=bundle.cluster_component(p.name),
                spec=p.spec,
                valid=not problems(p.spec, cluster=True),
            )
            for p in baselines
        ],
    )
    result = _write_bundles(
        api,
        plan.bundles,  # (one that does not compile is written too: it refuses every statement and says why)
        existing=existing,
        namespace=namespace,
        signer=signer,
        owners=owners,
        now=now,
    )
    written, failed = result.written, result.failed
    deleted = _delete_unneeded(api, existing=existing, keep={b.config_map for b in plan.bundles})
    statuses = []
    for policy in live:
        # A status never claims a bundle that was not written: those are problems, named.
        bound = tuple(a for a in plan.bound.get(policy.name, ()) if a not in failed)
        composition = (
            *plan.problems.get(policy.name, ()),
            *_unwritten(failed, plan.bound.get(policy.name, ())),
        )
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
    components = {p.name: bundle.cluster_component(p.name) for p in baselines}
    outcome = Outcome(
        bundles_written=tuple(written),
        statuses_written=tuple(statuses),
        bundles_deleted=tuple(deleted),
        cluster_bound={
            name: tuple(a for a in plan.bound.get(c, ()) if a not in failed) for name, c in components.items()
        },
        cluster_problems={
            name: found
            for name, c in components.items()
            if (found := (*plan.problems.get(c, ()), *_unwritten(failed, plan.bound.get(c, ()))))
        },
        bundles_failed=failed,
    )
    if result.retry is not None:
        raise BundleWriteFailed(
            f"bundles of ServiceAccount(s) {', '.join(sorted(failed))} in {namespace} were not written "
            f"(the others were): {result.retry}",
            outcome=outcome,
        ) from result.retry
    return outcome


def _unwritten(failed: Mapping[str, str], bound: Sequence[str]) -> tuple[policy_compile.Problem, ...]:
    """Why the bundles of ``bound`` among ``failed`` do not hold the policy: they keep what
    they held before."""
    return tuple(
        policy_compile.Problem(
            path="",
            message=f"the bundle of ServiceAccount {account} could not be written, so it keeps its "
            f"previous content (retried at the next change): {failed[account]}",
        )
        for account in bound
        if account in failed
    )


def _write_bundles(
    api: kubeapi.Api,
    bundles: Sequence[bundle.Bundle],
    *,
    existing: Mapping[str, Mapping[str, Any]],
    namespace: str,
    signer: bundle.Signs | None,
    owners: Mapping[str, str],
    now: datetime.datetime,
) -> _Written:
    """Write the bundles that differ, each owned by its ServiceAccount (``owners``: name -> uid;
    a bundle for one not in it is never written), each on its own: one that fails is reported
    and the others are written (one refused bundle held back every later baseline of the
    namespace: issue 12, F2)."""
    written: list[str] = []
    failed: dict[str, str] = {}
    retry: Exception | None = None
    for item in bundles:
        try:
            if _write_bundle(
                api, item, existing=existing, namespace=namespace, signer=signer, owners=owners, now=now
            ):
                written.append(item.service_account)
        except (kubeapi.NamespaceTerminating, kubeapi.Conflict):
            # Nothing is wrong with the bundle: the namespace is going, or someone wrote it since
            # it was read (the whole reconcile runs again in a second, from a fresh read).
            raise
        except Exception as err:  # each bundle on its own: reported, and retried if it may pass
            _log.warning("Writing the bundle of %s/%s failed: %s", namespace, item.service_account, err)
            failed[item.service_account] = _why(err)
            if retry is None and not _permanent(err):
                retry = err
    return _Written(written=written, failed=failed, retry=retry)


def _permanent(err: Exception) -> bool:
    """Whether the API server would refuse the same write again (invalid, forbidden): retrying
    it at once would only loop; the next change to the namespace tries again."""
    status = getattr(err, "status", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (409, 429)


def _why(err: Exception) -> str:
    """A short reason: the API server's message, not its whole response."""
    body = getattr(err, "body", None)
    if isinstance(body, str | bytes):
        with contextlib.suppress(ValueError):
            message = json.loads(body).get("message")
            if isinstance(message, str):
                return message
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _write_bundle(
    api: kubeapi.Api,
    item: bundle.Bundle,
    *,
    existing: Mapping[str, Mapping[str, Any]],
    namespace: str,
    signer: bundle.Signs | None,
    owners: Mapping[str, str],
    now: datetime.datetime,
) -> bool:
    """Write one bundle if it differs; whether it was written."""
    uid = owners.get(item.service_account)
    if not uid:
        return False  # planned from the same read, so never; an ownerless bundle is never written
    current = existing.get(item.config_map)
    previous = None
    if current is not None and signer is not None:
        previous = bundle.signed_generation(current, signer=signer, namespace=namespace)
    desired = bundle.config_map(
        item,
        namespace=namespace,
        signer=signer,
        generation=signing_generation(previous, now=now),
        owner={"name": item.service_account, "uid": uid},
    )
    if current is not None and bundle.is_current(current, desired, signer=signer):
        return False
    api.write_bundle(desired, existing=current)
    return True


def signing_generation(previous: int | None, *, now: datetime.datetime) -> int:
    """The generation of a new signature: the time in milliseconds, and always above the
    ``previous`` (verified) one of the same bundle, whatever the clocks of replicas say."""
    stamp = int(now.timestamp() * 1000)
    return stamp if previous is None else max(stamp, previous + 1)


def _delete_unneeded(
    api: kubeapi.Api, *, existing: Mapping[str, Mapping[str, Any]], keep: set[str]
) -> list[str]:
    """Delete the bundle ConfigMaps no policy and no enrolled pod needs; return their names."""
    deleted = []
    for name, body in sorted(existing.items()):
        if name in keep:
            continue
        version = (body.get("metadata") or {}).get("resourceVersion")
        namespace = str((body.get("metadata") or {}).get("namespace") or "")
        api.delete_bundle(namespace=namespace, name=name, resource_version=version)
        deleted.append(name)
    return deleted


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
