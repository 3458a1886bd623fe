"""Statement text for audit records with every literal replaced by a placeholder ($1, $2, ...)."""

from __future__ import annotations

from pglast import parser as pg_parser

UNPARSEABLE = "<statement not shown: it does not parse>"


def redact_literals(sql: str) -> str:
    """``sql`` with constants replaced by libpg_query's normalizer; a fixed text if it fails."""
    try:
        return str(pg_parser.normalize(sql))
    except (pg_parser.ParseError, ValueError, RecursionError):
        return UNPARSEABLE
