"""Session state: names a session prepared or declared, and the search_path it resolves with."""

from __future__ import annotations

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine

POLICY = policy_compile.compile_policy(
    {
        "rules": [{"name": "shop", "verdict": "allow", "statements": ["select"], "tables": ["shop.*"]}],
        "guardrails": {"allowedSettings": {"search_path": ["shop", "shop, public"]}},
        "masks": [{"table": "public.customers", "column": "ssn", "strategy": "null"}],
    }
)


def test_prepared_and_declared_names_live_in_the_session() -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext(search_path=("shop",))
    assert eng.decide("EXECUTE p", session=ctx).verdict == "block"
    assert eng.decide("PREPARE p AS SELECT * FROM orders", session=ctx).verdict == "allow"
    assert eng.decide("EXECUTE p", session=ctx).verdict == "allow"
    assert eng.decide("EXECUTE p", session=engine.SessionContext()).verdict == "block"
    assert eng.decide("DEALLOCATE ALL", session=ctx).verdict == "allow"
    assert eng.decide("EXECUTE p", session=ctx).verdict == "block"
    assert eng.decide("DECLARE c CURSOR FOR SELECT 1", session=ctx).verdict == "allow"
    assert eng.decide("FETCH 5 FROM c", session=ctx).verdict == "allow"
    assert eng.decide("CLOSE c", session=ctx).verdict == "allow"
    assert eng.decide("FETCH 5 FROM c", session=ctx).verdict == "block"


def test_a_refused_prepare_defines_nothing() -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext(search_path=("shop",))
    assert eng.decide("PREPARE q AS SELECT * FROM public.secrets", session=ctx).verdict == "block"
    assert eng.decide("EXECUTE q", session=ctx).verdict == "block"


def test_unqualified_names_resolve_with_the_sessions_search_path() -> None:
    eng = engine.Engine(POLICY)
    shop = engine.SessionContext(search_path=("shop",))
    assert eng.decide("SELECT * FROM orders", session=shop).verdict == "allow"
    assert eng.decide("SELECT * FROM orders", session=engine.SessionContext()).verdict == "block"


def test_an_allowed_search_path_change_is_tracked() -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext()
    assert eng.decide("SELECT * FROM orders", session=ctx).verdict == "block"
    assert eng.decide("SET search_path = shop", session=ctx).verdict == "allow"
    assert ctx.search_path == ("shop",)
    assert eng.decide("SELECT * FROM orders", session=ctx).verdict == "allow"
    assert eng.decide("RESET search_path", session=ctx).verdict == "allow"
    assert ctx.search_path == ("public",)
    assert eng.decide("SET search_path = elsewhere", session=ctx).verdict == "block"
    assert ctx.search_path == ("public",)


def test_ambiguous_names_must_be_allowed_in_every_candidate_schema() -> None:
    eng = engine.Engine(POLICY)
    ctx = engine.SessionContext(search_path=("shop", "public"))
    # `orders` may be shop.orders or public.orders: the rule only covers shop.*
    d = eng.decide("SELECT * FROM orders", session=ctx)
    assert d.verdict == "block" and "public.orders" in d.reason
    # `customers` may be the masked public.customers: no rewrite can be proven right
    d = eng.decide("SELECT * FROM customers", session=ctx)
    assert d.verdict == "block"
    d = eng.decide("SELECT * FROM shop.orders", session=ctx)
    assert d.verdict == "allow"
