"""kopf handlers: each reads top to bottom as parse -> decide -> build -> respond.

The decisions live in pure modules (injection, bundle, conditions) and the namespace
reconciler; this module only moves data between kopf, the Kubernetes API and those functions.

Two things keep the admission webhooks prompt while the operator works (issue 12, F5): every
reconcile goes through one ``reconcile.Coalescer`` (a burst of events is one reconcile soon
after, never a queue of them), and the webhook handlers are coroutines that do their blocking
work on thread pools of their own, so they never wait for kopf's executor, which the sync
handlers of events fill. Pods have a pool of their own too: checking a policy against every
composition it joins can be costly, and a flood of such checks made every pod admission time
out, fail closed (issue 12, F4). Policy checks run one at a time per namespace, within a budget
below the webhook's timeout: past it the policy is refused with "retry", never a pod.
"""

import asyncio
import concurrent.futures
import contextlib
import contextvars
import copy
import dataclasses
import datetime
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import kopf
import kubernetes
import psycopg

from dbgov_operator import (
    annotations,
    bundle,
    cluster_policies,
    conditions,
    credential_server,
    databases,
    dbconn,
    injection,
    kubeapi,
    minting,
    reconcile,
    runtime,
    signing,
    webhook,
)

POLICY = (kubeapi.GROUP, kubeapi.VERSION, kubeapi.POLICIES)
CLUSTER_POLICY = (kubeapi.GROUP, kubeapi.VERSION, kubeapi.CLUSTER_POLICIES)
DATABASE = (kubeapi.GROUP, kubeapi.VERSION, "databases")
DATABASE_TICK_SECONDS = 1.0
"""How often the Database timer wakes; each Database is checked every
``database_check_seconds`` (a setting), and at once when its spec changes."""
_database_checked: dict[str, float] = {}
_database_reaped: dict[str, float] = {}
POD_INJECTION_ID = webhook.POD_INJECTION_ID
POLICY_VALIDATION_ID = webhook.POLICY_VALIDATION_ID
CLUSTER_POLICY_VALIDATION_ID = webhook.CLUSTER_POLICY_VALIDATION_ID
DATABASE_VALIDATION_ID = webhook.DATABASE_VALIDATION_ID
POD_GUARD_ID = webhook.POD_GUARD_ID
ENROLLED = {annotations.INJECT: annotations.INJECT_ENABLED}
RETRY_SECONDS = 3.0
COALESCE_SECONDS = 0.25
"""How long a reconcile request waits for the rest of its burst before the reconcile starts."""
ADMISSION_THREADS = 4
"""Threads for the blocking work of admission requests (their own: see the module docstring)."""
_admission = concurrent.futures.ThreadPoolExecutor(ADMISSION_THREADS, thread_name_prefix="dbgov-admission")
_pod_admission = concurrent.futures.ThreadPoolExecutor(ADMISSION_THREADS, thread_name_prefix="dbgov-pods")
"""Pod injection and the enrolled pods' guard only: they never wait behind a policy's check."""
POLICY_CHECK_SHARE = 0.6
"""The share of the webhook timeout a policy's check may take (waiting for another check of its
namespace included) before the policy is refused with "retry"."""
_policy_checks: dict[str, asyncio.Future[None]] = {}
"""Namespace -> the policy check running there (it runs on even when its request gave up)."""
_log = logging.getLogger(__name__)

_rotation: asyncio.Task[None] | None = None
_credentials: credential_server.CredentialServer | None = None
_signer: signing.Signer | None = None
_minter: minting.Minter | None = None
_cluster = cluster_policies.Tracker()
"""What each namespace's last reconcile found for each ClusterDatabaseAccessPolicy."""


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, logger: kopf.Logger, **_: Any) -> None:
    """Certificates first, then the webhook server that serves them; state under dbgov.io."""
    global _rotation  # noqa: PLW0603 -- the one rotation task of this process
    config = runtime.current()
    try:
        await asyncio.to_thread(webhook.sync_certificates, config, client=runtime.client(), now=_now())
    except webhook.CertificatePending as err:
        raise kopf.TemporaryError(f"waiting for the webhook certificate: {err}", delay=5) from err
    await _load_signing_key(config)
    await _start_credential_endpoint(config)
    # Not kopf's managed mode: the operator writes the configurations itself, with the
    # namespaceSelector and short timeouts enrollment needs (see webhook.py).
    settings.admission.server = webhook.server(
        config, publish=lambda found: webhook.publish(config, client=runtime.client(), client_config=found)
    )
    settings.persistence.finalizer = annotations.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=annotations.PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=annotations.PREFIX, key=annotations.LAST_HANDLED
    )
    # Our own events say what changed; kopf's per-handler "succeeded" events would repeat on
    # every restart, so only its warnings and errors are posted.
    settings.posting.level = logging.WARNING
    _rotation = asyncio.create_task(_rotate_certificates(), name="dbgov certificate rotation")
    logger.info("dbgov operator started (webhook configurations: %s)", config.webhook.managed_name)


async def _load_signing_key(config: Any) -> None:
    """The bundle signing key, from (or generated into) its Secret; a Secret holding no usable
    key stops the operator rather than being replaced (sidecars trust the key it held)."""
    global _signer  # noqa: PLW0603 -- the one signing key of this process
    name = config.sidecar.bundle_signing_secret
    try:
        _signer = await asyncio.to_thread(
            signing.ensure, runtime.client(), name=name, namespace=config.namespace
        )
    except signing.SigningKeyUnusable as err:
        raise kopf.PermanentError(str(err)) from err
    except Exception as err:
        raise kopf.TemporaryError(
            f"cannot read or create the bundle signing key Secret {config.namespace}/{name}: {err}",
            delay=5,
        ) from err


async def _start_credential_endpoint(config: Any) -> None:
    """The HTTPS endpoint sidecars present their token to (the webhook's certificate); it
    mints database roles with the mask key from the operator's own Secret."""
    global _credentials, _minter  # noqa: PLW0603 -- the one credential endpoint of this process
    if _credentials is not None:
        return  # a startup retried after the endpoint started
    try:
        key = await asyncio.to_thread(
            minting.ensure_mask_key, runtime.client(), namespace=config.namespace, name=config.mask_key_secret
        )
    except (minting.MaskKeyInvalid, kubernetes.client.exceptions.ApiException) as err:
        raise kopf.TemporaryError(f"cannot read or create the mask key Secret: {err}", delay=5) from err
    _minter = minting.Minter(config, client=runtime.client(), mask_key=key)
    server = credential_server.CredentialServer(config, client=runtime.client(), issuer=_minter)
    try:
        await server.start()
    except OSError as err:
        raise kopf.TemporaryError(
            f"cannot listen for the credential endpoint on {config.credentials.listen_addr}:"
            f"{config.credentials.port} ({err.strerror or err}); free the port or set "
            "DBGOV_CREDENTIAL_PORT",
            delay=5,
        ) from err
    _credentials = server


@kopf.on.cleanup()
async def stop(**_: Any) -> None:
    """Stop the rotation task and the credential endpoint this process started."""
    global _credentials  # noqa: PLW0603 -- the one credential endpoint of this process
    if _rotation is not None:
        _rotation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await _rotation
    if _credentials is not None:
        await _credentials.stop()
        _credentials = None


@kopf.on.resume(*POLICY, backoff=RETRY_SECONDS)
@kopf.on.create(*POLICY, backoff=RETRY_SECONDS)
@kopf.on.update(*POLICY, backoff=RETRY_SECONDS)
# optional: no finalizer on policies, so one is never left Terminating when no operator runs
# (uninstalled, scaled to zero); a deletion missed meanwhile is caught up by the next reconcile.
@kopf.on.delete(*POLICY, backoff=RETRY_SECONDS, optional=True)
def reconcile_policy(namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """Any policy change: recompile the namespace's policies, bundles and statuses; revoke
    what an unbound or deleted policy granted."""
    _reconcile(namespace, logger, wait=True)
    _reap_namespace(namespace, logger)


@kopf.on.resume(*CLUSTER_POLICY, backoff=RETRY_SECONDS)
@kopf.on.create(*CLUSTER_POLICY, backoff=RETRY_SECONDS)
@kopf.on.update(*CLUSTER_POLICY, backoff=RETRY_SECONDS)
@kopf.on.delete(*CLUSTER_POLICY, backoff=RETRY_SECONDS, optional=True)  # no finalizer, as policies
def reconcile_cluster_policy(
    name: str | None, spec: kopf.Spec, old: Any, logger: kopf.Logger, **_: Any
) -> None:
    """A cluster policy changed: reconcile every namespace it selects now, selected before (its
    old spec, or where it was last found) and so may have to leave; then its own status."""
    before = dict((old or {}).get("spec") or {}) if isinstance(old, Mapping) else {}
    _reconcile_cluster_scope(name or "", specs=(dict(spec), before), logger=logger)


@kopf.on.event(*CLUSTER_POLICY)
def cluster_policy_gone(
    type: str | None, name: str | None, body: kopf.Body, logger: kopf.Logger, **_: Any
) -> None:
    """A deleted cluster policy (no finalizer, so its delete handler may not run) leaves every
    bundle it was in at once."""
    if type == "DELETED":
        _reconcile_cluster_scope(name or "", specs=(dict(body.spec),), logger=logger)
        _cluster.forget(name or "")


@kopf.on.event("v1", "namespaces")
def namespace_labels_changed(
    type: str | None, name: str | None, body: kopf.Body, logger: kopf.Logger, **_: Any
) -> None:
    """A namespace's labels decide which cluster policies apply there: when that set changes
    (a label added or removed, a new namespace), the namespace is reconciled at once."""
    namespace = name or ""
    if type == "DELETED":
        _cluster.record(namespace, selecting=(), outcome=None)
        return
    policies = kubeapi.KubeApi(runtime.client()).list_cluster_policies()
    now = {p.name for p in cluster_policies.selecting(policies, dict(body.metadata.labels or {}))}
    if now != _cluster.policies_in(namespace):
        _reconcile(namespace, logger, wait=True)
        _reap_namespace(namespace, logger)  # minted grants follow the baselines in force there


def _reconcile_cluster_scope(name: str, *, specs: Sequence[Mapping[str, Any]], logger: kopf.Logger) -> None:
    api = kubeapi.KubeApi(runtime.client())
    everywhere = api.list_namespaces()
    namespaces = _cluster.namespaces(name)
    for spec in specs:
        namespaces |= cluster_policies.matching_namespaces(spec, everywhere)
    pending = {namespace: _coalescer.request(namespace) for namespace in sorted(namespaces)}
    failed: dict[str, Exception] = {}
    for namespace, done in pending.items():
        try:
            done.result()
        except Exception as err:  # one namespace's failure stops none of the others (issue 12, F2)
            failed[namespace] = err
        _reap_namespace(namespace, logger)  # minted grants follow the composition
    _write_cluster_statuses({name}, api=api)
    if failed:
        listing = "; ".join(f"{namespace}: {err}" for namespace, err in failed.items())
        raise kopf.TemporaryError(
            f"{len(failed)} of {len(pending)} namespace(s) not reconciled (retrying): {listing}",
            delay=RETRY_SECONDS,
        )


@kopf.on.event("v1", "pods", labels=ENROLLED)
def enrolled_pod(type: str | None, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """A new or gone enrolled pod may need a bundle, or change what a podSelector binds."""
    excluded = injection.excluded(namespace or "", config=runtime.current())
    if type in ("ADDED", "DELETED") and excluded is None:
        _reconcile(namespace, logger)
    if type == "DELETED":
        _reap_namespace(namespace, logger)  # its database roles go at once, not at the next reap


@kopf.on.event(*POLICY)
async def policy_gone(type: str | None, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """A policy is gone at once (it carries no finalizer, so the delete handler may not run):
    the bundles it bound are recomputed, and deleted if nothing else needs them."""
    if type == "DELETED":
        _reconcile(namespace, logger)


def _bundle_config_map(name: str | None, labels: Mapping[str, str], **_: Any) -> bool:
    """A bundle ConfigMap: ours by label, or by name (its labels may have been removed)."""
    ours = labels.get(annotations.MANAGED_BY_LABEL) == annotations.MANAGED_BY_VALUE
    return ours or (name or "").startswith(runtime.current().sidecar.bundle_prefix)


@kopf.on.event("v1", "configmaps", when=_bundle_config_map)
async def bundle_changed(type: str | None, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """Drift: a bundle edited or deleted by anyone but us is rewritten within seconds (our own
    writes come back here too, and find the namespace current). One the garbage collector
    deleted with its ServiceAccount is not put back: bundles are only for ServiceAccounts that
    exist. Only asks for a (coalesced) reconcile: a churn of patches is one reconcile, not
    thousands."""
    if type in ("MODIFIED", "DELETED"):
        _reconcile(namespace, logger)


@kopf.on.event("v1", "serviceaccounts")
async def service_account_created(
    type: str | None, namespace: str | None, logger: kopf.Logger, **_: Any
) -> None:
    """A new ServiceAccount may be one a policy names or a pod runs as: only ServiceAccounts
    that exist get a bundle, so its bundle is written now, owned by it. (Not on the listing at
    startup, whose type is None: the policies' resume handlers reconcile every namespace with a
    policy then. Not on deletion: the garbage collector takes the bundle with its owner.)"""
    if type == "ADDED":
        _reconcile(namespace, logger)


@kopf.on.resume(*DATABASE, backoff=RETRY_SECONDS)
@kopf.on.create(*DATABASE, backoff=RETRY_SECONDS)
@kopf.on.update(*DATABASE, field="spec", backoff=RETRY_SECONDS)
def database_changed(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    """A new or changed Database: check at once that the operator can reach it and mint there."""
    _check_database(body, patch, logger)


@kopf.timer(*DATABASE, interval=DATABASE_TICK_SECONDS)
def database_timer(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    """Check every Database again now and then: a password rotates, a server goes away."""
    last = _database_checked.get(body.metadata.uid or "", 0.0)
    if time.monotonic() - last >= runtime.current().database_check_seconds:
        _check_database(body, patch, logger)


@kopf.timer(*DATABASE, interval=DATABASE_TICK_SECONDS)
def database_reaper(body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """Every ``reap_seconds`` (and first thing after a start): revoke the minted roles that
    expired, whose pod is gone or whose policy no longer binds it, and orphans."""
    uid = body.metadata.uid or ""
    if _minter is None or time.monotonic() - _database_reaped.get(uid, 0.0) < runtime.current().reap_seconds:
        return
    _database_reaped[uid] = time.monotonic()
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    try:
        _minter.reap(namespace, name)
    except (credential_server.IssueRefused, psycopg.Error) as err:
        logger.warning(
            "Reaping Database %s/%s failed (next try in %ss): %s",
            namespace,
            name,
            runtime.current().reap_seconds,
            err,
        )


@kopf.on.delete(*DATABASE, optional=True)
def database_deleted(body: kopf.Body, **_: Any) -> None:
    """Forget a deleted Database's last check (optional: no finalizer holds its deletion)."""
    _database_checked.pop(body.metadata.uid or "", None)
    _database_reaped.pop(body.metadata.uid or "", None)


@kopf.on.event(*DATABASE)
def database_gone(type: str | None, body: kopf.Body, logger: kopf.Logger, **_: Any) -> None:
    """A deleted Database (no finalizer holds it): revoke every role minted there while its
    admin Secret is still readable; best effort, a deletion missed leaves them to expire."""
    if type != "DELETED" or _minter is None:
        return
    namespace, name = body.metadata.namespace or "", body.metadata.name or ""
    try:
        _minter.retire(namespace, name, dict(body.spec))
    except (credential_server.IssueRefused, psycopg.Error, kubernetes.client.exceptions.ApiException) as err:
        logger.warning(
            "Database %s/%s deleted; its minted roles were not revoked (they expire): %s",
            namespace,
            name,
            err,
        )


@kopf.on.event(*POLICY)
def policy_gone_reap(type: str | None, namespace: str | None, logger: kopf.Logger, **_: Any) -> None:
    """A deleted policy (no finalizer, so its delete handler may not run): revoke what it granted."""
    if type == "DELETED":
        _reap_namespace(namespace, logger)


def _check_database(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger) -> None:
    _database_checked[body.metadata.uid or ""] = time.monotonic()
    namespace, spec = body.metadata.namespace or "", dict(body.spec)
    target = dbconn.resolve(runtime.client(), namespace=namespace, spec=spec)
    outcome = dbconn.check(target) if isinstance(target, databases.Target) else target
    previous = dict(body.status)
    desired = databases.status(
        generation=int(body.metadata.get("generation") or 0),
        outcome=outcome,
        previous=previous,
        now=_now().isoformat().replace("+00:00", "Z"),
    )
    if databases.same(previous, desired):
        return
    for key, value in desired.items():
        patch.status[key] = value
    ready = desired["conditions"][0]
    kind: reconcile.EventType = "Normal" if ready["status"] == "True" else "Warning"
    _emit(body, kind, ready["reason"], ready["message"])
    logger.info("Database %s/%s: %s (%s)", namespace, body.metadata.name, ready["reason"], ready["message"])


# persistent: the configurations keep these webhooks while the operator restarts, so requests
# fail (closed) instead of slipping through un-injected or unvalidated.
@kopf.on.validate(*POLICY, id=POLICY_VALIDATION_ID, operations=["CREATE", "UPDATE"], persistent=True)
async def validate_policy(spec: kopf.Spec, name: str | None, namespace: str | None, **kwargs: Any) -> None:
    """Refuse a policy that cannot take effect, listing every problem with its field path."""
    old: kopf.Body | None = kwargs.get("old")  # None on CREATE
    if old is not None and old.get("spec") == dict(spec):
        # Metadata-only updates (finalizers, annotations) of a policy stored before it became
        # invalid -- e.g. under an older, laxer compiler -- must still go through, or it could
        # not even be deleted; its status already says what is wrong with it.
        return
    await _checking_policy(_judge_policy, dict(spec), name=name or "", namespace=namespace or "")


def _judge_policy(spec: dict[str, Any], *, name: str, namespace: str) -> None:
    """Its own problems first; then, valid alone, whether it would break a composition it
    joins (the operator knows the other policies and the ServiceAccounts each binds). A race
    or a later baseline still gets there: that bundle then refuses every statement."""
    problems = reconcile.problems(spec)
    if problems:
        listing = "\n".join(f"  - {conditions.describe(p)}" for p in problems)
        raise kopf.AdmissionError(
            f"DatabaseAccessPolicy is invalid ({len(problems)} problem(s)):\n{listing}", code=422
        )
    api = kubeapi.KubeApi(runtime.client())
    baselines = cluster_policies.selecting(api.list_cluster_policies(), _namespace_labels(namespace))
    clashes = reconcile.conflicts(
        api,
        namespace=namespace,
        name=name,
        spec=spec,
        prefix=runtime.current().sidecar.bundle_prefix,
        cluster=baselines,
    )
    if clashes:
        listing = "\n".join(f"  - {conditions.describe(p)}" for p in clashes)
        raise kopf.AdmissionError(
            f"DatabaseAccessPolicy {name} does not compose with the policies binding the same "
            f"ServiceAccounts ({len(clashes)} problem(s)); give the conflicting settings the same "
            f"values, or bind other ServiceAccounts:\n{listing}",
            code=422,
        )


@kopf.on.validate(
    *CLUSTER_POLICY, id=CLUSTER_POLICY_VALIDATION_ID, operations=["CREATE", "UPDATE"], persistent=True
)
async def validate_cluster_policy(spec: kopf.Spec, **kwargs: Any) -> None:
    """Refuse a cluster policy that cannot take effect, every problem with its field path."""
    old: kopf.Body | None = kwargs.get("old")  # None on CREATE
    if old is not None and old.get("spec") == dict(spec):
        return  # metadata only: see validate_policy
    await _admitting(_judge_cluster_policy, dict(spec))


def _judge_cluster_policy(spec: dict[str, Any]) -> None:
    problems = reconcile.problems(spec, cluster=True)
    if problems:
        listing = "\n".join(f"  - {conditions.describe(p)}" for p in problems)
        raise kopf.AdmissionError(
            f"ClusterDatabaseAccessPolicy is invalid ({len(problems)} problem(s)):\n{listing}", code=422
        )


@kopf.on.validate(*DATABASE, id=DATABASE_VALIDATION_ID, operations=["CREATE", "UPDATE"], persistent=True)
async def validate_database(
    spec: kopf.Spec, name: str | None, namespace: str | None, warnings: list[str], **kwargs: Any
) -> None:
    """Refuse a Database whose admin or CA Secret is not granted to its namespace or pinned to
    another server, with the reason its status would give (a Secret the operator cannot read
    now is a warning: the controller reports it)."""
    old: kopf.Body | None = kwargs.get("old")  # None on CREATE
    if old is not None and old.get("spec") == dict(spec):
        return  # metadata only: see validate_policy
    await _admitting(
        _judge_database, dict(spec), name=name or "", namespace=namespace or "", warnings=warnings
    )


def _judge_database(spec: dict[str, Any], *, name: str, namespace: str, warnings: list[str]) -> None:
    found = dbconn.admission(runtime.client(), namespace=namespace, spec=spec)
    warnings.extend(found.warnings)
    if found.refused is not None:
        raise kopf.AdmissionError(
            f"Database {name} cannot use its Secret ({found.refused.reason}): {found.refused.message}",
            code=403,
        )


# No label filter: in a namespace labelled dbgov.io/enforce=true every pod comes here (the
# webhook configurations select which pods the apiserver sends; webhook.py).
@kopf.on.mutate("v1", "pods", id=POD_INJECTION_ID, operations=["CREATE"], persistent=True)
async def inject_pod(
    body: kopf.Body,
    namespace: str | None,
    patch: kopf.Patch,
    warnings: list[str],
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Add the dbgov sidecar to an enrolled pod (pods CREATE only)."""
    await _admitting(
        _inject, body, namespace=namespace, patch=patch, warnings=warnings, logger=logger, pool=_pod_admission
    )


def _inject(
    body: kopf.Body,
    *,
    namespace: str | None,
    patch: kopf.Patch,
    warnings: list[str],
    logger: kopf.Logger,
) -> None:
    config = runtime.current()
    pod = dict(body)
    enforce = injection.enforced(_namespace_labels(namespace or ""))
    decision = injection.decide(pod, namespace=namespace or "", config=config, enforce=enforce)
    if not decision.inject:
        logger.debug("Not injecting: %s", decision.reason)
        return
    try:
        endpoint = _credentials.endpoint if _credentials is not None else None
        if endpoint is not None and _signer is not None:
            endpoint = dataclasses.replace(endpoint, bundle_key=_signer.public_b64)
        result = injection.inject(
            pod,
            sidecar=config.sidecar,
            endpoint=endpoint,
            enforce=enforce,
            bound_databases=_bound_databases(pod, namespace=namespace or ""),
        )
    except injection.InjectionRefused as err:
        raise kopf.AdmissionError(f"dbgov cannot inject this pod: {err}", code=400) from err
    replace_body(patch, result.pod)
    warnings.extend(result.warnings)
    logger.info("Injected the dbgov sidecar")


# subresource "*": the pod itself and the subresources the configuration sends (webhook.py:
# ephemeralcontainers, resize); the label filter is the configuration's objectSelector.
@kopf.on.validate("v1", "pods", id=POD_GUARD_ID, operations=["UPDATE"], subresource="*", persistent=True)
async def guard_pod(namespace: str | None, subresource: str | None, **kwargs: Any) -> None:
    """Refuse updates that would undo or bypass an enrolled pod's sidecar (issue 12)."""
    old: kopf.Body | None = kwargs.get("old")
    new: kopf.Body | None = kwargs.get("new")
    if old is None or new is None:
        return
    await _admitting(_guard, old, new, namespace=namespace, subresource=subresource, pool=_pod_admission)


def _guard(old: kopf.Body, new: kopf.Body, *, namespace: str | None, subresource: str | None) -> None:
    config = runtime.current()
    # The namespace is read only when an ephemeral container is added (the one rule it decides).
    enforce = subresource == "ephemeralcontainers" and injection.enforced(_namespace_labels(namespace or ""))
    problems = injection.update_problems(
        dict(old), dict(new), enforce=enforce, allow_debug=config.sidecar.allow_debug_containers
    )
    if problems:
        listing = "\n".join(f"  - {p}" for p in problems)
        raise kopf.AdmissionError(f"dbgov refuses this change to an enrolled pod:\n{listing}", code=403)


async def _admitting(
    work: Callable[..., None],
    /,
    *args: Any,
    pool: concurrent.futures.Executor = _admission,
    **kwargs: Any,
) -> None:
    """Run an admission request's blocking work on the admission threads (``pool``), off kopf's
    event loop and its executor (its AdmissionError reaches kopf as raised)."""
    loop = asyncio.get_running_loop()
    context = contextvars.copy_context()  # kopf's, for its loggers and events
    await loop.run_in_executor(pool, functools.partial(context.run, work, *args, **kwargs))


async def _checking_policy(work: Callable[..., None], /, *args: Any, name: str, namespace: str) -> None:
    """A policy's check, one at a time per namespace, within its share of the webhook timeout:
    one past it is refused (fail closed) with what to do, and its work runs on to completion
    (so the next check of the namespace waits for it, and finds its compositions cached)."""
    loop = asyncio.get_running_loop()
    budget = runtime.current().webhook.timeout_seconds * POLICY_CHECK_SHARE
    deadline = loop.time() + budget
    while (running := _policy_checks.get(namespace)) is not None:
        with contextlib.suppress(Exception):  # its outcome is its own request's
            await asyncio.wait_for(asyncio.shield(running), max(deadline - loop.time(), 0))
        if loop.time() >= deadline and _policy_checks.get(namespace) is not None:
            raise _too_expensive(name, namespace=namespace, budget=budget)
    if loop.time() >= deadline:
        raise _too_expensive(name, namespace=namespace, budget=budget)
    context = contextvars.copy_context()
    check = loop.run_in_executor(
        _admission, functools.partial(context.run, work, *args, name=name, namespace=namespace)
    )
    _policy_checks[namespace] = check
    check.add_done_callback(functools.partial(_policy_check_done, namespace))
    try:
        await asyncio.wait_for(asyncio.shield(check), max(deadline - loop.time(), 0))
    except TimeoutError:
        raise _too_expensive(name, namespace=namespace, budget=budget) from None


def _policy_check_done(namespace: str, check: asyncio.Future[None]) -> None:
    if _policy_checks.get(namespace) is check:
        del _policy_checks[namespace]
    if not check.cancelled():
        check.exception()  # retrieved: a request that gave up no longer awaits it


def _too_expensive(name: str, *, namespace: str, budget: float) -> kopf.AdmissionError:
    return kopf.AdmissionError(
        f"DatabaseAccessPolicy {namespace}/{name} was not admitted: checking it against every "
        f"policy binding the same ServiceAccounts takes longer than {budget:.1f} s now (policies "
        f"of {namespace} are checked one at a time, and another check may be running). This is "
        "not a problem with the policy: retry in a few seconds (compositions already checked "
        "are cached).",
        code=503,
    )


def _namespace_labels(namespace: str) -> Mapping[str, str]:
    """The namespace's labels, read now: enrollment follows them (an error refuses the pod)."""
    found: Any = kubernetes.client.CoreV1Api(runtime.client()).read_namespace(namespace)
    return dict(found.metadata.labels or {})


def _bound_databases(pod: Mapping[str, Any], *, namespace: str) -> set[str] | None:
    """The databases the policies binding ``pod`` name (read only when it names one)."""
    meta = pod.get("metadata") or {}
    if not (meta.get("annotations") or {}).get(annotations.DATABASE):
        return None
    workload = bundle.Workload(
        service_account=(pod.get("spec") or {}).get("serviceAccountName") or "default",
        labels=dict(meta.get("labels") or {}),
    )
    found: set[str] = set()
    api = kubeapi.KubeApi(runtime.client())
    for policy in api.list_policies(namespace):
        subjects, problems = bundle.subjects(policy.spec)
        if not problems and bundle.binds(subjects, service_account=workload.service_account, pods=[workload]):
            found.add(bundle.database(policy.spec))
    # A cluster policy's databaseRef counts as well; one without (every database) names none.
    for policy in cluster_policies.selecting(api.list_cluster_policies(), _namespace_labels(namespace)):
        subjects, problems = bundle.subjects(policy.spec, cluster=True)
        if not problems and bundle.binds(subjects, service_account=workload.service_account, pods=[workload]):
            found.add(bundle.database(policy.spec))
    return found - {""}


def replace_body(patch: kopf.Patch, new_body: Mapping[str, Any]) -> None:
    """Make kopf's admission patch the diff from the reviewed object to ``new_body``."""

    def _replace(body: kopf.RawBody) -> None:
        raw = cast(dict[str, Any], body)  # a plain dict at run time; RawBody is its type
        raw.clear()
        raw.update(copy.deepcopy(dict(new_body)))

    patch.fns.append(_replace)


def _reconcile(
    namespace: str | None,
    logger: kopf.Logger,
    *,
    wait: bool = False,
) -> None:
    """Ask for a reconcile of ``namespace`` (coalesced with every other request of the burst);
    ``wait``: until it ran, raising its error (so kopf retries the handler)."""
    del logger  # the reconcile logs on its own thread
    if not namespace:
        return
    done = _coalescer.request(namespace)
    if wait:
        done.result()


def _reconcile_now(namespace: str) -> None:
    """One reconcile of ``namespace`` (the coalescer's ``run``)."""
    logger = _log
    if _signer is None:  # unsigned bundles would only be refused by every sidecar
        raise kopf.TemporaryError("the bundle signing key is not loaded yet", delay=2)
    api = kubeapi.KubeApi(runtime.client())
    labels = api.namespace_labels(namespace)
    if labels is None:
        _cluster.record(namespace, selecting=(), outcome=None)
        return  # the namespace is gone, and its bundles with it
    baselines = cluster_policies.selecting(api.list_cluster_policies(), labels)
    involved = _cluster.policies_in(namespace) | {p.name for p in baselines}
    try:
        outcome = reconcile.reconcile_namespace(
            api,
            namespace=namespace,
            config=runtime.current(),
            now=_now(),
            emit=_emit,
            signer=_signer,
            cluster=baselines,
        )
    except reconcile.BundleWriteFailed as err:  # the rest was done: the statuses say what was not
        _cluster.record(namespace, selecting=[p.name for p in baselines], outcome=err.outcome)
        _write_cluster_statuses(involved, api=api)
        raise
    except kubeapi.Conflict as err:
        raise kopf.TemporaryError(f"{err} changed meanwhile; retrying", delay=1) from err
    except kubeapi.NamespaceTerminating:
        logger.info("Namespace %s is being deleted; its bundles need no update", namespace)
        return
    _cluster.record(namespace, selecting=[p.name for p in baselines], outcome=outcome)
    _write_cluster_statuses(involved, api=api)
    logger.info(
        "Reconciled %s: bundles %s, statuses %s, deleted %s",
        namespace,
        list(outcome.bundles_written),
        list(outcome.statuses_written),
        list(outcome.bundles_deleted),
    )


_coalescer = reconcile.Coalescer(_reconcile_now, delay=COALESCE_SECONDS, retry=RETRY_SECONDS)


def _write_cluster_statuses(names: set[str], *, api: kubeapi.KubeApi) -> None:
    """Write the status of the cluster policies ``names`` (all their namespaces) that differ."""
    if not names:
        return
    live = {p.name: p for p in api.list_cluster_policies() if not p.deleting}
    with _cluster.lock:
        for name in sorted(names & set(live)):
            policy = live[name]
            desired = cluster_policies.status(
                policy, found=_cluster.found(name), now=_now().strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            if not _cluster.needs_write(name, desired, policy.status):
                continue
            api.patch_cluster_policy_status(name=name, status=desired)
            _cluster.written(name, desired)
            ready = {c["type"]: c for c in desired["conditions"]}[conditions.READY]
            before = {c.get("type"): c for c in policy.status.get("conditions") or []}
            if (before.get(conditions.READY) or {}).get("status") != ready["status"]:
                kind: reconcile.EventType = "Normal" if ready["status"] == "True" else "Warning"
                _emit(policy.body, kind, ready["reason"], ready["message"])


def _reap_namespace(namespace: str | None, logger: kopf.Logger) -> None:
    if _minter is None or not namespace:
        return
    try:
        _minter.reap_namespace(namespace)
    except kubernetes.client.exceptions.ApiException as err:
        logger.warning("Reaping the Databases of %s failed (the reaper retries): %s", namespace, err)


def _emit(body: Mapping[str, Any], kind: reconcile.EventType, reason: str, message: str) -> None:
    kopf.event(kopf.Body(cast(kopf.RawBody, dict(body))), type=kind, reason=reason, message=message)


async def _rotate_certificates() -> None:
    config = runtime.current()
    while True:
        await asyncio.sleep(config.webhook.rotation_check_seconds)
        try:
            await asyncio.to_thread(webhook.sync_certificates, config, client=runtime.client(), now=_now())
        except Exception:
            logging.getLogger(__name__).exception("Webhook certificate check failed; will retry")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
