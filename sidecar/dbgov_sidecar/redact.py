"""Statement text for audit records with every literal replaced by a placeholder ($1, $2, ...)."""

from __future__ import annotations

from pglast import parser as pg_parser

UNPARSEABLE = "<statement not shown: it does not parse>"

NORMALIZE_MAX_SIZE = 16 * 1024
"""Longer texts are redacted token by token: libpg_query's normalizer costs far more than the
text's length on wide statements (gigabytes for a 600 KB `SELECT 1,1,…`), and a refused
statement is audited too, whatever its size."""

_CONSTANTS = frozenset(("SCONST", "USCONST", "ICONST", "FCONST", "BCONST", "XCONST"))


def redact_literals(sql: str) -> str:
    """``sql`` with constants replaced by libpg_query's normalizer; a fixed text if it fails."""
    try:
        if len(sql) > NORMALIZE_MAX_SIZE:
            return _by_tokens(sql)
        return str(pg_parser.normalize(sql))
    except (pg_parser.ParseError, ValueError, RecursionError):
        return UNPARSEABLE


def _by_tokens(sql: str) -> str:
    """The same replacement by libpg_query's scanner (linear): every string, number, bit and
    hex constant becomes ``$n``, numbered after the text's own parameters."""
    tokens = pg_parser.scan(sql)
    number = max((int(sql[t.start + 1 : t.end + 1]) for t in tokens if t.name == "PARAM"), default=0)
    out: list[str] = []
    pos = 0
    for token in tokens:
        if token.name in _CONSTANTS:
            number += 1
            out.append(sql[pos : token.start])
            out.append(f"${number}")
            pos = token.end + 1
    out.append(sql[pos:])
    return "".join(out)
