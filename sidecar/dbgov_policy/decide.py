"""Analysis + policy → Decision. Pure; the engine adds caching and session state.

Order, for each statement that will run:
1. hard guardrails (always block);
2. guarded settings and session names (EXECUTE/FETCH of names never prepared/declared);
3. the first rule that covers the statement, else the built-in session basics, else the
   policy's default;
4. the policy's guardrails (requireWhere, deniedFunctions), which only make things stricter;
5. masks: a read of a masked table turns `allow` into `mask`; a statement where masking
   cannot be proven (a masked column used in a write, inside a function body, ...) is blocked.
A query string's verdict is the strictest of its statements.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from dbgov_policy import analyze, classes, compile, guards, model, names

POLICY_SQLSTATE = "42501"
SYNTAX_SQLSTATE = "42601"
LIMIT_SQLSTATE = "54000"

#: Fine classes the built-in `session-basics` rule allows when no policy rule matched.
SESSION_BASICS = frozenset(
    {
        "begin",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "set-constraints",
        "show",
        "reset",
        "discard",
        "deallocate",
        "close",
        "fetch",
        "move",
        "listen",
        "unlisten",
        "prepare",
        "declare",
        "execute",
    }
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class StatementInfo:
    """What one statement does, for `dbgov check`, audit events and metrics."""

    cls: str
    fine: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    functions: tuple[str, ...]
    verdict: model.Verdict
    rule: str | None
    nested: bool = False
    settings: tuple[str, ...] = ()
    """Settings it changes ("*": every one, as RESET ALL), which the session must learn back."""
    statement_names: tuple[str, ...] = ()
    """Prepared statement names it defines or drops (PREPARE, DEALLOCATE; "*": all of them):
    SQL and the protocol share that namespace."""

    def as_dict(self) -> dict[str, object]:
        return {
            "class": self.cls,
            "fine": self.fine,
            "reads": list(self.reads),
            "writes": list(self.writes),
            "functions": list(self.functions),
            "verdict": self.verdict,
            "rule": self.rule,
            "nested": self.nested,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """The verdict for one query string and why."""

    verdict: model.Verdict
    rule: str | None
    reason: str
    hint: str | None = None
    sqlstate: str | None = None
    rewritten: str | None = None
    fingerprint: str = ""
    statements: tuple[StatementInfo, ...] = ()
    masked_columns: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        return {
            "decision": self.verdict,
            "rule": self.rule,
            "reason": self.reason,
            "hint": self.hint,
            "sqlstate": self.sqlstate,
            "fingerprint": self.fingerprint,
            "statements": [s.as_dict() for s in self.statements],
            "masked_columns": list(self.masked_columns),
            "rewritten": self.rewritten,
        }


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Verdict:
    verdict: model.Verdict
    rule: str | None
    reason: str
    hint: str | None = None
    sqlstate: str | None = None


@dataclasses.dataclass(slots=True, kw_only=True)
class Names:
    """Session names known while judging a query string (prepared statements, cursors)."""

    prepared: set[str] = dataclasses.field(default_factory=set)
    cursors: set[str] = dataclasses.field(default_factory=set)
    writable_at_login: bool = False
    table_columns: Mapping[model.QualifiedName, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """The columns of masked tables in the session's database (from the catalog at login): what
    tells `t.id` (a column) from `t.row_to_json` (a function of the whole row)."""
    """The server reported ``default_transaction_read_only`` off when the session logged in:
    turning read-only off again only restores what the role and database gave the session."""

    def knows(self, kind: str, name: str) -> bool:
        return name in (self.prepared if kind == "prepared" else self.cursors)

    def apply(self, unit: analyze.Unit) -> None:
        for kind, name in unit.names_defined:
            (self.prepared if kind == "prepared" else self.cursors).add(name)
        for kind, name in unit.names_dropped:
            target = self.prepared if kind == "prepared" else self.cursors
            if name == "*":
                target.clear()
            else:
                target.discard(name)


def _block(rule: str, reason: str, hint: str, sqlstate: str = POLICY_SQLSTATE) -> _Verdict:
    return _Verdict(verdict="block", rule=rule, reason=reason, hint=hint, sqlstate=sqlstate)


def blocked_unparseable(reason: str, fingerprint: str = "") -> Decision:
    return Decision(
        verdict="block",
        rule="parse-error",
        reason=reason,
        hint="dbgov forwards only SQL it can analyze; check the statement's syntax.",
        sqlstate=SYNTAX_SQLSTATE,
        fingerprint=fingerprint,
    )


def _covers_class(statements: frozenset[str] | None, unit: analyze.Unit) -> bool:
    if statements is None:
        return True
    if unit.cls.coarse not in statements and unit.cls.fine not in statements:
        return False
    return all(
        extra in statements or bool(compile.FINE_TO_COARSE.get(extra, frozenset()) & statements)
        for extra in unit.extra_classes
    )


def _does_any(statements: frozenset[str], unit: analyze.Unit) -> bool:
    """Whether the statement does any of ``statements``: its own class, or anything else it
    does (an upsert's update, a MERGE's actions, COPY FROM's insert, TRUNCATE's delete)."""
    done = {unit.cls.coarse, unit.cls.fine, *unit.extra_classes, *unit.effect_classes}
    done.update(c for fine in tuple(done) for c in compile.FINE_TO_COARSE.get(fine, frozenset()))
    return bool(done & statements)


def _covers(rule: model.Rule, unit: analyze.Unit) -> bool:
    """Whether ``rule`` decides ``unit``.

    An allow rule must list the statement's class and everything else it does, and, with
    ``tables``, cover every relation the statement touches (and no other object). A block or
    approve rule decides a statement that does any of its classes and touches any of its
    tables: joining another table, or doing the held thing as part of another statement (a
    MERGE's DELETE), must not take it out of its rule, and a statement that touches none of
    its tables is not its business. What a statement reaches without naming it counts: a
    schema's tables (ALTER/DROP SCHEMA, GRANT ... IN SCHEMA) and, for CASCADE and DROP OWNED,
    any table at all. A rule about writes only (``[insert, update, delete]``) judges the
    relations written or row-locked, and also DDL on one of its tables or a view over one (a
    rename, a rewrite of a column, an updatable view all change what its writes reach)."""
    if rule.verdict == "allow":
        if not _covers_class(rule.statements, unit):
            return False
        if rule.tables is None:
            return True
        if unit.non_relation_object or unit.reaches_unknown or unit.schemas_reached:
            return False
        return all(rule.covers_relation(rel) for rel in _relations(unit))
    writes_only = compile.writes_only(rule.statements)
    ddl_on_table = writes_only and unit.cls.coarse == "ddl"
    if rule.statements is not None and not ddl_on_table and not _does_any(rule.statements, unit):
        return False
    if rule.tables is None:
        return True
    if unit.reaches_unknown or any(p.schema_covered(s) for p in rule.tables for s in unit.schemas_reached):
        return True
    if not writes_only:
        targets = _relations(unit)
    else:  # what it writes or locks, and what a view it makes could be written through
        targets = (*unit.writes, *unit.locks, *(unit.reads if unit.makes_view else ()))
    return any(rule.covers_relation(rel) for rel in targets)


def _relations(unit: analyze.Unit) -> tuple[model.QualifiedName, ...]:
    """Every relation the statement reads, writes or locks rows of: a rule must cover them all."""
    return (*unit.reads, *unit.writes, *unit.locks)


def _setting_verdict(
    policy: model.CompiledPolicy, setting: analyze.Setting, *, writable_at_login: bool = False
) -> _Verdict | None:
    """A block for a setting no policy may change, `allow` for benign ones, None for others."""
    if (
        writable_at_login
        and setting.name in {"transaction_read_only", "default_transaction_read_only"}
        and _off(setting.value)
    ):
        # pgjdbc's setReadOnly(false), Spring's read-write transactions after read-only ones.
        return _Verdict(
            verdict="allow",
            rule="builtin:session-basics",
            reason="the server started this session writable; READ WRITE only restores that",
        )
    if setting.name == "*":
        return _Verdict(
            verdict="allow",
            rule="builtin:session-basics",
            reason="RESET ALL / DISCARD restore defaults",
        )
    if setting.name in guards.ECHO_SETTINGS and policy.masks and not _off(setting.value):
        return _block(
            "guardrail:mask-key",
            f"{setting.name} makes the server send the client the tree of every statement, constants "
            "included, and for masked reads that is dbgov's rewrite with the hash mask's key",
            f"Leave {setting.name} off; use EXPLAIN on tables without masks to see plans.",
        )
    if setting.name in {"transaction_read_only", "default_transaction_read_only"} and (
        (setting.value or "").lower() in {"on", "true", "yes", "1", "t", "y"}
    ):
        return _Verdict(
            verdict="allow",
            rule="builtin:session-basics",
            reason="making transactions read-only only restricts what later statements may do",
        )
    kind = guards.setting_kind(setting.name)
    if kind == "identity":
        return _block(
            "guardrail:identity-setting",
            f"changing {setting.name} would run later statements with another role's privileges",
            "dbgov ties every statement to the workload's identity; connect as the role you need instead.",
        )
    if kind == "benign":
        return _Verdict(
            verdict="allow",
            rule="builtin:session-basics",
            reason=f"{setting.name} is a session setting",
        )
    if kind == "guarded":
        if setting.value is None:
            return _Verdict(
                verdict="allow",
                rule="builtin:session-basics",
                reason=f"{setting.name} back to its default",
            )
        if setting.name == "client_encoding" and setting.value.replace("-", "").lower() in {
            "utf8",
            "unicode",
        }:
            return _Verdict(
                verdict="allow", rule="builtin:session-basics", reason="client_encoding stays UTF8"
            )
        allowed = policy.guardrails.allowed_settings.get(setting.name)
        if setting.local and setting.name == "search_path":
            return _block(
                "guardrail:guarded-setting",
                "SET LOCAL search_path changes name resolution for part of a transaction only",
                "Use a session-level SET with a value listed in guardrails.allowedSettings.",
            )
        if allowed is not None and names.normalize_setting_value(setting.value) in allowed:
            return _Verdict(
                verdict="allow",
                rule=f"guardrails.allowedSettings.{setting.name}",
                reason="value allowed by the policy",
            )
        if setting.name == "search_path" and allowed is None and policy.default == "allow":
            return _search_path_under_allow(setting.value)
        return _block(
            "guardrail:guarded-setting",
            f"changing {setting.name} alters how later SQL is read or resolved",
            f"Leave {setting.name} at its default"
            + (
                ", or use a value listed in guardrails.allowedSettings."
                if setting.name == "search_path"
                else "."
            ),
        )
    return None


def _search_path_under_allow(value: str) -> _Verdict:
    """A session search_path under a policy whose default is allow (pgjdbc's currentSchema).

    The proxy does not predict where names resolve: after the change it asks the server for the
    effective path and judges later statements by it, so a schema choice cannot hide a table.
    What the server's answer does not tell is which function or operator an unqualified name
    means when pg_catalog is searched after another schema, so that order stays refused.
    """
    items = [item for item in names.normalize_setting_value(value).split(",") if value.strip()]
    if value == "?" or "" in items:
        return _block(
            "guardrail:guarded-setting",
            "dbgov cannot read the search_path this sets",
            "Set search_path to a literal list of schema names.",
        )
    if "pg_catalog" in items and any(item != "pg_temp" for item in items[: items.index("pg_catalog")]):
        return _block(
            "guardrail:guarded-setting",
            "a search_path that puts pg_catalog after another schema lets that schema's functions and "
            "operators stand in for PostgreSQL's built-ins",
            "Leave pg_catalog out of search_path (PostgreSQL searches it first), or put it first.",
        )
    return _Verdict(
        verdict="allow",
        rule="builtin:session-basics",
        reason="search_path under a policy whose default is allow: dbgov reads the effective path "
        "from the server after the change and resolves later names by it",
    )


def _off(value: str | None) -> bool:
    return value is None or value.lower() in {"off", "false", "0", "no", "f", "n"}


def _mask_key_problem(policy: model.CompiledPolicy, unit: analyze.Unit) -> str | None:
    """Why the statement would show the client SQL text holding the `hash` mask key, or None."""
    if unit.shows_statements and policy.masks:
        return (
            f"{', '.join(dict.fromkeys(unit.shows_statements))} shows the text of this session's "
            "statements, which for masked reads is dbgov's rewrite (with the hash mask's key)"
        )
    if not (unit.shown or unit.explains_prepared):
        return None
    keyed = {m.table for m in policy.masks if m.strategy == "hash"}
    if not keyed:
        return None
    if unit.explains_prepared:
        return (
            "EXPLAIN EXECUTE prints the plan of a prepared statement, which for a read of a table "
            "with a hash mask holds the mask's key"
        )
    for ref in unit.read_refs:
        if ref.rel in keyed:
            what = "EXPLAIN prints" if unit.cls.fine == "explain" else "the definition stored shows"
            return (
                f"{ref.rel} has a hash mask, and {what} dbgov's masking rewrite of it, which holds the "
                "mask's key (EXPLAIN, views, rules and row security policies over such a table are "
                "refused)"
            )
    return None


def _mask_problem(
    policy: model.CompiledPolicy,
    unit: analyze.Unit,
    *,
    columns: Mapping[model.QualifiedName, tuple[str, ...]],
) -> str | None:
    """Why masking cannot be proven for this statement, or None."""
    masked = policy.masked_tables
    for schema in unit.renamed_schemas:
        hidden = sorted(str(t) for t in masked if t.schema == schema)
        if hidden:
            return (
                f"renaming schema {schema} would give its masked tables ({', '.join(hidden)}) names "
                "the masks do not cover"
            )
    for ref in unit.read_refs:
        if ref.rel in masked and ref.location < 0:
            return f"{ref.rel} is read inside a function or DO body, where dbgov cannot mask it"
        if ref.rel in masked and ref.ambiguous:
            return f"{ref.rel.name} is ambiguous under the session's search_path; qualify it with its schema"
    for target in unit.targets:
        if target.rel not in masked:
            continue
        if unit.cls.coarse in {"ddl", "dcl"} and unit.cls.fine in {"alter", "grant", "revoke", "create"}:
            ancestors = policy.inherited.get(target.rel)
            if ancestors:
                return (
                    f"{target.rel} descends from {', '.join(str(a) for a in ancestors)} (a partition or "
                    "inheritance child: its rows are read through the masks of the table it descends from), "
                    "and changing its definition (renaming it, detaching it or ending its inheritance, "
                    "attaching or creating partitions or children of it, granting on it, adding rules, "
                    "triggers or policies) could expose masked columns under another name"
                )
            below = policy.contains.get(target.rel)
            if below:
                return (
                    f"{target.rel} is an ancestor of {', '.join(str(t) for t in below)} (a partitioned "
                    "table or inheritance parent: reading it reads their rows, so it is masked in their "
                    "masked columns), and changing its definition (renaming it, detaching partitions or "
                    "children, granting on it, adding rules, triggers or policies) could expose them "
                    "under another name"
                )
            return (
                f"{target.rel} has masked columns, and changing its definition (renaming it, granting "
                "on it, creating or attaching partitions or inheritance children of it, adding rules, "
                "triggers or policies) could expose them under another name"
            )
        cols = {m.column for m in policy.masks_for(target.rel)}
        blind = unit.assigned_columns & {m.column for m in policy.masks_for(target.rel) if not m.writable}
        if blind:
            return (
                f"the statement assigns {', '.join(sorted(blind))} of {target.rel}, which this workload "
                "only ever sees masked: an ORM that saves a whole row it read would write the masked "
                "value over the real one (update only the columns you changed, e.g. Django's "
                "save(update_fields=...) or Hibernate's @DynamicUpdate, or mark the mask writable)"
            )
        whole_row = {target.rel.name, *([target.alias] if target.alias else [])}
        # `"t"."id"` names the table only to qualify a column; `RETURNING t` is the whole row,
        # and so is `t.x` when x is no column of t: PostgreSQL then calls x(t) (`t.row_to_json`).
        used = (unit.column_names & cols) | (unit.row_names & whole_row)
        known = columns.get(target.rel)
        calls = sorted(
            f"{q}.{n}" for q, n in unit.qualified_refs if q in whole_row and n not in (known or ())
        )
        if calls and not used and not unit.has_star:
            if known is None:
                return (
                    f"without {target.rel}'s columns dbgov cannot tell whether {calls[0]} is a column "
                    f"or a function of the whole row (PostgreSQL reads t.f as f(t) when t has no column "
                    "f); the proxy reads the columns from the catalog, `dbgov check` cannot"
                )
            return (
                f"{calls[0]} is no column of {target.rel}: PostgreSQL calls that function with the "
                "whole row, masked columns included"
            )
        if used or unit.has_star:
            what = ", ".join(sorted(used)) if used else "*"
            return (
                f"the statement acts on {target.rel} and refers to masked data ({what}) "
                "in a way a masking subquery cannot cover (SET, WHERE, RETURNING, constraints)"
            )
    return None


def judge_unit(policy: model.CompiledPolicy, unit: analyze.Unit, known: Names) -> _Verdict:
    if unit.findings:
        f = unit.findings[0]
        return _block(f"guardrail:{f.guard}", f.reason, f.hint)
    setting_ok: _Verdict | None = None
    for setting in unit.settings:
        v = _setting_verdict(policy, setting, writable_at_login=known.writable_at_login)
        if v is not None and v.verdict == "block":
            return v
        setting_ok = v if setting_ok is None else setting_ok
    for kind, name in unit.names_used:
        if not known.knows(kind, name):
            what = "prepared statement" if kind == "prepared" else "cursor"
            verb = "PREPARE" if kind == "prepared" else "DECLARE"
            return _block(
                f"guardrail:unknown-{kind}",
                f"{what} {name!r} was never {verb}d through dbgov in this session",
                f"{verb} it through dbgov first, so its statement is checked.",
            )
    base = _rule_verdict(policy, unit, setting_ok)
    return _guardrails(policy, unit, base, columns=known.table_columns)


def _rule_verdict(policy: model.CompiledPolicy, unit: analyze.Unit, setting_ok: _Verdict | None) -> _Verdict:
    for rule in policy.rules:
        if _covers(rule, unit):
            what = (
                "allows" if rule.verdict == "allow" else ("holds" if rule.verdict == "approve" else "blocks")
            )
            reason = f"rule {rule.name!r} {what} {unit.cls.fine} statements" + (
                f" on {', '.join(sorted({str(r) for r in _relations(unit)}))}" if _relations(unit) else ""
            )
            hint = None
            if rule.verdict == "block":
                hint = "This statement is not allowed for this workload; ask the policy owner if you need it."
            elif rule.verdict == "approve":
                hint = "A human must approve this statement before it runs."
            return _Verdict(
                verdict=rule.verdict,
                rule=rule.name,
                reason=reason,
                hint=hint,
                sqlstate=POLICY_SQLSTATE if rule.verdict != "allow" else None,
            )
    basic = unit.cls.fine in SESSION_BASICS or (unit.cls.fine == "set" and setting_ok is not None)
    # Only the statement itself is basic: EXECUTE p(public.bump(1)) runs what its arguments call.
    if basic and not unit.extra_classes and not _relations(unit):
        if setting_ok is not None and setting_ok.rule != "builtin:session-basics":
            return setting_ok
        return _Verdict(
            verdict="allow",
            rule="builtin:session-basics",
            reason=f"{unit.cls.fine} is a session basic drivers need",
        )
    touched = sorted({str(r) for r in _relations(unit)})
    reason = f"no rule covers this {unit.cls.fine} statement" + (
        f" on {', '.join(touched)}" if touched else ""
    )
    if unit.cls.fine == "select-for-update":
        reason += (
            " (FOR UPDATE/NO KEY UPDATE/SHARE/KEY SHARE locks these rows, which PostgreSQL allows "
            "only with UPDATE privilege: a rule must allow update or select-for-update on them)"
        )
    if unit.cls.fine == "insert" and "update" in unit.extra_classes:
        reason += " (ON CONFLICT DO UPDATE updates too: a rule must allow both insert and update on it)"
    if unit.user_functions:
        calls = ", ".join(dict.fromkeys(unit.user_functions))
        reason += (
            f" (it calls {calls}, which may write: list it in guardrails.allowedFunctions "
            "if it only reads, or allow the call class)"
        )
    effects = {f: guards.BUILTIN_EFFECTS[f] for f in dict.fromkeys(unit.effects)}
    if effects:
        named = ", ".join(f"{f}() ({cls})" for f, cls in effects.items())
        wanted = ", ".join(sorted(set(effects.values())))
        reason += f" (it calls {named}, which changes state: a rule must allow {wanted} too)"
    reason += f"; the policy default is {policy.default}"
    return _Verdict(
        verdict=policy.default,
        rule="default",
        reason=reason,
        hint=None
        if policy.default == "allow"
        else "Add a rule for this statement class and these tables, or ask the policy owner.",
        sqlstate=POLICY_SQLSTATE if policy.default != "allow" else None,
    )


def _denied_function(denied: frozenset[str], fn: str) -> str | None:
    """The entry of deniedFunctions a call of ``fn`` matches, directly or through a built-in
    SQL-language wrapper (`pg_sleep_for` calls `pg_sleep`); None if it matches none."""
    schema, _, bare = fn.rpartition(".")
    if fn in denied or bare in denied:
        return bare if bare in denied else fn
    if schema not in ("", "pg_catalog"):
        return None
    if f"pg_catalog.{bare}" in denied:
        return f"pg_catalog.{bare}"
    for callee in guards.BUILTIN_CALLS.get(bare, ()):
        if callee in denied or f"pg_catalog.{callee}" in denied:
            return callee
    return None


def _guardrails(
    policy: model.CompiledPolicy,
    unit: analyze.Unit,
    base: _Verdict,
    *,
    columns: Mapping[model.QualifiedName, tuple[str, ...]],
) -> _Verdict:
    g = policy.guardrails
    if unit.cls.fine in g.require_where and unit.where_constrains is False:
        return _block(
            "guardrail:require-where",
            f"{unit.cls.fine.upper()} whose WHERE does not constrain the target table: one of its "
            "top-level AND conjuncts must compare a column of the target with a value that does not "
            "come from the same row (a constant, a parameter, a sub-query over other tables) using =, "
            "<, >, <=, >=, <>, IN (...), BETWEEN, = ANY ($1), LIKE 'prefix%', or be WHERE CURRENT OF; "
            "IS NULL, OR, NOT and expressions of the row itself do not count",
            "Add a condition that selects the rows you mean to change, e.g. WHERE id = $1.",
        )
    if "update" in g.require_where and unit.upsert_constrains is False:
        return _block(
            "guardrail:require-where",
            "INSERT ... ON CONFLICT DO UPDATE whose update is not bounded: its rows must be written "
            "out in the statement (VALUES or a SELECT without FROM, of constants and parameters), "
            "so each updates at most the one row its conflict target pins, or its DO UPDATE WHERE "
            "must constrain the target as an UPDATE's WHERE does",
            "Upsert VALUES rows, or add DO UPDATE ... WHERE target.id = $1; for a bulk change run "
            "an UPDATE with a WHERE.",
        )
    if g.denied_functions:
        for fn in unit.functions:
            match = _denied_function(g.denied_functions, fn)
            if match is not None:
                via = "" if match in {fn, fn.rsplit(".", 1)[-1]} else f", which calls {match}(),"
                return _block(
                    "guardrails.deniedFunctions",
                    f"the function {fn}(){via} is denied by this policy",
                    "Remove the call, or ask the policy owner.",
                )
    if policy.masks:
        key_problem = _mask_key_problem(policy, unit)
        if key_problem is not None:
            return _block(
                "guardrail:mask-key",
                key_problem,
                "Run the query itself (dbgov masks its results); plans, stored definitions and statement "
                "texts that include a masking rewrite are never shown.",
            )
    if base.verdict != "block" and policy.masks:
        problem = _mask_problem(policy, unit, columns=columns)
        if problem is not None:
            return _block(
                "guardrail:mask-unprovable",
                problem,
                "Select masked columns only in plain reads, which dbgov rewrites; never write or filter by them.",
            )
        masked = sorted({str(r.rel) for r in unit.read_refs if r.rel in policy.masked_tables})
        if base.verdict == "allow" and masked:
            base = dataclasses.replace(
                base,
                verdict="mask",
                reason=f"{base.reason}; masked columns of {', '.join(masked)} are rewritten",
            )
    if (
        base.verdict != "block"
        and g.max_rows_affected is not None
        and unit.writes
        and not unit.runs_later
        and (unit.nested or unit.cls.fine == "truncate")
    ):
        what = (
            "TRUNCATE"
            if unit.cls.fine == "truncate"
            else f"{classes.with_article(unit.cls.fine.upper())} inside this statement"
        )
        return _block(
            "guardrail:max-rows-affected",
            f"maxRowsAffected is {g.max_rows_affected}, and the rows changed by {what} cannot be "
            "counted before they are committed (only a top-level INSERT, UPDATE, DELETE, MERGE or COPY "
            "reports its row count)",
            "Run the change as its own INSERT, UPDATE, DELETE or MERGE statement, "
            "or ask the policy owner for an exception.",
            sqlstate=LIMIT_SQLSTATE,
        )
    return base


def _changes_resolution(unit: analyze.Unit) -> bool:
    return any(s.name in {"search_path", "*"} and s.value is not None for s in unit.settings)


def _user_function_extra(policy: model.CompiledPolicy, unit: analyze.Unit) -> None:
    allowed = policy.guardrails.allowed_functions
    for fn in unit.user_functions:
        bare = fn.rsplit(".", 1)[-1]
        if fn not in allowed and bare not in allowed:
            unit.extra_classes.add("call")
            return


def decide(
    policy: model.CompiledPolicy,
    analysis: analyze.Analysis,
    *,
    known: Names | None = None,
    fingerprint: str = "",
) -> tuple[Decision, list[analyze.ReadRef]]:
    """Judge every statement; return the decision and the masked reads to rewrite."""
    if analysis.error is not None:
        return blocked_unparseable(analysis.error, fingerprint), []
    if not analysis.units:
        return Decision(verdict="allow", rule=None, reason="empty query", fingerprint=fingerprint), []
    known = known if known is not None else Names()
    infos: list[StatementInfo] = []
    worst: _Verdict | None = None
    refs: list[analyze.ReadRef] = []
    masked_columns: list[str] = []
    # The last top-level statement and the statements nested in it (listed after it) run last.
    last = max(i for i, u in enumerate(analysis.units) if not u.nested)
    for index, unit in enumerate(analysis.units):
        _user_function_extra(policy, unit)
        v = judge_unit(policy, unit, known)
        if v.verdict != "block" and unit.unpinned_names:
            # Judged under the session's path, the statement passed; where the function will run
            # nobody knows yet (any other reason to refuse it was said first).
            name = unit.unpinned_names[0]
            v = _block(
                "guardrail:unpinned-function-body",
                f"the function body names {name} without a schema, and a function runs under its "
                "caller's search_path, so dbgov cannot know now which table that will be",
                f"Qualify the name (schema.{name}) or give the function SET search_path = <schemas>.",
            )
        if v.verdict != "block" and _changes_resolution(unit) and index < last:
            v = _block(
                "guardrail:guarded-setting",
                "search_path changes in the middle of a query string, so later statements in it "
                "would resolve names differently from how they are checked",
                "Send SET search_path on its own, then the statements that rely on it.",
            )
        known.apply(unit)
        infos.append(_info(unit, v))
        if worst is None or model.STRICTNESS[v.verdict] > model.STRICTNESS[worst.verdict]:
            worst = v
        if v.verdict in {"mask", "approve"}:
            for ref in unit.read_refs:
                if ref.rel in policy.masked_tables:
                    refs.append(ref)
                    masked_columns.extend(f"{ref.rel}.{m.column}" for m in policy.masks_for(ref.rel))
    assert worst is not None
    return (
        Decision(
            verdict=worst.verdict,
            rule=worst.rule,
            reason=worst.reason,
            hint=worst.hint,
            sqlstate=worst.sqlstate,
            fingerprint=fingerprint,
            statements=tuple(infos),
            masked_columns=tuple(dict.fromkeys(masked_columns)),
        ),
        refs,
    )


def _uniq(items: Iterable[object]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(i) for i in items))


def _info(unit: analyze.Unit, v: _Verdict) -> StatementInfo:
    return StatementInfo(
        cls=unit.cls.coarse,
        fine=unit.cls.fine,
        reads=_uniq(unit.reads),
        writes=_uniq(unit.writes),
        functions=_uniq(unit.functions),
        verdict=v.verdict,
        rule=v.rule,
        nested=unit.nested,
        settings=tuple(dict.fromkeys(s.name for s in unit.settings)),
        statement_names=tuple(
            dict.fromkeys(n for kind, n in (*unit.names_defined, *unit.names_dropped) if kind == "prepared")
        ),
    )
