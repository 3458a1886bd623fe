"""Statement classes: the words policies use to name kinds of SQL.

Classes exist at two levels. A coarse class (`select`, `ddl`, ...) groups fine ones (`drop`,
`alter`, ...). A rule listing either level covers the statement. The table below maps each
PostgreSQL parse-tree node (libpg_query's names) to its pair; a node missing from it is an
unknown kind of statement, and unknown means block.
"""

from __future__ import annotations

import dataclasses

COARSE: frozenset[str] = frozenset(
    {
        "select",
        "insert",
        "update",
        "delete",
        "merge",
        "copy",
        "ddl",
        "dcl",
        "tcl",
        "session",
        "utility",
        "procedural",
    }
)


@dataclasses.dataclass(frozen=True, slots=True)
class StatementClass:
    """A statement's place in the taxonomy."""

    coarse: str
    fine: str


_C = StatementClass

#: libpg_query node name → class. Nodes whose class depends on a field are refined in
#: `analyze` (GrantStmt grant/revoke, TransactionStmt kinds, VacuumStmt vacuum/analyze, ...).
NODE_CLASSES: dict[str, StatementClass] = {
    "SelectStmt": _C("select", "select"),
    "InsertStmt": _C("insert", "insert"),
    "UpdateStmt": _C("update", "update"),
    "DeleteStmt": _C("delete", "delete"),
    "MergeStmt": _C("merge", "merge"),
    "CopyStmt": _C("copy", "copy-to"),  # COPY ... FROM is refined to copy-from in analyze
    # DDL
    "CreateStmt": _C("ddl", "create"),
    "CreateTableAsStmt": _C("ddl", "create"),
    "ViewStmt": _C("ddl", "create"),
    "IndexStmt": _C("ddl", "create"),
    "CreateSeqStmt": _C("ddl", "create"),
    "CreateSchemaStmt": _C("ddl", "create"),
    "CreateFunctionStmt": _C("ddl", "create"),
    "CreateTrigStmt": _C("ddl", "create"),
    "CreateEventTrigStmt": _C("ddl", "create"),
    "RuleStmt": _C("ddl", "create"),
    "CreateExtensionStmt": _C("ddl", "create"),
    "CompositeTypeStmt": _C("ddl", "create"),
    "CreateEnumStmt": _C("ddl", "create"),
    "CreateRangeStmt": _C("ddl", "create"),
    "CreateDomainStmt": _C("ddl", "create"),
    "DefineStmt": _C("ddl", "create"),
    "CreatedbStmt": _C("ddl", "create"),
    "CreateTableSpaceStmt": _C("ddl", "create"),
    "CreatePolicyStmt": _C("ddl", "create"),
    "CreateStatsStmt": _C("ddl", "create"),
    "CreateCastStmt": _C("ddl", "create"),
    "CreateConversionStmt": _C("ddl", "create"),
    "CreateOpClassStmt": _C("ddl", "create"),
    "CreateOpFamilyStmt": _C("ddl", "create"),
    "CreatePLangStmt": _C("ddl", "create"),
    "CreateTransformStmt": _C("ddl", "create"),
    "CreateAmStmt": _C("ddl", "create"),
    "CreatePublicationStmt": _C("ddl", "create"),
    "CreateSubscriptionStmt": _C("ddl", "create"),
    "CreateFdwStmt": _C("ddl", "create"),
    "CreateForeignServerStmt": _C("ddl", "create"),
    "CreateForeignTableStmt": _C("ddl", "create"),
    "CreateUserMappingStmt": _C("ddl", "create"),
    "ImportForeignSchemaStmt": _C("ddl", "create"),
    "AlterTableStmt": _C("ddl", "alter"),
    "AlterSeqStmt": _C("ddl", "alter"),
    "AlterDomainStmt": _C("ddl", "alter"),
    "AlterFunctionStmt": _C("ddl", "alter"),
    "AlterEnumStmt": _C("ddl", "alter"),
    "AlterExtensionStmt": _C("ddl", "alter"),
    "AlterExtensionContentsStmt": _C("ddl", "alter"),
    "AlterObjectSchemaStmt": _C("ddl", "alter"),
    "AlterOwnerStmt": _C("ddl", "alter"),
    "AlterObjectDependsStmt": _C("ddl", "alter"),
    "AlterOperatorStmt": _C("ddl", "alter"),
    "AlterTypeStmt": _C("ddl", "alter"),
    "AlterTableSpaceOptionsStmt": _C("ddl", "alter"),
    "AlterTableMoveAllStmt": _C("ddl", "alter"),
    "AlterPolicyStmt": _C("ddl", "alter"),
    "AlterStatsStmt": _C("ddl", "alter"),
    "AlterPublicationStmt": _C("ddl", "alter"),
    "AlterSubscriptionStmt": _C("ddl", "alter"),
    "AlterFdwStmt": _C("ddl", "alter"),
    "AlterForeignServerStmt": _C("ddl", "alter"),
    "AlterUserMappingStmt": _C("ddl", "alter"),
    "AlterEventTrigStmt": _C("ddl", "alter"),
    "AlterTSDictionaryStmt": _C("ddl", "alter"),
    "AlterTSConfigurationStmt": _C("ddl", "alter"),
    "AlterOpFamilyStmt": _C("ddl", "alter"),
    "AlterCollationStmt": _C("ddl", "alter"),
    "AlterDatabaseStmt": _C("ddl", "alter"),
    "AlterDatabaseRefreshCollStmt": _C("ddl", "alter"),
    "RenameStmt": _C("ddl", "alter"),
    "DropStmt": _C("ddl", "drop"),
    "DropdbStmt": _C("ddl", "drop"),
    "DropTableSpaceStmt": _C("ddl", "drop"),
    "DropSubscriptionStmt": _C("ddl", "drop"),
    "DropUserMappingStmt": _C("ddl", "drop"),
    "DropOwnedStmt": _C("ddl", "drop"),
    "TruncateStmt": _C("ddl", "truncate"),
    "CommentStmt": _C("ddl", "comment"),
    "SecLabelStmt": _C("ddl", "security-label"),
    "RefreshMatViewStmt": _C("ddl", "refresh"),
    # DCL
    "GrantStmt": _C("dcl", "grant"),
    "GrantRoleStmt": _C("dcl", "grant"),
    "AlterDefaultPrivilegesStmt": _C("dcl", "grant"),
    "CreateRoleStmt": _C("dcl", "create"),
    "AlterRoleStmt": _C("dcl", "alter"),
    "AlterRoleSetStmt": _C("dcl", "alter"),
    "AlterDatabaseSetStmt": _C("ddl", "alter"),
    "DropRoleStmt": _C("dcl", "drop"),
    "ReassignOwnedStmt": _C("dcl", "reassign"),
    # TCL
    "TransactionStmt": _C("tcl", "begin"),
    "ConstraintsSetStmt": _C("tcl", "set-constraints"),
    # session
    "VariableSetStmt": _C("session", "set"),
    "VariableShowStmt": _C("session", "show"),
    "DiscardStmt": _C("session", "discard"),
    "ListenStmt": _C("session", "listen"),
    "UnlistenStmt": _C("session", "unlisten"),
    "NotifyStmt": _C("session", "notify"),
    # utility
    "ExplainStmt": _C("utility", "explain"),
    "VacuumStmt": _C("utility", "vacuum"),
    "LockStmt": _C("utility", "lock"),
    "CheckPointStmt": _C("utility", "checkpoint"),
    "ReindexStmt": _C("utility", "reindex"),
    "ClusterStmt": _C("utility", "cluster"),
    "LoadStmt": _C("utility", "load"),
    "PrepareStmt": _C("utility", "prepare"),
    "ExecuteStmt": _C("utility", "execute"),
    "DeallocateStmt": _C("utility", "deallocate"),
    "DeclareCursorStmt": _C("utility", "declare"),
    "FetchStmt": _C("utility", "fetch"),
    "ClosePortalStmt": _C("utility", "close"),
    "AlterSystemStmt": _C("utility", "alter-system"),
    # procedural
    "DoStmt": _C("procedural", "do"),
    "CallStmt": _C("procedural", "call"),
}

#: Fine classes that only some nodes produce (field-dependent refinements in `analyze`).
EXTRA_FINE: frozenset[str] = frozenset(
    {
        "revoke",
        "commit",
        "rollback",
        "savepoint",
        "release",
        "prepare-transaction",
        "commit-prepared",
        "rollback-prepared",
        "reset",
        "analyze",
        "move",
        "select-into",
        "copy-from",
        "select-for-update",
    }
)

FINE: frozenset[str] = frozenset(c.fine for c in NODE_CLASSES.values()) | EXTRA_FINE

#: Every class name a rule may list.
ALL: frozenset[str] = COARSE | FINE

#: Aliases users reach for; compile accepts them and maps to the canonical name.
ALIASES: dict[str, str] = {
    "start": "begin",
    "end": "commit",
    "abort": "rollback",
    "transaction": "tcl",
    "function": "call",
}


def with_article(word: str) -> str:
    """``word`` after "a" or "an" as it is read aloud: "an insert", "an UPDATE", "a select"."""
    return ("an " if word[:1].lower() in ("a", "e", "i", "o", "u") else "a ") + word
