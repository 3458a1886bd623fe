"""Property tests: whatever text arrives, the engine returns a decision and never raises."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbgov_policy import engine, model

from .test_cases import POLICY

TOKENS = st.sampled_from(
    [
        "SELECT",
        "select",
        "*",
        "FROM",
        "customers",
        "orders",
        "public",
        ".",
        ",",
        "(",
        ")",
        ";",
        "WHERE",
        "id",
        "=",
        "1",
        "'x'",
        "''",
        "$$",
        "$t$",
        "E'\\''",
        "--",
        "/*",
        "*/",
        "\n",
        "DELETE",
        "UPDATE",
        "SET",
        "ssn",
        "ROLE",
        "WITH",
        "AS",
        "INSERT",
        "INTO",
        "VALUES",
        "DROP",
        "TABLE",
        "COPY",
        "TO",
        "STDOUT",
        "PROGRAM",
        "DO",
        "BEGIN",
        "END",
        'U&"\\0063"',
        '"q"',
        "::",
        "int",
        "$1",
        "OR",
        "true",
        "UNION",
        "LATERAL",
        "ONLY",
        "EXPLAIN",
        "ANALYZE",
        "PREPARE",
        "EXECUTE",
        "DECLARE",
        "CURSOR",
        "FOR",
        "row_to_json",
        "pg_read_file",
        "set_config",
    ]
)


def _check(sql: str) -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext()
    d = eng.decide(sql, session=ctx)
    assert d.verdict in model.STRICTNESS
    if d.verdict == "block":
        assert d.sqlstate in {"42501", "42601"} and d.reason
    again = eng.decide(sql, session=engine.SessionContext())
    assert again.verdict == d.verdict or d.verdict != "allow"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_yields_a_decision(sql: str) -> None:
    _check(sql)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(TOKENS, max_size=30).map(" ".join))
def test_sql_like_token_soup_yields_a_decision(sql: str) -> None:
    _check(sql)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_bytes_decoded_leniently_yield_a_decision(raw: bytes) -> None:
    _check(raw.decode("utf-8", errors="surrogateescape"))
