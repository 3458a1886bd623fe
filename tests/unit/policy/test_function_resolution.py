"""Which function a name means, by the session's catalog (attack findings F3 and F6).

PostgreSQL calls a user's ``public.lower(int)`` for ``lower(42)`` (the overload whose argument
types fit best wins, whatever the path order) and ``f(t)`` for ``t.f`` when t has no column f.
The cases (functions/cases.yaml) carry the catalog's facts in the session; the engine tests
check that a decision made under some facts is never served from the cache to a session with
others, and that the steady state still caches.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from dbgov_policy import analyze, engine
from dbgov_policy import compile as policy_compile
from dbgov_policy import compose as policy_compose
from dbgov_sidecar import policy_port

HERE = pathlib.Path(__file__).parent / "functions"
POLICY = policy_compile.load_policy_text(
    (HERE / "policy.yaml").read_text(), source="tests/functions/policy.yaml", mask_key="k"
)
CASES = [
    pytest.param(case, id=f"{i}:{case['sql'][:40]}")
    for i, case in enumerate(yaml.safe_load((HERE / "cases.yaml").read_text()))
]


def _facts(case: dict[str, Any]) -> analyze.Functions | None:
    if "names" not in case:
        return None
    columns = frozenset(tuple(c.split(".")) for c in case.get("columns", ()))
    return analyze.Functions(names=frozenset(case["names"]), columns=columns)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES)
def test_case(case: dict[str, Any]) -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext(functions=_facts(case))
    first = eng.decide(case["sql"], session=ctx)
    assert (first.verdict, first.rule) == (case["d"], case["r"]), first.reason
    if "calls" in case:
        assert case["calls"] in first.reason, first.reason
    if first.verdict == "block":
        assert first.sqlstate == "42501" and first.hint
    again = eng.decide(case["sql"], session=ctx)  # (from the cache)
    assert (again.verdict, again.rule) == (first.verdict, first.rule)


def test_a_decision_is_never_served_to_a_session_with_other_facts() -> None:
    eng = engine.Engine(POLICY)
    plain = engine.SessionContext()
    overloaded = engine.SessionContext(functions=analyze.Functions(names=frozenset({"lower"})))
    other = engine.SessionContext(functions=analyze.Functions(names=frozenset({"purge_orders"})))
    sql = "SELECT lower(name) FROM shop.orders WHERE id = 1"
    for _ in range(2):
        assert eng.decide(sql, session=plain).verdict == "allow"
        assert eng.decide(sql, session=overloaded).verdict == "block"
        assert eng.decide(sql, session=other).verdict == "allow"
        assert eng.cached_shape(sql, session=overloaded) is not None
        assert eng.cached_shape(sql, session=overloaded)[1].verdict == "block"  # type: ignore[index]
    # The session learns other names (DDL): the next decision follows them.
    plain.functions = analyze.Functions(names=frozenset({"lower"}))
    assert eng.decide(sql, session=plain).verdict == "block"
    overloaded.functions = analyze.Functions(names=frozenset({"upper"}))
    assert eng.decide(sql, session=overloaded).verdict == "allow"


def test_the_steady_state_still_caches_under_facts() -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext(functions=analyze.Functions(names=frozenset({"purge_orders"})))
    for i in range(50):
        assert (
            eng.decide(f"SELECT lower(name) FROM shop.orders WHERE id = {i}", session=ctx).verdict == "allow"
        )
    assert eng.stats.misses == 1 and eng.stats.hits == 49
    assert eng.for_session(ctx) is eng.for_session(ctx) is not eng


def test_derived_engines_are_bounded() -> None:
    eng = engine.Engine(POLICY)
    for i in range(engine.MAX_VIEWS * 3):
        ctx = engine.SessionContext(functions=analyze.Functions(names=frozenset({f"f{i}"})))
        assert eng.decide(f"SELECT f{i}(1)", session=ctx).verdict == "block"
        assert len(eng._views) <= engine.MAX_VIEWS


def test_the_port_carries_the_facts_into_single_and_composed_policies() -> None:
    facts = (frozenset({"lower"}), frozenset[tuple[str, str, str]]())
    single = policy_port.EnginePolicy(engine.Engine(POLICY))
    composed = policy_port.ComposedPolicy(
        policy_compose.Composed([policy_compose.Component(name="a", policy=POLICY)])
    )
    for policy in (single, composed):
        known = policy.new_context(search_path=("public",), functions=facts)
        assert policy.decide("SELECT lower(42)", known).verdict == "block"
        unknown = policy.new_context(search_path=("public",))
        assert policy.decide("SELECT lower(42)", unknown).verdict == "allow"
        policy_port.learn_functions(unknown, facts)  # (read again after DDL)
        assert policy.decide("SELECT lower(42)", unknown).verdict == "block"
