"""A `Database` resource's decisions: how to reach the server, and what its status says.

Pure: the spec, the Secrets it names (already read) and the result of a connection check come
in; a connection target or the precise problem, and the status, come out. The connection itself
is opened by ``dbconn``; the kopf handler in ``handlers`` only moves data between them.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from dbgov_operator.kubetypes import Condition

READY = "Ready"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Where and as whom the operator connects to a governed database."""

    host: str
    port: int
    dbname: str
    sslmode: str
    user: str
    password: str = dataclasses.field(repr=False)
    ca_pem: str | None = dataclasses.field(default=None, repr=False)
    """The CA bundle from ``caSecretRef`` (None: the system trust store)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """Why the operator cannot use a Database: a condition reason and a message saying what to do."""

    reason: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """What connecting as the admin role found."""

    server_version: str
    can_create_roles: bool
    """superuser, or CREATEROLE: minting per-workload roles needs it."""
    can_create_schema: bool
    """CREATE on the database: the masking views live in a schema of the operator's own."""


def secret_names(spec: Mapping[str, Any]) -> tuple[str, str | None]:
    """The admin Secret's name and the CA Secret's name (None when there is none)."""
    admin = spec.get("adminSecretRef") or {}
    ca = spec.get("caSecretRef")
    return str(admin.get("name") or ""), (str(ca.get("name")) if isinstance(ca, Mapping) else None)


def target(
    spec: Mapping[str, Any],
    *,
    admin_secret: Mapping[str, str] | None,
    ca_secret: Mapping[str, str] | None,
) -> Target | Problem:
    """The connection target from the spec and the Secrets' ``data`` (base64, as the API returns
    it; None: the Secret does not exist)."""
    admin_ref = spec.get("adminSecretRef") or {}
    admin_name = str(admin_ref.get("name") or "")
    if admin_secret is None:
        return Problem(
            reason="AdminSecretMissing",
            message=f"the Secret {admin_name!r} named by spec.adminSecretRef does not exist in this "
            "namespace; create it with the admin role's username and password",
        )
    fields: dict[str, str] = {}
    for role, default in (("usernameKey", "username"), ("passwordKey", "password")):
        key = str(admin_ref.get(role) or default)
        value = _decoded(admin_secret, key)
        if not value:
            return Problem(
                reason="AdminSecretIncomplete",
                message=f"the Secret {admin_name!r} has no non-empty key {key!r} "
                f"(spec.adminSecretRef.{role}); add it or point {role} at the key that holds it",
            )
        fields[role] = value
    ca_pem = None
    ca_ref = spec.get("caSecretRef")
    if isinstance(ca_ref, Mapping):
        ca_name, ca_key = str(ca_ref.get("name") or ""), str(ca_ref.get("key") or "ca.crt")
        ca_pem = _decoded(ca_secret or {}, ca_key) if ca_secret is not None else None
        if not ca_pem or "-----BEGIN CERTIFICATE-----" not in ca_pem:
            return Problem(
                reason="CASecretInvalid",
                message=f"the Secret {ca_name!r} named by spec.caSecretRef "
                + ("does not exist" if ca_secret is None else f"has no PEM certificate under {ca_key!r}")
                + "; it must hold the CA bundle that signs the server's certificate",
            )
    return Target(
        host=str(spec["host"]),
        port=int(spec.get("port") or 5432),
        dbname=str(spec["dbname"]),
        sslmode=str(spec.get("sslmode") or "verify-full"),
        user=fields["usernameKey"],
        password=fields["passwordKey"],
        ca_pem=ca_pem,
    )


def judge(check: Check) -> Problem | None:
    """What the admin role lacks for minting credentials, or None when it has everything."""
    missing = []
    if not check.can_create_roles:
        missing.append("CREATEROLE (or superuser), to create and drop per-workload roles")
    if not check.can_create_schema:
        missing.append("CREATE on the database, for the schema that holds the masking views")
    if not missing:
        return None
    return Problem(
        reason="AdminNotPrivileged",
        message="the admin role lacks " + " and ".join(missing) + "; grant it, or name another role",
    )


def status(
    *,
    generation: int,
    outcome: Check | Problem,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The Database's status after a check: Ready with a reason, and the server's version."""
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    problem = judge(outcome) if isinstance(outcome, Check) else outcome
    if problem is None:
        assert isinstance(outcome, Check)
        ready = _condition("True", "Connected", f"connected as the admin role ({outcome.server_version})")
    else:
        ready = _condition("False", problem.reason, problem.message)
    ready["observedGeneration"] = generation
    previous_ready = old.get(READY)
    if previous_ready is not None and previous_ready.get("status") == ready["status"]:
        ready["lastTransitionTime"] = str(previous_ready.get("lastTransitionTime") or now)
    else:
        ready["lastTransitionTime"] = now
    out: dict[str, Any] = {"observedGeneration": generation, "conditions": [ready]}
    if isinstance(outcome, Check):
        out["serverVersion"] = outcome.server_version
    elif previous and previous.get("serverVersion"):
        out["serverVersion"] = previous["serverVersion"]
    return out


def same(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> bool:
    """Whether the stored status already says everything ``desired`` says."""
    return current is not None and all(current.get(k) == v for k, v in desired.items())


def _condition(state: Literal["True", "False"], reason: str, message: str) -> Condition:
    return {
        "type": READY,
        "status": state,
        "observedGeneration": 0,
        "lastTransitionTime": "",
        "reason": reason,
        "message": message,
    }


def _decoded(data: Mapping[str, str], key: str) -> str | None:
    raw = data.get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
