"""The seam between the proxy and the policy engine.

The session asks a ``Policy`` for a decision on every statement text (simple Query text and
every Parse). ``EnginePolicy`` adapts ``dbgov_policy.engine.Engine``; ``AllowAll`` is the stand-in
used where no policy is configured (tests, benchmarks of the bare proxy). Both are pure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from dbgov_policy import analyze, compose, engine, mask, model


class Decision(Protocol):
    """What the session reads from a policy decision (``dbgov_policy.decide.Decision``)."""

    @property
    def verdict(self) -> str: ...
    @property
    def rule(self) -> str | None: ...
    @property
    def reason(self) -> str: ...
    @property
    def hint(self) -> str | None: ...
    @property
    def sqlstate(self) -> str | None: ...
    @property
    def rewritten(self) -> str | None: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def masked_columns(self) -> tuple[str, ...]: ...
    @property
    def statements(self) -> tuple[Any, ...]: ...


TableColumns = Mapping[tuple[str, str], tuple[str, ...]]
"""(schema, table) -> the table's columns in order, from the catalog."""

Inherits = Mapping[tuple[str, str], tuple[tuple[str, str], ...]]
"""(schema, table) of a descendant of masked tables (partition or inheritance child, any depth)
-> (schema, table) of its masked ancestors, from the catalog."""

Ancestors = Mapping[tuple[str, str], tuple[tuple[str, str, str], ...]]
"""(schema, table) of an ancestor of masked tables (partitioned root, inheritance parent, any
height) -> (schema, table, column) of each masked column below it that it has by name."""


FunctionNames = tuple[frozenset[str], frozenset[tuple[str, str, str]]]
"""(names of the functions, aggregates and procedures outside pg_catalog and information_schema,
(schema, relation, column) of every column named like one of them or like a built-in that takes a
whole row), from the catalog: which calls and ``t.f`` references may run a user's function."""


class Policy(Protocol):
    """A loaded policy: decides statements for one session context at a time."""

    @property
    def mode(self) -> str:
        """'enforce' or 'dry-run'."""

    @property
    def max_rows_returned(self) -> int | None:
        """Refuse results with more rows than this (None: no limit)."""

    @property
    def max_rows_affected(self) -> int | None:
        """Roll back and refuse writes that change more rows than this (None: no limit)."""

    def new_context(
        self,
        *,
        search_path: tuple[str, ...] | None = None,
        columns: TableColumns | None = None,
        inherits: Inherits | None = None,
        ancestors: Ancestors | None = None,
        writable_at_login: bool = False,
        functions: FunctionNames | None = None,
    ) -> object:
        """Per-session state the engine keeps (prepared statement and cursor names, search_path);
        ``columns``: the columns of masked tables (and of their descendants) in the session's
        database, in order; ``inherits``: the descendants of masked tables there; ``ancestors``:
        the ancestors of masked tables there; ``writable_at_login``: the server reported
        default_transaction_read_only off at login (READ WRITE then restores it); ``functions``:
        the function names outside pg_catalog there (None: not known)."""

    def decide(self, sql: str, context: object) -> Decision:
        """The decision for one statement text."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SimpleDecision:
    """A decision made without the engine (allow-all, fixed refusals in tests)."""

    verdict: str = "allow"
    rule: str | None = None
    reason: str = "no policy configured"
    hint: str | None = None
    sqlstate: str | None = None
    rewritten: str | None = None
    fingerprint: str = ""
    masked_columns: tuple[str, ...] = ()
    statements: tuple[Any, ...] = field(default_factory=tuple)


_ALLOW = SimpleDecision()


class AllowAll:
    """Allows every statement: the proxy without policy."""

    mode = "enforce"
    max_rows_returned: int | None = None
    max_rows_affected: int | None = None
    mask_targets: tuple[tuple[str, str, str], ...] = ()

    def new_context(
        self,
        *,
        search_path: tuple[str, ...] | None = None,
        columns: TableColumns | None = None,
        inherits: Inherits | None = None,
        ancestors: Ancestors | None = None,
        writable_at_login: bool = False,
        functions: FunctionNames | None = None,
    ) -> object:
        return None

    def decide(self, sql: str, context: object) -> Decision:
        return _ALLOW


class RefuseAll:
    """Refuses every statement: the proxy while its policy is missing (fail closed)."""

    mode = "enforce"
    max_rows_returned: int | None = None
    max_rows_affected: int | None = None
    mask_targets: tuple[tuple[str, str, str], ...] = ()

    def __init__(self, reason: str, hint: str) -> None:
        self.reason = reason
        self._decision = SimpleDecision(
            verdict="block", rule="no-policy", reason=reason, hint=hint, sqlstate="42501"
        )

    def new_context(
        self,
        *,
        search_path: tuple[str, ...] | None = None,
        columns: TableColumns | None = None,
        inherits: Inherits | None = None,
        ancestors: Ancestors | None = None,
        writable_at_login: bool = False,
        functions: FunctionNames | None = None,
    ) -> object:
        return None

    def decide(self, sql: str, context: object) -> Decision:
        return self._decision


MAX_SUBSETS = 64
"""Distinct rule subsets (one per kind of end user, usually few) a policy keeps an engine for."""


def for_identity(policy: Policy, identity: model.Identity | None) -> Policy:
    """The policy that decides a session of ``identity`` (None: no verified end user): for an
    ``EnginePolicy`` with subject-scoped rules, one holding only the rules that apply to it."""
    scoped = getattr(policy, "for_identity", None)
    return policy if scoped is None else scoped(identity)


def session_context(
    *,
    search_path: tuple[str, ...] | None,
    columns: TableColumns | None,
    inherits: Inherits | None,
    ancestors: Ancestors | None,
    writable_at_login: bool,
    functions: FunctionNames | None = None,
) -> engine.SessionContext:
    """An engine session context from what the session knows of its database."""
    ctx = engine.SessionContext() if search_path is None else engine.SessionContext(search_path=search_path)
    if columns:
        ctx.columns = {model.QualifiedName(schema=s, name=t): names for (s, t), names in columns.items()}
    if inherits:
        ctx.inherits = {
            model.QualifiedName(schema=s, name=t): tuple(model.QualifiedName(schema=a, name=b) for a, b in up)
            for (s, t), up in inherits.items()
        }
    if ancestors:
        ctx.ancestors = {
            model.QualifiedName(schema=s, name=t): tuple(
                (model.QualifiedName(schema=a, name=b), c) for a, b, c in below
            )
            for (s, t), below in ancestors.items()
        }
    ctx.names.writable_at_login = writable_at_login
    ctx.functions = _functions(functions)
    return ctx


def _functions(functions: FunctionNames | None) -> analyze.Functions | None:
    if functions is None:
        return None
    names, columns = functions
    return analyze.Functions(names=frozenset(names), columns=frozenset(columns))


def learn_functions(context: object, functions: FunctionNames) -> None:
    """The session read the function names of its database again (after DDL): later statements
    are judged by them (an engine context, or each part of a composition's)."""
    facts = _functions(functions)
    for part in getattr(context, "parts", (context,)):
        if isinstance(part, engine.SessionContext):
            part.functions = facts


class _CompiledFacts:
    """What a policy adapter reads from its compiled policy once (a compiled policy never
    changes): mode, row limits and masks, which the hot path asks for on every statement."""

    def __init__(self, policy: model.CompiledPolicy) -> None:
        self._mode: str = policy.mode
        self._max_rows_returned = policy.guardrails.max_rows_returned
        self._max_rows_affected = policy.guardrails.max_rows_affected
        self.mask_targets: tuple[tuple[str, str, str], ...] = tuple(
            (m.table.schema, m.table.name, m.column) for m in policy.masks
        )
        """(schema, table, column) of every masked column, for checking result origins."""
        self._masks = {f"{m.table.schema}.{m.table.name}.{m.column}": m for m in policy.masks}
        self._mask_key = policy.mask_key

    def mask_value(self, column: str, text: str) -> str | None:
        """``text`` masked by the strategy of ``column`` ("schema.table.column"), exactly as the
        rewrite masks it in the database; None (NULL) for a column the policy does not mask."""
        rule = self._masks.get(column)
        return None if rule is None else mask.mask_text(rule, text, key=self._mask_key)

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def max_rows_returned(self) -> int | None:
        return self._max_rows_returned

    @property
    def max_rows_affected(self) -> int | None:
        return self._max_rows_affected


class EnginePolicy(_CompiledFacts):
    """Adapts ``dbgov_policy.engine.Engine`` to ``Policy``."""

    def __init__(self, eng: engine.Engine) -> None:
        self._engine = eng
        self._scoped = any(rule.subjects is not None for rule in eng.policy.rules)
        self._subsets: dict[tuple[int, ...], EnginePolicy] = {}
        super().__init__(eng.policy)

    @property
    def jwt_issuers(self) -> tuple[model.JwtIssuer, ...]:
        """The issuers the policy trusts (``authentication.jwt``)."""
        return self._engine.policy.jwt_issuers

    def for_identity(self, identity: model.Identity | None) -> EnginePolicy:
        """This policy as it applies to ``identity``: rules scoped to other subjects dropped.

        Chosen once per session, so ``decide`` and its caches stay as they are: each distinct
        subset gets one engine (with its own cache), shared by every session it applies to."""
        if not self._scoped:
            return self
        rules = self._engine.policy.rules
        chosen = tuple(
            i for i, rule in enumerate(rules) if rule.subjects is None or rule.subjects.matches(identity)
        )
        found = self._subsets.get(chosen)
        if found is None:
            eng = self._engine
            subset = dataclasses.replace(eng.policy, rules=tuple(rules[i] for i in chosen))
            found = EnginePolicy(
                engine.Engine(subset, cache_size=eng.cache_size, max_statement_size=eng.max_statement_size)
            )
            found._scoped = False  # (its rules already apply to this identity)
            if len(self._subsets) >= MAX_SUBSETS:
                self._subsets.clear()
            self._subsets[chosen] = found
        return found

    def new_context(
        self,
        *,
        search_path: tuple[str, ...] | None = None,
        columns: TableColumns | None = None,
        inherits: Inherits | None = None,
        ancestors: Ancestors | None = None,
        writable_at_login: bool = False,
        functions: FunctionNames | None = None,
    ) -> object:
        return session_context(
            search_path=search_path,
            columns=columns,
            inherits=inherits,
            ancestors=ancestors,
            writable_at_login=writable_at_login,
            functions=functions,
        )

    def decide(self, sql: str, context: object) -> Decision:
        assert isinstance(context, engine.SessionContext)
        return self._engine.decide(sql, session=context)

    @property
    def shape_key(self) -> Any:
        """``Engine.shape_key``: statement texts with the same key are decided alike when
        ``cached_shape`` says so (the compiled lane keys what it learned by it)."""
        return engine.Engine.shape_key

    def cached_rewrite(self, sql: str, context: object) -> tuple[str, Decision, Any] | None:
        """``Engine.cached_rewrite``: the shape key, the decision and the rewrite of a masked
        shape's texts (the compiled lane runs simple queries of such shapes)."""
        assert isinstance(context, engine.SessionContext)
        return self._engine.cached_rewrite(sql, session=context)

    def cached_shape(self, sql: str, context: object) -> tuple[str, Decision] | None:
        """``Engine.cached_shape``: the shape key and the one decision of every text of it."""
        assert isinstance(context, engine.SessionContext)
        return self._engine.cached_shape(sql, session=context)


class ComposedPolicy(_CompiledFacts):
    """Adapts ``dbgov_policy.compose.Composed`` (several policies bind the workload) to ``Policy``:
    each component judges with its own cached engine and the strictest answer wins."""

    def __init__(self, composed: compose.Composed) -> None:
        self._composed = composed
        whole = composed.policy
        self._scoped = any(r.subjects is not None for c in composed.components for r in c.policy.rules)
        self._subsets: dict[tuple[tuple[int, ...], ...], ComposedPolicy] = {}
        super().__init__(whole)  # (union masks with the stricter strategy, the smaller limits)

    @property
    def components(self) -> tuple[str, ...]:
        """The names of the composed policies."""
        return self._composed.names

    @property
    def jwt_issuers(self) -> tuple[model.JwtIssuer, ...]:
        """The issuers any of the policies declares: a login from any of them is accepted (whose
        rules it satisfies is ``for_identity``'s question)."""
        return self._composed.policy.jwt_issuers

    def for_identity(self, identity: model.Identity | None) -> ComposedPolicy:
        """The composition as it applies to ``identity``: in each policy, rules scoped to other
        subjects dropped (one composition per distinct subset, shared by its sessions). A policy's
        subjects match only identities of issuers it may trust (``compose.trusted_issuers``): a
        token signed by an issuer only another namespaced policy declares is, to it, no token."""
        if not self._scoped:
            return self
        chosen = tuple(
            tuple(
                i
                for i, rule in enumerate(c.policy.rules)
                if rule.subjects is None or rule.subjects.matches(identity)
            )
            for c in self._composed.components
        )
        found = self._subsets.get(chosen)
        if found is None:
            found = ComposedPolicy(
                self._composed.for_rules(
                    lambda rule: rule.subjects is None or rule.subjects.matches(identity)
                )
            )
            found._scoped = False  # (its rules already apply to this identity)
            if len(self._subsets) >= MAX_SUBSETS:
                self._subsets.clear()
            self._subsets[chosen] = found
        return found

    def new_context(
        self,
        *,
        search_path: tuple[str, ...] | None = None,
        columns: TableColumns | None = None,
        inherits: Inherits | None = None,
        ancestors: Ancestors | None = None,
        writable_at_login: bool = False,
        functions: FunctionNames | None = None,
    ) -> object:
        template = session_context(
            search_path=search_path,
            columns=columns,
            inherits=inherits,
            ancestors=ancestors,
            writable_at_login=writable_at_login,
        )
        context = self._composed.new_context(template)
        if functions is not None:
            learn_functions(context, functions)
        return context

    def decide(self, sql: str, context: object) -> Decision:
        assert isinstance(context, compose.Context)
        return self._composed.decide(sql, session=context)

    @property
    def shape_key(self) -> Any:
        """``Engine.shape_key`` (see ``EnginePolicy.shape_key``)."""
        return engine.Engine.shape_key

    def cached_shape(self, sql: str, context: object) -> tuple[str, Decision] | None:
        """``Composed.cached_shape``: the shape key and the one composed decision of its texts."""
        assert isinstance(context, compose.Context)
        return self._composed.cached_shape(sql, session=context)
