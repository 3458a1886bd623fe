"""The hard guardrails: what no policy can allow.

These lists are the product's opinion of what a governed workload must never do through a
proxied connection: run programs or touch files on the database server, signal other
backends, replicate or decode the WAL, reach other servers, read catalogs that leak data or
secrets, or change how later SQL is read or whose privileges it runs with.
"""

from __future__ import annotations

#: Functions refused in every policy, by bare name (pg_catalog or unqualified).
DENIED_FUNCTIONS: dict[str, str] = {
    **dict.fromkeys(
        (
            "pg_read_file",
            "pg_read_binary_file",
            "pg_stat_file",
            "pg_ls_dir",
            "pg_ls_logdir",
            "pg_ls_waldir",
            "pg_ls_tmpdir",
            "pg_ls_archive_statusdir",
            "pg_ls_logicalmapdir",
            "pg_ls_logicalsnapdir",
            "pg_ls_replslotdir",
            "pg_file_write",
            "pg_file_rename",
            "pg_file_unlink",
            "pg_file_sync",
            "pg_logdir_ls",
            "pg_current_logfile",
        ),
        "server-files",
    ),
    **dict.fromkeys(
        (
            "lo_import",
            "lo_export",
            "lo_open",
            "lo_close",
            "lo_creat",
            "lo_create",
            "lo_unlink",
            "lo_get",
            "lo_put",
            "lo_from_bytea",
            "lo_truncate",
            "lo_truncate64",
            "lo_lseek",
            "lo_lseek64",
            "lo_tell",
            "lo_tell64",
            "loread",
            "lowrite",
        ),
        "large-objects",
    ),
    **dict.fromkeys(
        (
            "pg_terminate_backend",
            "pg_cancel_backend",
            "pg_signal_backend",
            "pg_reload_conf",
            "pg_rotate_logfile",
            "pg_promote",
            "pg_log_backend_memory_contexts",
            "pg_wal_replay_pause",
            "pg_wal_replay_resume",
            "pg_switch_wal",
            "pg_backup_start",
            "pg_backup_stop",
            "pg_create_restore_point",
        ),
        "backend-control",
    ),
    **dict.fromkeys(
        (
            "pg_create_physical_replication_slot",
            "pg_create_logical_replication_slot",
            "pg_drop_replication_slot",
            "pg_copy_physical_replication_slot",
            "pg_copy_logical_replication_slot",
            "pg_replication_slot_advance",
            "pg_logical_slot_get_changes",
            "pg_logical_slot_peek_changes",
            "pg_logical_slot_get_binary_changes",
            "pg_logical_slot_peek_binary_changes",
            "pg_logical_emit_message",
            "pg_replication_origin_create",
            "pg_replication_origin_drop",
            "pg_replication_origin_advance",
            "pg_replication_origin_session_setup",
            "pg_replication_origin_xact_setup",
            "pg_sync_replication_slots",
        ),
        "replication",
    ),
    **dict.fromkeys(
        (
            # pageinspect, pg_walinspect, pg_dirtyread, pg_surgery: a relation's raw pages, rows
            # included, or its tuples rewritten in place (extensions: any schema)
            "get_raw_page",
            "heap_page_items",
            "heap_page_item_attrs",
            "tuple_data_split",
            "bt_page_items",
            "brin_page_items",
            "gist_page_items",
            "gist_page_items_bytea",
            "gin_leafpage_items",
            "hash_page_items",
            "pg_get_wal_block_info",
            "pg_get_wal_record_info",
            "pg_get_wal_records_info",
            "pg_dirtyread",
            "heap_force_kill",
            "heap_force_freeze",
        ),
        "raw-pages",
    ),
    **dict.fromkeys(
        (
            "pg_stat_get_activity",
            "pg_stat_get_backend_activity",
            "pg_get_backend_memory_contexts",
            "pg_stat_statements",
            "pg_stat_statements_info",
            "pg_stat_statements_reset",
            "pg_hba_file_rules",
            "pg_ident_file_mappings",
            "pg_show_all_file_settings",
            # the text the server runs, which for masked reads is dbgov's rewrite (and its mask key)
            "current_query",
        ),
        "leaky-catalog",
    ),
}

_RUNS_TEXT = "runs the query it is given as text"
_TABLE_BY_NAME = "reads every row of the table it is given by name"

#: Functions that run SQL given as text, or read a relation's rows given its name, inside the
#: server: what they run never passes through dbgov, so no rule, guardrail or mask applies to
#: it. Refused in every policy and in any schema (tablefunc installs wherever it is told), with
#: what each does for the reason. Checked against PostgreSQL 16's pg_proc (and tablefunc's).
DYNAMIC_SQL_FUNCTIONS: dict[str, str] = {
    "ts_stat": _RUNS_TEXT,
    "query_to_xml": _RUNS_TEXT,
    "query_to_xmlschema": _RUNS_TEXT,
    "query_to_xml_and_xmlschema": _RUNS_TEXT,
    "cursor_to_xml": "reads the open cursor it is given by name",
    "cursor_to_xmlschema": "reads the open cursor it is given by name",
    "table_to_xml": _TABLE_BY_NAME,
    "table_to_xmlschema": _TABLE_BY_NAME,
    "table_to_xml_and_xmlschema": _TABLE_BY_NAME,
    "schema_to_xml": "reads every row of every table in the schema it is given",
    "schema_to_xmlschema": "reads every table in the schema it is given",
    "schema_to_xml_and_xmlschema": "reads every row of every table in the schema it is given",
    "database_to_xml": "reads every row of every table in the database",
    "database_to_xmlschema": "reads every table in the database",
    "database_to_xml_and_xmlschema": "reads every row of every table in the database",
    "currtid2": "reads the rows of the table it is given by name",
    "crosstab": _RUNS_TEXT + " (tablefunc)",
    "crosstab2": _RUNS_TEXT + " (tablefunc)",
    "crosstab3": _RUNS_TEXT + " (tablefunc)",
    "crosstab4": _RUNS_TEXT + " (tablefunc)",
    "connectby": "reads the table it is given by name (tablefunc)",
}

#: Functions that run SQL text in some of their forms only: name → argument counts of those
#: forms (`ts_rewrite(tsquery, text)` runs its second argument; the 3-argument form does not).
DYNAMIC_SQL_FORMS: dict[str, frozenset[int]] = {"ts_rewrite": frozenset({2})}


def dynamic_sql(bare_name: str, nargs: int | None) -> str | None:
    """What a function does with SQL text or a table name, if it runs or reads one; else None.

    ``nargs`` None (a function named in CREATE OPERATOR or CREATE AGGREGATE, called later with
    arguments dbgov does not see) counts every form.
    """
    what = DYNAMIC_SQL_FUNCTIONS.get(bare_name)
    if what is not None:
        return what
    forms = DYNAMIC_SQL_FORMS.get(bare_name)
    if forms is not None and (nargs is None or nargs in forms):
        return _RUNS_TEXT
    return None


#: Built-in SQL-language functions and the built-ins they call (transitively), so a policy
#: that denies the callee (`pg_sleep`) denies the wrapper (`pg_sleep_for`) too. Read once from
#: PostgreSQL 16 (the FuncCall nodes of each `pg_catalog` SQL function's body; a function
#: calling only its own overloads, such as `round(numeric)`, is left out). Operators in the
#: bodies (`$2 + $1`) are not followed.
BUILTIN_CALLS: dict[str, frozenset[str]] = {
    "bit_length": frozenset(("length", "octet_length")),
    "log10": frozenset(("log",)),
    "path_contain_pt": frozenset(("on_ppath",)),
    "pg_sleep_for": frozenset(("clock_timestamp", "extract", "pg_sleep")),
    "pg_sleep_until": frozenset(("clock_timestamp", "extract", "pg_sleep")),
    "substring": frozenset(("similar_to_escape",)),
    "ts_debug": frozenset(("get_current_ts_config", "ts_lexize", "ts_parse", "ts_token_type")),
}

#: Built-in functions whose value changes from row to row (volatile, and not already refused):
#: a WHERE comparing a column with one of them does not pin the column to one value.
VOLATILE_VALUES: frozenset[str] = frozenset(
    {
        "random",
        "random_normal",
        "clock_timestamp",
        "timeofday",
        "gen_random_uuid",
        "nextval",
        "setval",
        "currval",
        "lastval",
        "array_sample",
        "array_shuffle",
        "txid_current",
        "pg_current_xact_id",
    }
)

#: Catalog views and functions that show the text of statements this session prepared or
#: declared: for masked reads that text is dbgov's rewrite, with the `hash` mask key in it.
#: Refused whenever the policy masks anything (the statement read may be an earlier one).
STATEMENT_TEXT_RELATIONS: frozenset[str] = frozenset({"pg_prepared_statements", "pg_cursors"})
STATEMENT_TEXT_FUNCTIONS: frozenset[str] = frozenset({"pg_prepared_statement", "pg_cursor"})

#: Extension relations that leak other sessions' statements, whatever schema holds them.
EXTENSION_LEAKY_RELATIONS: frozenset[str] = frozenset({"pg_stat_statements", "pg_stat_statements_info"})

#: information_schema views over the same secrets: user mappings' options hold the passwords
#: foreign servers are reached with (what the pg_user_mappings guard hides).
INFORMATION_SCHEMA_LEAKY_RELATIONS: frozenset[str] = frozenset({"user_mapping_options", "_pg_user_mappings"})

#: Settings that make the server send the client the parse tree or plan of every statement
#: (at LOG level, with `client_min_messages` at log or below): constants included, so the
#: `hash` mask key of a masked read. Turning them on is refused whenever the policy masks.
ECHO_SETTINGS: frozenset[str] = frozenset({"debug_print_parse", "debug_print_rewritten", "debug_print_plan"})


#: Built-in functions that change state: a statement calling one also counts as this class,
#: so a rule that allows only reads does not cover it.
BUILTIN_EFFECTS: dict[str, str] = {
    # a sequence advanced or reset stays so (a write no ROLLBACK undoes)
    "nextval": "call",
    "setval": "call",
    # advisory locks: held to the end of the session (or transaction), others wait for them
    **dict.fromkeys(
        (
            "pg_advisory_lock",
            "pg_advisory_lock_shared",
            "pg_advisory_xact_lock",
            "pg_advisory_xact_lock_shared",
            "pg_try_advisory_lock",
            "pg_try_advisory_lock_shared",
            "pg_try_advisory_xact_lock",
            "pg_try_advisory_xact_lock_shared",
            "pg_advisory_unlock",
            "pg_advisory_unlock_shared",
            "pg_advisory_unlock_all",
        ),
        "lock",
    ),
    "pg_notify": "notify",
    "pg_stat_reset": "call",
    "pg_stat_reset_shared": "call",
    "pg_stat_reset_single_table_counters": "call",
    "pg_stat_reset_single_function_counters": "call",
    "pg_stat_reset_slru": "call",
    "pg_stat_reset_replication_slot": "call",
    "pg_stat_reset_subscription_stats": "call",
    "txid_current": "call",
    "pg_current_xact_id": "call",
}

#: Name prefixes refused whatever follows (extension families that reach other servers).
DENIED_FUNCTION_PREFIXES: dict[str, str] = {
    "dblink": "remote-connection",
    "binary_upgrade_": "backend-control",
    "pg_replication_origin_": "replication",
    "pg_logical_slot_": "replication",
}

#: Catalog relations that leak data, secrets or other sessions' statements.
LEAKY_RELATIONS: frozenset[str] = frozenset(
    {
        "pg_authid",
        "pg_shadow",
        "pg_user_mapping",
        "pg_user_mappings",
        "pg_statistic",
        "pg_statistic_ext_data",
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
        "pg_largeobject",
        "pg_stat_activity",
        "pg_stat_statements",
        "pg_stat_statements_info",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_file_settings",
        "pg_replication_slots",
        "pg_stat_replication",
        "pg_subscription",
        "pg_stat_subscription",
        "pg_replication_origin",
        "pg_replication_origin_status",
        "pg_backend_memory_contexts",
        "pg_stat_wal_receiver",
    }
)

#: Settings that change whose privileges later SQL runs with.
IDENTITY_SETTINGS: frozenset[str] = frozenset({"role", "session_authorization"})

#: Settings that change how later SQL is read or resolved, or switch off integrity checks.
GUARDED_SETTINGS: frozenset[str] = frozenset(
    {
        "search_path",
        "standard_conforming_strings",
        "backslash_quote",
        "escape_string_warning",
        "session_replication_role",
        "transform_null_equals",
        "client_encoding",
        "allow_system_table_mods",
        "lo_compat_privileges",
        "default_transaction_read_only",
        "transaction_read_only",
        "row_security",
        "check_function_bodies",
        "session_preload_libraries",
        "local_preload_libraries",
        "dynamic_library_path",
        "default_table_access_method",
        "array_nulls",
        "quote_all_identifiers",
        "plpgsql.variable_conflict",
    }
)

#: Settings a session may change freely; drivers and ORMs set these routinely.
BENIGN_SETTINGS: frozenset[str] = frozenset(
    {
        "application_name",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "transaction_timeout",
        "timezone",
        "datestyle",
        "intervalstyle",
        "extra_float_digits",
        "bytea_output",
        "client_min_messages",
        "default_transaction_isolation",
        "transaction_isolation",
        "default_transaction_deferrable",
        "transaction_deferrable",
        "work_mem",
        "maintenance_work_mem",
        "temp_buffers",
        "synchronous_commit",
        "jit",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
        "geqo",
        "random_page_cost",
        "seq_page_cost",
        "effective_cache_size",
        "cpu_tuple_cost",
        "cpu_index_tuple_cost",
        "cpu_operator_cost",
        "max_parallel_workers_per_gather",
        "plan_cache_mode",
        "xmlbinary",
        "xmloption",
        "default_text_search_config",
        "gin_fuzzy_search_limit",
        "vacuum_cost_delay",
        "deadlock_timeout",
        "log_statement",
        "debug_parallel_query",
    }
)

BENIGN_SETTING_PREFIXES: tuple[str, ...] = ("enable_",)


def function_guard(bare_name: str) -> str | None:
    """The guardrail a function name trips, or None."""
    if bare_name in DENIED_FUNCTIONS:
        return DENIED_FUNCTIONS[bare_name]
    for prefix, guard in DENIED_FUNCTION_PREFIXES.items():
        if bare_name.startswith(prefix):
            return guard
    return None


def setting_kind(name: str) -> str:
    """`identity`, `guarded`, `benign` or `other` for a setting name (lower case)."""
    if name in IDENTITY_SETTINGS:
        return "identity"
    if name in GUARDED_SETTINGS:
        return "guarded"
    if name in BENIGN_SETTINGS or name.startswith(BENIGN_SETTING_PREFIXES):
        return "benign"
    return "other"
