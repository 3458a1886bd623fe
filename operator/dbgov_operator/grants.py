"""A policy, compiled a second time: into the privileges of the workload's database group role.

Why: the proxy judges every statement, but a parser miss, a proxy bug or a workload that
reaches the database directly with its minted credentials must still meet PostgreSQL's own
refusal ("one policy, enforced twice", design principle 1). This module is PURE: a
`CompiledPolicy` (from `dbgov_policy.compile`) plus the database's catalog facts (passed in as
data, read by `pgapply.read_catalog`) in, the group role's privileges and masking views out.
`credentials.plan` diffs them against what the database holds; `pgapply` executes the diff.

How a rule becomes a privilege. For every table of the catalog (system schemas and the
operator's own `dbgov_masked` excluded) and every privilege, the policy's rules are read the
way the proxy reads them, first match wins, then `default`:

  SELECT      a `select` (or `copy-to`: COPY ... TO reads with SELECT) statement is allowed
  INSERT      an `insert` (or `copy-from`) statement is allowed
  UPDATE      an `update` statement is allowed (SELECT ... FOR UPDATE is an update class too)
  DELETE      a `delete` statement is allowed
  TRUNCATE    a `truncate` statement is allowed
  REFERENCES,
  TRIGGER     a `create` (DDL) statement on the table is allowed (a foreign key or a trigger
              is created against the table)

A rule with no `tables` covers every table of the catalog. A `block` rule that comes first
removes the privilege; an `approve` rule grants nothing: a human-approved statement runs
through the proxy (the lead's wiring, later), never with the workload's own privileges.
`merge` grants nothing of its own (it would need INSERT, UPDATE and DELETE at once); a policy
that allows MERGE but not the classes it is made of is refused by the database (fail closed).
DDL on existing tables (ALTER, DROP) needs ownership, which a minted role never gets.
`mode: dry-run` relaxes only the proxy: the grants still follow the rules.

- Schemas: USAGE on every schema holding a table with a privilege; CREATE only when an `allow`
  rule covers `create` for every relation of the schema (no `tables`, or a `schema.*` pattern)
  and no earlier non-allow rule covers `create` for any relation in it.
- Sequences owned by a table (serial, identity) get USAGE and SELECT where INSERT is granted.

Masked columns (the design; docs/credentials.md tells it to operators). Masks follow
inheritance as in the proxy (`with_inheritance`): children and partitions of a masked table,
and parents of one, are masked tables too. A view with its owner's rights (or a materialized
view) that reads a masked table gets no SELECT at all: it would return the raw values. A role that connects
directly, bypassing the proxy, must not read a masked column raw. So on a masked table the
group role gets SELECT on the *unmasked columns only* (column privileges): `SELECT *`, a
WHERE/ORDER BY/RETURNING naming a masked column, or a whole-row reference is refused by
PostgreSQL with 42501. Reads of masked values go through one masking view per (group role,
masked table) in the operator-owned schema `dbgov_masked`:

    CREATE VIEW dbgov_masked."<schema>.<table>.<group hash>" WITH (security_barrier) AS
      SELECT src.id, <mask_expression(src.email)>::text AS email, ...
      FROM <schema>.<table> AS src [CROSS JOIN LATERAL (SELECT ipad, opad FROM
           dbgov_masked.hmac_keys WHERE group_role = '<group>') AS k]

owned by the admin role (a view reads its tables with its owner's privileges), the group role
granted SELECT on the view only. The masked columns apply exactly the expressions the proxy
uses (`dbgov_policy.mask.mask_expression`), so the view and the proxy agree byte for byte.

The `hash` mask's HMAC key must not appear in the view's text: any role can read view
definitions (pg_get_viewdef). It lives, as its two HMAC pads (equivalent to the key), in the
table `dbgov_masked.hmac_keys` that no workload role may read; the view joins it and the view
owner's privileges read it. We deliberately do NOT read the key through a SECURITY DEFINER
function: PostgreSQL checks EXECUTE on functions a view calls against the *invoking* role, so
the workload role would need EXECUTE on it and could call it to get the key (or, for a function
that hashes, use it as an oracle to hash guesses of low-entropy values such as SSNs). The join
gives the workload no callable path to the key at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, mask, model

MASKED_SCHEMA = "dbgov_masked"
"""The operator's schema for masking views and the HMAC key table."""
KEY_TABLE = "hmac_keys"
"""`dbgov_masked.hmac_keys(group_role name PRIMARY KEY, ipad bytea, opad bytea)`: no workload
role has any privilege on it."""
SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema", "pg_toast", MASKED_SCHEMA})

ObjectType = Literal["schema", "table", "column", "sequence"]
PrivilegeName = Literal[
    "SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER", "USAGE", "CREATE"
]

#: Table privilege → the statement classes (coarse, fine) whose allowance grants it.
TABLE_PRIVILEGES: dict[PrivilegeName, tuple[tuple[str, str], ...]] = {
    "SELECT": (("select", "select"), ("copy", "copy-to")),
    "INSERT": (("insert", "insert"), ("copy", "copy-from")),
    "UPDATE": (("update", "update"),),
    "DELETE": (("delete", "delete"),),
    "TRUNCATE": (("ddl", "truncate"),),
    "REFERENCES": (("ddl", "create"),),
    "TRIGGER": (("ddl", "create"),),
}
_CREATE = ("ddl", "create")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Table:
    """One relation of the database's catalog (table, view, partitioned or foreign table)."""

    schema: str
    name: str
    columns: tuple[str, ...]
    sequences: tuple[model.QualifiedName, ...] = ()
    """Sequences the table owns (serial and identity columns)."""
    ancestors: tuple[model.QualifiedName, ...] = ()
    """Every table it inherits from or is a partition of, transitively (pg_inherits)."""
    reads: tuple[model.QualifiedName, ...] = ()
    """For a view or materialized view: the relations its query reads (pg_depend)."""
    definer_rights: bool = False
    """A view that reads its relations with its owner's privileges (not security_invoker), or
    a materialized view (its rows are stored as read)."""

    @property
    def qname(self) -> model.QualifiedName:
        return model.QualifiedName(schema=self.schema, name=self.name)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Catalog:
    """The catalog facts grants are compiled against (`pgapply.read_catalog` reads them)."""

    schemas: tuple[str, ...]
    tables: tuple[Table, ...]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Privilege:
    """One privilege of a role on one object; `column` only for column privileges."""

    object_type: ObjectType
    schema: str
    name: str = ""
    """The table or sequence (empty for a schema)."""
    column: str = ""
    privilege: PrivilegeName

    def __str__(self) -> str:
        where = (
            self.schema + (f".{self.name}" if self.name else "") + (f"({self.column})" if self.column else "")
        )
        return f"{self.privilege} on {self.object_type} {where}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MaskingView:
    """A view in `dbgov_masked` that reads one masked table with the policy's masks applied."""

    name: str
    source: model.QualifiedName
    select_sql: str
    """The view's query (no key in it); `pgapply` wraps it in CREATE VIEW."""
    uses_key: bool

    @property
    def digest(self) -> str:
        """What the view's COMMENT carries, so a changed definition is seen and replaced."""
        return hashlib.sha256(f"{self.source}\0{self.select_sql}".encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class HmacPads:
    """The HMAC-SHA256 inner and outer pads of the mask key (as good as the key: secret)."""

    ipad: bytes = dataclasses.field(repr=False)
    opad: bytes = dataclasses.field(repr=False)

    @property
    def digest(self) -> str:
        """A fingerprint to notice a changed key without reading it back in the clear."""
        return hashlib.sha256(self.ipad + self.opad).hexdigest()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class GroupGrants:
    """Everything a group role should hold in one database."""

    privileges: frozenset[Privilege]
    views: tuple[MaskingView, ...] = ()
    pads: HmacPads | None = None
    """Set when a view applies a `hash` mask."""


def compile_grants(policy: model.CompiledPolicy, catalog: Catalog, *, group_role: str) -> GroupGrants:
    """The privileges and masking views of ``group_role`` for ``policy`` on ``catalog``."""
    policy = with_inheritance(policy, catalog)
    privileges: set[Privilege] = set()
    views: list[MaskingView] = []
    hiding = _views_over_masked(policy, catalog)
    for table in sorted(_user_tables(catalog), key=lambda t: (t.schema, t.name)):
        rel = table.qname
        allowed = {
            p for p, classes in TABLE_PRIVILEGES.items() if any(_allows(policy, c, rel) for c in classes)
        }
        if rel in hiding:
            allowed.discard("SELECT")
        masks = {m.column: m for m in policy.masks_for(rel) if m.column in table.columns}
        for p in sorted(allowed):
            if p == "SELECT" and masks:
                privileges.update(_column(rel, c, "SELECT") for c in table.columns if c not in masks)
            else:
                privileges.add(Privilege(object_type="table", schema=rel.schema, name=rel.name, privilege=p))
        if "INSERT" in allowed:
            for seq in table.sequences:
                for p in ("USAGE", "SELECT"):
                    privileges.add(
                        Privilege(object_type="sequence", schema=seq.schema, name=seq.name, privilege=p)
                    )
        if "SELECT" in allowed and masks:
            views.append(
                masking_view(table, tuple(masks.values()), group_role=group_role, key=policy.mask_key)
            )
        if allowed:
            privileges.add(Privilege(object_type="schema", schema=rel.schema, privilege="USAGE"))
    for schema in _user_schemas(catalog):
        if _may_create_in(policy, schema):
            privileges.add(Privilege(object_type="schema", schema=schema, privilege="CREATE"))
            privileges.add(Privilege(object_type="schema", schema=schema, privilege="USAGE"))
    sequence_schemas = {p.schema for p in privileges if p.object_type == "sequence"}
    privileges.update(Privilege(object_type="schema", schema=s, privilege="USAGE") for s in sequence_schemas)
    if views:
        privileges.add(Privilege(object_type="schema", schema=MASKED_SCHEMA, privilege="USAGE"))
    pads = hmac_pads(policy.mask_key) if any(v.uses_key for v in views) else None
    return GroupGrants(privileges=frozenset(privileges), views=tuple(views), pads=pads)


def with_inheritance(policy: model.CompiledPolicy, catalog: Catalog) -> model.CompiledPolicy:
    """``policy`` with the masks inheritance implies, as the proxy applies them: a child or
    partition of a masked table reads the same values (its own grant would expose them raw),
    and a parent read without ONLY returns its masked descendants' rows."""
    masked = policy.masked_tables
    if not masked:
        return policy
    inherits = {
        t.qname: tuple(a for a in t.ancestors if a in masked)
        for t in catalog.tables
        if set(t.ancestors) & masked
    }
    below: dict[model.QualifiedName, list[tuple[model.QualifiedName, str]]] = {}
    columns = {t.qname: t.columns for t in catalog.tables}
    for t in catalog.tables:
        for m in policy.masks_for(t.qname):
            for parent in t.ancestors:
                if m.column in columns.get(parent, ()):
                    below.setdefault(parent, []).append((t.qname, m.column))
    return policy.with_descendants(inherits, {p: tuple(v) for p, v in below.items()})


def _views_over_masked(policy: model.CompiledPolicy, catalog: Catalog) -> frozenset[model.QualifiedName]:
    """Definer-rights views and materialized views that read a masked table, directly or through
    other views: SELECT on them would return its masked columns raw, whatever the column
    privileges say, so they get none (fail closed; a `security_invoker` view is checked against
    the reader's own column privileges and is left to the rules)."""
    masked = set(policy.masked_tables)
    reads = {t.qname: set(t.reads) for t in catalog.tables if t.reads}
    tainted: set[model.QualifiedName] = set()
    changed = True
    while changed:
        changed = False
        for view, sources in reads.items():
            if view not in tainted and sources & (masked | tainted):
                tainted.add(view)
                changed = True
    definer = {t.qname for t in catalog.tables if t.definer_rights}
    return frozenset(tainted & definer)


def _column(rel: model.QualifiedName, column: str, p: PrivilegeName) -> Privilege:
    return Privilege(object_type="column", schema=rel.schema, name=rel.name, column=column, privilege=p)


def _user_schemas(catalog: Catalog) -> list[str]:
    return sorted(s for s in catalog.schemas if s not in SYSTEM_SCHEMAS and not s.startswith("pg_"))


def _user_tables(catalog: Catalog) -> Iterable[Table]:
    user = set(_user_schemas(catalog))
    return (t for t in catalog.tables if t.schema in user)


def _covers_class(statements: frozenset[str] | None, cls: tuple[str, str]) -> bool:
    """As `dbgov_policy.decide` reads a rule's `statements` for a statement of class ``cls``."""
    if statements is None:
        return True
    coarse, fine = cls
    if coarse in statements or fine in statements:
        return True
    return bool(policy_compile.FINE_TO_COARSE.get(fine, frozenset()) & statements)


def _allows(policy: model.CompiledPolicy, cls: tuple[str, str], rel: model.QualifiedName) -> bool:
    """Whether the first rule covering a ``cls`` statement on ``rel`` (else the default) allows it."""
    for rule in policy.rules:
        if _covers_class(rule.statements, cls) and rule.covers_relation(rel):
            return rule.verdict == "allow"
    return policy.default == "allow"


def _may_create_in(policy: model.CompiledPolicy, schema: str) -> bool:
    """CREATE on a schema lets the role name any new relation in it, so it is granted only when
    every relation of the schema would be allowed: the first rule that could cover a `create`
    there must allow it and cover the whole schema."""
    everything = model.QualifiedName(schema=schema, name="*")
    for rule in policy.rules:
        if not _covers_class(rule.statements, _CREATE):
            continue
        whole = rule.tables is None or rule.covers_relation(everything)
        some = whole or any(_schema_matches(p, schema) for p in rule.tables or ())
        if not some:
            continue
        return (
            rule.verdict == "allow"
            and whole
            and all(p.name == "*" for p in rule.tables or () if _schema_matches(p, schema))
        )
    return policy.default == "allow"


def _schema_matches(pattern: model.TablePattern, schema: str) -> bool:
    return pattern.matches(model.QualifiedName(schema=schema, name=pattern.name))


def view_name(source: model.QualifiedName, *, group_role: str) -> str:
    """`<schema>.<table>.<group hash>`, at most 63 bytes (a long table name is cut and hashed)."""
    suffix = "." + group_role.removeprefix("dbgov_g_")[:12]
    base = f"{source.schema}.{source.name}"
    if len((base + suffix).encode()) > 63:
        base = (
            base.encode()[:40].decode(errors="ignore") + "~" + hashlib.sha256(base.encode()).hexdigest()[:8]
        )
    return base + suffix


def hmac_pads(key: str) -> HmacPads:
    """The pads `mask.mask_expression` writes into its text for ``key``."""
    ipad, opad = mask._hmac_pads(key)
    return HmacPads(ipad=bytes.fromhex(ipad), opad=bytes.fromhex(opad))


def _pad_literal(pad: bytes) -> str:
    return "E'\\\\x" + pad.hex() + "'::pg_catalog.bytea"


def masking_view(table: Table, masks: tuple[model.Mask, ...], *, group_role: str, key: str) -> MaskingView:
    """The masking view of ``table`` for ``group_role``: the proxy's mask expressions, with the
    `hash` key's pads read from `dbgov_masked.hmac_keys` instead of written in the text."""
    by_column: Mapping[str, model.Mask] = {m.column: m for m in masks}
    pads = hmac_pads(key)
    fields: list[str] = []
    uses_key = False
    for column in table.columns:
        src = f"src.{mask.quote_ident(column)}"
        m = by_column.get(column)
        if m is None:
            fields.append(src)
            continue
        if m.strategy == "hash" and not key:
            raise ValueError(
                f"{table.schema}.{table.name}.{column} has a hash mask but the mask key is empty: "
                "give the operator its HMAC key Secret (an empty key makes hashes guessable)"
            )
        expr = mask.mask_expression(m, src, key=key)
        if m.strategy == "hash":
            expr = _swap(expr, _pad_literal(pads.ipad), "k.ipad")
            expr = _swap(expr, _pad_literal(pads.opad), "k.opad")
            uses_key = True
        fields.append(f"({expr})::pg_catalog.text AS {mask.quote_ident(column)}")
    source = f"{mask.quote_ident(table.schema)}.{mask.quote_ident(table.name)}"
    sql = f"SELECT {', '.join(fields)} FROM {source} AS src"
    if uses_key:
        sql += (
            f" CROSS JOIN LATERAL (SELECT ipad, opad FROM {MASKED_SCHEMA}.{KEY_TABLE}"
            f" WHERE group_role = {mask.quote_literal(group_role)}) AS k"
        )
    return MaskingView(
        name=view_name(table.qname, group_role=group_role),
        source=table.qname,
        select_sql=sql,
        uses_key=uses_key,
    )


def _swap(expr: str, literal: str, column: str) -> str:
    if expr.count(literal) != 1:
        raise ValueError(
            "the hash mask's expression no longer carries its key pad as one literal, so the "
            "masking view could not keep the key out of its text; update grants.masking_view "
            "to follow dbgov_policy.mask.mask_expression"
        )
    return expr.replace(literal, column)


def compile_composed_grants(
    policies: Sequence[model.CompiledPolicy], catalog: Catalog, *, group_role: str
) -> GroupGrants:
    """The privileges and masking views of ``group_role`` for several policies composed (a
    namespace's policy under the cluster baselines that bind the same workload): as in the proxy,
    the strictest answer wins, so a privilege is granted only where every policy grants it, and
    the masks are the union (each column its strictest mask), so no policy's masked column is
    granted raw and the masking views mask what any policy masks."""
    if not policies:
        raise ValueError("a composition needs at least one policy")
    masks = compose.union_masks(policies)
    each = [
        compile_grants(dataclasses.replace(p, masks=masks), catalog, group_role=group_role) for p in policies
    ]
    privileges = set(each[0].privileges)
    for other in each[1:]:
        privileges &= other.privileges
    readable = {
        (p.schema, p.name)
        for p in privileges
        if p.object_type in ("table", "column") and p.privilege == "SELECT"
    }
    views = tuple(v for v in each[0].views if (v.source.schema, v.source.name) in readable)
    masked_usage = Privilege(object_type="schema", schema=MASKED_SCHEMA, privilege="USAGE")
    if views:
        privileges.add(masked_usage)
    else:
        privileges.discard(masked_usage)
    pads = each[0].pads if any(v.uses_key for v in views) else None
    return GroupGrants(privileges=frozenset(privileges), views=views, pads=pads)
