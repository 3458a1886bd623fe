"""SQL text → what each statement in it would do, read from PostgreSQL's own parse tree.

libpg_query (through pglast) is the authority: it splits the query string the way the
server will and names every node. This module walks that tree once and records, for each
statement that will run (a top-level statement, and every statement hidden inside another:
data-modifying CTEs, EXPLAIN ANALYZE, PREPARE, DECLARE, rule actions, function and DO
bodies), its class, the relations it reads and writes, the functions it calls, the hard
guardrails it trips, and where masked tables would have to be rewritten.

The walk is policy-independent; `decide` applies a policy to the result. What it needs of the
session's database is which function names are PostgreSQL's own (``Functions``): a name that a
function outside pg_catalog also has may call that function (PostgreSQL picks the overload whose
argument types match best, before path order), and ``t.f`` calls ``f(t)`` when t has no column f.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any, Literal

from pglast import parser as pg_parser

from dbgov_policy import _pgcatalog, classes, guards, model

Role = Literal["read", "target"]

#: Fields whose RangeVars are read as data (and may be replaced by a masking subquery).
READ_FIELDS = frozenset({"fromClause", "usingClause", "sourceRelation"})
#: Nested statements that run as themselves and are judged as their own unit.
DML_NODES = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"})
RELATION_DROP_TYPES = frozenset(
    {
        "OBJECT_TABLE",
        "OBJECT_VIEW",
        "OBJECT_MATVIEW",
        "OBJECT_INDEX",
        "OBJECT_SEQUENCE",
        "OBJECT_FOREIGN_TABLE",
    }
)
TRANSACTION_FINE = {
    "TRANS_STMT_BEGIN": "begin",
    "TRANS_STMT_START": "begin",
    "TRANS_STMT_COMMIT": "commit",
    "TRANS_STMT_ROLLBACK": "rollback",
    "TRANS_STMT_SAVEPOINT": "savepoint",
    "TRANS_STMT_RELEASE": "release",
    "TRANS_STMT_ROLLBACK_TO": "rollback",
    "TRANS_STMT_PREPARE": "prepare-transaction",
    "TRANS_STMT_COMMIT_PREPARED": "commit-prepared",
    "TRANS_STMT_ROLLBACK_PREPARED": "rollback-prepared",
}
#: Utility statements that act on every table of the database when they name none.
WHOLE_DATABASE_NODES = frozenset({"VacuumStmt", "ClusterStmt", "ReindexStmt"})
#: A_Expr kinds whose `name` is not an operator that could call a user function.
NON_OPERATOR_EXPRS = frozenset(
    {"AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM"}
)
#: PL/pgSQL statements that run SQL text computed at run time, and the field holding that text.
DYNAMIC_PLPGSQL = {
    "PLpgSQL_stmt_dynexecute": "query",
    "PLpgSQL_stmt_dynfors": "query",
    "PLpgSQL_stmt_open": "dynquery",
    "PLpgSQL_stmt_return_query": "dynquery",
}
#: How PostgreSQL's core parser reads a PL/pgSQL expression's text (RawParseMode, parser.h).
PARSE_STATEMENT, PARSE_EXPRESSION = 0, 2
PARSE_ASSIGNMENTS = frozenset({3, 4, 5})  # RAW_PARSE_PLPGSQL_ASSIGN1..3: `a`, `a.b`, `a.b.c :=`
#: Statements that store the text of what they read (a view's query, a rule's actions, a row
#: security policy's expressions) for anyone to print back later (pg_get_viewdef, pg_policies).
DEFINITION_NODES = frozenset({"ViewStmt", "RuleStmt", "CreatePolicyStmt", "AlterPolicyStmt"})
#: DefElems of CREATE OPERATOR / AGGREGATE / TYPE that name a function the object calls later.
FUNCTION_DEFELEMS = frozenset(
    {
        "function",
        "procedure",
        "sfunc",
        "finalfunc",
        "combinefunc",
        "serialfunc",
        "deserialfunc",
        "msfunc",
        "minvfunc",
        "mfinalfunc",
        "restrict",
        "join",
        "input",
        "output",
        "receive",
        "send",
        "typmod_in",
        "typmod_out",
        "analyze",
        "subscript",
        "canonical",
        "subtype_diff",
    }
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Functions:
    """What the catalog of the session's database says about function names, read at login and
    again after DDL: without it (``dbgov check``) a name is judged by pg_catalog's names alone."""

    names: frozenset[str] = frozenset()
    """Names of the functions, aggregates and procedures in every schema but pg_catalog,
    information_schema and the system's own (``pg_*``): an unqualified call of one may be of it,
    whatever overloads pg_catalog has, so it is judged as a user function; ``operator <name>``
    likewise for operators."""
    columns: frozenset[tuple[str, str, str]] = frozenset()
    """(schema, relation, column) of every column named like one of ``names`` or a whole-row
    built-in (``_pgcatalog.WHOLE_ROW_FUNCTIONS``): where ``t.f`` is a column, not ``f(t)``."""

    def __bool__(self) -> bool:
        return bool(self.names or self.columns)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """A hard guardrail a statement trips: always a block."""

    guard: str
    reason: str
    hint: str


#: Statements refused by kind alone, whatever they name.
FIXED_FINDINGS: dict[str, Finding] = {
    "AlterSystemStmt": Finding(
        guard="alter-system",
        reason="ALTER SYSTEM rewrites the server's configuration",
        hint="Server configuration changes go through your database platform team.",
    ),
    "LoadStmt": Finding(
        guard="load-library",
        reason="LOAD loads a shared library into the database server",
        hint="Libraries are installed by your database platform team.",
    ),
    "CreateSubscriptionStmt": Finding(
        guard="replication",
        reason="CREATE SUBSCRIPTION connects the database to another server",
        hint="Replication is set up by your database platform team.",
    ),
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ReadRef:
    """A relation read in a position a masking subquery can take its place."""

    rel: model.QualifiedName
    location: int
    """Byte offset of the name in the query string; -1 when it came from a nested body."""
    alias: str | None
    only: bool
    copy_columns: tuple[str, ...] | None = None
    """For `COPY table [(cols)] TO`: the columns (empty tuple = all); None otherwise."""
    ambiguous: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TargetRef:
    """A relation a statement writes or acts on (never rewritten)."""

    rel: model.QualifiedName
    alias: str | None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Setting:
    """A setting a statement changes (SET, RESET, set_config)."""

    name: str
    value: str | None
    """Normalized new value; None for RESET/DEFAULT; '?' when not a constant."""
    local: bool = False


@dataclasses.dataclass(slots=True, kw_only=True)
class Unit:
    """One statement that will run, as the policy judges it."""

    cls: classes.StatementClass
    nested: bool = False
    runs_later: bool = False
    """Defined now, run later (a PREPARE's or DECLARE's query, a rule action, a function body),
    as opposed to running as part of this statement (a WITH write, EXPLAIN ANALYZE, a DO body)."""
    extra_classes: set[str] = dataclasses.field(default_factory=set)
    reads: list[model.QualifiedName] = dataclasses.field(default_factory=list)
    writes: list[model.QualifiedName] = dataclasses.field(default_factory=list)
    functions: list[str] = dataclasses.field(default_factory=list)
    user_functions: list[str] = dataclasses.field(default_factory=list)
    findings: list[Finding] = dataclasses.field(default_factory=list)
    read_refs: list[ReadRef] = dataclasses.field(default_factory=list)
    targets: list[TargetRef] = dataclasses.field(default_factory=list)
    column_names: set[str] = dataclasses.field(default_factory=set)
    """Every name in a column reference, qualifiers included (``t.addr`` may be the field of a
    composite column ``t``)."""
    unpinned_names: list[str] = dataclasses.field(default_factory=list)
    """Relation names without a schema in the body of a function that does not pin its
    search_path: judged under the session's path, but resolved under the caller's when it runs."""
    assigned_columns: set[str] = dataclasses.field(default_factory=set)
    """Columns of the target an UPDATE, an upsert's DO UPDATE or a MERGE's UPDATE assigns."""
    row_names: set[str] = dataclasses.field(default_factory=set)
    qualified_refs: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    """(qualifier, name) of references `q.name` (the last two names): a column of q, or, when q
    has no such column, the function name(q) of q's whole row."""
    row_calls: list[tuple[str | None, str]] = dataclasses.field(default_factory=list)
    """(qualifier, name) of references `q.name` and `(expr).name` whose name is a function's that
    takes a whole row: calls of it unless the catalog says q has such a column (``_row_calls``);
    qualifier None: of an expression, never a relation."""
    """Names a column reference uses alone (``RETURNING t``): perhaps a whole-row reference."""
    has_star: bool = False
    non_relation_object: bool = False
    where_constrains: bool | None = None
    """For update/delete/merge: does the WHERE (ON) constrain a column of the target?"""
    locks: list[model.QualifiedName] = dataclasses.field(default_factory=list)
    """Relations whose rows it locks (SELECT ... FOR UPDATE/SHARE): PostgreSQL asks for UPDATE
    privilege on them, so a rule must cover them as for an update."""
    upsert_constrains: bool | None = None
    """For INSERT ... ON CONFLICT DO UPDATE: is the update bounded, as requireWhere asks?"""
    shown: bool = False
    """What it reads is shown back as SQL text: the plan of an EXPLAIN, or a stored definition
    (view, materialized view, rule, row security policy); masked reads in it show the rewrite."""
    explains_prepared: bool = False
    """An EXPLAIN of EXECUTE: it prints the plan of a statement prepared earlier."""
    shows_statements: list[str] = dataclasses.field(default_factory=list)
    """Catalogs and functions it reads that show the text of this session's statements."""
    settings: list[Setting] = dataclasses.field(default_factory=list)
    effects: list[str] = dataclasses.field(default_factory=list)
    """Built-in functions it calls that change state (``guards.BUILTIN_EFFECTS``), by name."""
    renamed_schemas: list[str] = dataclasses.field(default_factory=list)
    schemas_reached: set[str] = dataclasses.field(default_factory=set)
    """Schemas whose tables the statement reaches without naming them: ALTER/DROP SCHEMA,
    GRANT ... ON ALL TABLES IN SCHEMA, ALTER DEFAULT PRIVILEGES IN SCHEMA."""
    reaches_unknown: bool = False
    """It reaches relations nobody can name from its text: DROP ... CASCADE, TRUNCATE ...
    CASCADE, DROP OWNED, REASSIGN OWNED, ALTER ... ALL IN TABLESPACE."""
    makes_view: bool = False
    """CREATE VIEW: a simple view is updatable, so writes through it reach what it reads."""
    effect_classes: set[str] = dataclasses.field(default_factory=set)
    """What else it does to rows, for block and approve rules: a MERGE's actions, COPY FROM's
    insert, TRUNCATE's delete (an allow rule judges the statement's own class, as before)."""
    """Schemas it renames: the tables in them take new qualified names."""
    names_used: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    """Session names the statement relies on: ("prepared"|"cursor", name)."""
    names_defined: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    names_dropped: list[tuple[str, str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Analysis:
    """Everything the policy needs to know about one query string."""

    units: tuple[Unit, ...]
    error: str | None = None
    """Why the text could not be analyzed (→ block, SQLSTATE 42601)."""
    literal_sensitive: bool = False
    """The verdict depends on a literal value, so it must not be cached by normalized text."""


class _Sensitive:
    __slots__ = ("flag",)

    def __init__(self) -> None:
        self.flag = False


def parse_tree(sql: str) -> list[dict[str, Any]]:
    """libpg_query's raw statements for `sql`; raises pglast's ParseError."""
    tree = json.loads(pg_parser.parse_sql_json(sql))
    stmts: list[dict[str, Any]] = tree.get("stmts", [])
    return stmts


def analyze(
    sql: str, *, search_path: tuple[str, ...] = ("public",), functions: Functions | None = None
) -> Analysis:
    """Analyze a query string as one simple-query message would carry it; ``functions``: what the
    session's catalog says of function names (None: only pg_catalog's names are known)."""
    if "\x00" in sql:
        return Analysis(units=(), error="the query text contains a NUL character")
    try:
        stmts = parse_tree(sql)
    except pg_parser.ParseError as err:
        return Analysis(units=(), error=f"PostgreSQL's parser rejects it: {err}")
    except (ValueError, RecursionError) as err:
        return Analysis(units=(), error=f"cannot parse: {err}")
    walker = _Walker(search_path=search_path, functions=functions)
    try:
        for raw in stmts:
            node = raw.get("stmt")
            if not node:
                continue
            walker.source = (sql, raw)
            walker.top_level(node)
    except RecursionError:
        return Analysis(units=(), error="statement nests too deeply to analyze")
    return Analysis(
        units=tuple(walker.units),
        error=None,
        literal_sensitive=walker.sensitive.flag,
    )


def _statement_text(sql: str, raw: dict[str, Any]) -> str:
    """The text of one raw statement (libpg_query's offsets count bytes; length 0: to the end)."""
    start = int(raw.get("stmt_location", 0))
    length = int(raw.get("stmt_len", 0))
    return sql.encode()[start : start + length if length else None].decode()


def _node(value: Any) -> tuple[str, dict[str, Any]] | None:
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        if key[:1].isupper() and isinstance(inner, dict):
            return key, inner
    return None


def _strings(items: Any) -> list[str]:
    out = []
    for item in items or []:
        n = _node(item)
        if n and n[0] == "String":
            out.append(str(n[1].get("sval", "")))
    return out


def _const_text(value: Any) -> str | None:
    n = _node(value)
    if n is None:
        return None
    kind, fields = n
    if kind == "A_Const":
        for key in ("sval", "ival", "fval", "boolval", "bsval"):
            if key in fields:
                inner = fields[key]
                if isinstance(inner, dict):
                    val = next(iter(inner.values()), "")
                    return str(val).lower() if key == "boolval" else str(val)
                return str(inner)
        if fields.get("isnull"):
            return "null"
        # an A_Const with every field at its default is 0 / false / ''
        return "0"
    if kind == "TypeCast":
        return _const_text(fields.get("arg"))
    return None


def _defelems(options: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in options or []:
        n = _node(item)
        if n and n[0] == "DefElem":
            out[str(n[1].get("defname", ""))] = n[1].get("arg")
    return out


def _option_flag(arg: Any) -> bool:
    """A boolean option as PostgreSQL's defGetBoolean reads it (no value is true); anything it
    would not accept counts as true (the statement then fails on the server anyway)."""
    n = _node(arg)
    if n is None:
        return True
    kind, fields = n
    if kind == "String":
        value = str(fields.get("sval", "")).lower()
    elif kind == "Integer":
        value = str(fields.get("ival", 0))
    elif kind == "Boolean":
        value = "true" if fields.get("boolval") else "false"
    else:
        value = _const_text(arg) or ""
    return value not in {"false", "off", "0"}


def _reach(kind: str, f: dict[str, Any], unit: Unit) -> None:
    """What a statement reaches beyond the relations it names (``Unit.schemas_reached``,
    ``reaches_unknown``, ``effect_classes``)."""
    if f.get("behavior") == "DROP_CASCADE" and kind in {"DropStmt", "TruncateStmt"}:
        unit.reaches_unknown = True  # dependents: other tables' columns, views, FK-linked rows
    if kind in {"DropOwnedStmt", "ReassignOwnedStmt", "AlterTableMoveAllStmt"}:
        unit.reaches_unknown = True
    dropped_schemas = kind == "DropStmt" and f.get("removeType") == "OBJECT_SCHEMA"
    if dropped_schemas or (kind == "GrantStmt" and f.get("targtype") == "ACL_TARGET_ALL_IN_SCHEMA"):
        unit.schemas_reached.update(_strings(f.get("objects")))
    elif kind == "AlterOwnerStmt" and f.get("objectType") == "OBJECT_SCHEMA":
        unit.schemas_reached.update(_strings([f.get("object")]))
    elif kind == "RenameStmt" and f.get("renameType") == "OBJECT_SCHEMA":
        unit.schemas_reached.add(str(f.get("subname", "")))
    elif kind == "AlterDefaultPrivilegesStmt":
        for option in f.get("options") or []:
            n = _node(option)
            if n is not None and n[1].get("defname") == "schemas":
                arg = _node(n[1].get("arg"))
                unit.schemas_reached.update(_strings(arg[1].get("items")) if arg and arg[0] == "List" else [])
    elif kind == "MergeStmt":
        actions = {"CMD_UPDATE": "update", "CMD_DELETE": "delete", "CMD_INSERT": "insert"}
        for clause in f.get("mergeWhenClauses") or []:
            n = _node(clause)
            if n is not None and n[1].get("commandType") in actions:
                unit.effect_classes.add(actions[n[1]["commandType"]])
    elif kind == "CopyStmt" and f.get("is_from"):
        unit.effect_classes.add("insert")
    elif kind == "TruncateStmt":
        unit.effect_classes.add("delete")
    elif kind == "ViewStmt":
        unit.makes_view = True


class _Walker:
    def __init__(self, *, search_path: tuple[str, ...], functions: Functions | None = None) -> None:
        self.search_path = search_path
        self.functions = functions
        self.user_names = functions.names if functions is not None else frozenset()
        """Names a function outside pg_catalog has: an unqualified call may be of that one."""
        self.units: list[Unit] = []
        self.sensitive = _Sensitive()
        self.in_body = 0
        """Depth inside function/DO bodies, whose offsets are not the query string's."""
        self.later = 0
        """Depth inside definitions whose statements run later (see ``Unit.runs_later``)."""
        self.later_once = False
        """The next unit runs later, but what it nests runs with it (a prepared statement)."""
        self.shown = 0
        """Depth inside EXPLAIN and stored definitions (see ``Unit.shown``)."""
        self.unpinned_body = 0
        """Depth inside the body of a function or procedure that does not pin its search_path:
        it runs under its caller's path, which nobody knows when it is created."""
        self.column_defaults = 0
        """Depth inside a new table's columns and constraints: their expressions (defaults,
        CHECKs, generated columns) run when rows are written later, not when the table is made."""
        self.source: tuple[str, dict[str, Any]] = ("", {})
        """The query text and raw statement being walked (a PL/pgSQL body is parsed from it)."""

    # ---- units -------------------------------------------------------------------------

    def top_level(self, node: dict[str, Any]) -> None:
        n = _node(node)
        if n is None:
            self.units.append(self._unknown("an empty parse node"))
            return
        self.statement(n[0], n[1], nested=False, scope=frozenset())

    def _unknown(self, what: str) -> Unit:
        unit = Unit(cls=classes.StatementClass("utility", "unknown"))
        unit.findings.append(
            Finding(
                guard="unknown-statement",
                reason=f"dbgov does not know {what}, and unknown statements are refused",
                hint="Ask your dbgov administrator to add support, or rewrite the statement.",
            )
        )
        return unit

    def statement(self, kind: str, fields: dict[str, Any], *, nested: bool, scope: frozenset[str]) -> Unit:
        runs_later, self.later_once = self.later > 0 or self.later_once, False
        cls = classes.NODE_CLASSES.get(kind)
        if cls is None:
            unit = self._unknown(f"the statement kind {kind}")
            unit.nested, unit.runs_later = nested, runs_later
            self.units.append(unit)
            return unit
        unit = Unit(cls=self._refine(kind, fields, cls), nested=nested, runs_later=runs_later)
        self.units.append(unit)
        if kind in FIXED_FINDINGS:
            unit.findings.append(FIXED_FINDINGS[kind])
        shows = kind in DEFINITION_NODES or kind == "ExplainStmt" or _is_matview(kind, fields)
        self.shown += shows
        unit.shown = self.shown > 0
        try:
            handler = getattr(self, f"_on_{kind}", None)
            if handler is not None:
                handler(fields, unit, scope)
            else:
                self.fields(kind, fields, unit, scope, "target")
        finally:
            self.shown -= shows
        if unit.row_calls:
            self._row_calls(unit)
        _reach(kind, fields, unit)
        if unit.cls.coarse in {"ddl", "dcl"} and not unit.writes:
            unit.non_relation_object = True
        if kind in WHOLE_DATABASE_NODES and not unit.writes:
            unit.non_relation_object = True  # VACUUM, ANALYZE, CLUSTER, REINDEX of every table
        return unit

    def _refine(self, kind: str, f: dict[str, Any], cls: classes.StatementClass) -> classes.StatementClass:
        C = classes.StatementClass
        if kind == "TransactionStmt":
            return C("tcl", TRANSACTION_FINE.get(str(f.get("kind")), "begin"))
        if kind in {"GrantStmt", "GrantRoleStmt"} and not f.get("is_grant"):
            return C("dcl", "revoke")
        if kind == "VacuumStmt" and not f.get("is_vacuumcmd"):
            return C("utility", "analyze")
        if kind == "FetchStmt" and f.get("ismove"):
            return C("utility", "move")
        if kind == "VariableSetStmt" and str(f.get("kind", "")).startswith("VAR_RESET"):
            return C("session", "reset")
        if kind == "SelectStmt" and f.get("intoClause"):
            return C("ddl", "select-into")
        if kind == "CopyStmt" and f.get("is_from"):
            return C("copy", "copy-from")  # a write: a rule allowing copy-to (reads) does not cover it
        return cls

    # ---- generic walk ------------------------------------------------------------------

    def visit(self, value: Any, unit: Unit, scope: frozenset[str], role: Role) -> None:
        if isinstance(value, list):
            for item in value:
                self.visit(item, unit, scope, role)
            return
        if not isinstance(value, dict):
            return
        n = _node(value)
        if n is not None:
            self.node(n[0], n[1], unit, scope, role)
        elif "relname" in value and "relpersistence" in value:
            self.range_var(value, unit, scope, role)
        else:
            self.fields("", value, unit, scope, role)

    def fields(
        self, kind: str, fields: dict[str, Any], unit: Unit, scope: frozenset[str], role: Role
    ) -> None:
        for key, value in fields.items():
            if not isinstance(value, (dict, list)):
                continue
            if (
                key in {"larg", "rarg"}
                and kind == "SelectStmt"
                and isinstance(value, dict)
                and _node(value) is None
            ):
                self.node("SelectStmt", value, unit, scope, "target")
                continue
            deferred = kind == "CreateStmt" and key == "tableElts"
            self.column_defaults += deferred
            try:
                self.visit(value, unit, scope, "read" if key in READ_FIELDS else role)
            finally:
                self.column_defaults -= deferred

    def node(self, kind: str, fields: dict[str, Any], unit: Unit, scope: frozenset[str], role: Role) -> None:
        if kind == "RangeVar":
            self.range_var(fields, unit, scope, role)
        elif kind == "SelectStmt":
            self._select(fields, unit, scope)
        elif kind in DML_NODES or (kind in classes.NODE_CLASSES and kind != "SelectStmt"):
            self.statement(kind, fields, nested=True, scope=scope)
        elif kind == "FuncCall":
            self.func_call(fields, unit, scope, role)
        elif kind == "ColumnRef":
            self.column_ref(fields, unit)
        elif kind == "A_Indirection":
            self._field_selections(fields, unit)
            self.fields(kind, fields, unit, scope, role)
        elif kind == "A_Expr":
            if fields.get("kind") not in NON_OPERATOR_EXPRS:
                self.operator(fields.get("name"), unit)
            self.fields(kind, fields, unit, scope, role)
        elif kind in ("SubLink", "SortBy"):
            # `x OPERATOR(s.op) ANY (SELECT …)` and `ORDER BY x USING op` call an operator's
            # function too, as an expression's operator does.
            op_name = fields.get("operName" if kind == "SubLink" else "useOp")
            if op_name:
                self.operator(op_name, unit)
            self.fields(kind, fields, unit, scope, role)
        elif kind == "CommonTableExpr":
            self.fields(kind, fields, unit, scope, role)
        else:
            self.fields(kind, fields, unit, scope, role)

    def _select(self, fields: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        scope = self.with_clause(fields.get("withClause"), unit, scope)
        rest = {k: v for k, v in fields.items() if k not in {"withClause", "lockingClause"}}
        if fields.get("intoClause"):
            unit.extra_classes.add("create")
        self.fields("SelectStmt", rest, unit, scope, "target")
        if fields.get("lockingClause"):
            self._row_locks(fields, unit, scope)

    def _row_locks(self, fields: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        """FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE: a unit of its own (class
        `select-for-update`, coarse `update`) for the relations whose rows it locks, since
        PostgreSQL requires UPDATE privilege on them: the rows stay locked, writers wait."""
        locks: list[model.QualifiedName] = []
        for item in fields.get("lockingClause") or []:
            n = _node(item)
            if n is None or n[0] != "LockingClause":
                continue
            named = [_node(r) or ("", r) for r in n[1].get("lockedRels") or []]
            only = frozenset(str(r[1].get("relname", "")) for r in named) or None
            self._locked_from(fields.get("fromClause"), only, scope, locks)
        if locks:
            lock = Unit(
                cls=classes.StatementClass("update", "select-for-update"),
                nested=True,
                runs_later=unit.runs_later,
            )
            lock.locks.extend(dict.fromkeys(locks))
            self.units.append(lock)

    def _locked_from(
        self, items: Any, only: frozenset[str] | None, scope: frozenset[str], out: list[model.QualifiedName]
    ) -> None:
        """The relations of FROM items a locking clause reaches: all of them, or those named in
        `OF` (by alias or name), and every table inside a sub-query in FROM it reaches; never a
        WITH query (PostgreSQL does not lock through one)."""
        for item in items if isinstance(items, list) else [items]:
            n = _node(item)
            if n is None:
                continue
            kind, f = n
            alias_node = f.get("alias")
            alias = str(alias_node.get("aliasname")) if isinstance(alias_node, dict) else None
            if kind == "RangeVar":
                schema, name = f.get("schemaname"), str(f.get("relname", ""))
                if (only is None or (alias or name) in only) and (schema or name not in scope):
                    out.extend(self.candidates(schema, name))
            elif kind == "RangeTableSample":
                self._locked_from(f.get("relation"), only if alias is None else None, scope, out)
            elif kind == "JoinExpr":
                self._locked_from([f.get("larg"), f.get("rarg")], only, scope, out)
            elif kind == "RangeSubselect" and (only is None or alias in only):
                for sub_kind, sub in _walk_nodes(f.get("subquery")):
                    if sub_kind == "SelectStmt":
                        self._locked_from(sub.get("fromClause"), None, scope, out)

    def with_clause(self, with_clause: Any, unit: Unit, scope: frozenset[str]) -> frozenset[str]:
        """Walk CTE bodies with the names each may see; return the scope for the body."""
        if not isinstance(with_clause, dict):
            return scope
        ctes = [n[1] for n in map(_node, with_clause.get("ctes", [])) if n and n[0] == "CommonTableExpr"]
        cte_names = [str(c.get("ctename", "")) for c in ctes]
        recursive = bool(with_clause.get("recursive"))
        for i, cte in enumerate(ctes):
            visible = scope | frozenset(cte_names if recursive else cte_names[:i])
            self.visit(cte.get("ctequery"), unit, visible, "target")
        return scope | frozenset(cte_names)

    # ---- leaves ------------------------------------------------------------------------

    def candidates(self, schema: str | None, name: str) -> tuple[model.QualifiedName, ...]:
        """Every relation an (unqualified) name may resolve to under the session's search_path.

        Without the catalog dbgov cannot know which schema holds the name, so a statement must
        be allowed under every candidate, and a masked candidate cannot be rewritten safely.
        """
        if schema:
            return (model.QualifiedName(schema=schema, name=name),)
        if name in _pgcatalog.PG_CATALOG_RELATIONS:
            return (model.QualifiedName(schema="pg_catalog", name=name),)
        path = self.search_path or ("public",)
        return tuple(model.QualifiedName(schema=s, name=name) for s in path)

    def range_var(
        self,
        rv: dict[str, Any],
        unit: Unit,
        scope: frozenset[str],
        role: Role,
        *,
        copy_columns: tuple[str, ...] | None = None,
    ) -> None:
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        if role == "read" and not schema and name in scope:
            # A CTE reference. Only a read can be one: PostgreSQL resolves the target of INSERT,
            # UPDATE, DELETE, MERGE, COPY, TRUNCATE, LOCK and DDL in the catalog, never among
            # the WITH names (`WITH t AS (...) UPDATE t` updates the table t).
            return
        rels = self.candidates(schema, name)
        if self.unpinned_body and not schema and rels and rels[0].schema != "pg_catalog":
            _unpinned_name(unit, name)
        alias_node = rv.get("alias")
        alias = str(alias_node.get("aliasname")) if isinstance(alias_node, dict) else None
        for rel in rels:
            if (
                (rel.name in guards.LEAKY_RELATIONS and rel.schema == "pg_catalog")
                or rel.name in guards.EXTENSION_LEAKY_RELATIONS
                or (
                    rel.name in guards.INFORMATION_SCHEMA_LEAKY_RELATIONS
                    and rel.schema == "information_schema"
                )
            ):
                unit.findings.append(
                    Finding(
                        guard="leaky-catalog",
                        reason=f"{rel} exposes passwords, other sessions' statements or sampled column values",
                        hint="Query the application's own tables, or ask a DBA for the specific information.",
                    )
                )
            if rel.name in guards.STATEMENT_TEXT_RELATIONS and rel.schema == "pg_catalog":
                unit.shows_statements.append(str(rel))
            if role == "read":
                unit.reads.append(rel)
                unit.read_refs.append(
                    ReadRef(
                        rel=rel,
                        location=-1 if self.in_body else int(rv.get("location", -1)),
                        alias=alias,
                        only=not rv.get("inh", False),
                        copy_columns=copy_columns,
                        ambiguous=len(rels) > 1,
                    )
                )
            else:
                if rel.schema in ("pg_catalog", "information_schema"):
                    # UPDATE pg_settings is set_config() by a rule: a setting change nobody judged.
                    unit.findings.append(
                        Finding(
                            guard="catalog-write",
                            reason=f"writing {rel} changes the server's catalogs or settings behind the policy's back",
                            hint="Use SET for settings the policy allows; catalogs are changed by DDL.",
                        )
                    )
                unit.writes.append(rel)
                unit.targets.append(TargetRef(rel=rel, alias=alias))

    def column_ref(self, fields: dict[str, Any], unit: Unit) -> None:
        items = fields.get("fields", [])
        for item in items:
            n = _node(item)
            if n is None:
                continue
            if n[0] == "A_Star":
                unit.has_star = True
            elif n[0] == "String":
                unit.column_names.add(str(n[1].get("sval", "")))
                if len(items) == 1:
                    unit.row_names.add(str(n[1].get("sval", "")))
        nodes = [_node(i) for i in items]
        strings = [str(n[1].get("sval", "")) for n in nodes if n is not None and n[0] == "String"]
        if len(strings) >= 2 and len(strings) == len(items):
            unit.qualified_refs.add((strings[-2], strings[-1]))
            if strings[-1] in self.user_names or strings[-1] in _pgcatalog.WHOLE_ROW_FUNCTIONS:
                unit.row_calls.append((strings[-2], strings[-1]))

    def _field_selections(self, fields: dict[str, Any], unit: Unit) -> None:
        """``(x).f``, ``(expr).f``: a field of a composite value, or, when it has no field f, the
        call f(value) (functional notation), as for ``x.f``."""
        arg = _node(fields.get("arg"))
        qualifier: str | None = None
        if arg is not None and arg[0] == "ColumnRef":
            parts = arg[1].get("fields") or []
            names = _strings(parts)
            qualifier = names[0] if len(parts) == 1 and len(names) == 1 else None
        for item in fields.get("indirection") or []:
            n = _node(item)
            if n is not None and n[0] == "String":
                name = str(n[1].get("sval", ""))
                if name in self.user_names or name in _pgcatalog.WHOLE_ROW_FUNCTIONS:
                    unit.row_calls.append((qualifier, name))
            qualifier = None  # (what follows selects from the value before it, not from x)

    def _row_calls(self, unit: Unit) -> None:
        """``q.f`` is a column when the catalog says every relation q may name in this statement
        has one named f; otherwise (q names no relation here, or one without that column, or the
        catalog is not known) PostgreSQL calls f with q's whole row, which is judged as the call."""
        columns = self.functions.columns if self.functions is not None else frozenset()
        for qualifier, name in dict.fromkeys(unit.row_calls):
            named: list[ReadRef | TargetRef] = [*unit.read_refs, *unit.targets]
            rels = [
                ref.rel for ref in named if qualifier is not None and (ref.alias or ref.rel.name) == qualifier
            ]
            if rels and all((rel.schema, rel.name, name) in columns for rel in rels):
                continue
            if name in unit.functions:
                continue
            unit.functions.append(name)
            self.function_findings(name, name, 1, unit)
            if name in self.user_names:
                unit.user_functions.append(name)

    def operator(self, name: Any, unit: Unit) -> None:
        parts = _strings(name)
        if not parts:
            return
        op = parts[-1]
        schema = parts[0] if len(parts) > 1 else None
        if (
            schema in (None, "pg_catalog")
            and op in _pgcatalog.OPERATORS
            # (a user's operator of that name may fit the operands better, as a function may)
            and (schema is not None or f"operator {op}" not in self.user_names)
        ):
            return
        qualified = f"{schema}.{op}" if schema else op
        unit.user_functions.append(f"operator {qualified}")
        unit.functions.append(f"operator {qualified}")
        unit.extra_classes.add("call")

    def func_call(self, fields: dict[str, Any], unit: Unit, scope: frozenset[str], role: Role) -> None:
        parts = _strings(fields.get("funcname"))
        bare = parts[-1] if parts else ""
        schema = parts[-2] if len(parts) > 1 else None
        qualified = ".".join(parts)
        unit.functions.append(qualified)
        # Checked in any schema: extensions (dblink, tablefunc) live wherever they were installed.
        nargs = None if fields.get("func_variadic") else len(fields.get("args") or ())
        self.function_findings(qualified, bare, nargs, unit)
        if schema in (None, "pg_catalog"):
            if bare == "set_config":
                self.set_config(fields.get("args", []), unit)
            # A serial column's `DEFAULT nextval(...)` advances its sequence when rows are
            # inserted, as every insert into a serial table does; other effects in a new table's
            # expressions (locks, notifications, resets) run at each insert unseen, so they count.
            if bare in guards.BUILTIN_EFFECTS and not (self.column_defaults and bare == "nextval"):
                unit.extra_classes.add(guards.BUILTIN_EFFECTS[bare])
                unit.effects.append(bare)
            if bare in guards.STATEMENT_TEXT_FUNCTIONS:
                unit.shows_statements.append(f"{bare}()")
            if bare not in _pgcatalog.FUNCTIONS or (schema is None and bare in self.user_names):
                # A function of that name outside pg_catalog may be the one PostgreSQL calls:
                # the overload whose argument types fit best wins, whatever the path order.
                unit.user_functions.append(qualified)
        elif schema != "information_schema" or bare not in _pgcatalog.INFORMATION_SCHEMA_FUNCTIONS:
            # information_schema's own helpers (pgjdbc's getPrimaryKeys calls _pg_expandarray) are
            # SQL functions owned by the bootstrap superuser; they only read.
            unit.user_functions.append(qualified)
        self.fields("FuncCall", fields, unit, scope, role)

    def function_findings(self, qualified: str, bare: str, nargs: int | None, unit: Unit) -> None:
        """The hard guardrails a call of (or a later-call reference to) a function trips."""
        what = guards.dynamic_sql(bare, nargs)
        if what is not None:
            unit.findings.append(
                Finding(
                    guard="dynamic-sql",
                    reason=f"the function {qualified}() {what} inside the server, where dbgov cannot "
                    "check or mask what it reads; it is refused in every policy",
                    hint="Send the query itself through dbgov, which checks it and masks what it returns.",
                )
            )
        guard = guards.function_guard(bare)
        if guard is not None:
            unit.findings.append(
                Finding(
                    guard=guard,
                    reason=f"the function {qualified}() is refused in every policy ({guard})",
                    hint="This is a hard guardrail; it cannot be allowed through dbgov.",
                )
            )

    def function_reference(self, parts: list[str], unit: Unit) -> None:
        """A function an object being defined will call later (an operator's, an aggregate's)."""
        if not parts:
            return
        qualified = ".".join(parts)
        unit.functions.append(qualified)
        self.function_findings(qualified, parts[-1], None, unit)

    def set_config(self, args: list[Any], unit: Unit) -> None:
        self.sensitive.flag = True
        name = _const_text(args[0]) if args else None
        if name is None:
            unit.findings.append(
                Finding(
                    guard="guarded-setting",
                    reason="set_config() with a setting name that is not a constant cannot be checked",
                    hint="Call set_config with a literal setting name.",
                )
            )
            return
        value = _const_text(args[1]) if len(args) > 1 else None
        local = (_const_text(args[2]) if len(args) > 2 else None) in {"true", "t", "on", "1"}
        setting = Setting(name=name.lower(), value=value if value is not None else "?", local=local)
        unit.settings.append(setting)
        # It changes the setting as `SET name = value` would, and is judged as that SET too: a
        # statement of class `set` of its own, which a rule allowing the SELECT does not cover.
        change = Unit(cls=classes.StatementClass("session", "set"), nested=True, runs_later=unit.runs_later)
        change.settings.append(setting)
        self.units.append(change)

    # ---- statement handlers (`_on_<NodeType>`) -----------------------------------------

    def _on_SelectStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._select(f, unit, scope)

    def _dml(self, f: dict[str, Any], unit: Unit, scope: frozenset[str], where_key: str) -> None:
        scope = self.with_clause(f.get("withClause"), unit, scope)
        rest = {k: v for k, v in f.items() if k != "withClause"}
        self.fields("", rest, unit, scope, "target")
        target = f.get("relation") or {}
        alias_node = target.get("alias")
        names = frozenset({str(target.get("relname", ""))})
        if isinstance(alias_node, dict):
            names = frozenset({str(alias_node.get("aliasname"))})
        from_items = f.get("fromClause") or f.get("usingClause") or []
        if f.get("sourceRelation"):
            from_items = [f.get("sourceRelation")]
        unit.where_constrains = _constrains(f.get(where_key), names, from_items, self.sensitive)

    def _on_InsertStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._dml(f, unit, scope, "whereClause")
        unit.where_constrains = None
        conflict = f.get("onConflictClause")
        if isinstance(conflict, dict) and conflict.get("action") == "ONCONFLICT_UPDATE":
            unit.assigned_columns.update(_assigned(conflict.get("targetList")))
            # An upsert updates the rows it conflicts with: PostgreSQL asks for INSERT and
            # UPDATE privilege, so a rule must allow both.
            unit.extra_classes.add("update")
            target = f.get("relation") or {}
            alias_node = target.get("alias")
            name = str(alias_node.get("aliasname")) if isinstance(alias_node, dict) else target.get("relname")
            where = conflict.get("whereClause")
            unit.upsert_constrains = _constant_rows(f.get("selectStmt")) or _conjunction(
                where,
                _Rows(target=frozenset({str(name)}), unqualified_is_target=False, others={"excluded": False}),
                self.sensitive,
            )

    def _on_TransactionStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        # BEGIN READ WRITE / START TRANSACTION READ WRITE set this transaction's characteristics
        # as SET TRANSACTION does, and are judged the same way.
        if str(f.get("kind")) in {"TRANS_STMT_BEGIN", "TRANS_STMT_START"} and f.get("options"):
            unit.settings.extend(_transaction_characteristics("transaction", f.get("options")))

    def _on_UpdateStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._dml(f, unit, scope, "whereClause")
        unit.assigned_columns.update(_assigned(f.get("targetList")))

    def _on_DeleteStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._dml(f, unit, scope, "whereClause")

    def _on_MergeStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._dml(f, unit, scope, "joinCondition")
        for clause in f.get("mergeWhenClauses") or []:
            n = _node(clause)
            if n is not None and n[1].get("commandType") == "CMD_UPDATE":
                unit.assigned_columns.update(_assigned(n[1].get("targetList")))

    def _on_CopyStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.sensitive.flag = True
        if f.get("is_program"):
            unit.findings.append(
                Finding(
                    guard="copy-program",
                    reason="COPY ... PROGRAM runs a shell command on the database server",
                    hint="Use COPY ... TO STDOUT / FROM STDIN and process the data in your application.",
                )
            )
        elif f.get("filename"):
            unit.findings.append(
                Finding(
                    guard="server-files",
                    reason="COPY to or from a server file reads or writes the database server's filesystem",
                    hint="Use COPY ... TO STDOUT / FROM STDIN instead.",
                )
            )
        rv = f.get("relation")
        if isinstance(rv, dict):
            if f.get("is_from"):
                self.range_var(rv, unit, scope, "target")
            else:
                self.range_var(rv, unit, scope, "read", copy_columns=tuple(_strings(f.get("attlist"))))
        if f.get("query"):
            self.visit(f.get("query"), unit, scope, "target")
        if f.get("whereClause"):
            self.visit(f.get("whereClause"), unit, scope, "target")

    def _on_ExplainStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        opts = _defelems(f.get("options"))
        analyze = "analyze" in opts and _option_flag(opts["analyze"])
        query = _node(f.get("query"))
        if query is None:
            return
        unit.explains_prepared = query[0] == "ExecuteStmt"
        if analyze:
            self.statement(query[0], query[1], nested=True, scope=scope)
        elif query[0] == "SelectStmt":
            self._select(query[1], unit, scope)
        else:
            # Plain EXPLAIN does not run the statement: judge what it names, not what it does.
            inner = Unit(cls=classes.StatementClass("utility", "explain"))
            saved, self.units = self.units, [inner]
            try:
                handler = getattr(self, f"_on_{query[0]}", None)
                if handler is not None:
                    handler(query[1], inner, scope)
                else:
                    self.fields(query[0], query[1], inner, scope, "target")
            finally:
                nested_units, self.units = self.units[1:], saved
            unit.reads.extend(inner.reads + inner.writes)
            unit.read_refs.extend(inner.read_refs)
            unit.functions.extend(inner.functions)
            unit.findings.extend(inner.findings)
            self.units.extend(nested_units)

    def _on_DefineStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.fields("DefineStmt", f, unit, scope, "target")
        for item in f.get("definition") or []:
            n = _node(item)
            if n is None or n[0] != "DefElem" or n[1].get("defname") not in FUNCTION_DEFELEMS:
                continue
            arg = _node(n[1].get("arg"))
            if arg is not None and arg[0] == "TypeName":
                self.function_reference(_strings(arg[1].get("names")), unit)
            elif arg is not None and arg[0] == "List":
                self.function_reference(_strings(arg[1].get("items")), unit)
            elif arg is not None and arg[0] == "String":
                self.function_reference([str(arg[1].get("sval", ""))], unit)

    def _on_CreateCastStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.fields("CreateCastStmt", f, unit, scope, "target")
        func = f.get("func")
        if isinstance(func, dict):
            self.function_reference(_strings(func.get("objname")), unit)

    def _on_PrepareStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        unit.names_defined.append(("prepared", str(f.get("name", ""))))
        query = _node(f.get("query"))
        if query:  # EXECUTE runs it later, and what it nests (a WITH write) along with it
            self.later_once = True
            self.statement(query[0], query[1], nested=True, scope=scope)

    def _on_DeclareCursorStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        unit.names_defined.append(("cursor", str(f.get("portalname", ""))))
        query = _node(f.get("query"))
        if query:
            self.later_once = True
            self.statement(query[0], query[1], nested=True, scope=scope)

    def _on_ExecuteStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        unit.names_used.append(("prepared", str(f.get("name", ""))))
        self.fields("ExecuteStmt", f, unit, scope, "target")

    def _on_FetchStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        unit.names_used.append(("cursor", str(f.get("portalname", ""))))

    def _on_ClosePortalStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        name = f.get("portalname")
        unit.names_dropped.append(("cursor", str(name) if name else "*"))

    def _on_DeallocateStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        name = f.get("name")
        unit.names_dropped.append(("prepared", str(name) if name else "*"))

    def _on_DiscardStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        if f.get("target") in {"DISCARD_ALL", None}:
            unit.names_dropped.extend([("prepared", "*"), ("cursor", "*")])
            unit.settings.append(Setting(name="*", value=None))

    def _on_VariableSetStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.sensitive.flag = True
        kind = str(f.get("kind", ""))
        name = str(f.get("name", "")).lower()
        local = bool(f.get("is_local"))
        if kind == "VAR_RESET_ALL":
            unit.settings.append(Setting(name="*", value=None, local=local))
        elif kind == "VAR_SET_MULTI":
            unit.settings.extend(_transaction_characteristics(name, f.get("args")))
        elif kind in {"VAR_SET_DEFAULT", "VAR_RESET"}:
            unit.settings.append(Setting(name=name, value=None, local=local))
        else:
            values = [_const_text(a) for a in f.get("args", [])]
            value = "?" if any(v is None for v in values) else ",".join(str(v) for v in values)
            unit.settings.append(Setting(name=name, value=value, local=local))

    def _on_AlterRoleSetStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._persisted_setting(f, unit)

    def _on_AlterDatabaseSetStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self._persisted_setting(f, unit)

    def _persisted_setting(self, f: dict[str, Any], unit: Unit) -> None:
        setstmt = f.get("setstmt") or {}
        name = str(setstmt.get("name", "")).lower()
        if guards.setting_kind(name) in {"identity", "guarded"} or name in guards.ECHO_SETTINGS:
            unit.findings.append(
                Finding(
                    guard="guarded-setting",
                    reason=f"changing the default of {name} changes how later sessions read SQL",
                    hint="Setting defaults are managed by your database platform team.",
                )
            )

    def _on_DropStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        if str(f.get("removeType")) not in RELATION_DROP_TYPES:
            return
        for obj in f.get("objects", []):
            n = _node(obj)
            parts = _strings(n[1].get("items")) if n and n[0] == "List" else []
            if not parts:
                continue
            for rel in self.candidates(parts[-2] if len(parts) > 1 else None, parts[-1]):
                unit.writes.append(rel)
                unit.targets.append(TargetRef(rel=rel, alias=None))

    def _on_RenameStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        if str(f.get("renameType")) == "OBJECT_SCHEMA":
            unit.renamed_schemas.append(str(f.get("subname", "")))
        self.fields("RenameStmt", f, unit, scope, "target")

    def _on_RuleStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        rv = f.get("relation")
        if isinstance(rv, dict):
            self.range_var(rv, unit, scope, "target")
        # Rule actions run later, on someone else's statement: judge each as itself now.
        for action in f.get("actions", []) or []:
            n = _node(action)
            if n:
                self._later(n, scope | {"new", "old"})
        if f.get("whereClause"):
            self.visit(f.get("whereClause"), unit, scope | {"new", "old"}, "target")

    def _later(self, node: tuple[str, dict[str, Any]], scope: frozenset[str]) -> None:
        self.later += 1
        try:
            self.statement(node[0], node[1], nested=True, scope=scope)
        finally:
            self.later -= 1

    def _on_CreateFunctionStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.later += 1
        try:
            self._create_function(f, unit, scope)
        finally:
            self.later -= 1

    def _create_function(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.sensitive.flag = True
        opts = _defelems(f.get("options"))
        language = (_const_text(opts.get("language")) or "").lower() or "sql"
        lang_node = _node(opts.get("language"))
        if lang_node and lang_node[0] == "String":
            language = str(lang_node[1].get("sval", "")).lower()
        body = _node(opts.get("as"))
        sql_body = f.get("sql_body")
        pinned: tuple[str, ...] | None = None
        for item in f.get("options", []) or []:
            n = _node(item)
            if n and n[0] == "DefElem" and n[1].get("defname") == "set":
                self.visit(n[1].get("arg"), unit, scope, "target")
                pinned = _pinned_path(n[1].get("arg"), self.search_path, pinned)
        # The body runs under the path the function pins, or under its caller's, whatever that
        # is then: names in it are judged under the pinned path, and without one must be qualified.
        saved = self.search_path
        if pinned is not None:
            self.search_path = pinned
        else:
            self.unpinned_body += 1
        try:
            if sql_body is not None:
                self.in_body += 1
                try:
                    self.visit(sql_body, unit, scope, "target")
                finally:
                    self.in_body -= 1
                return
            texts = _strings(body[1].get("items")) if body and body[0] == "List" else []
            if body and body[0] == "String":
                texts = [str(body[1].get("sval", ""))]
            if texts:
                self._body(language, texts[0], unit, scope)
        finally:
            self.search_path = saved
            if pinned is None:
                self.unpinned_body -= 1

    def _on_AlterFunctionStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.fields("AlterFunctionStmt", f, unit, scope, "target")
        for item in f.get("actions") or []:
            n = _node(item)
            arg = (
                _node(n[1].get("arg"))
                if n and n[0] == "DefElem" and n[1].get("defname") in {"set", "reset"}
                else None
            )
            if arg is None or arg[0] != "VariableSetStmt":
                continue
            name = str(arg[1].get("name") or "").lower()
            if name == "search_path" or str(arg[1].get("kind")) == "VAR_RESET_ALL":
                unit.findings.append(
                    Finding(
                        guard="function-search-path",
                        reason="changing an existing function's search_path changes which tables its "
                        "body names, and dbgov judged that body where the function was created",
                        hint="CREATE OR REPLACE the function with its SET search_path, so dbgov judges "
                        "the body under it.",
                    )
                )

    def _on_DoStmt(self, f: dict[str, Any], unit: Unit, scope: frozenset[str]) -> None:
        self.sensitive.flag = True
        opts = _defelems(f.get("args"))
        lang = _node(opts.get("language"))
        language = str(lang[1].get("sval", "")).lower() if lang and lang[0] == "String" else "plpgsql"
        body = _node(opts.get("as"))
        text = str(body[1].get("sval", "")) if body and body[0] == "String" else ""
        self._body(language, text, unit, scope)

    def _body(self, language: str, text: str, unit: Unit, scope: frozenset[str]) -> None:
        self.in_body += 1
        try:
            self._body_units(language, text, unit, scope)
        finally:
            self.in_body -= 1

    def _body_units(self, language: str, text: str, unit: Unit, scope: frozenset[str]) -> None:
        if language == "sql":
            self._embedded(text, unit, scope, what="its SQL body")
            return
        if language == "plpgsql":
            self._plpgsql(_statement_text(*self.source), unit, scope)
            return
        self._unanalyzable(unit, f"its body is in {language}, which dbgov cannot analyze")

    def _embedded(
        self, sql: str, unit: Unit, scope: frozenset[str], *, what: str, single: bool = False
    ) -> bool:
        """Judge the statements of code embedded in `unit` as nested units; False (and the unit
        refused) if it does not parse, or is not one statement when `single` is asked."""
        try:
            stmts = parse_tree(sql)
        except pg_parser.ParseError as err:
            self._unanalyzable(unit, f"{what} does not parse: {err}")
            return False
        if single and len(stmts) != 1:
            self._unanalyzable(unit, f"{what} is not one statement: {sql!r}")
            return False
        outer = self.source
        try:
            for raw in stmts:
                n = _node(raw.get("stmt"))
                if n:
                    self.source = (sql, raw)
                    self.statement(n[0], n[1], nested=True, scope=scope)
        finally:
            self.source = outer
        return True

    def _unanalyzable(self, unit: Unit, why: str) -> None:
        unit.findings.append(
            Finding(
                guard="unanalyzable-body",
                reason=f"the statements this code would run cannot be checked: {why}",
                hint="Use LANGUAGE sql or plpgsql without dynamic SQL (EXECUTE), or have a DBA deploy it.",
            )
        )

    def _plpgsql(self, statement: str, unit: Unit, scope: frozenset[str]) -> None:
        """Judge a PL/pgSQL body as PostgreSQL runs it: the whole CREATE FUNCTION or DO statement
        goes to PostgreSQL's own PL/pgSQL parser (in libpg_query), which knows the function's
        parameters, return type and trigger variables; every SQL expression and statement in the
        tree it returns (assignments, conditions, loop bounds, RAISE arguments, RETURN, queries,
        cursors, defaults) is then judged as the SQL the executor runs for it."""
        try:
            functions = json.loads(pg_parser.parse_plpgsql_json(statement))
        except pg_parser.ParseError as err:
            self._unanalyzable(unit, f"PostgreSQL's PL/pgSQL parser rejects it: {err}")
            return
        if not isinstance(functions, list) or len(functions) != 1:
            self._unanalyzable(unit, "PostgreSQL's PL/pgSQL parser does not find exactly one body in it")
            return
        for kind, fields in _walk_nodes(functions):
            if kind in DYNAMIC_PLPGSQL and fields.get(DYNAMIC_PLPGSQL[kind]) is not None:
                ok = self._dynamic(fields[DYNAMIC_PLPGSQL[kind]], unit, scope)
            elif kind == "PLpgSQL_expr":
                ok = self._plpgsql_expr(fields, unit, scope)
            else:
                continue
            if not ok:
                return

    def _plpgsql_expr(self, fields: dict[str, Any], unit: Unit, scope: frozenset[str]) -> bool:
        query = str(fields.get("query", ""))
        mode = int(fields.get("parseMode", PARSE_STATEMENT))
        if mode == PARSE_STATEMENT:
            return self._embedded(query, unit, scope, what="an embedded statement")
        if mode == PARSE_EXPRESSION:
            return self._expression(query, unit, scope)
        if mode in PARSE_ASSIGNMENTS:
            parts = _assignment(query)
            if parts is None:
                self._unanalyzable(unit, f"dbgov cannot read the assignment {query!r}")
                return False
            target, value = parts
            # A subscript of the target (`a[(SELECT …)] := …`) is evaluated too.
            if "[" in target and not self._expression(target, unit, scope):
                return False
            return self._expression(value, unit, scope)
        self._unanalyzable(unit, f"dbgov does not know how PostgreSQL reads {query!r}")
        return False

    def _expression(self, expr: str, unit: Unit, scope: frozenset[str]) -> bool:
        """A PL/pgSQL expression is the target list (and optional FROM … clauses) of a SELECT
        the executor runs (PostgreSQL's PLpgSQL_Expr grammar), so it is judged as that SELECT."""
        return self._embedded(f"SELECT {expr}", unit, scope, what=f"the expression {expr!r}", single=True)

    def _dynamic(self, expr: Any, unit: Unit, scope: frozenset[str]) -> bool:
        """EXECUTE (and FOR/OPEN/RETURN QUERY … EXECUTE) runs the text an expression computes:
        judged when that text is a string constant, refused otherwise."""
        n = _node(expr)
        query = str(n[1].get("query", "")) if n and n[0] == "PLpgSQL_expr" else ""
        text = _constant_string(query)
        if text is None:
            self._unanalyzable(unit, f"it builds SQL at run time (EXECUTE {query.strip()[:80]})")
            return False
        return self._embedded(text, unit, scope, what="the SQL text EXECUTE runs")


def _assignment(query: str) -> tuple[str, str] | None:
    """`target := value` (or `=`) split where PostgreSQL's grammar splits it: at the first `:=`
    or `=` token outside brackets, found by PostgreSQL's own scanner so that string literals,
    quoted names and comments are never cut."""
    depth = 0
    try:
        tokens = pg_parser.scan(query)
    except pg_parser.ParseError:
        return None
    for tok in tokens:
        text = query[tok.start : tok.end + 1]
        if text in {"(", "["}:
            depth += 1
        elif text in {")", "]"}:
            depth -= 1
        elif depth == 0 and tok.name in {"COLON_EQUALS", "ASCII_61"}:
            return query[: tok.start], query[tok.end + 1 :]
    return None


def _constant_string(expr: str) -> str | None:
    """The value of a PL/pgSQL expression that is one string literal, else None."""
    try:
        stmts = parse_tree(f"SELECT {expr}")
    except pg_parser.ParseError:
        return None
    if len(stmts) != 1:
        return None
    select = _node(stmts[0].get("stmt"))
    if select is None or select[0] != "SelectStmt":
        return None
    if set(select[1]) - {"targetList", "limitOption", "op"}:
        return None
    targets = select[1].get("targetList") or []
    res = _node(targets[0]) if len(targets) == 1 else None
    val = _node(res[1].get("val")) if res and res[0] == "ResTarget" and "name" not in res[1] else None
    if val is None or val[0] != "A_Const" or "sval" not in val[1]:
        return None
    inner = val[1]["sval"]
    return str(inner.get("sval", "")) if isinstance(inner, dict) else None


#: SET TRANSACTION / SET SESSION CHARACTERISTICS AS TRANSACTION option → the setting it sets.
_CHARACTERISTICS = {
    "transaction_isolation": "transaction_isolation",
    "transaction_read_only": "transaction_read_only",
    "transaction_deferrable": "transaction_deferrable",
}


def _transaction_characteristics(name: str, args: Any) -> list[Setting]:
    """The settings `SET TRANSACTION` (this transaction's `transaction_*`) or `SET SESSION
    CHARACTERISTICS AS TRANSACTION` (the session's `default_transaction_*`) changes, so each is
    judged as the SET of that setting would be (`READ WRITE` is default_transaction_read_only =
    off, a guarded setting)."""
    if name == "transaction snapshot":  # imports another transaction's snapshot; sets nothing
        return [Setting(name="transaction_isolation", value="?", local=True)]
    session = name == "session characteristics"
    out: list[Setting] = []
    for option, arg in _defelems(args).items():
        setting = _CHARACTERISTICS.get(option)
        if setting is None:
            out.append(Setting(name=option, value="?", local=not session))
            continue
        value = _const_text(arg)
        if option != "transaction_isolation":
            value = "on" if value not in {None, "", "0", "false"} else "off"
        out.append(
            Setting(
                name=f"default_{setting}" if session else setting,
                value=value if value is not None else "?",
                local=not session,
            )
        )
    return out


def _is_matview(kind: str, fields: dict[str, Any]) -> bool:
    return kind == "CreateTableAsStmt" and fields.get("objtype") == "OBJECT_MATVIEW"


def _walk_nodes(value: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(value, list):
        for item in value:
            yield from _walk_nodes(item)
    elif isinstance(value, dict):
        n = _node(value)
        if n is not None:
            yield n
            yield from _walk_nodes(n[1])
        else:
            for v in value.values():
                yield from _walk_nodes(v)


# ---- WHERE analysis --------------------------------------------------------------------
#
# requireWhere by requirement, not by a list of tautologies (which is never complete): a WHERE
# constrains the target when one of its top-level AND conjuncts pins a column of the target to
# a value that does not come from the same row. Judged by shape only, never by constant values
# (except a LIKE pattern's leading wildcard), so the answer holds for every literal.

#: Comparison operators a pinning conjunct may use (pg_catalog's, by name).
PIN_OPERATORS = frozenset({"=", "<", ">", "<=", ">=", "<>"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _Rows:
    """Whose columns a WHERE may name: the target's names, and the other FROM items'."""

    target: frozenset[str]
    unqualified_is_target: bool
    """No other FROM item: an unqualified column can only be the target's."""
    others: dict[str, bool]
    """Other FROM item name → whether it yields row-independent values by itself (VALUES of
    constants, unnest($1)); the others count only when a conjunct pins them."""


def _constrains(where: Any, target: frozenset[str], from_items: list[Any], sensitive: _Sensitive) -> bool:
    """Does this WHERE restrict which rows of the target are touched (see above)?"""
    others: dict[str, bool] = {}
    for item in from_items:
        _from_item(item, others)
    rows = _Rows(target=target, unqualified_is_target=not others, others=others)
    return _conjunction(where, rows, sensitive)


def _conjunction(where: Any, rows: _Rows, sensitive: _Sensitive) -> bool:
    conjuncts = _conjuncts(where)
    for c in conjuncts:
        n = _node(c)
        if n is None:
            continue
        kind, f = n
        if kind == "CurrentOfExpr":
            return True
        if kind == "BoolExpr" and f.get("boolop") == "OR_EXPR":
            # every branch must constrain on its own: id = 1 OR id = 2
            if f.get("args") and all(_conjunction(a, rows, sensitive) for a in f["args"]):
                return True
            continue
        if _pins(c, rows.target, rows.unqualified_is_target, sensitive):
            return True
        if (
            kind == "SubLink"
            and f.get("subLinkType") == "EXISTS_SUBLINK"
            and _exists_constrains(f.get("subselect"), rows, sensitive)
        ):
            return True
    # A join: the target is linked by equality to another FROM item that is itself pinned.
    for name, pinned in rows.others.items():
        if any(_links(c, rows, name) for c in conjuncts) and (
            pinned or any(_pins(c, frozenset({name}), False, sensitive) for c in conjuncts)
        ):
            return True
    return False


def _constant_rows(select: Any) -> bool:
    """An INSERT's rows are written out in the statement (DEFAULT VALUES, VALUES of constants and
    parameters, a SELECT of those without FROM): an upsert then updates at most one existing row
    for each, the one its conflict target pins (PostgreSQL refuses to update a row twice)."""
    n = _node(select)
    if select is None:
        return True
    if n is None or n[0] != "SelectStmt":
        return False
    f = n[1]
    if any(f.get(k) for k in ("withClause", "fromClause", "larg", "rarg", "whereClause", "groupClause")):
        return False
    if f.get("valuesLists"):
        rows = [(_node(r) or ("", {}))[1].get("items") or [] for r in f["valuesLists"]]
        return all(_independent(v) or _is_default(v) for row in rows for v in row)
    values = [(_node(t) or ("", {}))[1].get("val") for t in f.get("targetList") or []]
    return bool(values) and all(_independent(v) for v in values)


def _is_default(value: Any) -> bool:
    n = _node(value)
    return n is not None and n[0] == "SetToDefault"


def _conjuncts(where: Any) -> list[Any]:
    n = _node(where)
    if n is None:
        return []
    if n[0] == "BoolExpr" and n[1].get("boolop") == "AND_EXPR":
        return [c for a in n[1].get("args", []) for c in _conjuncts(a)]
    return [where]


def _exists_constrains(subselect: Any, rows: _Rows, sensitive: _Sensitive) -> bool:
    """EXISTS (SELECT ... FROM x WHERE x.k = target.k AND x.c = 5): a semi-join on a pinned x."""
    n = _node(subselect)
    if n is None or n[0] != "SelectStmt":
        return False
    inner: dict[str, bool] = {}
    for item in n[1].get("fromClause") or []:
        _from_item(item, inner)
    inner_rows = _Rows(target=rows.target, unqualified_is_target=False, others=inner)
    conjuncts = _conjuncts(n[1].get("whereClause"))
    for name, pinned in inner.items():
        if name in rows.target:
            continue  # shadows the target's name: the columns are no longer the target's
        if any(_links(c, inner_rows, name) for c in conjuncts) and (
            pinned or any(_pins(c, frozenset({name}), False, sensitive) for c in conjuncts)
        ):
            return True
    return False


def _from_item(item: Any, out: dict[str, bool]) -> None:
    n = _node(item)
    if n is None:
        if isinstance(item, dict) and "relname" in item:
            n = ("RangeVar", item)
        else:
            return
    kind, f = n
    alias = f.get("alias")
    alias_name = str(alias.get("aliasname")) if isinstance(alias, dict) else None
    if kind == "RangeVar":
        out[alias_name or str(f.get("relname", ""))] = False
    elif kind == "RangeSubselect" and alias_name:
        out[alias_name] = _independent_query(f.get("subquery"))
    elif kind == "RangeFunction" and alias_name:
        out[alias_name] = not f.get("lateral") and _independent(f.get("functions"))
    elif kind == "JoinExpr":
        _from_item(f.get("larg"), out)
        _from_item(f.get("rarg"), out)


def _column(value: Any, names: frozenset[str], unqualified: bool) -> bool:
    """A column of one of ``names`` (or a cast of one, or a built-in function of one)."""
    n = _node(value)
    if n is None:
        return False
    kind, f = n
    if kind == "ColumnRef":
        parts = f.get("fields", [])
        if any((_node(p) or ("",))[0] != "String" for p in parts):
            return False  # a whole-row star
        strings = _strings(parts)
        return (len(strings) == 1 and unqualified) or (len(strings) >= 2 and strings[-2] in names)
    if kind in {"TypeCast", "CollateClause"}:
        return _column(f.get("arg"), names, unqualified)
    if kind == "FuncCall" and _stable_builtin(f):
        args = f.get("args") or []
        cols = [a for a in args if _column(a, names, unqualified)]
        return len(cols) == 1 and all(a is cols[0] or _independent(a) for a in args)
    return False


def _pins(value: Any, names: frozenset[str], unqualified: bool, sensitive: _Sensitive) -> bool:
    """Does this conjunct pin a column of ``names`` to row-independent values?"""
    n = _node(value)
    if n is None:
        return False
    kind, f = n
    if kind == "SubLink":
        op = _strings(f.get("operName"))[-1:] or ["="]
        return (
            f.get("subLinkType") in {"ANY_SUBLINK", "ALL_SUBLINK"}
            and op[0] in PIN_OPERATORS
            and _column(f.get("testexpr"), names, unqualified)
            and _independent_query(f.get("subselect"))
        )
    if kind != "A_Expr":
        return False
    op = _strings(f.get("name"))
    if len(op) > 1 and op[0] != "pg_catalog":
        return False
    left, right, ak = f.get("lexpr"), f.get("rexpr"), f.get("kind")
    if ak == "AEXPR_OP" and op[-1:] and op[-1] in PIN_OPERATORS and left is not None:
        return (_column(left, names, unqualified) and _independent(right)) or (
            _column(right, names, unqualified) and _independent(left)
        )
    if not _column(left, names, unqualified):
        return False
    if ak in {"AEXPR_OP_ANY", "AEXPR_OP_ALL", "AEXPR_IN"}:
        return op[-1:] != [] and op[-1] in PIN_OPERATORS and _independent(right)
    if ak in {"AEXPR_BETWEEN", "AEXPR_BETWEEN_SYM"}:
        return _independent(right)
    if ak in {"AEXPR_LIKE", "AEXPR_ILIKE"} and op[-1:] in (["~~"], ["~~*"]):
        sensitive.flag = True
        c = _node(right)
        pattern = c[1].get("sval") if c is not None and c[0] == "A_Const" else None
        text = pattern.get("sval", "") if isinstance(pattern, dict) else None
        return isinstance(text, str) and not text.startswith(("%", "_"))
    return False


def _pinned_path(
    arg: Any, session_path: tuple[str, ...], current: tuple[str, ...] | None
) -> tuple[str, ...] | None:
    """The search_path a function's `SET search_path ...` clause pins (`FROM CURRENT`: the
    session's), or ``current`` when the clause sets something else. None also when a schema in it
    depends on the caller (`"$user"`)."""
    n = _node(arg)
    if n is None or n[0] != "VariableSetStmt" or str(n[1].get("name") or "").lower() != "search_path":
        return current
    if str(n[1].get("kind")) == "VAR_SET_CURRENT":
        return session_path
    values = [_const_text(a) for a in n[1].get("args") or []]
    if any(v is None or v == "$user" for v in values):
        return None
    schemas = [s.strip() for v in values for s in str(v).split(",")]
    return tuple(s for s in schemas if s and s not in {"pg_catalog", "pg_temp"})


def _unpinned_name(unit: Unit, name: str) -> None:
    if name not in unit.unpinned_names:
        unit.unpinned_names.append(name)


def _assigned(target_list: Any) -> set[str]:
    """The columns a SET list assigns (``SET a = 1, (b, c) = (…)``, ``SET d[1] = …``)."""
    out: set[str] = set()
    for item in target_list or []:
        n = _node(item)
        if n is not None and n[0] == "ResTarget" and n[1].get("name"):
            out.add(str(n[1]["name"]))
    return out


def _stable_builtin(f: dict[str, Any]) -> bool:
    parts = _strings(f.get("funcname"))
    if not parts or (len(parts) > 1 and parts[-2] != "pg_catalog"):
        return False
    if f.get("over") or f.get("agg_star") or f.get("agg_filter") or f.get("agg_order"):
        return False
    return parts[-1] in _pgcatalog.FUNCTIONS and parts[-1] not in guards.VOLATILE_VALUES


def _independent(value: Any) -> bool:
    """A value that is the same for every row: constants, parameters, built-in non-volatile
    functions and operators of those, uncorrelated sub-queries; never a column of any row."""
    if isinstance(value, list):
        return all(_independent(v) for v in value)
    if value is None or value == {}:
        return True
    n = _node(value)
    if n is None:
        return False
    kind, f = n
    if kind in {"A_Const", "ParamRef", "SQLValueFunction"}:
        return True
    if kind in {"TypeCast", "CollateClause"}:
        return _independent(f.get("arg"))
    if kind == "List":
        return _independent(f.get("items"))
    if kind == "A_ArrayExpr":
        return _independent(f.get("elements"))
    if kind == "A_Expr":
        op = _strings(f.get("name"))
        return (len(op) == 1 or op[0] == "pg_catalog") and _independent([f.get("lexpr"), f.get("rexpr")])
    if kind == "FuncCall":
        return _stable_builtin(f) and _independent(f.get("args"))
    if kind == "SubLink":
        return f.get("subLinkType") in {"EXPR_SUBLINK", "ARRAY_SUBLINK"} and _independent_query(
            f.get("subselect")
        )
    return False


def _independent_query(select: Any) -> bool:
    """An uncorrelated query: every column it names is qualified by a FROM item of its own (an
    unqualified name may resolve to the outer row, which dbgov cannot rule out without the
    catalog), and it calls no volatile or user function."""
    inner: set[str] = set()
    for kind, f in _walk_nodes(select):
        if kind in {"RangeVar", "RangeSubselect", "RangeFunction"}:
            alias = f.get("alias")
            inner.add(str(alias.get("aliasname")) if isinstance(alias, dict) else str(f.get("relname", "")))
        elif kind == "CommonTableExpr":
            return False
    for kind, f in _walk_nodes(select):
        if kind == "ColumnRef":
            parts = _strings(f.get("fields"))
            if len(parts) < 2 or parts[-2] not in inner:
                return False
        elif kind == "FuncCall" and not _stable_builtin(f) and not _aggregate_ok(f):
            return False
    return True


def _aggregate_ok(f: dict[str, Any]) -> bool:
    """An aggregate (max, count(*)) over a sub-query's own rows is one value for every row."""
    parts = _strings(f.get("funcname"))
    return bool(parts) and parts[-1] in _pgcatalog.FUNCTIONS and parts[-1] not in guards.VOLATILE_VALUES


def _links(value: Any, rows: _Rows, other: str) -> bool:
    """`target.col = other.col` (either way round): the target joined to another FROM item."""
    n = _node(value)
    if n is None or n[0] != "A_Expr" or n[1].get("kind") != "AEXPR_OP" or _strings(n[1].get("name")) != ["="]:
        return False
    left, right = n[1].get("lexpr"), n[1].get("rexpr")
    only = frozenset({other})
    target_unqualified = rows.unqualified_is_target
    return (_column(left, rows.target, target_unqualified) and _column(right, only, False)) or (
        _column(right, rows.target, target_unqualified) and _column(left, only, False)
    )
