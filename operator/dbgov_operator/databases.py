"""A `Database` resource's decisions: how to reach the server, and what its status says.

Pure: the spec, the Secrets it names (already read) and the result of a connection check come
in; a connection target or the precise problem, and the status, come out. The connection itself
is opened by ``dbconn``; the kopf handler in ``handlers`` only moves data between them.
"""

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from dbgov_operator import annotations
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


# -- Secrets outside the Database's namespace ---------------------------------------------------
#
# The admin Secret is the key to the whole database (superuser or CREATEROLE). Kept in the
# workload's namespace it is readable by whoever may read Secrets there (Kubernetes' `edit` role
# may), so the platform keeps it in a namespace of its own and *grants* it: the Secret names the
# namespaces whose Databases may use it, and pins the server it is for. The Database's own
# host, port and dbname must equal the pins, so a namespace user cannot point the platform's
# password at a server of their choosing (the operator would log in there as the admin, and any
# server it logs in to learns enough to replay or relay it), nor use another team's Secret.
# Annotations, not keys: the platform sees and reviews them with `kubectl get -o yaml` without
# reading the password, and only those who may write the Secret can write them (their names:
# ``annotations.SECRET_*``).

SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's sslmodes, weakest first."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SecretRef:
    """A Secret a Database names, with its namespace resolved (the Database's when omitted)."""

    field: str
    """``adminSecretRef`` or ``caSecretRef``: the spec field, for messages."""
    namespace: str
    name: str

    def where(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Secret:
    """A Secret as read from the API: its ``data`` (base64) and its annotations."""

    namespace: str
    name: str
    data: Mapping[str, str] = dataclasses.field(repr=False)
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)


def secret_refs(spec: Mapping[str, Any], *, namespace: str) -> tuple[SecretRef, SecretRef | None]:
    """The admin Secret and the CA Secret (None when there is none) a Database in ``namespace``
    names, each in its own ``namespace`` or the Database's."""
    admin = spec.get("adminSecretRef") or {}
    ca = spec.get("caSecretRef")
    admin_ref = SecretRef(
        field="adminSecretRef",
        namespace=str(admin.get("namespace") or namespace),
        name=str(admin.get("name") or ""),
    )
    if not isinstance(ca, Mapping):
        return admin_ref, None
    ca_ref = SecretRef(
        field="caSecretRef", namespace=str(ca.get("namespace") or namespace), name=str(ca.get("name") or "")
    )
    return admin_ref, ca_ref


def granted(secret: Secret, *, ref: SecretRef, namespace: str, spec: Mapping[str, Any]) -> Problem | None:
    """Why a Database in ``namespace`` may not use ``secret`` (None: it may).

    A Secret in the Database's own namespace is always usable (whoever can write the Database
    can read it anyway). One elsewhere must grant the namespace; an admin Secret must also pin
    the Database's host, port and dbname, and an sslmode no weaker than its floor."""
    if secret.namespace == namespace:
        return None
    allowed = _names(secret.annotations.get(annotations.SECRET_ALLOWED_NAMESPACES, ""))
    if namespace not in allowed:
        return Problem(
            reason="SecretNotGranted",
            message=f"the Secret {ref.where()} named by spec.{ref.field} is in another namespace and "
            f"is not granted to namespace {namespace!r}"
            + (f" (it is granted to {', '.join(sorted(allowed))})" if allowed else "")
            + f"; the platform must annotate it {annotations.SECRET_ALLOWED_NAMESPACES}=<comma-separated "
            f"namespaces including {namespace}>, or the Database must name a Secret of its own namespace",
        )
    if ref.field != "adminSecretRef":
        return None
    chosen = {
        role: str(key)
        for role, default in (("usernameKey", "username"), ("passwordKey", "password"))
        if (key := (spec.get("adminSecretRef") or {}).get(role)) and key != default
    }
    if chosen:
        # The team must not choose how the platform's Secret is read: naming its password as
        # the username put the password into the connection error, the status and an Event.
        return Problem(
            reason="SecretKeysFixed",
            message=f"spec.adminSecretRef.{' and '.join(sorted(chosen))} may not be set for a Secret in "
            "another namespace: the platform's Secret is read by its keys username and password; "
            "remove the field",
        )
    return _pinned(secret, ref=ref, spec=spec)


def _pinned(secret: Secret, *, ref: SecretRef, spec: Mapping[str, Any]) -> Problem | None:
    notes = secret.annotations
    pins = {
        annotations.SECRET_HOST: "host",
        annotations.SECRET_PORT: "port",
        annotations.SECRET_DBNAME: "dbname",
    }
    missing = [key for key in pins if not notes.get(key, "").strip()]
    if missing:
        return Problem(
            reason="TargetNotPinned",
            message=f"the Secret {ref.where()} named by spec.adminSecretRef is used from another "
            "namespace, so it must name the one server it is for; the platform must annotate it "
            + ", ".join(f"{key}=<{pins[key]}>" for key in missing),
        )
    actual = {
        annotations.SECRET_HOST: _host(str(spec.get("host") or "")),
        annotations.SECRET_PORT: str(int(spec.get("port") or 5432)),
        annotations.SECRET_DBNAME: str(spec.get("dbname") or ""),
    }
    wanted = {
        annotations.SECRET_HOST: _host(notes[annotations.SECRET_HOST]),
        annotations.SECRET_PORT: notes[annotations.SECRET_PORT].strip(),
        annotations.SECRET_DBNAME: notes[annotations.SECRET_DBNAME].strip(),
    }
    wrong = [
        f"spec.{pins[key]} is {actual[key]!r}, the Secret's {key} is {wanted[key]!r}"
        for key in pins
        if actual[key] != wanted[key]
    ]
    floor = notes.get(annotations.SECRET_MIN_SSLMODE, "verify-full").strip()
    sslmode = str(spec.get("sslmode") or "verify-full")
    if floor not in SSLMODES:
        wrong.append(f"the Secret's {annotations.SECRET_MIN_SSLMODE} {floor!r} is not an sslmode")
    elif sslmode not in SSLMODES or SSLMODES.index(sslmode) < SSLMODES.index(floor):
        wrong.append(
            f"spec.sslmode {sslmode!r} is weaker than the Secret's {annotations.SECRET_MIN_SSLMODE} {floor!r}"
        )
    if not wrong:
        return None
    return Problem(
        reason="TargetMismatch",
        message=f"the Secret {ref.where()} named by spec.adminSecretRef is for another server: "
        + "; ".join(wrong)
        + "; the operator did not connect. Point the Database at the server the Secret names, or "
        "have the platform grant a Secret for this one",
    )


def _names(text: str) -> set[str]:
    return {part.strip() for part in text.split(",") if part.strip()}


def _host(text: str) -> str:
    return text.strip().rstrip(".").lower()


def target(
    spec: Mapping[str, Any],
    *,
    namespace: str,
    admin_secret: Secret | None,
    ca_secret: Secret | None,
) -> Target | Problem:
    """The connection target from the spec of a Database in ``namespace`` and the Secrets it
    names (None: the Secret does not exist), or why it cannot be used. Nothing here connects:
    a Problem means the operator must not."""
    admin_ref, ca_ref = secret_refs(spec, namespace=namespace)
    admin_name = admin_ref.where() if admin_ref.namespace != namespace else admin_ref.name
    if admin_secret is None:
        return Problem(
            reason="AdminSecretMissing",
            message=f"the Secret {admin_name!r} named by spec.adminSecretRef does not exist"
            + (" in this namespace" if admin_ref.namespace == namespace else "")
            + "; create it with the admin role's username and password",
        )
    problem = granted(admin_secret, ref=admin_ref, namespace=namespace, spec=spec)
    if problem is not None:
        return problem
    admin_ref_spec = spec.get("adminSecretRef") or {}
    fields: dict[str, str] = {}
    for role, default in (("usernameKey", "username"), ("passwordKey", "password")):
        key = str(admin_ref_spec.get(role) or default)
        value = _decoded(admin_secret.data, key)
        if not value:
            return Problem(
                reason="AdminSecretIncomplete",
                message=f"the Secret {admin_name!r} has no non-empty key {key!r} "
                f"(spec.adminSecretRef.{role}); add it or point {role} at the key that holds it",
            )
        fields[role] = value
    ca_pem = None
    if ca_ref is not None:
        ca_pem_or_problem = _ca(spec, ca_ref=ca_ref, ca_secret=ca_secret, namespace=namespace)
        if isinstance(ca_pem_or_problem, Problem):
            return ca_pem_or_problem
        untrusted = _ca_not_trusted(admin_ref, ca_ref, namespace=namespace)
        if untrusted is not None:
            return untrusted
        ca_pem = ca_pem_or_problem
    return Target(
        host=str(spec["host"]),
        port=int(spec.get("port") or 5432),
        dbname=str(spec["dbname"]),
        sslmode=str(spec.get("sslmode") or "verify-full"),
        user=fields["usernameKey"],
        password=fields["passwordKey"],
        ca_pem=ca_pem,
    )


def grant_problem(
    spec: Mapping[str, Any],
    *,
    namespace: str,
    admin_secret: Secret | None,
    ca_secret: Secret | None,
) -> Problem | None:
    """What refuses a Database in ``namespace`` at admission: the Secrets it names (None: not
    read, or not there) are not granted to it or are for another server, or its CA is one the
    namespace could swap. The same Problems :func:`target` gives (reason and message), so the
    answer at ``kubectl apply`` is the status the controller would write; what the Secrets hold
    (missing keys, no PEM) is left to the controller, which reports it."""
    admin_ref, ca_ref = secret_refs(spec, namespace=namespace)
    if admin_secret is not None:
        problem = granted(admin_secret, ref=admin_ref, namespace=namespace, spec=spec)
        if problem is not None:
            return problem
    if ca_ref is None:
        return None
    if ca_secret is not None:
        problem = granted(ca_secret, ref=ca_ref, namespace=namespace, spec=spec)
        if problem is not None:
            return problem
    return _ca_not_trusted(admin_ref, ca_ref, namespace=namespace)


def _ca_not_trusted(admin_ref: SecretRef, ca_ref: SecretRef, *, namespace: str) -> Problem | None:
    """A platform admin Secret with a CA from the Database's own namespace: refused."""
    if admin_ref.namespace == namespace or ca_ref.namespace != namespace:
        return None
    return Problem(
        reason="CASecretNotTrusted",
        message=f"spec.adminSecretRef names the Secret {admin_ref.where()!r} of another namespace, but "
        f"spec.caSecretRef names {ca_ref.name!r} in this one: whoever may write Secrets here "
        "could swap the CA and intercept the admin's login. Name a CA Secret the platform "
        f"keeps and grants (caSecretRef.namespace, e.g. {admin_ref.namespace!r}), or omit "
        "caSecretRef to use the system trust store",
    )


def _ca(
    spec: Mapping[str, Any], *, ca_ref: SecretRef, ca_secret: Secret | None, namespace: str
) -> str | Problem:
    ca_name = ca_ref.where() if ca_ref.namespace != namespace else ca_ref.name
    ca_key = str((spec.get("caSecretRef") or {}).get("key") or "ca.crt")
    if ca_secret is not None:
        problem = granted(ca_secret, ref=ca_ref, namespace=namespace, spec=spec)
        if problem is not None:
            return problem
    ca_pem = _decoded(ca_secret.data, ca_key) if ca_secret is not None else None
    if not ca_pem or "-----BEGIN CERTIFICATE-----" not in ca_pem:
        return Problem(
            reason="CASecretInvalid",
            message=f"the Secret {ca_name!r} named by spec.caSecretRef "
            + ("does not exist" if ca_secret is None else f"has no PEM certificate under {ca_key!r}")
            + "; it must hold the CA bundle that signs the server's certificate",
        )
    return ca_pem


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
