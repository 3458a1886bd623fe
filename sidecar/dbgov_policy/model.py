"""The compiled policy: what a policy document means once it has been checked.

`compile.compile_policy` is the only producer of these values; everything downstream (the
analyzer, the decision function, the proxy, the operator) reads them and never re-validates.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from typing import Literal

Verdict = Literal["allow", "mask", "approve", "block"]
RuleVerdict = Literal["allow", "approve", "block"]
Mode = Literal["enforce", "dry-run"]
Strategy = Literal["email", "partial", "redact", "hash", "null"]

VERDICTS: tuple[RuleVerdict, ...] = ("allow", "approve", "block")
MODES: tuple[Mode, ...] = ("enforce", "dry-run")
STRATEGIES: tuple[Strategy, ...] = ("email", "partial", "redact", "hash", "null")

#: How strict each verdict is; a query string's verdict is the strictest of its statements.
STRICTNESS: dict[Verdict, int] = {"allow": 0, "mask": 1, "approve": 2, "block": 3}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class QualifiedName:
    """A relation name as PostgreSQL resolves it: schema and relation, both case-folded."""

    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TablePattern:
    """One entry of a rule's `tables`: `schema.name`, where either part may use `*` and `?`."""

    schema: str
    name: str
    text: str

    def matches(self, rel: QualifiedName) -> bool:
        return fnmatch.fnmatchcase(rel.schema, self.schema) and fnmatch.fnmatchcase(rel.name, self.name)

    def schema_covered(self, schema: str) -> bool:
        """Whether a table this pattern matches may live in ``schema``."""
        return fnmatch.fnmatchcase(schema, self.schema)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who a verified token says the client is: the issuer that vouched, the subject (``sub``)
    and the claims the issuer's configuration chose to keep."""

    issuer: str
    subject: str
    claims: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def audit_fields(self) -> dict[str, object]:
        """The ``identity`` object of every audit event of the session."""
        return {"issuer": self.issuer, "subject": self.subject, "claims": dict(self.claims)}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Subjects:
    """Whom a rule applies to: a session whose verified identity matches every part given
    (``users`` globs against ``sub``; each claim: any of its values), never one with none."""

    users: tuple[str, ...] | None = None
    issuers: tuple[str, ...] | None = None
    claims: tuple[tuple[str, tuple[str, ...]], ...] = ()
    trusted: frozenset[str] | None = None
    """The issuers the rule's policy may trust, set by composition (``compose.prepared``), never
    by a document: an identity from any other issuer is, to this rule, no identity at all (so a
    namespace's own issuer cannot satisfy a baseline's subjects). None: whichever issuer the
    proxy trusted (a policy alone)."""

    def matches(self, identity: Identity | None) -> bool:
        if identity is None:
            return False
        if self.trusted is not None and identity.issuer not in self.trusted:
            return False
        if self.issuers is not None and identity.issuer not in self.issuers:
            return False
        if self.users is not None and not any(fnmatch.fnmatchcase(identity.subject, u) for u in self.users):
            return False
        for name, wanted in self.claims:
            value = identity.claims.get(name)
            have = [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
            if value is None or not any(fnmatch.fnmatchcase(h, w) for h in have for w in wanted):
                return False
        return True


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One statement rule; the first rule that covers a statement decides it."""

    name: str
    verdict: RuleVerdict
    statements: frozenset[str] | None
    """Statement classes (coarse or fine) the rule covers; None covers every class."""
    tables: tuple[TablePattern, ...] | None
    """Relations the rule covers; None covers every relation."""
    subjects: Subjects | None = None
    """End users the rule applies to; None: every session. The proxy picks, per session, the
    rules that apply to its identity and decides with an engine for just those."""

    def covers_relation(self, rel: QualifiedName) -> bool:
        return self.tables is None or any(p.matches(rel) for p in self.tables)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Guardrails:
    """Checks applied on top of whatever rule allowed a statement."""

    require_where: frozenset[str] = frozenset()
    """Statement classes (update, delete) whose WHERE must constrain a column of the target."""
    max_rows_affected: int | None = None
    """Enforced by the proxy: a write reporting more rows is rolled back."""
    max_rows_returned: int | None = None
    """Enforced by the proxy: a result with more rows fails instead of being truncated."""
    denied_functions: frozenset[str] = frozenset()
    """Qualified or bare function names refused in addition to the built-in list."""
    allowed_functions: frozenset[str] = frozenset()
    """User functions trusted not to write; others count as a `call` (a possible write)."""
    allowed_settings: dict[str, frozenset[str]] = dataclasses.field(default_factory=dict)
    """Guarded settings (search_path, ...) a session may SET, with the values allowed."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Mask:
    """One masked column and the strategy that replaces its values."""

    table: QualifiedName
    column: str
    strategy: Strategy
    keep_last: int = 4
    writable: bool = False
    """Whether UPDATE may assign the column. Off by default: the workload never sees its real
    values, so an ORM's save() would write back the masked value it read."""


JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
"""Public-key algorithms an issuer may allow."""
JWT_HMAC = ("HS256", "HS384", "HS512")
"""Shared-secret algorithms: only with ``secretFile`` (never with public key material)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class JwtIssuer:
    """One trusted token issuer, and exactly one source of its keys."""

    issuer: str
    """The exact ``iss`` its tokens carry ("" only for the legacy key flag: tokens with no ``iss``)."""
    audiences: tuple[str, ...]
    """A token's ``aud`` must name one of these (empty only for the legacy key flag)."""
    algorithms: tuple[str, ...]
    """The only ``alg`` values accepted."""
    jwks_uri: str | None = None
    discovery: bool = False
    """Find ``jwks_uri`` at ``issuer`` + ``/.well-known/openid-configuration``."""
    public_keys: tuple[str, ...] = ()
    """Static keys: PEM text, a PEM file path, or a JWK / JWK set as JSON text."""
    secret_file: str | None = None
    """File holding the HMAC secret (HS* only)."""
    claims: tuple[str, ...] = ()
    """Claims kept in the session's identity (and so in every audit event)."""
    leeway: float = 30.0
    """Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    ca_file: str | None = None
    """CA bundle for the issuer's HTTPS endpoints (None: the system store)."""
    allow_http: bool = False
    """Fetch keys over plain http (http://127.0.0.1 is always allowed, for tests)."""
    cache_seconds: float = 300.0
    """Keys fetched are used this long before they are fetched again."""
    refresh_cooldown: float = 30.0
    """An unknown ``kid`` fetches the keys again at most this often."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class CompiledPolicy:
    """A checked policy, ready for the engine."""

    mode: Mode
    default: RuleVerdict
    rules: tuple[Rule, ...]
    guardrails: Guardrails
    masks: tuple[Mask, ...]
    mask_key: str = ""
    """Secret for the keyed `hash` strategy; given by the deployment, never by the document."""
    jwt_issuers: tuple[JwtIssuer, ...] = ()
    """Issuers whose signed JWTs clients may give as their password (``authentication.jwt``)."""
    inherited: Mapping[QualifiedName, tuple[QualifiedName, ...]] = dataclasses.field(default_factory=dict)
    """Descendants (partitions, inheritance children) of masked tables → their masked ancestors,
    as one session's catalog has them; their masks are in `masks` (see `with_descendants`)."""
    contains: Mapping[QualifiedName, tuple[QualifiedName, ...]] = dataclasses.field(default_factory=dict)
    """Ancestors (partitioned roots, inheritance parents) of masked tables → the masked tables
    below them, as one session's catalog has them; their masks are in `masks`."""

    def masks_for(self, rel: QualifiedName) -> tuple[Mask, ...]:
        return tuple(m for m in self.masks if m.table == rel)

    @property
    def masked_tables(self) -> frozenset[QualifiedName]:
        return frozenset(m.table for m in self.masks)

    def with_descendants(
        self,
        inherits: Mapping[QualifiedName, tuple[QualifiedName, ...]],
        ancestors: Mapping[QualifiedName, tuple[tuple[QualifiedName, str], ...]] | None = None,
    ) -> CompiledPolicy:
        """This policy for a database where each table of ``inherits`` descends from the masked
        tables it maps to: reading it directly reads their rows, so it takes their masks, matched
        by column name (a child has every column of its parents, in any order).

        Each table of ``ancestors`` is an ancestor of masked tables, mapped to (masked table,
        column) for each masked column it has by name: reading it without ONLY reads their rows,
        so it takes those masks. With ONLY too, and on its own rows in those columns: a read of
        the ancestor is masked whatever rows it returns (fail closed)."""
        own = {(m.table, m.column) for m in self.masks}
        extra: list[Mask] = []
        for child, up in sorted(inherits.items(), key=lambda item: str(item[0])):
            for ancestor in up:
                for m in self.masks_for(ancestor):
                    if (child, m.column) not in own:
                        own.add((child, m.column))
                        extra.append(dataclasses.replace(m, table=child))
        by_column = {(m.table, m.column): m for m in self.masks}
        for parent, below in sorted((ancestors or {}).items(), key=lambda item: str(item[0])):
            for masked, column in below:
                found = by_column.get((masked, column))
                if found is not None and (parent, column) not in own:
                    own.add((parent, column))
                    extra.append(dataclasses.replace(found, table=parent))
        known = {child: tuple(up) for child, up in inherits.items() if up}
        contains = {
            parent: tuple(dict.fromkeys(masked for masked, _ in below))
            for parent, below in (ancestors or {}).items()
            if below
        }
        return dataclasses.replace(self, masks=self.masks + tuple(extra), inherited=known, contains=contains)
