"""Minted database credentials, planned: desired state vs the database's actual roles → actions.

Why a plan: the operator is restarted, killed mid-cycle and run against databases that other
people touch. A PURE function that compares what should exist (workloads bound to policies,
each with its group role's compiled grants) with what the database holds (read by
`pgapply.read_state`) and returns an ordered list of actions is testable as data and converges
whatever state it starts from; `pgapply.apply` executes the list (CloudNativePG's
`internal/management/controller/roles/roles.go` has the same split). Nothing is kept in memory:
every role carries its owner in its name and COMMENT, so a fresh operator can reap what an
earlier one left.

Roles (deterministic, ≤ 63 bytes, cluster-wide in PostgreSQL, so the database is in the hash):
  dbgov_g_<hash(namespace, policy, database)>  group role: holds the policy's grants, NOLOGIN
  dbgov_w_<hash(pod uid, database)>            login role of one pod: member of its groups,
                                               SCRAM password, VALID UNTIL now + TTL
  dbgov_q_<hash(database)>                     quarantine: NOLOGIN, no privilege, no member;
                                               owns what a dropped role left with no group
All carry a JSON COMMENT naming their owner (`Owner`). A plan only touches roles it can prove
the operator made for ITS database (`owned`): the COMMENT names the database and the role's name
is the hash that COMMENT's fields give (a minted role cannot change its own COMMENT: that needs
CREATEROLE). Any other `dbgov_` role, a DBA's `dbgov_dba` say, is never touched (`unmanaged`).

Revocation never hands a workload's objects to the admin: `DropRole` reassigns them to the
workload's group role (its rights are the policy's, so a view or SECURITY DEFINER function it
owns gets no more) or, with no group left, to the quarantine role, which has no rights at all.

Passwords and the SCRAM verifier are made by the caller (`pgapply.new_secret`) and passed in,
so the plan stays pure; PostgreSQL receives only the verifier, never the plaintext.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from dbgov_operator import grants
from dbgov_policy import compile as policy_compile

PREFIX = "dbgov_"
GROUP_PREFIX = "dbgov_g_"
LOGIN_PREFIX = "dbgov_w_"
QUARANTINE_PREFIX = "dbgov_q_"
COMMENT_VERSION = 1

MIN_TTL = datetime.timedelta(minutes=1)
MAX_TTL = datetime.timedelta(hours=24)
DEFAULT_TTL = datetime.timedelta(hours=1)
CREDENTIAL_FIELDS = frozenset({"ttl", "renewBefore"})

Reason = Literal["issued", "renewed", "grants-changed", "expired", "pod-deleted", "policy-unbound", "orphan"]
"""Why an action happens; it goes into the audit event."""


# -- the policy's `credentials` field ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CredentialsSpec:
    """A policy's `spec.credentials`: how long a minted role lives and when it is renewed."""

    ttl: datetime.timedelta = DEFAULT_TTL
    renew_before: datetime.timedelta = DEFAULT_TTL / 3
    """Renew when less than this is left (default a third of the TTL)."""


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> datetime.timedelta | None:
    """ "15m", "1h", "90s", "1h30m" → timedelta; None when it is not that shape."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        return None
    h, m, s = (int(g) if g else 0 for g in match.groups())
    return datetime.timedelta(hours=h, minutes=m, seconds=s)


def parse_credentials(value: Any, *, path: str = "spec.credentials") -> CredentialsSpec:
    """Check a policy's `credentials` field; raise `PolicyInvalid` listing every problem with
    its field path, as `dbgov_policy.compile` does."""
    problems: list[policy_compile.Problem] = []
    if value is None:
        return CredentialsSpec()
    if not isinstance(value, Mapping):
        raise policy_compile.PolicyInvalid(
            [policy_compile.Problem(path=path, message=f"must be a mapping, got {type(value).__name__}")]
        )
    for key in value:
        if key not in CREDENTIAL_FIELDS:
            problems.append(
                policy_compile.Problem(
                    path=f"{path}.{key}",
                    message=f"unknown field; known fields: {', '.join(sorted(CREDENTIAL_FIELDS))}",
                )
            )
    ttl = _duration_field(value, "ttl", path, problems, default=DEFAULT_TTL)
    if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
        problems.append(
            policy_compile.Problem(
                path=f"{path}.ttl", message=f"must be between 1m and 24h, got {value['ttl']!r}"
            )
        )
        ttl = None
    renew = _duration_field(value, "renewBefore", path, problems, default=(ttl or DEFAULT_TTL) / 3)
    if ttl is not None and renew is not None and not datetime.timedelta(0) < renew < ttl:
        problems.append(
            policy_compile.Problem(
                path=f"{path}.renewBefore",
                message=f"must be more than 0 and less than ttl ({value.get('ttl', '1h')}), got {value['renewBefore']!r}",
            )
        )
    if problems or ttl is None or renew is None:
        raise policy_compile.PolicyInvalid(problems)
    return CredentialsSpec(ttl=ttl, renew_before=renew)


def _duration_field(
    value: Mapping[str, Any],
    key: str,
    path: str,
    problems: list[policy_compile.Problem],
    *,
    default: datetime.timedelta,
) -> datetime.timedelta | None:
    if key not in value:
        return default
    raw = value[key]
    parsed = parse_duration(raw) if isinstance(raw, str) else None
    if parsed is None:
        problems.append(
            policy_compile.Problem(
                path=f"{path}.{key}", message=f'must be a duration like "15m", "1h" or "1h30m", got {raw!r}'
            )
        )
    return parsed


# -- names and owners --------------------------------------------------------------------------


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def group_role_name(*, namespace: str, policy: str, database: str) -> str:
    """The group role of (namespace, policy, database): `dbgov_g_` + 32 hex digits."""
    return GROUP_PREFIX + _hash("group", namespace, policy, database)


def login_role_name(*, pod_uid: str, database: str) -> str:
    """The login role of one pod on one database: `dbgov_w_` + 32 hex digits."""
    return LOGIN_PREFIX + _hash("login", pod_uid, database)


def quarantine_role_name(database: str) -> str:
    """The database's quarantine role (owns a revoked role's objects when it has no group):
    `dbgov_q_` + 32 hex digits."""
    return QUARANTINE_PREFIX + _hash("quarantine", database)


def quarantine_owner(database: str) -> Owner:
    return Owner(kind="quarantine", database=database)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Owner:
    """Who a role belongs to; kept as the role's COMMENT (JSON) so reaping needs no memory."""

    kind: Literal["group", "login", "quarantine"]
    database: str
    namespace: str = ""
    policy: str = ""
    service_account: str = ""
    pod_name: str = ""
    pod_uid: str = ""

    def comment(self) -> str:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v}
        return json.dumps({"dbgov": COMMENT_VERSION, **fields}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_comment(cls, text: str | None) -> Owner | None:
        """The owner a COMMENT names, or None when it names none (an orphan)."""
        try:
            data = json.loads(text or "")
            if not isinstance(data, dict) or data.pop("dbgov", None) != COMMENT_VERSION:
                return None
            if data.get("kind") not in ("group", "login", "quarantine"):
                return None
            return cls(**{k: str(v) for k, v in data.items()})  # type: ignore[arg-type]
        except (ValueError, TypeError):
            return None

    def audit(self) -> dict[str, str]:
        """The identity fields an audit event names."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v}

    def role_name(self) -> str:
        """The only name a role with this owner can have (the hash of its fields)."""
        match self.kind:
            case "group":
                return group_role_name(namespace=self.namespace, policy=self.policy, database=self.database)
            case "login":
                return login_role_name(pod_uid=self.pod_uid, database=self.database)
            case "quarantine":
                return quarantine_role_name(self.database)


def provable_owner(role: ActualRole) -> Owner | None:
    """The owner of a role the operator provably made: its COMMENT is an owner whose fields hash
    to the role's name. None for anything else (a DBA's `dbgov_dba`, a hand-made look-alike)."""
    owner = Owner.from_comment(role.comment)
    return owner if owner is not None and owner.role_name() == role.name else None


def owned(role: ActualRole, database: str) -> Owner | None:
    """``role``'s owner when the operator made it for ``database``; None otherwise."""
    owner = provable_owner(role)
    return owner if owner is not None and owner.database == database else None


def unmanaged(actual: Actual) -> tuple[str, ...]:
    """The `dbgov_` roles that no plan may touch: named like ours, not provably ours."""
    return tuple(r.name for r in actual.roles if r.name.startswith(PREFIX) and provable_owner(r) is None)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Secret:
    """A login role's password and the SCRAM-SHA-256 verifier PostgreSQL stores for it."""

    password: str = dataclasses.field(repr=False)
    verifier: str = dataclasses.field(repr=False)


# -- desired and actual state ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """A pod that is bound to a policy (what TokenReview told the credential endpoint)."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DesiredGroup:
    """One (namespace, policy) on this database and the grants its policy compiles to."""

    namespace: str
    policy: str
    grants: grants.GroupGrants


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DesiredLogin:
    """One pod's login role: the groups (policies) it is bound to and their credentials spec."""

    workload: Workload
    policies: tuple[str, ...]
    """Names of the policies (in the workload's namespace) that bind it."""
    credentials: CredentialsSpec = CredentialsSpec()
    rotate_password: bool = False
    """Renew with a new password too (the caller has one for it in `secrets`)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Desired:
    """What should exist on one database."""

    database: str
    groups: tuple[DesiredGroup, ...] = ()
    logins: tuple[DesiredLogin, ...] = ()
    live_pods: frozenset[str] = frozenset()
    """UIDs of pods that exist: a role whose pod lives but is no longer bound was unbound."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActualRole:
    """A `dbgov_` role as pg_roles, pg_auth_members and its COMMENT show it."""

    name: str
    can_login: bool
    valid_until: datetime.datetime | None
    comment: str | None
    member_of: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ActualView:
    """A view in `dbgov_masked` with the group and digest its COMMENT names."""

    name: str
    group_role: str
    digest: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Actual:
    """What one database holds (`pgapply.read_state`)."""

    roles: tuple[ActualRole, ...] = ()
    privileges: Mapping[str, frozenset[grants.Privilege]] = dataclasses.field(default_factory=dict)
    """Group role → its privileges in this database (objects of `dbgov_masked` but the schema
    itself are left out: the view actions own those)."""
    views: tuple[ActualView, ...] = ()
    key_digests: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Group role → `HmacPads.digest` of its row in `dbgov_masked.hmac_keys`."""
    masking_schema: bool = False
    """Whether `dbgov_masked` and its key table exist."""


# -- actions -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Action:
    role: str
    reason: Reason
    owner: Owner | None = None

    def audit(self) -> dict[str, Any]:
        """What the audit event for this action records (never a password or key)."""
        event: dict[str, Any] = {"action": type(self).__name__, "role": self.role, "reason": self.reason}
        if self.owner is not None:
            event["owner"] = self.owner.audit()
        return event


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EnsureMaskingSchema(_Action):
    """Create `dbgov_masked` and its key table, closed to PUBLIC."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CreateGroupRole(_Action):
    """CREATE ROLE ... NOLOGIN with the owner COMMENT."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetMaskKey(_Action):
    """Write (or, with no pads, delete) the group's row in `dbgov_masked.hmac_keys`."""

    pads: grants.HmacPads | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DropMaskingView(_Action):
    view: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CreateMaskingView(_Action):
    """(Re)create a masking view owned by the admin and grant the group SELECT on it."""

    view: grants.MaskingView


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RevokePrivileges(_Action):
    privileges: tuple[grants.Privilege, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GrantPrivileges(_Action):
    privileges: tuple[grants.Privilege, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CreateLoginRole(_Action):
    """CREATE ROLE ... LOGIN PASSWORD '<SCRAM verifier>' VALID UNTIL ... IN ROLE <groups>."""

    secret: Secret
    valid_until: datetime.datetime
    groups: tuple[str, ...]

    def audit(self) -> dict[str, Any]:
        return {
            **_Action.audit(self),
            "validUntil": self.valid_until.isoformat(),
            "groups": list(self.groups),
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RenewLoginRole(_Action):
    """ALTER ROLE ... VALID UNTIL (and PASSWORD when rotating); live sessions stay."""

    valid_until: datetime.datetime
    secret: Secret | None = None

    def audit(self) -> dict[str, Any]:
        return {
            **_Action.audit(self),
            "validUntil": self.valid_until.isoformat(),
            "rotated": self.secret is not None,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SetMembership(_Action):
    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DisableLogin(_Action):
    """ALTER ROLE ... NOLOGIN, committed before the sessions are terminated."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TerminateSessions(_Action):
    """pg_terminate_backend of every session of the role."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DropRole(_Action):
    """Give what the role owns to ``reassign_to`` (never the admin), DROP OWNED BY it (its
    privileges), DROP ROLE; in every database of the server where it owns something."""

    reassign_to: str
    """A group role of the login, or the database's quarantine role."""
    quarantine: Owner
    """The quarantine role's owner: it is created when first needed."""

    def audit(self) -> dict[str, Any]:
        return {**_Action.audit(self), "reassignTo": self.reassign_to}


Action = (
    EnsureMaskingSchema
    | CreateGroupRole
    | SetMaskKey
    | DropMaskingView
    | CreateMaskingView
    | RevokePrivileges
    | GrantPrivileges
    | CreateLoginRole
    | RenewLoginRole
    | SetMembership
    | DisableLogin
    | TerminateSessions
    | DropRole
)


class PlanError(ValueError):
    """The desired state cannot be planned (names the cause and what the caller must supply)."""


# -- the plan ----------------------------------------------------------------------------------


def plan(
    desired: Desired,
    actual: Actual,
    *,
    now: datetime.datetime,
    secrets: Mapping[str, Secret],
) -> tuple[Action, ...]:
    """The ordered actions that take ``actual`` to ``desired`` at ``now``.

    ``secrets`` maps login role names to the secret a newly created (or rotated) role gets;
    the caller makes one per desired login it may need (`pgapply.new_secret`).

    Order: the masking schema; each desired group (create, key, views, revokes before grants);
    then every revocation (all NOLOGIN first, then terminations, then drops, so no revoked role
    can log in while others are being dropped); then creations, renewals and memberships; last,
    groups nobody is bound to any more.
    """
    if now.tzinfo is None:
        raise PlanError("now must be timezone-aware (UTC): VALID UNTIL is an absolute time")
    db = desired.database
    groups = {group_role_name(namespace=g.namespace, policy=g.policy, database=db): g for g in desired.groups}
    logins = {login_role_name(pod_uid=d.workload.pod_uid, database=db): d for d in desired.logins}
    _check_bindings(desired, groups)
    ours = [(r, o) for r in actual.roles if (o := owned(r, db)) is not None and o.kind != "quarantine"]
    actual_roles = {r.name: r for r, _ in ours}
    quarantine = quarantine_owner(db)

    actions: list[Action] = []
    if any(g.grants.views for g in groups.values()) and not actual.masking_schema:
        actions.append(EnsureMaskingSchema(role="", reason="issued"))
    for name, group in sorted(groups.items()):
        actions.extend(_group_actions(name, group, db, actual, exists=name in actual_roles))

    revoked: list[tuple[ActualRole, Reason, Owner]] = []
    keep: dict[str, ActualRole] = {}
    for role, owner in sorted(ours, key=lambda item: item[0].name):
        reason = _revocation(role, owner, logins, groups, desired, now=now)
        if reason is None:
            keep[role.name] = role
        elif owner.kind == "login":
            revoked.append((role, reason, owner))
    actions.extend(DisableLogin(role=r.name, reason=why, owner=o) for r, why, o in revoked)
    actions.extend(TerminateSessions(role=r.name, reason=why, owner=o) for r, why, o in revoked)
    # A group that stays first (one dropped later hands everything on to the quarantine).
    own_groups = sorted((r.name not in groups, r.name) for r, o in ours if o.kind == "group")
    actions.extend(
        DropRole(
            role=r.name,
            reason=why,
            owner=o,
            # The objects a migration created are its group's, which the next pod of the
            # policy may alter; with no group left, the quarantine role's.
            reassign_to=next((g for _, g in own_groups if g in r.member_of), quarantine.role_name()),
            quarantine=quarantine,
        )
        for r, why, o in revoked
    )

    for name, login in sorted(logins.items()):
        actions.extend(_login_actions(name, login, keep.get(name), db, secrets=secrets, now=now))

    for role, owner in sorted(ours, key=lambda item: item[0].name):
        if role.name in keep or owner.kind != "group":
            continue
        reason = _revocation(role, owner, logins, groups, desired, now=now) or "orphan"
        actions.extend(_drop_group(role.name, reason, owner, actual, quarantine=quarantine))
    return tuple(actions)


def _check_bindings(desired: Desired, groups: Mapping[str, DesiredGroup]) -> None:
    for login in desired.logins:
        for policy in login.policies:
            name = group_role_name(
                namespace=login.workload.namespace, policy=policy, database=desired.database
            )
            if name not in groups:
                raise PlanError(
                    f"pod {login.workload.namespace}/{login.workload.pod_name} is bound to policy {policy!r}, "
                    "which has no DesiredGroup: compile the policy's grants and pass it in desired.groups"
                )


def _revocation(
    role: ActualRole,
    owner: Owner,
    logins: Mapping[str, DesiredLogin],
    groups: Mapping[str, DesiredGroup],
    desired: Desired,
    *,
    now: datetime.datetime,
) -> Reason | None:
    """Why ``role`` (provably the operator's, for this database) must go, or None when it stays."""
    if owner.kind == "group":
        return None if role.name in groups else "policy-unbound"
    if role.valid_until is not None and role.valid_until <= now:
        return "expired"
    if role.name in logins:
        # NOLOGIN on a role that should log in: an earlier revocation stopped half-way.
        return None if role.can_login else "orphan"
    return "policy-unbound" if owner.pod_uid in desired.live_pods else "pod-deleted"


def _group_actions(
    name: str, group: DesiredGroup, database: str, actual: Actual, *, exists: bool
) -> Iterable[Action]:
    owner = Owner(kind="group", namespace=group.namespace, policy=group.policy, database=database)
    reason: Reason = "grants-changed" if exists else "issued"
    if not exists:
        yield CreateGroupRole(role=name, reason="issued", owner=owner)
    pads = group.grants.pads
    if (pads.digest if pads else None) != actual.key_digests.get(name):
        yield SetMaskKey(role=name, reason=reason, owner=owner, pads=pads)
    wanted = {v.name: v for v in group.grants.views}
    have = {v.name: v for v in actual.views if v.group_role == name}
    for stale in sorted(have.keys() - wanted.keys()):
        yield DropMaskingView(role=name, reason=reason, owner=owner, view=stale)
    held = actual.privileges.get(name, frozenset()) if exists else frozenset()
    want = group.grants.privileges
    revoke = held - want
    # Revoking a table-level privilege takes its column-level grants with it: grant them again.
    lost = {(p.schema, p.name, p.privilege) for p in revoke if p.object_type == "table"}
    regrant = {p for p in want if p.object_type == "column" and (p.schema, p.name, p.privilege) in lost}
    if revoke:
        yield RevokePrivileges(role=name, reason=reason, owner=owner, privileges=tuple(sorted(revoke)))
    if (want - held) | regrant:
        yield GrantPrivileges(
            role=name, reason=reason, owner=owner, privileges=tuple(sorted((want - held) | regrant))
        )
    for view_name, view in sorted(wanted.items()):
        current = have.get(view_name)
        if current is None or current.digest != view.digest:
            yield CreateMaskingView(role=name, reason=reason, owner=owner, view=view)


def _login_actions(
    name: str,
    login: DesiredLogin,
    current: ActualRole | None,
    database: str,
    *,
    secrets: Mapping[str, Secret],
    now: datetime.datetime,
) -> Iterable[Action]:
    w = login.workload
    owner = Owner(
        kind="login",
        namespace=w.namespace,
        database=database,
        policy=",".join(sorted(login.policies)),
        service_account=w.service_account,
        pod_name=w.pod_name,
        pod_uid=w.pod_uid,
    )
    groups = tuple(
        sorted(group_role_name(namespace=w.namespace, policy=p, database=database) for p in login.policies)
    )
    valid_until = now + login.credentials.ttl
    if current is None:
        yield CreateLoginRole(
            role=name,
            reason="issued",
            owner=owner,
            secret=_secret(secrets, name, w),
            valid_until=valid_until,
            groups=groups,
        )
        return
    left = (current.valid_until - now) if current.valid_until is not None else datetime.timedelta.max
    if login.rotate_password or left <= login.credentials.renew_before or current.valid_until is None:
        secret = _secret(secrets, name, w) if login.rotate_password else None
        yield RenewLoginRole(role=name, reason="renewed", owner=owner, valid_until=valid_until, secret=secret)
    add = tuple(sorted(set(groups) - current.member_of))
    remove = tuple(sorted(current.member_of - set(groups)))
    if add or remove:
        yield SetMembership(role=name, reason="grants-changed", owner=owner, add=add, remove=remove)


def _secret(secrets: Mapping[str, Secret], name: str, w: Workload) -> Secret:
    try:
        return secrets[name]
    except KeyError:
        raise PlanError(
            f"no secret for login role {name} (pod {w.namespace}/{w.pod_name}): pass one per desired "
            "login in `secrets` (pgapply.new_secret)"
        ) from None


def _drop_group(
    name: str, reason: Reason, owner: Owner, actual: Actual, *, quarantine: Owner
) -> Sequence[Action]:
    out: list[Action] = [
        DropMaskingView(role=name, reason=reason, owner=owner, view=v.name)
        for v in sorted(actual.views, key=lambda v: v.name)
        if v.group_role == name
    ]
    if name in actual.key_digests:
        out.append(SetMaskKey(role=name, reason=reason, owner=owner, pads=None))
    out.append(
        DropRole(
            role=name, reason=reason, owner=owner, reassign_to=quarantine.role_name(), quarantine=quarantine
        )
    )
    return out
