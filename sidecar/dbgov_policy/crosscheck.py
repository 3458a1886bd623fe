"""A second opinion from sqlglot on where statements start and what they are.

A proxy that sees one statement where the server sees two is a classic bypass, so every
statement libpg_query finds is parsed again by sqlglot, which must see exactly one statement
of the same kind. Any disagreement, or a statement sqlglot cannot parse, blocks.

sqlglot's PostgreSQL dialect parses queries, DML, DDL and privileges into real trees; for
transaction, session and utility commands (SAVEPOINT, LISTEN, VACUUM, ...) it falls back to a
generic Command or misreads the keyword, so those classes are checked by libpg_query alone
(their grammar is a keyword and a few names, with nothing to hide a second statement in that
libpg_query would not also see).

sqlglot also validates each expression it builds (an argument it expected and did not get);
those complaints say nothing about statement boundaries or kinds, so they are ignored, while
a statement sqlglot cannot build at all is refused.

sqlglot is pure Python on the proxy's event loop (~1 µs per byte, far more with deep nesting),
so it reads query strings up to ``MAX_SIZE`` only. Above that the libpg_query analysis — the
authority, which parses exactly as the server does — decides alone; the second opinion only
ever adds refusals, it never allows what libpg_query refuses, so skipping it loses a
cross-check, never a check.
"""

from __future__ import annotations

import logging

import sqlglot
from sqlglot import ErrorLevel, exp

from dbgov_policy import analyze

#: Coarse class → sqlglot node types that agree with it.
AGREES: dict[str, tuple[type[exp.Expression], ...]] = {
    "select": (
        exp.Select,
        exp.Union,
        exp.Intersect,
        exp.Except,
        exp.Values,
        exp.Subquery,
        exp.Table,
    ),
    "insert": (exp.Insert,),
    "update": (exp.Update,),
    "delete": (exp.Delete,),
    "merge": (exp.Merge,),
    "copy": (exp.Copy,),
    "ddl": (
        exp.Create,
        exp.Drop,
        exp.Alter,
        exp.TruncateTable,
        exp.Comment,
        exp.Select,
        exp.Command,
    ),
    "dcl": (exp.Grant, exp.Revoke, exp.Create, exp.Alter, exp.Drop, exp.Command),
}
DDL_COMMAND_WORDS = frozenset(
    {
        "CREATE",
        "ALTER",
        "DROP",
        "COMMENT",
        "REFRESH",
        "SECURITY",
        "IMPORT",
        "TRUNCATE",
        "GRANT",
        "REVOKE",
        "REASSIGN",
    }
)

MAX_SIZE = 256 * 1024
"""Longest query string (characters) sqlglot is asked about: ~0.2-0.5 s of parsing at most."""

# sqlglot logs a warning for every statement it parses as a generic Command; that is expected here.
logging.getLogger("sqlglot").setLevel(logging.ERROR)


def check(statement_texts: list[str], units: tuple[analyze.Unit, ...], *, whole: int = 0) -> str | None:
    """Why sqlglot disagrees with libpg_query about these statements, or None.

    ``whole``: the length of the query string the texts come from; over ``MAX_SIZE`` only
    libpg_query's own split is checked against its units, and sqlglot is not asked."""
    top = [u for u in units if not u.nested]
    if len(top) != len(statement_texts):
        return f"libpg_query found {len(top)} statements but split the text into {len(statement_texts)}"
    if max(whole, sum(map(len, statement_texts))) > MAX_SIZE:
        return None
    for text, unit in zip(statement_texts, top, strict=True):
        expected = AGREES.get(unit.cls.coarse)
        if expected is None:
            continue
        try:
            parsed = [
                e
                for e in sqlglot.parse(text, read="postgres", error_level=ErrorLevel.IGNORE)
                if e is not None
            ]
        except (sqlglot.errors.ParseError, sqlglot.errors.TokenError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            return f"sqlglot cannot parse a {unit.cls.fine} statement that PostgreSQL accepts ({first[:160]})"
        except RecursionError:
            return "sqlglot cannot parse the statement (nesting too deep)"
        except Exception as err:  # a crash inside the second parser is a refusal, never a pass
            return f"sqlglot fails on a {unit.cls.fine} statement ({type(err).__name__})"
        if len(parsed) != 1:
            return f"sqlglot sees {len(parsed)} statements where PostgreSQL sees one"
        node = parsed[0]
        if not isinstance(node, expected):
            return (
                f"PostgreSQL reads a {unit.cls.fine} statement where sqlglot reads {type(node).__name__}; "
                "the parsers disagree"
            )
        if isinstance(node, exp.Command) and str(node.this).upper() not in DDL_COMMAND_WORDS:
            return f"sqlglot reads {node.this!s} where PostgreSQL reads a {unit.cls.fine} statement"
    return None
