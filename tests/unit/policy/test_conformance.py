"""Conformance over PostgreSQL's own regression SQL: agree with libpg_query, or refuse.

Every statement of the corpus is judged under an allow-everything policy. For each one the
engine either refuses it (parse error, parser disagreement, unknown kind, hard guardrail) or
classifies it exactly as libpg_query's own parse tree (through pglast's AST objects, a
different path from the engine's JSON walk) says it is. A statement PostgreSQL's grammar
rejects must never be allowed. The counts are printed for the closing note.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re

import pglast
import pytest
from pglast import parser as pg_parser

from dbgov_policy import analyze, classes, engine
from dbgov_policy import compile as policy_compile

ROOT = pathlib.Path(__file__).resolve().parents[3]
CORPUS = pathlib.Path(os.environ.get("DBGOV_REGRESS_SQL", ROOT / "tests" / "data" / "postgres_regress"))
ALLOW_ALL = policy_compile.compile_policy({"default": "allow"})
REFUSALS = {"parse-error", "guardrail:", "default"}


def _statements() -> list[str]:
    out: list[str] = []
    for path in sorted(CORPUS.glob("*.sql")):
        text = path.read_text(errors="replace")
        # psql meta-commands and COPY ... FROM stdin data blocks are not SQL
        text = re.sub(r"(?ms)^(COPY[^;]*FROM\s+stdin[^;]*;).*?^\\\.$", r"\1", text)
        text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("\\"))
        try:
            out.extend(s for s in pg_parser.split(text, with_parser=False) if s.strip())
        except pg_parser.ParseError:
            continue
    return out


def _expected(stmt: str) -> list[classes.StatementClass | None] | None:
    """libpg_query's class for each top-level statement, or None when PostgreSQL rejects it."""
    try:
        raws = pglast.parse_sql(stmt)
    except pglast.parser.ParseError:
        return None
    out: list[classes.StatementClass | None] = []
    for raw in raws:
        name = type(raw.stmt).__name__
        if name == "SelectStmt" and raw.stmt.intoClause is not None:
            out.append(classes.StatementClass("ddl", "select-into"))
        else:
            out.append(classes.NODE_CLASSES.get(name))
    return out


def test_regression_corpus_agrees_or_refuses() -> None:
    if not CORPUS.is_dir():
        pytest.fail(f"the conformance corpus is missing: {CORPUS} (set DBGOV_REGRESS_SQL to its folder)")
    statements = _statements()
    assert len(statements) > 20000
    eng = engine.Engine(ALLOW_ALL, cache_size=100_000)
    counts: collections.Counter[str] = collections.Counter()
    wrong: list[str] = []
    for stmt in statements:
        expected = _expected(stmt)
        d = eng.decide(stmt)
        if d.verdict == "block":
            why = "postgresql-rejects" if expected is None else (d.rule or "").split(":")[0]
            if why == "parse-error" and "sqlglot" in d.reason:
                why = "sqlglot-disagrees"
            counts["refused:" + why] += 1
            continue
        if expected is None:
            wrong.append(f"allowed what PostgreSQL rejects: {stmt[:120]!r}")
            continue
        top = [s for s in d.statements if not s.nested]
        want = expected
        if len(top) != len(want) or any(
            w is None or s.cls != w.coarse for s, w in zip(top, want, strict=False)
        ):
            wrong.append(f"{[(s.cls, s.fine) for s in top]} vs libpg_query {expected}: {stmt[:120]!r}")
            continue
        counts["agreed"] += 1
    print(f"\nconformance over {len(statements)} statements: {dict(sorted(counts.items()))}")
    assert not wrong, "\n".join(wrong[:30])
    assert counts["agreed"] > len(statements) // 2


def test_unparseable_input_is_reported_as_such() -> None:
    a = analyze.analyze("SELECT FROM WHERE")
    assert a.error is not None and "syntax error" in a.error
