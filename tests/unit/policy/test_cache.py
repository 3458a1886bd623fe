"""The decision cache: a hit must give exactly what a fresh analysis gives."""

from __future__ import annotations

import pytest

from dbgov_policy import engine

from .test_cases import POLICY

SHAPES = [
    ("SELECT ssn FROM customers WHERE id = {}", ["1", "123456", "-5", "(2 + 3)"], True),
    (
        "SELECT c.email FROM customers c WHERE c.name = {} AND c.id > 7",
        ["'a'", "'ünïcödé é'", "E'x\\'y'", "$$z$$"],
        True,
    ),
    # COPY decisions depend on how the target is spelled: never cached
    ("COPY (SELECT ssn FROM customers WHERE id = {}) TO STDOUT", ["1", "22"], False),
    ("TABLE customers LIMIT {}", ["1", "99999"], True),
    (
        "SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id IN ({})",
        ["1", "1, 2, 3", "4, 5, 6"],
        True,
    ),
]


@pytest.mark.parametrize(("template", "values", "cached_shape"), SHAPES)
def test_cached_rewrites_equal_fresh_rewrites(template: str, values: list[str], cached_shape: bool) -> None:
    cached = engine.Engine(POLICY)
    for value in values:
        sql = template.format(value)
        fresh = engine.Engine(POLICY).decide(sql)
        got = cached.decide(sql)
        assert (got.verdict, got.rule, got.rewritten) == (fresh.verdict, fresh.rule, fresh.rewritten), sql
    assert (cached.stats.hits >= 1) == cached_shape


def test_literal_sensitive_decisions_are_never_cached() -> None:
    eng = engine.Engine(POLICY)
    assert eng.decide("SELECT set_config('application_name', 'x', false)").verdict == "allow"
    assert eng.decide("SELECT set_config('role', 'x', false)").verdict == "block"
    assert eng.decide("UPDATE orders SET qty = 1 WHERE qty LIKE '1%'").verdict == "allow"
    assert eng.decide("UPDATE orders SET qty = 1 WHERE qty LIKE '%'").verdict == "block"
    assert eng.stats.hits == 0


def test_the_cache_is_bounded() -> None:
    eng = engine.Engine(POLICY, cache_size=10)
    for i in range(50):
        eng.decide(f"SELECT {'1, ' * i}1 FROM orders")
    assert len(eng._cache) == 10


def test_a_text_whose_tokens_differ_from_its_cached_shape_gets_its_own_template(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`... = $1` and `... = 5` normalize alike, but the cached template (from the constant) does
    not fit the parameter's tokens: the first time is analyzed afresh, and from then on that
    text is rewritten from its own template, with the same result as a fresh analysis."""
    from dbgov_policy import analyze

    cached = engine.Engine(POLICY)
    assert cached.decide("SELECT ssn FROM customers WHERE id = 5").verdict == "mask"
    analyses: list[str] = []
    real = analyze.analyze
    monkeypatch.setattr(analyze, "analyze", lambda sql, **kw: analyses.append(sql) or real(sql, **kw))
    param = "SELECT ssn FROM customers WHERE id = $1"
    first = cached.decide(param)
    assert len(analyses) == 1
    for _ in range(3):
        again = cached.decide(param)
        assert again.rewritten == first.rewritten
    assert len(analyses) == 1
    fresh = engine.Engine(POLICY).decide(param)
    assert (first.verdict, first.rule, first.rewritten) == (fresh.verdict, fresh.rule, fresh.rewritten)
