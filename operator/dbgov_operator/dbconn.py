"""Open the operator's admin connection to a governed database, and check what it may do.

The I/O half of ``databases``: the Database controller checks a server with it, and minting
(``pgapply``) runs its plans over the connection it opens. The password goes to libpq as a
connection parameter, never into a connection string that an error message could echo; a CA
bundle from a Secret is written to a private temporary file only for as long as the handshake.
``resolve`` reads the Secrets a Database names (in its namespace or, granted, the platform's)
and returns a target only when ``databases`` judges them usable: nothing connects before that.
``admission`` reads the same Secrets for the validating webhook, which refuses a Database whose
Secrets are not granted to it before it is stored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes.client
import psycopg
from kubernetes.client.exceptions import ApiException

from dbgov_operator import databases

CONNECT_TIMEOUT_SECONDS = 10

_CHECK = """
SELECT pg_catalog.current_setting('server_version'),
       r.rolsuper OR r.rolcreaterole,
       pg_catalog.has_database_privilege(pg_catalog.current_database(), 'CREATE')
FROM pg_catalog.pg_roles r WHERE r.rolname = current_user
"""


def resolve(client: Any, *, namespace: str, spec: Mapping[str, Any]) -> databases.Target | databases.Problem:
    """Read the Secrets a Database in ``namespace`` names and judge them: a target to connect
    to, or why the operator must not (ApiException for anything but 403/404)."""
    admin_ref, ca_ref = databases.secret_refs(spec, namespace=namespace)
    read: dict[str, databases.Secret | None] = {}
    for ref in (admin_ref, ca_ref):
        if ref is None:
            continue
        found = _read(client, ref)
        if isinstance(found, databases.Problem):
            return found
        read[ref.field] = found
    return databases.target(
        spec,
        namespace=namespace,
        admin_secret=read.get("adminSecretRef"),
        ca_secret=read.get("caSecretRef"),
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """What the validating webhook answers about a Database."""

    refused: databases.Problem | None
    """Why it is refused (the reason and message its status would carry), or None."""
    warnings: tuple[str, ...] = ()
    """What could not be judged now (a Secret not there yet, or not readable): the Database is
    admitted and the controller reports it in its status."""


def admission(client: Any, *, namespace: str, spec: Mapping[str, Any]) -> Admission:
    """Read the Secrets a Database in ``namespace`` names and judge their grants now, so a
    Database that could never be used is refused at ``kubectl apply`` rather than only reported
    in its status afterwards (``databases.grant_problem``)."""
    admin_ref, ca_ref = databases.secret_refs(spec, namespace=namespace)
    read: dict[str, databases.Secret | None] = {}
    warnings: list[str] = []
    for ref in (admin_ref, ca_ref):
        if ref is None or not ref.name:
            continue
        try:
            found = _read(client, ref)
        except ApiException as err:
            found = databases.Problem(
                reason="SecretNotReadable",
                message=f"the operator could not read the Secret {ref.where()} named by spec.{ref.field} "
                f"({err.status} {err.reason})",
            )
        if isinstance(found, databases.Problem):
            warnings.append(
                f"{found.message}; its grant was not checked, the Database's status will say more"
            )
            found = None
        elif found is None:
            warnings.append(
                f"the Secret {ref.where()} named by spec.{ref.field} does not exist (yet); "
                "the Database's status will say when it can be used"
            )
        read[ref.field] = found
    refused = databases.grant_problem(
        spec,
        namespace=namespace,
        admin_secret=read.get("adminSecretRef"),
        ca_secret=read.get("caSecretRef"),
    )
    return Admission(refused=refused, warnings=tuple(warnings))


def _read(client: Any, ref: databases.SecretRef) -> databases.Secret | databases.Problem | None:
    if not ref.name:
        return None
    core: Any = kubernetes.client.CoreV1Api(client)  # models out, held untyped
    try:
        body = core.read_namespaced_secret(ref.name, ref.namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        if err.status == 403:
            return databases.Problem(
                reason="SecretNotReadable",
                message=f"the operator may not read the Secret {ref.where()} named by spec.{ref.field}: "
                f"grant it get on Secrets in namespace {ref.namespace!r} (chart values "
                "rbac.platformSecretsNamespace or rbac.databaseSecretNamespaces)",
            )
        raise
    return databases.Secret(
        namespace=ref.namespace,
        name=ref.name,
        data=dict(body.data or {}),
        annotations=dict(body.metadata.annotations or {}),
    )


@contextlib.contextmanager
def connect(target: databases.Target, *, autocommit: bool = True) -> Iterator[psycopg.Connection[Any]]:
    """A connection as the admin role (psycopg.OperationalError when the server cannot be
    reached or refuses the login)."""
    with _ca_file(target.ca_pem) as ca_path:
        params: dict[str, Any] = {
            "host": target.host,
            "port": target.port,
            "dbname": target.dbname,
            "user": target.user,
            "password": target.password,
            "sslmode": target.sslmode,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "application_name": "dbgov-operator",
        }
        if ca_path is not None:
            params["sslrootcert"] = ca_path
        conn = psycopg.connect(autocommit=autocommit, **params)
    try:
        yield conn
    finally:
        conn.close()


def check(target: databases.Target) -> databases.Check | databases.Problem:
    """Connect and read what the admin role may do; a Problem names why it could not."""
    try:
        with connect(target) as conn:
            row = conn.execute(_CHECK).fetchone()
    except psycopg.OperationalError as err:
        return databases.Problem(reason=_reason(err), message=_message(err, target))
    except psycopg.Error as err:
        return databases.Problem(reason="CheckFailed", message=f"the check query failed: {err}")
    if row is None:
        return databases.Problem(reason="CheckFailed", message="the admin role is not in pg_roles")
    return databases.Check(
        server_version=str(row[0]), can_create_roles=bool(row[1]), can_create_schema=bool(row[2])
    )


def _reason(err: psycopg.OperationalError) -> str:
    # libpq reports a refused login as text: psycopg has no SQLSTATE for connection failures.
    state, text = getattr(err, "sqlstate", None), str(err)
    if state in {"28P01", "28000"} or "password authentication failed" in text:
        return "AuthenticationFailed"
    if state == "3D000" or ('database "' in text and "does not exist" in text):
        return "DatabaseMissing"
    return "Unreachable"


def _message(err: psycopg.OperationalError, target: databases.Target) -> str:
    """Why the operator could not connect, for the Database's status and Events, which the
    Database's namespace reads: never the admin Secret's values (libpq's text names the user,
    and a user or password can be any key of the Secret), so they are cut out of it."""
    text = " ".join(str(err).split())
    for secret in {target.user, target.password}:
        if secret:
            text = text.replace(secret, "<from the admin Secret>")
    where = f"{target.host}:{target.port}/{target.dbname} (sslmode={target.sslmode})"
    hint = {
        "AuthenticationFailed": "check the username and password in spec.adminSecretRef's Secret",
        "DatabaseMissing": "create the database or fix spec.dbname (immutable: recreate the Database)",
    }.get(_reason(err), "check spec.host, spec.port, spec.sslmode and the network path to the server")
    return f"cannot connect to {where}: {text}; {hint}"


@contextlib.contextmanager
def _ca_file(pem: str | None) -> Iterator[str | None]:
    if pem is None:
        yield None
        return
    fd, path = tempfile.mkstemp(prefix="dbgov-ca-", suffix=".pem")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(pem)
        yield path
    finally:
        os.unlink(path)
