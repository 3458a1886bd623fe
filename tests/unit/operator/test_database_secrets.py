"""Which Secrets a Database may use (attack finding F2): the pure checks in ``databases``.

A Secret in the Database's own namespace is usable as before. One in another namespace (the
platform's) is used only when it grants the Database's namespace and, for the admin Secret,
pins the host, port and dbname the Database names and an sslmode floor. Every refusal names
the reason and what the platform must annotate; nothing here connects.
"""

import base64
from typing import Any

import pytest

from dbgov_operator import annotations, databases, settings, webhook

PLATFORM = "dbgov-platform"
PASSWORD = "s3cret-admin-password"
PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
PINS = {
    annotations.SECRET_ALLOWED_NAMESPACES: "team-a, team-c",
    annotations.SECRET_HOST: "pg.platform.svc",
    annotations.SECRET_PORT: "5432",
    annotations.SECRET_DBNAME: "orders",
    annotations.SECRET_MIN_SSLMODE: "verify-ca",
}


ADMISSION_REASONS = (
    "SecretNotGranted",
    "SecretKeysFixed",
    "TargetNotPinned",
    "TargetMismatch",
    "CASecretNotTrusted",
)
"""What the validating webhook refuses a Database for (the controller reports the rest)."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "host": "pg.platform.svc",
        "port": 5432,
        "dbname": "orders",
        "sslmode": "verify-full",
        "adminSecretRef": {"name": "orders-admin", "namespace": PLATFORM},
    }
    spec.update(changes)
    return spec


def _admin(namespace: str = PLATFORM, /, **notes: str | None) -> databases.Secret:
    annotations = {k: v for k, v in {**PINS, **notes}.items() if v is not None}
    return databases.Secret(
        namespace=namespace,
        name="orders-admin",
        data={"username": _b64("postgres"), "password": _b64(PASSWORD)},
        annotations=annotations,
    )


def _ca(namespace: str = PLATFORM, /, **notes: str) -> databases.Secret:
    return databases.Secret(namespace=namespace, name="pg-ca", data={"ca.crt": _b64(PEM)}, annotations=notes)


def _target(
    spec: dict[str, Any],
    *,
    namespace: str = "team-a",
    admin: databases.Secret | None = None,
    ca: databases.Secret | None = None,
) -> databases.Target | databases.Problem:
    admin_secret = admin if admin is not None else _admin()
    found = databases.target(spec, namespace=namespace, admin_secret=admin_secret, ca_secret=ca)
    # Every case is judged at admission too: the same refusal (reason and message), or none.
    early = databases.grant_problem(spec, namespace=namespace, admin_secret=admin_secret, ca_secret=ca)
    refused_early = isinstance(found, databases.Problem) and found.reason in ADMISSION_REASONS
    assert early == (found if refused_early else None), (found, early)
    return found


def _problem(outcome: databases.Target | databases.Problem) -> databases.Problem:
    assert isinstance(outcome, databases.Problem), outcome
    assert PASSWORD not in outcome.message
    return outcome


def test_refs_default_to_the_databases_namespace() -> None:
    admin, ca = databases.secret_refs(
        {"adminSecretRef": {"name": "a"}, "caSecretRef": {"name": "c"}}, namespace="x"
    )
    assert (admin.namespace, admin.name, admin.field) == ("x", "a", "adminSecretRef")
    assert ca is not None and (ca.namespace, ca.name, ca.field) == ("x", "c", "caSecretRef")
    admin, ca = databases.secret_refs(_spec(), namespace="team-a")
    assert admin.where() == f"{PLATFORM}/orders-admin" and ca is None


def test_a_granted_pinned_platform_secret_gives_the_target() -> None:
    found = _target(_spec())
    assert isinstance(found, databases.Target)
    assert (found.host, found.port, found.dbname, found.user, found.password) == (
        "pg.platform.svc",
        5432,
        "orders",
        "postgres",
        PASSWORD,
    )
    assert PASSWORD not in repr(found)


def test_a_same_namespace_secret_needs_no_annotation() -> None:
    spec = _spec(adminSecretRef={"name": "orders-admin"}, host="anywhere", sslmode="disable")
    found = _target(spec, admin=_admin("team-a", **dict.fromkeys(PINS)))
    assert isinstance(found, databases.Target) and found.host == "anywhere"


@pytest.mark.parametrize(
    ("namespace", "allowed"),
    [
        ("team-b", "team-a, team-c"),  # another team's grant
        ("team-a", None),  # no grant at all
        ("team-a", ""),
        ("team-a", "team-ab,team"),  # exact names, no prefixes
        ("team-a", "*"),  # no wildcard
    ],
)
def test_a_secret_not_granted_to_the_namespace_is_refused(namespace: str, allowed: str | None) -> None:
    admin = _admin(**{annotations.SECRET_ALLOWED_NAMESPACES: allowed})
    problem = _problem(_target(_spec(), namespace=namespace, admin=admin))
    assert problem.reason == "SecretNotGranted"
    assert f"{PLATFORM}/orders-admin" in problem.message and repr(namespace) in problem.message
    assert annotations.SECRET_ALLOWED_NAMESPACES in problem.message


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"host": "evil.team-a.svc"}, "spec.host"),
        ({"port": 5433}, "spec.port"),
        ({"dbname": "postgres"}, "spec.dbname"),
        ({"sslmode": "require"}, "spec.sslmode"),
        ({"sslmode": "disable"}, "spec.sslmode"),
    ],
)
def test_a_database_pointing_elsewhere_is_refused(change: dict[str, Any], named: str) -> None:
    problem = _problem(_target(_spec(**change)))
    assert problem.reason == "TargetMismatch"
    assert named in problem.message and "did not connect" in problem.message


def test_host_comparison_ignores_case_and_the_root_dot() -> None:
    assert isinstance(_target(_spec(host="PG.platform.svc.")), databases.Target)


def test_the_sslmode_floor_defaults_to_verify_full() -> None:
    admin = _admin(**{annotations.SECRET_MIN_SSLMODE: None})
    problem = _problem(_target(_spec(sslmode="verify-ca"), admin=admin))
    assert problem.reason == "TargetMismatch" and "'verify-full'" in problem.message
    assert isinstance(_target(_spec(), admin=admin), databases.Target)
    bogus = _admin(**{annotations.SECRET_MIN_SSLMODE: "strict"})
    assert _problem(_target(_spec(), admin=bogus)).reason == "TargetMismatch"


def test_an_unpinned_platform_secret_is_refused_naming_what_to_annotate() -> None:
    admin = _admin(**{annotations.SECRET_PORT: None, annotations.SECRET_DBNAME: " "})
    problem = _problem(_target(_spec(), admin=admin))
    assert problem.reason == "TargetNotPinned"
    assert annotations.SECRET_PORT in problem.message and annotations.SECRET_DBNAME in problem.message
    assert annotations.SECRET_HOST not in problem.message


def test_a_missing_platform_secret_names_its_namespace() -> None:
    problem = databases.target(_spec(), namespace="team-a", admin_secret=None, ca_secret=None)
    assert isinstance(problem, databases.Problem) and problem.reason == "AdminSecretMissing"
    assert f"{PLATFORM}/orders-admin" in problem.message


def test_a_platform_ca_must_be_granted_but_not_pinned() -> None:
    spec = _spec(caSecretRef={"name": "pg-ca", "namespace": PLATFORM})
    granted = _ca(**{annotations.SECRET_ALLOWED_NAMESPACES: "team-a"})
    found = _target(spec, ca=granted)
    assert isinstance(found, databases.Target) and found.ca_pem == PEM
    problem = _problem(_target(spec, ca=_ca()))
    assert problem.reason == "SecretNotGranted" and "spec.caSecretRef" in problem.message


def test_a_platform_admin_secret_with_a_workload_namespace_ca_is_refused() -> None:
    spec = _spec(caSecretRef={"name": "pg-ca"})
    problem = _problem(_target(spec, ca=_ca("team-a")))
    assert problem.reason == "CASecretNotTrusted" and "caSecretRef.namespace" in problem.message


def test_a_workload_admin_secret_may_use_a_granted_platform_ca() -> None:
    spec = _spec(
        adminSecretRef={"name": "orders-admin"}, caSecretRef={"name": "pg-ca", "namespace": PLATFORM}
    )
    ca = _ca(**{annotations.SECRET_ALLOWED_NAMESPACES: "team-a"})
    assert isinstance(_target(spec, admin=_admin("team-a"), ca=ca), databases.Target)


def test_granted_judges_nothing_for_the_own_namespace() -> None:
    ref = databases.SecretRef(field="adminSecretRef", namespace="team-a", name="x")
    secret = databases.Secret(namespace="team-a", name="x", data={})
    assert databases.granted(secret, ref=ref, namespace="team-a", spec={}) is None


def test_admission_refuses_only_what_the_grants_decide() -> None:
    # What the Secret holds is the controller's to report: an admin Secret without its keys is
    # admitted, though the Database cannot be used yet.
    empty = databases.Secret(namespace=PLATFORM, name="orders-admin", data={}, annotations=PINS)
    assert _problem(_target(_spec(), admin=empty)).reason == "AdminSecretIncomplete"
    # Secrets not read (not there yet, or the operator may not read them) refuse nothing...
    assert databases.grant_problem(_spec(), namespace="team-b", admin_secret=None, ca_secret=None) is None
    # ... but a platform admin Secret with a CA of the workload's namespace needs no read.
    spec = _spec(caSecretRef={"name": "pg-ca"})
    problem = databases.grant_problem(spec, namespace="team-a", admin_secret=None, ca_secret=None)
    assert problem is not None and problem.reason == "CASecretNotTrusted"


def test_the_webhook_configuration_validates_databases_within_five_seconds_failing_closed() -> None:
    config = settings.Settings(namespace="dbgov")
    hooks = webhook.validating_webhooks(
        config, client_config={"url": "https://127.0.0.1:1/x", "caBundle": "Y2E="}
    )
    (hook,) = [h for h in hooks if h["name"] == webhook.DATABASE_VALIDATION_ID]
    (rule,) = hook["rules"]
    assert (rule["apiGroups"], rule["resources"], rule["scope"]) == (
        ["dbgov.io"],
        ["databases"],
        "Namespaced",
    )
    assert rule["operations"] == ["CREATE", "UPDATE"]  # the status subresource is not matched
    assert hook["clientConfig"]["url"].endswith("/" + webhook.DATABASE_VALIDATION_ID)
    assert (hook["failurePolicy"], hook["timeoutSeconds"], hook["sideEffects"]) == ("Fail", 5, "None")


def test_a_team_cannot_choose_which_keys_of_the_platforms_secret_are_read() -> None:
    """Naming the password key as the username put the platform's admin password into the
    connection error, the Database's status and an Event its namespace reads."""
    for ref in (
        {"usernameKey": "password"},
        {"passwordKey": "username"},
        {"usernameKey": "x", "passwordKey": "y"},
    ):
        spec = _spec(adminSecretRef={"name": "orders-admin", "namespace": PLATFORM, **ref})
        problem = _problem(_target(spec))
        assert problem.reason == "SecretKeysFixed" and "remove the field" in problem.message
    # the defaults spelt out are fine, and a Secret of the Database's own namespace keeps its keys
    spelt = _spec(adminSecretRef={"name": "orders-admin", "namespace": PLATFORM, "usernameKey": "username"})
    assert isinstance(_target(spelt), databases.Target)


def test_a_connection_error_never_carries_the_admin_secrets_values() -> None:
    import psycopg

    from dbgov_operator import dbconn

    target = databases.Target(
        host="pg", port=5432, dbname="orders", sslmode="disable", user=PASSWORD, password="pw-2", ca_pem=None
    )
    err = psycopg.OperationalError(f'FATAL:  password authentication failed for user "{PASSWORD}" (pw-2)')
    message = dbconn._message(err, target)
    assert PASSWORD not in message and "pw-2" not in message
    assert "password authentication failed" in message and "pg:5432/orders" in message
