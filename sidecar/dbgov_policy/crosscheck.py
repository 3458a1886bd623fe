"""A second opinion from sqlglot on where statements start and what they are.

A proxy that sees one statement where the server sees two is a classic bypass, so every
statement libpg_query finds is parsed again by sqlglot, which must see exactly one statement
of the same kind. libpg_query is PostgreSQL's own grammar and the authority: the second
opinion refuses only where it parses too and disagrees on a fact the decision uses (how many
statements, which kind). A statement sqlglot cannot tokenize or parse (`VALUES ($1,$2)`, which
pgjdbc sends for every two-parameter insert; option lists it does not know), or reads only
as a generic Command, is left to libpg_query: a parser's gap is not a disagreement.

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

from dbgov_policy import analyze, classes

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

#: What sqlglot builds for a statement it understood; anything else (an Alias, a Column, a
#: literal) is what it makes of a statement it did not understand, which is no opinion.
_STATEMENTS: tuple[type[exp.Expression], ...] = (
    *{t for kinds in AGREES.values() for t in kinds},
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Set,
    exp.Command,
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
        except (sqlglot.errors.ParseError, sqlglot.errors.TokenError, RecursionError):
            continue  # sqlglot's gap, not a disagreement: libpg_query decides
        except Exception:  # a crash inside the second parser: no opinion
            continue
        if len(parsed) != 1:
            if any(isinstance(e, (exp.Command, exp.EndStatement)) for e in parsed):
                continue  # it fell back to a generic Command somewhere: it did not parse the text
            return f"sqlglot sees {len(parsed)} statements where PostgreSQL sees one"
        node = parsed[0]
        if isinstance(node, exp.Command) and str(node.this).upper() not in DDL_COMMAND_WORDS:
            continue  # a generic Command is sqlglot not parsing it, not reading another kind
        if not isinstance(node, _STATEMENTS):
            continue  # a bare expression (`IMPORT FOREIGN SCHEMA …` read as an Alias): no statement
        if not isinstance(node, expected):
            return (
                f"PostgreSQL reads {classes.with_article(unit.cls.fine)} statement where sqlglot reads "
                f"{type(node).__name__}; "
                "the parsers disagree"
            )
    return None
