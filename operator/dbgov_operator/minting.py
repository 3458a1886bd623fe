"""Minting, renewing and revoking per-workload database roles: the credential endpoint's issuer
and the reaper, wired from the pure plan (`credentials`, `grants`) and its I/O (`pgapply`).

Why a module of its own: the plan is pure and the apply is plain SQL; what remains is deciding,
from the Kubernetes objects, WHAT should exist on one database (which policies bind which live
pods, which Database they name) and running one plan at a time per database. Both the issuer
(a sidecar presents its token) and the reaper (a timer per Database, pod deletion, policy
changes) build the same desired state from a fresh read, so an operator restarted, or killed
mid-cycle, converges: everything it needs is in the database's roles and their COMMENTs.

Decisions taken here (docs/credentials.md says them to operators):
- The desired state covers the whole database: every live pod that holds a usable login role
  there and is still bound, plus the presenting pod. A plan for one workload only would revoke
  everyone else's roles (`credentials.plan` revokes what is not desired).
- Only the presenting pod's role is created or renewed. Others are neither created (a pod gets
  a role when its sidecar asks) nor renewed (a role whose sidecar stops presenting expires and
  is reaped); the reaper creates and renews nothing.
- Every presentation rotates the password: the operator keeps no password (PostgreSQL holds
  only the SCRAM verifier), so the only way to answer one is to set a new one. Open sessions
  stay; new logins need the new password.
- A Database is identified as ``<namespace>/<name>`` in role names and COMMENTs: roles are
  cluster-wide, and two namespaces may each have a Database of the same name on one server.
- One plan at a time per database: a session-level advisory lock on the admin connection
  (several threads and replicas may issue and reap at once).
- One role's failure never blocks the others: the plan is applied role by role, and a role
  whose revocation fails (it owns objects in a database the operator cannot clean up, say)
  stays NOLOGIN, is logged with the reason and audited (`credential_revoke_failed`), and is
  tried again by the next plan; only a failure on the presenting pod's own role (or its groups)
  refuses that pod. `dbgov_` roles the operator cannot prove it made are never touched and
  are logged once.
"""

import base64
import binascii
import contextlib
import dataclasses
import datetime
import json
import logging
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import kubernetes
import psycopg
from kubernetes.client.exceptions import ApiException

from dbgov_operator import (
    annotations,
    bundle,
    credential_server,
    credentials,
    databases,
    dbconn,
    grants,
    identity,
    kubeapi,
    pgapply,
    reconcile,
    settings,
    webhook,
)
from dbgov_policy import compile as policy_compile

logger = logging.getLogger(__name__)

DATABASES = "databases"
MASK_KEY_FIELD = "maskKey"
"""The Secret key holding the mask HMAC key (text, at least :data:`MASK_KEY_MIN_LENGTH`)."""
MASK_KEY_BYTES = 32
MASK_KEY_MIN_LENGTH = 32
LOCK_KEY = 0x6462_6776_6D69_6E74  # "dbgvmint": serialises plans on one database
LOCK_TIMEOUT = "30s"

_reported_unmanaged: set[str] = set()
"""`dbgov_` roles already logged as not the operator's (logged once per process)."""

Audit = Callable[[dict[str, Any]], None]


# -- the mask key -----------------------------------------------------------------------------


class MaskKeyInvalid(RuntimeError):
    """The mask key Secret exists but holds no usable key (names the Secret and the fix)."""


def ensure_mask_key(client: Any, *, namespace: str, name: str) -> str:
    """The mask HMAC key from Secret ``namespace/name``, created with 32 random bytes (URL-safe
    text) when missing. Never overwritten: the Secret is created immutable, and a replica that
    loses the create race reads the winner's key."""
    core: Any = kubernetes.client.CoreV1Api(client)
    for _ in range(3):
        found = webhook.read_secret(client, name=name, namespace=namespace)
        if found is not None:
            return mask_key_of(found.data or {}, where=f"{namespace}/{name}")
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "immutable": True,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {annotations.MANAGED_BY_LABEL: annotations.MANAGED_BY_VALUE},
            },
            "data": {MASK_KEY_FIELD: _b64(secrets.token_urlsafe(MASK_KEY_BYTES))},
        }
        try:
            core.create_namespaced_secret(namespace, body)
            logger.info("Created the mask key Secret %s/%s", namespace, name)
        except ApiException as err:
            if err.status != 409:
                raise
            logger.info("Another replica created the mask key Secret %s/%s; reading it", namespace, name)
    raise RuntimeError(f"could not read or create the mask key Secret {namespace}/{name}")


def mask_key_of(data: Mapping[str, str], *, where: str) -> str:
    """The key in a Secret's ``data`` (base64, as the API returns it)."""
    try:
        key = base64.b64decode(data.get(MASK_KEY_FIELD) or "", validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        key = ""
    if len(key.strip()) < MASK_KEY_MIN_LENGTH:
        raise MaskKeyInvalid(
            f"the mask key Secret {where} has no text key {MASK_KEY_FIELD!r} of at least "
            f"{MASK_KEY_MIN_LENGTH} characters; delete the Secret and the operator creates one, or "
            "put a random key in it"
        )
    return key.strip()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- pure decisions ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """A valid DatabaseAccessPolicy of the namespace, or a ClusterDatabaseAccessPolicy that
    selects it (named ``cluster:<name>``), or a namespace policy under the cluster baselines
    that bind a pod (``restricted_by``; named ``<policy>+cluster:<name>...``, its own group)."""

    name: str
    spec: Mapping[str, Any]
    restricted_by: tuple["Policy", ...] = ()
    """Cluster baselines composed with this policy: its group holds only what every one of
    them grants too, and masks what any of them masks."""

    @property
    def database(self) -> str:
        return bundle.database(self.spec)

    @property
    def cluster(self) -> bool:
        return self.name.startswith(bundle.CLUSTER_PREFIX)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Pod:
    """A live pod of the namespace, as binding needs it."""

    name: str
    uid: str
    service_account: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    database: str = ""
    """Its ``dbgov.io/database`` annotation ("" if none)."""
    injected: bool = False
    """The webhook injected the sidecar at its CREATE (its status annotation and enrollment label,
    which the pod may neither claim at CREATE nor add later)."""

    @classmethod
    def from_api(cls, body: Mapping[str, Any]) -> "Pod":
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        return cls(
            name=str(meta.get("name") or ""),
            uid=str(meta.get("uid") or ""),
            service_account=str(spec.get("serviceAccountName") or "default"),
            labels=dict(meta.get("labels") or {}),
            database=str((meta.get("annotations") or {}).get(annotations.DATABASE) or ""),
            injected=(meta.get("annotations") or {}).get(annotations.STATUS) == annotations.STATUS_INJECTED
            and (meta.get("labels") or {}).get(annotations.INJECT) == annotations.INJECT_ENABLED,
        )


def database_id(*, namespace: str, name: str) -> str:
    """How roles name a Database (cluster-wide unique): ``<namespace>/<name>``."""
    return f"{namespace}/{name}"


def refused(status: int, code: str, message: str, detail: str = "") -> credential_server.IssueRefused:
    return credential_server.IssueRefused(status=status, code=code, message=message, detail=detail)


def valid_policies(objects: Sequence[kubeapi.PolicyObject]) -> list[Policy]:
    """The namespace's policies that are not being deleted and have no problem (an invalid
    policy binds nothing, as for the bundles)."""
    return [
        Policy(name=p.name, spec=p.spec)
        for p in sorted(objects, key=lambda p: p.name)
        if not p.deleting and not reconcile.problems(p.spec)
    ]


def baselines(objects: Sequence[kubeapi.PolicyObject], labels: Mapping[str, str]) -> list[Policy]:
    """The cluster policies that select a namespace with ``labels`` (not being deleted, subjects
    readable). An invalid one is kept: its group cannot compile, so the pods it binds get no
    credentials rather than the namespace policy's grants without the baseline (fail closed)."""
    return [
        Policy(name=bundle.cluster_component(p.name), spec=p.spec)
        for p in sorted(objects, key=lambda p: p.name)
        if not p.deleting and bundle.selects_namespace(p.spec, labels)
    ]


def effective(bound: Sequence[Policy], cluster: Sequence[Policy], pod: Pod) -> list[Policy]:
    """The groups a pod gets from the namespace policies that bind it (``bound``): each under
    the cluster baselines (``cluster``, already those about this database or every one) that
    bind the pod, so a baseline's block removes the privilege whatever the namespace allows."""
    workload = bundle.Workload(service_account=pod.service_account, labels=pod.labels, database=pod.database)
    over = tuple(
        c
        for c in cluster
        if bundle.binds(
            bundle.subjects(c.spec, cluster=True)[0], service_account=pod.service_account, pods=[workload]
        )
    )
    if not over:
        return list(bound)
    suffix = "".join(f"+{c.name}" for c in over)
    return [Policy(name=p.name + suffix, spec=p.spec, restricted_by=over) for p in bound]


def binding(policies: Sequence[Policy], pod: Pod) -> list[Policy]:
    """The policies with a ``databaseRef`` that bind ``pod`` (its ServiceAccount or labels)."""
    workload = bundle.Workload(service_account=pod.service_account, labels=pod.labels, database=pod.database)
    return [
        p
        for p in policies
        if p.database
        and bundle.binds(bundle.subjects(p.spec)[0], service_account=pod.service_account, pods=[workload])
    ]


def choose_database(bound: Sequence[Policy], pod: Pod) -> str:
    """The Database the pod gets credentials for; refuses (409) when none or ambiguous."""
    names = sorted({p.database for p in bound})
    where = f"pod {pod.name} (ServiceAccount {pod.service_account})"
    if not names:
        raise refused(
            409,
            "no_policy",
            "no valid DatabaseAccessPolicy with a databaseRef in the pod's namespace binds this pod",
            f"{where}: no valid policy with a databaseRef binds it",
        )
    if pod.database:
        if pod.database not in names:
            raise refused(
                409,
                "database_not_bound",
                f"the pod's {annotations.DATABASE} annotation names {pod.database!r}, but the policies "
                f"binding it govern {', '.join(names)}",
            )
        return pod.database
    if len(names) > 1:
        raise refused(
            409,
            "database_ambiguous",
            f"policies for several databases bind this pod ({', '.join(names)}); name one with the "
            f"{annotations.DATABASE} annotation",
        )
    return names[0]


def credentials_spec(bound: Sequence[Policy]) -> credentials.CredentialsSpec:
    """The shortest TTL (and renewBefore) of the policies binding a pod on one database."""
    specs = [
        credentials.parse_credentials(q.spec.get("credentials")) for p in bound for q in (p, *p.restricted_by)
    ]
    return min(specs, key=lambda s: (s.ttl, s.renew_before), default=credentials.CredentialsSpec())


def compile_groups(
    policies: Sequence[Policy], catalog: grants.Catalog, *, namespace: str, database: str, mask_key: str
) -> tuple[dict[str, credentials.DesiredGroup], dict[str, str]]:
    """Each policy's group (compiled grants), and why the others cannot be compiled."""
    groups: dict[str, credentials.DesiredGroup] = {}
    failed: dict[str, str] = {}
    for policy in policies:
        try:
            compiled = [
                policy_compile.compile_policy(dict(p.spec), source=p.name, mask_key=mask_key)
                for p in (policy, *policy.restricted_by)
            ]
            role = credentials.group_role_name(namespace=namespace, policy=policy.name, database=database)
            compiled_grants = grants.compile_composed_grants(compiled, catalog, group_role=role)
        except (policy_compile.PolicyInvalid, ValueError) as err:
            failed[policy.name] = str(err)
            continue
        groups[policy.name] = credentials.DesiredGroup(
            namespace=namespace, policy=policy.name, grants=compiled_grants
        )
    return groups, failed


def desired_state(
    *,
    namespace: str,
    database: str,
    policies: Sequence[Policy],
    groups: Mapping[str, credentials.DesiredGroup],
    pods: Sequence[Pod],
    actual: credentials.Actual,
    now: datetime.datetime,
    presenting: Pod | None = None,
    cluster: Sequence[Policy] = (),
) -> credentials.Desired:
    """What should exist on ``database`` (``policies`` are those naming it, ``groups`` the ones
    that compiled, ``cluster`` the baselines about it): a login for every live pod that holds a
    usable role there and is still bound, and for the presenting pod (rotated); the groups of
    the policies they are bound by, each under the baselines binding the pod (:func:`effective`)."""
    roles = {r.name: r for r in actual.roles}
    logins: list[credentials.DesiredLogin] = []
    for pod in pods:
        mine = presenting is not None and pod.uid == presenting.uid
        current = roles.get(credentials.login_role_name(pod_uid=pod.uid, database=database))
        if not mine and (current is None or not _usable(current, now)):
            continue  # nothing to keep (a role is created when its sidecar asks for it)
        bound = [p for p in effective(binding(policies, pod), cluster, pod) if p.name in groups]
        if not bound:
            continue  # unbound: its role, if any, is revoked
        logins.append(
            credentials.DesiredLogin(
                workload=credentials.Workload(
                    namespace=namespace,
                    service_account=pod.service_account,
                    pod_name=pod.name,
                    pod_uid=pod.uid,
                ),
                policies=tuple(p.name for p in bound),
                credentials=credentials_spec(bound),
                rotate_password=mine,
            )
        )
    used = {name for login in logins for name in login.policies}
    return credentials.Desired(
        database=database,
        groups=tuple(g for name, g in sorted(groups.items()) if name in used),
        logins=tuple(logins),
        live_pods=frozenset(p.uid for p in pods),
    )


def _usable(role: credentials.ActualRole, now: datetime.datetime) -> bool:
    return role.can_login and (role.valid_until is None or role.valid_until > now)


def applicable(
    actions: Sequence[credentials.Action], *, presenting_role: str | None
) -> list[credentials.Action]:
    """The plan's actions but creations and renewals of other pods' roles (and, for the reaper,
    of any role): a role lives on only while its own sidecar presents."""
    keep: list[credentials.Action] = []
    for action in actions:
        mints = isinstance(action, credentials.CreateLoginRole | credentials.RenewLoginRole)
        if not mints or action.role == presenting_role:
            keep.append(action)
    return keep


_EVENT_TYPES: Mapping[type, str] = {
    credentials.CreateLoginRole: "credential_issued",
    credentials.RenewLoginRole: "credential_renewed",
    credentials.DisableLogin: "credential_revoked",
    credentials.TerminateSessions: "credential_revoked",
    credentials.DropRole: "credential_revoked",
}


def audit_event(action: credentials.Action, *, database: str, now: datetime.datetime) -> dict[str, Any]:
    """The audit line of one applied action (never a password or key): issued, renewed,
    revoked, or a group's grants changed."""
    return {
        "type": _EVENT_TYPES.get(type(action), "credential_grants_changed"),
        "time": now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "database": database,
        **action.audit(),
    }


# -- I/O: the issuer and the reaper -----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Scope:
    """One Database and what its plan reads from Kubernetes."""

    namespace: str
    name: str
    target: databases.Target
    policies: tuple[Policy, ...]
    """The valid policies of the namespace that name this Database."""
    cluster: tuple[Policy, ...] = ()
    """The cluster policies selecting the namespace that are about this Database (or every one)."""

    @property
    def database(self) -> str:
        return database_id(namespace=self.namespace, name=self.name)


class Minter:
    """The credential endpoint's issuer, and the reaper the Database timer runs."""

    def __init__(
        self,
        config: settings.Settings,
        *,
        client: Any,
        mask_key: str,
        audit: Audit | None = None,
        clock: Callable[[], datetime.datetime] | None = None,
    ) -> None:
        if len(mask_key) < MASK_KEY_MIN_LENGTH:
            raise MaskKeyInvalid("the mask key is empty or short: ensure_mask_key reads it")
        self._config = config
        self._client = client
        self._mask_key = mask_key
        self._audit = audit if audit is not None else _print_line
        self._clock = clock if clock is not None else (lambda: datetime.datetime.now(datetime.UTC))
        self._core: Any = kubernetes.client.CoreV1Api(client)
        self._custom: Any = kubernetes.client.CustomObjectsApi(client)

    # ---- issue -------------------------------------------------------------------------------

    def issue(self, workload: identity.Identity) -> credential_server.IssuedCredentials:
        """Create or renew (rotating the password) the pod's role on the Database its policies
        name; refuse with `IssueRefused` when none binds it or the database is not usable."""
        try:
            return self._issue(workload)
        except (ApiException, OSError) as err:
            raise refused(
                503,
                "kubernetes_unavailable",
                "the operator cannot read the pod, policies or Database from the Kubernetes API; retry later",
                f"{workload.namespace}/{workload.pod}: {err}",
            ) from err

    def _issue(self, workload: identity.Identity) -> credential_server.IssuedCredentials:
        namespace = workload.namespace
        pod = self._pod(workload)
        policies = self._policies(namespace)
        name = choose_database(binding(policies, pod), pod)
        scope = self._scope(namespace, name, policies)
        role = credentials.login_role_name(pod_uid=pod.uid, database=scope.database)
        secret = pgapply.new_secret()
        try:
            with self._session(scope) as conn:
                if not pod.injected:
                    # A pod bound by a policy but without the sidecar (never enrolled, or a token
                    # requested for it by hand) would hold database credentials the proxy never sees.
                    raise refused(
                        403,
                        "pod_not_injected",
                        "credentials go only to pods the dbgov webhook injected with its sidecar; "
                        "enroll the pod (label dbgov.io/inject=true, or an enforced namespace)",
                        f"{namespace}/{pod.name}",
                    )
                applied, desired = self._converge(conn, scope, presenting=pod, secrets={role: secret})
        except psycopg.Error as err:
            raise refused(
                503,
                "database_unavailable",
                f"minting on Database {name!r} failed; retry later",
                f"{scope.database}: {' '.join(str(err).split())}",
            ) from err
        return self._answer(scope, role=role, secret=secret, applied=applied, desired=desired)

    def _pod(self, workload: identity.Identity) -> Pod:
        try:
            body = self._core.read_namespaced_pod(workload.pod, workload.namespace)
        except ApiException as err:
            if err.status == 404:
                raise refused(403, "pod_not_found", identity.REASONS["pod_not_found"]) from err
            raise
        pod = Pod.from_api(self._client.sanitize_for_serialization(body))
        if pod.uid != workload.pod_uid:
            raise refused(403, "pod_uid_mismatch", identity.REASONS["pod_uid_mismatch"])
        return pod

    def _answer(
        self,
        scope: _Scope,
        *,
        role: str,
        secret: credentials.Secret,
        applied: Sequence[credentials.Action],
        desired: credentials.Desired,
    ) -> credential_server.IssuedCredentials:
        minted = [
            a
            for a in applied
            if isinstance(a, credentials.CreateLoginRole | credentials.RenewLoginRole) and a.role == role
        ]
        login = [d for d in desired.logins if d.rotate_password]
        if not minted or not login:
            raise refused(503, "database_unavailable", "minting did not converge; retry later", role)
        spec = login[0].credentials
        valid_until = minted[-1].valid_until
        return credential_server.IssuedCredentials(
            user=role,
            password=secret.password,
            valid_until=valid_until,
            renew_at=valid_until - spec.renew_before,
            database=scope.name,
            host=scope.target.host,
            port=scope.target.port,
            dbname=scope.target.dbname,
            sslmode=scope.target.sslmode,
            ca_pem=scope.target.ca_pem,
            policies=login[0].policies,
        )

    # ---- reap --------------------------------------------------------------------------------

    def reap(self, namespace: str, name: str) -> list[credentials.Action]:
        """Revoke what must go on one Database (expired, pod deleted, unbound, orphans) and
        bring its groups' grants up to date; creates and renews nothing."""
        scope = self._scope(namespace, name, self._policies(namespace))
        with self._session(scope) as conn:
            applied, _ = self._converge(conn, scope, presenting=None, secrets={})
        return applied

    def retire(self, namespace: str, name: str, spec: Mapping[str, Any]) -> list[credentials.Action]:
        """A Database was deleted: revoke every role minted there and drop its groups and views
        (with nothing desired, the plan revokes all of them), while its admin Secret is still
        readable. Best effort: a deletion the operator did not see leaves the roles to expire."""
        scope = self._scope_of(namespace, name, spec, ())
        with self._session(scope) as conn:
            applied, _ = self._converge(conn, scope, presenting=None, secrets={})
        return applied

    def reap_namespace(self, namespace: str) -> None:
        """Reap every Database of the namespace (a pod went, a policy changed); problems are
        logged, the periodic reaper tries again."""
        listed = self._custom.list_namespaced_custom_object(
            kubeapi.GROUP, kubeapi.VERSION, namespace, DATABASES
        )
        for item in listed.get("items", []):
            name = str(item["metadata"]["name"])
            try:
                self.reap(namespace, name)
            except (credential_server.IssueRefused, psycopg.Error) as err:
                logger.warning("Reaping Database %s/%s failed: %s", namespace, name, err)

    # ---- shared ------------------------------------------------------------------------------

    def _policies(self, namespace: str) -> list[Policy]:
        return valid_policies(kubeapi.KubeApi(self._client).list_policies(namespace))

    def _scope(self, namespace: str, name: str, policies: Sequence[Policy]) -> _Scope:
        try:
            body = self._custom.get_namespaced_custom_object(
                kubeapi.GROUP, kubeapi.VERSION, namespace, DATABASES, name
            )
        except ApiException as err:
            if err.status != 404:
                raise
            raise refused(
                409,
                "database_missing",
                f"the Database {name!r} the policies name does not exist in the pod's namespace",
            ) from err
        return self._scope_of(
            namespace, name, dict(body.get("spec") or {}), policies, cluster=self._baselines(namespace)
        )

    def _baselines(self, namespace: str) -> list[Policy]:
        api = kubeapi.KubeApi(self._client)
        labels = api.namespace_labels(namespace)
        return baselines(api.list_cluster_policies(), labels) if labels is not None else []

    def _scope_of(
        self,
        namespace: str,
        name: str,
        spec: Mapping[str, Any],
        policies: Sequence[Policy],
        *,
        cluster: Sequence[Policy] = (),
    ) -> _Scope:
        # Judged again at every use: the Secret's grant and pins may have changed since the
        # Database was last checked, and a refused Secret is never connected with.
        target = dbconn.resolve(self._client, namespace=namespace, spec=spec)
        if isinstance(target, databases.Problem):
            raise refused(
                409,
                "database_not_ready",
                f"the Database {name!r} is not ready ({target.reason})",
                f"{namespace}/{name}: {target.message}",
            )
        mine = tuple(p for p in policies if p.database == name)
        about = tuple(c for c in cluster if c.database in ("", name))
        return _Scope(namespace=namespace, name=name, target=target, policies=mine, cluster=about)

    @contextlib.contextmanager
    def _session(self, scope: _Scope) -> Iterator[psycopg.Connection[Any]]:
        try:
            with dbconn.connect(scope.target) as conn:
                conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT}'")
                conn.execute("SELECT pg_catalog.pg_advisory_lock(%s)", (LOCK_KEY,))
                yield conn
        except psycopg.OperationalError as err:
            raise refused(
                503,
                "database_unavailable",
                f"the operator cannot connect to Database {scope.name!r}; retry later",
                f"{scope.database}: {' '.join(str(err).split())}",
            ) from err

    def _converge(
        self,
        conn: psycopg.Connection[Any],
        scope: _Scope,
        *,
        presenting: Pod | None,
        secrets: Mapping[str, credentials.Secret],
    ) -> tuple[list[credentials.Action], credentials.Desired]:
        """Read, plan, apply and audit one database (under the advisory lock)."""
        catalog = pgapply.read_catalog(conn)
        actual = pgapply.read_state(conn)
        pods = self._live_pods(scope.namespace, presenting)
        candidates = {p.name: p for p in scope.policies}
        for pod in pods:  # each namespace policy under the baselines binding each pod
            candidates.update(
                (p.name, p) for p in effective(binding(scope.policies, pod), scope.cluster, pod)
            )
        groups, failed = compile_groups(
            list(candidates.values()),
            catalog,
            namespace=scope.namespace,
            database=scope.database,
            mask_key=self._mask_key,
        )
        if presenting is not None:
            mine = effective(binding(scope.policies, presenting), scope.cluster, presenting)
            broken = sorted(set(failed) & {p.name for p in mine})
            if broken:
                detail = "; ".join(f"{name}: {failed[name]}" for name in broken)
                raise refused(
                    409,
                    "policy_invalid",
                    f"policy {', '.join(broken)} cannot be compiled into grants: {detail}",
                )
        for name, why in sorted(failed.items()):
            logger.warning(
                "Policy %s/%s grants nothing on %s: %s", scope.namespace, name, scope.database, why
            )
        now = self._clock()
        desired = desired_state(
            namespace=scope.namespace,
            database=scope.database,
            policies=scope.policies,
            groups=groups,
            pods=pods,
            actual=actual,
            now=now,
            presenting=presenting,
            cluster=scope.cluster,
        )
        role = (
            credentials.login_role_name(pod_uid=presenting.uid, database=scope.database)
            if presenting
            else None
        )
        actions = applicable(
            credentials.plan(desired, actual, now=now, secrets=secrets), presenting_role=role
        )
        _report_unmanaged(actual)
        own_roles = (
            {role}
            | {
                credentials.group_role_name(namespace=scope.namespace, policy=p, database=scope.database)
                for d in desired.logins
                if d.rotate_password
                for p in d.policies
            }
            if role
            else set()
        )
        applied: list[credentials.Action] = []
        for batch in _by_role(actions):
            try:
                done = pgapply.apply(conn, batch, connect=self._connect_to(scope))
            except (psycopg.Error, pgapply.RoleNotDropped) as err:
                if batch[0].role in own_roles and not isinstance(err, pgapply.RoleNotDropped):
                    raise
                self._failed(batch[0], err, database=scope.database, now=now)
                continue
            for action in done:
                applied.append(action)
                self._audit(audit_event(action, database=scope.database, now=now))
        return applied, desired

    def _connect_to(self, scope: _Scope) -> pgapply.Connect:
        """Admin connections to the server's other databases (cleaning up a revoked role)."""

        def connect(dbname: str) -> contextlib.AbstractContextManager[psycopg.Connection[Any]]:
            return dbconn.connect(dataclasses.replace(scope.target, dbname=dbname))

        return connect

    def _failed(
        self, action: credentials.Action, err: Exception, *, database: str, now: datetime.datetime
    ) -> None:
        """One role's actions failed: the others go on; log and audit why (the next plan retries)."""
        reason = " ".join(str(err).split())
        logger.warning(
            "Database %s: %s on role %s failed: %s", database, type(action).__name__, action.role, reason
        )
        event = audit_event(action, database=database, now=now)
        event.update(type="credential_revoke_failed" if _revoking(action) else "credential_apply_failed")
        event["error"] = reason
        if isinstance(err, pgapply.RoleNotDropped):
            event["databases"] = list(err.databases)
        self._audit(event)

    def _live_pods(self, namespace: str, presenting: Pod | None) -> list[Pod]:
        listed = self._core.list_namespaced_pod(namespace)
        pods = [Pod.from_api(self._client.sanitize_for_serialization(p)) for p in listed.items]
        if presenting is not None and all(p.uid != presenting.uid for p in pods):
            pods.append(presenting)  # read a moment ago; the list may lag behind
        return pods


def _revoking(action: credentials.Action) -> bool:
    return isinstance(action, credentials.DisableLogin | credentials.TerminateSessions | credentials.DropRole)


def _report_unmanaged(actual: credentials.Actual) -> None:
    for name in credentials.unmanaged(actual):
        if name not in _reported_unmanaged:
            _reported_unmanaged.add(name)
            logger.info(
                "Role %s is named like a dbgov role but the operator did not make it (no owner COMMENT "
                "whose hash is its name); it is never touched. Rename it to silence this",
                name,
            )


def _by_role(actions: Sequence[credentials.Action]) -> Iterator[list[credentials.Action]]:
    """Consecutive actions on one role: each batch is applied (one transaction) and audited
    before the next, so an error later leaves no applied action unaudited."""
    batch: list[credentials.Action] = []
    for action in actions:
        if batch and action.role != batch[-1].role:
            yield batch
            batch = []
        batch.append(action)
    if batch:
        yield batch


def _print_line(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()
