"""The I/O half of minted credentials: read a database's state, execute a `credentials` plan.

Why separate: `credentials.plan` is pure and decides; this module only talks to PostgreSQL
(psycopg 3, every name and value quoted by `psycopg.sql.Identifier` / `Literal`). It is
idempotent action by action (creating what exists, dropping what is gone and granting what is
held all converge), so a plan that was half-applied when the operator died is finished by
reading the state again and planning again; nothing is kept in memory between runs.

Transactions: each role's consecutive actions run in one transaction (`roles_per_transaction`
batches several roles into one for bulk work). `TerminateSessions` runs outside a transaction,
after the NOLOGIN before it has committed: a session terminated before NOLOGIN is visible
could log straight back in.

Revocation hands nothing to the admin. A revoked role's objects (a view a migration made, a
SECURITY DEFINER function) go to its group role or the database's quarantine role, never to
the admin (a superuser): a view owned by the admin reads masked columns raw, a SECURITY
DEFINER function owned by it runs anything as superuser. Before they change hands, views are
made `security_invoker` (readers need their own rights) and SECURITY DEFINER routines lose
every grant (PUBLIC's too), so only their new owner's members may call them, with its rights.
A role that owns objects in OTHER databases of the server (any role may connect where PUBLIC
has CONNECT) is cleaned up there too when the caller can connect there (``connect``); when
that fails its DROP ROLE fails with `RoleNotDropped` naming those databases.

The connection must be to the governed database, as the admin role (superuser, or CREATEROLE
with the role memberships REASSIGN OWNED needs; it owns the masking views and reads the tables
they mask), with autocommit on.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql

from dbgov_operator import credentials, grants
from dbgov_policy import model
from dbgov_sidecar.pgwire import auth

SCRAM_ITERATIONS = 4096
"""PostgreSQL's default scram_iterations."""
TERMINATE_WAIT_MS = 5000
"""How long pg_terminate_backend waits for each session to exit."""


Connect = Callable[[str], contextlib.AbstractContextManager[psycopg.Connection[Any]]]
"""Opens an autocommit admin connection to another database of the same server, by name."""


class RoleNotDropped(RuntimeError):
    """DROP ROLE failed because the role still owns objects or holds privileges somewhere the
    operator could not clean up; the role stays NOLOGIN and the next plan tries again."""

    def __init__(self, *, role: str, databases: Sequence[str], cause: str) -> None:
        self.role = role
        self.databases = tuple(databases)
        self.cause = cause
        where = ", ".join(self.databases) or "this database"
        super().__init__(
            f"role {role} cannot be dropped: it still owns objects or holds privileges in database(s) "
            f"{where} ({cause}); it stays NOLOGIN and is retried. Let the operator's admin connect "
            "there, or run REASSIGN OWNED BY / DROP OWNED BY it in each of them; REVOKE CONNECT ON "
            "DATABASE <db> FROM PUBLIC keeps minted roles out of databases they are not meant for"
        )


def new_secret(password: str | None = None) -> credentials.Secret:
    """A fresh password (32 random bytes, URL-safe) and its SCRAM-SHA-256 verifier, salted at
    random; only the verifier ever reaches the server (and its logs)."""
    password = password if password is not None else secrets.token_urlsafe(32)
    keys = auth.scram_keys(password, salt=secrets.token_bytes(16), iterations=SCRAM_ITERATIONS)
    return credentials.Secret(password=password, verifier=keys.verifier())


# -- reading ---------------------------------------------------------------------------------

_ROLES = """
SELECT r.rolname, r.rolcanlogin,
       CASE WHEN pg_catalog.isfinite(r.rolvaliduntil) THEN r.rolvaliduntil END,
       pg_catalog.shobj_description(r.oid, 'pg_authid'),
       ARRAY(SELECT g.rolname FROM pg_catalog.pg_auth_members m
             JOIN pg_catalog.pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid ORDER BY 1)
FROM pg_catalog.pg_roles r
WHERE pg_catalog.starts_with(r.rolname, %(prefix)s)
ORDER BY 1
"""

_PRIVILEGES = """
SELECT g.rolname, CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'table' END,
       n.nspname, c.relname, '', a.privilege_type
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL pg_catalog.aclexplode(c.relacl) a
JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
WHERE pg_catalog.starts_with(g.rolname, %(prefix)s) AND n.nspname <> %(masked)s
UNION ALL
SELECT g.rolname, 'column', n.nspname, c.relname, at.attname, a.privilege_type
FROM pg_catalog.pg_attribute at
JOIN pg_catalog.pg_class c ON c.oid = at.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL pg_catalog.aclexplode(at.attacl) a
JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
WHERE at.attacl IS NOT NULL AND pg_catalog.starts_with(g.rolname, %(prefix)s) AND n.nspname <> %(masked)s
UNION ALL
SELECT g.rolname, 'schema', n.nspname, '', '', a.privilege_type
FROM pg_catalog.pg_namespace n
CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
JOIN pg_catalog.pg_roles g ON g.oid = a.grantee
WHERE pg_catalog.starts_with(g.rolname, %(prefix)s)
"""

_VIEWS = """
SELECT c.relname, pg_catalog.obj_description(c.oid, 'pg_class')
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(masked)s AND c.relkind = 'v'
"""

_KEY_TABLE_EXISTS = "SELECT pg_catalog.to_regclass(%(table)s) IS NOT NULL"

_CATALOG_SCHEMAS = "SELECT nspname FROM pg_catalog.pg_namespace ORDER BY 1"

_CATALOG_TABLES = """
SELECT n.nspname, c.relname,
       ARRAY(SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT sn.nspname FROM pg_catalog.pg_depend d
             JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace
             WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = c.oid
               AND d.deptype IN ('a', 'i') ORDER BY s.relname),
       ARRAY(SELECT s.relname FROM pg_catalog.pg_depend d
             JOIN pg_catalog.pg_class s ON s.oid = d.objid AND s.relkind = 'S'
             WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = c.oid
               AND d.deptype IN ('a', 'i') ORDER BY s.relname),
       ARRAY(WITH RECURSIVE up(oid) AS (
               SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid
               UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid)
             SELECT pn.nspname FROM up JOIN pg_catalog.pg_class p ON p.oid = up.oid
             JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace ORDER BY p.oid),
       ARRAY(WITH RECURSIVE up(oid) AS (
               SELECT i.inhparent FROM pg_catalog.pg_inherits i WHERE i.inhrelid = c.oid
               UNION SELECT i.inhparent FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.oid)
             SELECT p.relname FROM up JOIN pg_catalog.pg_class p ON p.oid = up.oid ORDER BY p.oid),
       ARRAY(SELECT DISTINCT ON (d.refobjid) rn.nspname FROM pg_catalog.pg_rewrite r
             JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
               AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refobjid <> c.oid
             JOIN pg_catalog.pg_class rc ON rc.oid = d.refobjid
             JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
             WHERE r.ev_class = c.oid ORDER BY d.refobjid),
       ARRAY(SELECT DISTINCT ON (d.refobjid) rc.relname FROM pg_catalog.pg_rewrite r
             JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
               AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.refobjid <> c.oid
             JOIN pg_catalog.pg_class rc ON rc.oid = d.refobjid
             WHERE r.ev_class = c.oid ORDER BY d.refobjid),
       c.relkind = 'm' OR (c.relkind = 'v' AND NOT EXISTS (
             SELECT 1 FROM pg_catalog.unnest(c.reloptions) o
             WHERE o OPERATOR(pg_catalog.~*) '^security_invoker=(true|on|yes|1)$'))
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname <> ALL (%(system)s) AND n.nspname NOT LIKE 'pg\\_%%'
ORDER BY 1, 2
"""


def read_catalog(conn: psycopg.Connection[Any]) -> grants.Catalog:
    """The connected database's schemas, relations, their columns and owned sequences."""
    schemas = tuple(row[0] for row in conn.execute(_CATALOG_SCHEMAS))
    tables = tuple(
        grants.Table(
            schema=schema,
            name=name,
            columns=tuple(columns),
            sequences=_names(seq_schemas, seq_names),
            ancestors=_names(up_schemas, up_names),
            reads=_names(read_schemas, read_names),
            definer_rights=definer,
        )
        for (
            schema,
            name,
            columns,
            seq_schemas,
            seq_names,
            up_schemas,
            up_names,
            read_schemas,
            read_names,
            definer,
        ) in conn.execute(_CATALOG_TABLES, {"system": sorted(grants.SYSTEM_SCHEMAS)})
    )
    return grants.Catalog(schemas=schemas, tables=tables)


def _names(schemas: list[str], names: list[str]) -> tuple[model.QualifiedName, ...]:
    return tuple(model.QualifiedName(schema=s, name=n) for s, n in zip(schemas, names, strict=True))


def read_state(conn: psycopg.Connection[Any]) -> credentials.Actual:
    """The `dbgov_` roles (cluster-wide), their memberships and comments, and the group roles'
    privileges, masking views and key rows in the connected database."""
    roles = tuple(
        credentials.ActualRole(
            name=name, can_login=login, valid_until=until, comment=comment, member_of=frozenset(member_of)
        )
        for name, login, until, comment, member_of in conn.execute(_ROLES, {"prefix": credentials.PREFIX})
    )
    held: dict[str, set[grants.Privilege]] = {}
    for role, kind, schema, name, column, privilege in conn.execute(
        _PRIVILEGES, {"prefix": credentials.GROUP_PREFIX, "masked": grants.MASKED_SCHEMA}
    ):
        held.setdefault(role, set()).add(
            grants.Privilege(object_type=kind, schema=schema, name=name, column=column, privilege=privilege)
        )
    views = []
    for name, comment in conn.execute(_VIEWS, {"masked": grants.MASKED_SCHEMA}):
        meta = _json(comment)
        views.append(
            credentials.ActualView(
                name=name, group_role=str(meta.get("group", "")), digest=str(meta.get("digest", ""))
            )
        )
    key_table = f"{grants.MASKED_SCHEMA}.{grants.KEY_TABLE}"
    has_keys = bool(_scalar(conn, _KEY_TABLE_EXISTS, {"table": key_table}))
    digests: dict[str, str] = {}
    if has_keys:
        query = sql.SQL(
            "SELECT group_role, pg_catalog.encode(pg_catalog.sha256(ipad || opad), 'hex') FROM {}.{}"
        ).format(sql.Identifier(grants.MASKED_SCHEMA), sql.Identifier(grants.KEY_TABLE))
        digests = {str(row[0]): str(row[1]) for row in conn.execute(query)}
    return credentials.Actual(
        roles=roles,
        privileges={role: frozenset(p) for role, p in held.items()},
        views=tuple(views),
        key_digests=digests,
        masking_schema=has_keys,
    )


def _json(text: str | None) -> dict[str, Any]:
    try:
        data = json.loads(text or "")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _scalar(conn: psycopg.Connection[Any], query: str, params: dict[str, Any]) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


# -- applying --------------------------------------------------------------------------------


def apply(
    conn: psycopg.Connection[Any],
    actions: Sequence[credentials.Action],
    *,
    roles_per_transaction: int = 1,
    connect: Connect | None = None,
) -> list[credentials.Action]:
    """Execute ``actions`` in order; return those applied (for the audit events).

    The connection's current user is the admin: it owns the masking views. A revoked role's
    objects go where its `DropRole` says (its group or the quarantine role); ``connect`` opens
    the other databases where it owns something (without it they are not cleaned up and
    its drop fails with `RoleNotDropped`). An error stops the run with the transaction in
    progress rolled back; reading the state and planning again converges.
    """
    if not conn.autocommit:
        raise ValueError("pgapply.apply needs an autocommit connection: it commits per role itself")
    done: list[credentials.Action] = []
    for batch in _transactions(actions, roles_per_transaction):
        if len(batch) == 1 and isinstance(batch[0], credentials.TerminateSessions):
            _terminate(conn, batch[0])
        else:
            # Other databases first, each committed on its own: the drop below needs them clean.
            left = {
                a.role: _disown_elsewhere(conn, a, connect)
                for a in batch
                if isinstance(a, credentials.DropRole) and connect is not None
            }
            with conn.transaction():
                for action in batch:
                    if isinstance(action, credentials.DropRole):
                        _drop_role(conn, action, cleanup=left.get(action.role, ()))
                    else:
                        _execute(conn, action)
        done.extend(batch)
    return done


def _transactions(actions: Sequence[credentials.Action], per: int) -> Iterator[list[credentials.Action]]:
    batch: list[credentials.Action] = []
    roles: set[str] = set()
    for action in actions:
        if isinstance(action, credentials.TerminateSessions):
            if batch:
                yield batch
            yield [action]
            batch, roles = [], set()
            continue
        if batch and action.role not in roles and len(roles) >= per:
            yield batch
            batch, roles = [], set()
        batch.append(action)
        roles.add(action.role)
    if batch:
        yield batch


def _ident(name: str) -> sql.Identifier:
    return sql.Identifier(name)


def _exists(conn: psycopg.Connection[Any], role: str) -> bool:
    return bool(_scalar(conn, "SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = %(r)s", {"r": role}))


def _comment(conn: psycopg.Connection[Any], role: str, owner: credentials.Owner | None) -> None:
    if owner is not None:
        conn.execute(sql.SQL("COMMENT ON ROLE {} IS {}").format(_ident(role), sql.Literal(owner.comment())))


def _execute(conn: psycopg.Connection[Any], action: credentials.Action) -> None:
    match action:
        case credentials.EnsureMaskingSchema():
            _ensure_masking_schema(conn)
        case credentials.CreateGroupRole():
            if not _exists(conn, action.role):
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(_ident(action.role)))
            _comment(conn, action.role, action.owner)
        case credentials.SetMaskKey():
            _set_key(conn, action.role, action.pads)
        case credentials.DropMaskingView():
            conn.execute(
                sql.SQL("DROP VIEW IF EXISTS {}.{}").format(_ident(grants.MASKED_SCHEMA), _ident(action.view))
            )
        case credentials.CreateMaskingView():
            _create_view(conn, action.role, action.view)
        case credentials.RevokePrivileges():
            for p in action.privileges:
                conn.execute(sql.SQL("REVOKE {}").format(_grant_clause(p, "FROM", action.role)))
        case credentials.GrantPrivileges():
            for p in action.privileges:
                conn.execute(sql.SQL("GRANT {}").format(_grant_clause(p, "TO", action.role)))
        case credentials.CreateLoginRole():
            _create_login(conn, action)
        case credentials.RenewLoginRole():
            _renew(conn, action)
        case credentials.SetMembership():
            for group in action.add:
                conn.execute(sql.SQL("GRANT {} TO {}").format(_ident(group), _ident(action.role)))
            for group in action.remove:
                conn.execute(sql.SQL("REVOKE {} FROM {}").format(_ident(group), _ident(action.role)))
        case credentials.DisableLogin():
            if _exists(conn, action.role):
                conn.execute(sql.SQL("ALTER ROLE {} NOLOGIN").format(_ident(action.role)))
        case credentials.DropRole():
            _drop_role(conn, action, cleanup=())
        case credentials.TerminateSessions():
            raise AssertionError("TerminateSessions runs outside a transaction")


def _ensure_masking_schema(conn: psycopg.Connection[Any]) -> None:
    schema, table = _ident(grants.MASKED_SCHEMA), _ident(grants.KEY_TABLE)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    conn.execute(sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(schema))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.{} (group_role name PRIMARY KEY, ipad bytea NOT NULL, opad bytea NOT NULL)"
        ).format(schema, table)
    )
    conn.execute(sql.SQL("REVOKE ALL ON TABLE {}.{} FROM PUBLIC").format(schema, table))


def _set_key(conn: psycopg.Connection[Any], role: str, pads: grants.HmacPads | None) -> None:
    table = sql.SQL("{}.{}").format(_ident(grants.MASKED_SCHEMA), _ident(grants.KEY_TABLE))
    if pads is None:
        conn.execute(sql.SQL("DELETE FROM {} WHERE group_role = %s").format(table), (role,))
        return
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (group_role, ipad, opad) VALUES (%s, %s, %s) "
            "ON CONFLICT (group_role) DO UPDATE SET ipad = EXCLUDED.ipad, opad = EXCLUDED.opad"
        ).format(table),
        (role, pads.ipad, pads.opad),
    )


def _create_view(conn: psycopg.Connection[Any], role: str, view: grants.MaskingView) -> None:
    name = sql.SQL("{}.{}").format(_ident(grants.MASKED_SCHEMA), _ident(view.name))
    meta = json.dumps(
        {"dbgov": 1, "group": role, "source": str(view.source), "digest": view.digest}, sort_keys=True
    )
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(name))
    # select_sql is built by grants.masking_view from quoted identifiers and the proxy's mask
    # expressions; it holds no value from outside the catalog and the policy.
    conn.execute(
        sql.SQL("CREATE VIEW {} WITH (security_barrier) AS ").format(name) + sql.SQL(view.select_sql)
    )
    conn.execute(sql.SQL("COMMENT ON VIEW {} IS {}").format(name, sql.Literal(meta)))
    conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(name, _ident(role)))


def _grant_clause(p: grants.Privilege, direction: str, role: str) -> sql.Composed:
    word: sql.Composable = sql.SQL(p.privilege)  # a PrivilegeName literal, never user text
    target: sql.Composable
    if p.object_type == "schema":
        target = sql.SQL("SCHEMA {}").format(_ident(p.schema))
    elif p.object_type == "sequence":
        target = sql.SQL("SEQUENCE {}.{}").format(_ident(p.schema), _ident(p.name))
    else:
        target = sql.SQL("TABLE {}.{}").format(_ident(p.schema), _ident(p.name))
    if p.object_type == "column":
        word = sql.SQL("{} ({})").format(word, _ident(p.column))
    return sql.SQL("{} ON {} {} {}").format(word, target, sql.SQL(direction), _ident(role))


def _valid_until(when: datetime.datetime) -> sql.Literal:
    return sql.Literal(when.astimezone(datetime.UTC).isoformat())


def _create_login(conn: psycopg.Connection[Any], action: credentials.CreateLoginRole) -> None:
    role = _ident(action.role)
    verb = "ALTER" if _exists(conn, action.role) else "CREATE"
    conn.execute(
        sql.SQL(
            "{} ROLE {} LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS "
            "PASSWORD {} VALID UNTIL {}"
        ).format(sql.SQL(verb), role, sql.Literal(action.secret.verifier), _valid_until(action.valid_until))
    )
    for group in action.groups:
        conn.execute(sql.SQL("GRANT {} TO {}").format(_ident(group), role))
    _comment(conn, action.role, action.owner)


def _renew(conn: psycopg.Connection[Any], action: credentials.RenewLoginRole) -> None:
    if action.secret is None:
        query = sql.SQL("ALTER ROLE {} VALID UNTIL {}").format(
            _ident(action.role), _valid_until(action.valid_until)
        )
    else:
        query = sql.SQL("ALTER ROLE {} PASSWORD {} VALID UNTIL {}").format(
            _ident(action.role), sql.Literal(action.secret.verifier), _valid_until(action.valid_until)
        )
    conn.execute(query)


_HOLDING = """
SELECT DISTINCT d.datname FROM pg_catalog.pg_shdepend s
JOIN pg_catalog.pg_database d ON d.oid = s.dbid
WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass
  AND s.refobjid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %(r)s)
  AND d.datname <> pg_catalog.current_database()
ORDER BY 1
"""
"""The other databases where the role owns objects or holds privileges."""

_OWNS_HERE = """
SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_shdepend s
  JOIN pg_catalog.pg_database d ON d.oid = s.dbid AND d.datname = pg_catalog.current_database()
  WHERE s.refclassid = 'pg_catalog.pg_authid'::pg_catalog.regclass AND s.deptype = 'o'
    AND s.refobjid = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %(r)s))
"""

# regclass / regprocedure text is PostgreSQL's own quoted, schema-qualified name of the object,
# made to be read back as SQL: it carries no text from outside the catalog unquoted.
_OWN_VIEWS = """
SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_class c
WHERE c.relkind = 'v' AND c.relowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %(r)s)
ORDER BY c.oid
"""
_OWN_DEFINER_ROUTINES = """
SELECT p.oid::pg_catalog.regprocedure::text,
       ARRAY(SELECT DISTINCT g.rolname FROM pg_catalog.aclexplode(p.proacl) a
             JOIN pg_catalog.pg_roles g ON g.oid = a.grantee WHERE a.grantee <> p.proowner)
FROM pg_catalog.pg_proc p
WHERE p.prosecdef AND p.proowner = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %(r)s)
ORDER BY p.oid
"""


def _drop_role(
    conn: psycopg.Connection[Any], action: credentials.DropRole, *, cleanup: Sequence[str]
) -> None:
    role = action.role
    if not _exists(conn, role):
        return
    elsewhere = [str(row[0]) for row in conn.execute(_HOLDING, {"r": role})]
    if _scalar(conn, _OWNS_HERE, {"r": role}):
        target = action.reassign_to if _exists(conn, action.reassign_to) else action.quarantine.role_name()
        _disown(conn, role, target=target, quarantine=action.quarantine)
    conn.execute(sql.SQL("DROP OWNED BY {}").format(_ident(role)))  # its privileges, here and shared
    try:
        conn.execute(sql.SQL("DROP ROLE {}").format(_ident(role)))
    except psycopg.errors.DependentObjectsStillExist as err:
        detail = " ".join(f"{err.diag.message_primary or err}: {err.diag.message_detail or ''}".split())
        if cleanup:
            detail += "; cleaning up failed: " + "; ".join(cleanup)
        elif elsewhere:
            detail += "; the operator was given no connection to clean up there"
        raise RoleNotDropped(role=role, databases=elsewhere, cause=detail) from err


def _disown(conn: psycopg.Connection[Any], role: str, *, target: str, quarantine: credentials.Owner) -> None:
    """Defang the role's views and SECURITY DEFINER routines in the connected database, then
    REASSIGN OWNED BY it TO ``target`` (created first when it is the quarantine role)."""
    if target == quarantine.role_name() and not _exists(conn, target):
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN NOINHERIT").format(_ident(target)))
        _comment(conn, target, quarantine)
    if int(_scalar(conn, "SELECT pg_catalog.current_setting('server_version_num')::int", {})) >= 150000:
        for (view,) in conn.execute(_OWN_VIEWS, {"r": role}).fetchall():
            conn.execute(sql.SQL("ALTER VIEW {} SET (security_invoker = true)").format(sql.SQL(view)))
    for routine, grantees in conn.execute(_OWN_DEFINER_ROUTINES, {"r": role}).fetchall():
        conn.execute(sql.SQL("REVOKE ALL ON ROUTINE {} FROM PUBLIC").format(sql.SQL(routine)))
        for grantee in grantees:
            conn.execute(
                sql.SQL("REVOKE ALL ON ROUTINE {} FROM {}").format(sql.SQL(routine), _ident(grantee))
            )
    conn.execute(sql.SQL("REASSIGN OWNED BY {} TO {}").format(_ident(role), _ident(target)))


def _disown_elsewhere(
    conn: psycopg.Connection[Any], action: credentials.DropRole, connect: Connect
) -> list[str]:
    """Clean up what the role owns in the server's other databases: their objects go to the
    quarantine role (the group's grants are this database's only), its privileges are revoked.
    Returns why a database could not be cleaned up (the DROP ROLE then fails naming it)."""
    failed: list[str] = []
    if not _exists(conn, action.role):
        return failed
    for (name,) in conn.execute(_HOLDING, {"r": action.role}).fetchall():
        try:
            with connect(str(name)) as other, other.transaction():
                if _scalar(other, _OWNS_HERE, {"r": action.role}):
                    quarantine = action.quarantine.role_name()
                    _disown(other, action.role, target=quarantine, quarantine=action.quarantine)
                other.execute(sql.SQL("DROP OWNED BY {}").format(_ident(action.role)))
        except psycopg.Error as err:
            failed.append(f"{name}: {' '.join(str(err).split())}")
    return failed


def _terminate(conn: psycopg.Connection[Any], action: credentials.Action) -> None:
    conn.execute(
        "SELECT pg_catalog.pg_terminate_backend(pid, %(wait)s) FROM pg_catalog.pg_stat_activity "
        "WHERE usename = %(role)s AND pid <> pg_catalog.pg_backend_pid()",
        {"role": action.role, "wait": TERMINATE_WAIT_MS},
    )
