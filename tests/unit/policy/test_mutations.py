"""Mutation tests: every fixture case, respelled, is still judged at least as strictly.

Each mutation keeps the statement's meaning for PostgreSQL (case of keywords and unquoted
names, comments and newlines between tokens, quoted identifiers, dollar-quoted strings,
Unicode-escaped identifiers). A mutated attack must never get a weaker verdict than the
original; a mutated benign statement that both parsers still read must keep its verdict.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from pglast import parser as pg_parser

from dbgov_policy import engine, model

from .test_cases import CASES, POLICY

KEYWORD_KINDS = {
    "RESERVED_KEYWORD",
    "UNRESERVED_KEYWORD",
    "COL_NAME_KEYWORD",
    "TYPE_FUNC_NAME_KEYWORD",
}
Mutation = Callable[[str, random.Random], str]


def _respell(
    sql: str, rng: random.Random, spell: Callable[[pg_parser.Token, str, random.Random], str]
) -> str:
    if not sql.isascii():
        return sql  # scanner offsets are characters; keep the non-ASCII cases as they are
    try:
        tokens = pg_parser.scan(sql)
    except pg_parser.ParseError:
        return sql  # unscannable cases stay as they are (and stay blocked)
    out, pos = [], 0
    for tok in tokens:
        out.append(sql[pos : tok.start])
        text = sql[tok.start : tok.end + 1]
        out.append(spell(tok, text, rng))
        pos = tok.end + 1
    out.append(sql[pos:])
    return "".join(out)


def flip_case(sql: str, rng: random.Random) -> str:
    def spell(tok: pg_parser.Token, text: str, rng: random.Random) -> str:
        if tok.kind in KEYWORD_KINDS or (tok.name == "IDENT" and not text.startswith('"')):
            return "".join(c.upper() if rng.random() < 0.5 else c.lower() for c in text)
        return text

    return _respell(sql, rng, spell)


def comments_between_tokens(sql: str, rng: random.Random) -> str:
    def spell(tok: pg_parser.Token, text: str, rng: random.Random) -> str:
        if tok.name in {"C_COMMENT", "SQL_COMMENT"}:
            return text
        sep = rng.choice([" /* x */ ", "\n", "\t", " /* a /* nested */ b */ ", " -- c\n"])
        return f"{sep}{text}"

    return _respell(sql, rng, spell)


def quote_identifiers(sql: str, rng: random.Random) -> str:
    def spell(tok: pg_parser.Token, text: str, rng: random.Random) -> str:
        if tok.name == "IDENT" and not text.startswith('"') and text.lower() not in {"excluded"}:
            return f'"{text.lower()}"'
        return text

    return _respell(sql, rng, spell)


def dollar_strings(sql: str, rng: random.Random) -> str:
    def spell(tok: pg_parser.Token, text: str, rng: random.Random) -> str:
        if tok.name == "SCONST" and text.startswith("'") and "$" not in text:
            return "$q$" + text[1:-1].replace("''", "'") + "$q$"
        return text

    return _respell(sql, rng, spell)


def unicode_identifiers(sql: str, rng: random.Random) -> str:
    def spell(tok: pg_parser.Token, text: str, rng: random.Random) -> str:
        if tok.name == "IDENT" and not text.startswith('"'):
            return 'U&"' + "".join(f"\\{ord(c):04x}" for c in text.lower()) + '"'
        return text

    return _respell(sql, rng, spell)


MUTATIONS: dict[str, Mutation] = {
    "case": flip_case,
    "comments": comments_between_tokens,
    "quoting": quote_identifiers,
    "dollar": dollar_strings,
    "unicode": unicode_identifiers,
}
#: Mutations both parsers read exactly like the original (sqlglot sometimes reads U&"x" as `U & "x"`,
#: a differential the cross-check turns into a refusal).
FAITHFUL = {"case", "comments", "quoting", "dollar"}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
@pytest.mark.parametrize("case", CASES)
def test_mutated_case_is_judged_at_least_as_strictly(case: pytest.param, name: str) -> None:  # type: ignore[valid-type]
    original_sql: str = case["sql"]  # type: ignore[index]
    rng = random.Random(f"{name}:{original_sql}")
    mutated = MUTATIONS[name](original_sql, rng)
    original = engine.Engine(POLICY).decide(original_sql)
    got = engine.Engine(POLICY).decide(mutated)
    strict = model.STRICTNESS
    assert strict[got.verdict] >= strict[original.verdict], (mutated, got.reason)
    if original.verdict == "block":
        assert got.verdict == "block", mutated
    if name in FAITHFUL and original.verdict != "block" and mutated != original_sql:
        assert (got.verdict, got.rule) == (original.verdict, original.rule), (mutated, got.reason)
