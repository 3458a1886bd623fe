"""Reasons are read by people: they say "an insert statement", never "a insert statement"."""

from __future__ import annotations

import pathlib

import pytest

from dbgov_policy import analyze, classes, crosscheck, engine
from dbgov_policy import compile as policy_compile

HERE = pathlib.Path(__file__).parent
POLICY = policy_compile.load_policy_text(
    (HERE / "policy.yaml").read_text(), source="tests/policy.yaml", mask_key="k"
)


@pytest.mark.parametrize(
    ("word", "spoken"),
    [
        ("insert", "an insert"),
        ("INSERT", "an INSERT"),
        ("update", "an update"),
        ("alter", "an alter"),
        ("explain", "an explain"),
        ("other", "an other"),
        ("select", "a select"),
        ("DELETE", "a DELETE"),
        ("merge", "a merge"),
        ("", "a "),
    ],
)
def test_the_article_follows_the_sound_of_the_word(word: str, spoken: str) -> None:
    assert classes.with_article(word) == spoken


def test_a_nested_write_under_max_rows_affected_reads_as_english() -> None:
    d = engine.Engine(POLICY).decide(
        "WITH moved AS (INSERT INTO orders (id) VALUES (1) RETURNING id) SELECT id FROM moved",
        session=engine.SessionContext(),
    )
    assert d.rule == "guardrail:max-rows-affected", d.reason
    assert "the rows changed by an INSERT inside this statement" in d.reason


def test_a_parser_disagreement_reads_as_english() -> None:
    units = analyze.analyze("INSERT INTO orders (id) VALUES (1)").units
    reason = crosscheck.check(["SELECT 1"], units)
    assert reason is not None
    assert reason.startswith("PostgreSQL reads an insert statement where sqlglot reads Select")
