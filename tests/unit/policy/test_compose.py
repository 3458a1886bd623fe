"""Composition as data: several policies bind one workload, each judges every statement on its
own, and the strictest answer wins whatever the policies are called (``compose/cases.yaml``)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, model

CASES = yaml.safe_load((pathlib.Path(__file__).parent / "compose" / "cases.yaml").read_text())
SPECS: dict[str, Any] = CASES["policies"]


def composed(names: list[str]) -> compose.Composed:
    return compose.Composed(policy_compile.compile_components([(n, SPECS[n]) for n in names]))


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_case(case: dict[str, Any]) -> None:
    decision = composed(case["use"]).decide(case["sql"])
    assert decision.verdict == case["verdict"], decision.reason
    if "rule" in case:
        assert decision.rule == case["rule"]
    for masked in case.get("masked", []):
        assert masked in decision.masked_columns
    for text in case.get("rewritten_contains", []):
        assert decision.rewritten is not None and text in decision.rewritten
    if "reason_contains" in case:
        assert case["reason_contains"] in decision.reason


def test_the_same_verdict_whatever_the_order() -> None:
    names = ["baseline-security", "aaa-app", "zz-observer"]
    for case in CASES["cases"]:
        forward = composed(case["use"]).decide(case["sql"])
        backward = composed(list(reversed(case["use"]))).decide(case["sql"])
        assert (forward.verdict, forward.rewritten) == (backward.verdict, backward.rewritten), case["name"]
    assert composed(names).policy.mode == "enforce"


def test_masks_take_the_strictest_strategy_and_writable_only_if_all_say_so() -> None:
    whole = composed(["baseline-security", "aaa-app"]).policy
    by_column = {m.column: m for m in whole.masks}
    assert by_column["email"].strategy == "redact"  # redact is stricter than partial
    assert by_column["phone"].strategy == "partial" and by_column["phone"].keep_last == 2
    table = model.QualifiedName(schema="s", name="t")
    a = model.Mask(table=table, column="c", strategy="partial", keep_last=4, writable=True)
    b = model.Mask(table=table, column="c", strategy="partial", keep_last=2, writable=False)
    assert compose.stricter_mask(a, b) == b
    assert compose.stricter_mask(b, a) == b
    null = model.Mask(table=table, column="c", strategy="null", writable=True)
    assert compose.stricter_mask(a, null) == null


def test_guardrails_take_the_smallest_limit_and_the_intersection_of_what_is_trusted() -> None:
    specs = [
        ("a", {"guardrails": {"maxRowsReturned": 10, "allowedFunctions": ["f", "g"]}}),
        ("b", {"guardrails": {"maxRowsReturned": 5, "maxRowsAffected": 7, "allowedFunctions": ["g"]}}),
    ]
    whole = compose.Composed(policy_compile.compile_components(specs)).policy.guardrails
    assert (whole.max_rows_returned, whole.max_rows_affected) == (5, 7)
    assert whole.allowed_functions == frozenset({"g"})


def test_a_setting_value_is_allowed_only_if_every_policy_allows_it() -> None:
    opened = {"default": "allow", "guardrails": {"allowedSettings": {"search_path": ["app"]}}}
    closed = {"default": "allow", "guardrails": {"allowedSettings": {"search_path": ["other"]}}}
    alone = compose.Composed(policy_compile.compile_components([("opened", opened)]))
    both = compose.Composed(policy_compile.compile_components([("opened", opened), ("closed", closed)]))
    assert alone.decide("SET search_path TO app").verdict == "allow"
    assert both.decide("SET search_path TO app").verdict == "block"


def test_dry_run_limits_are_not_enforced() -> None:
    specs = [
        ("enforced", {"default": "allow"}),
        ("observed", {"mode": "dry-run", "guardrails": {"maxRowsReturned": 1}}),
    ]
    whole = compose.Composed(policy_compile.compile_components(specs)).policy
    assert whole.mode == "enforce" and whole.guardrails.max_rows_returned is None


def test_one_issuer_configured_two_ways_does_not_compose() -> None:
    def jwt(audience: str) -> dict[str, Any]:
        issuer = {"issuer": "https://idp.example", "audiences": [audience], "algorithms": ["RS256"]}
        return {"authentication": {"jwt": {"issuers": [{**issuer, "jwksUri": "https://idp.example/keys"}]}}}

    with pytest.raises(policy_compile.PolicyInvalid) as err:
        policy_compile.compile_components([("a", jwt("one")), ("b", jwt("two"))])
    assert "configured differently by policy a" in str(err.value)
    same = policy_compile.compile_components([("a", jwt("one")), ("b", jwt("one"))])
    assert len(compose.Composed(same).policy.jwt_issuers) == 1


def test_every_problem_of_every_policy_names_its_policy() -> None:
    doc = policy_compile.bundle_document(
        [
            ("good", {"default": "allow"}),
            ("bad", {"rules": [{"name": "r", "verdict": "allow", "tabels": ["x"]}]}),
        ]
    )
    with pytest.raises(policy_compile.PolicyInvalid) as err:
        policy_compile.compile_bundle(doc)
    assert [p.path for p in err.value.problems] == ["policies[1](bad).rules[0].tabels"]


def test_a_bundle_loads_as_components_and_a_spec_as_one_policy() -> None:
    text = yaml.safe_dump(
        policy_compile.bundle_document([(n, SPECS[n]) for n in ("aaa-app", "baseline-security")])
    )
    loaded = policy_compile.load_text(text)
    assert isinstance(loaded, tuple) and [c.name for c in loaded] == ["aaa-app", "baseline-security"]
    assert isinstance(policy_compile.load_text(yaml.safe_dump(SPECS["aaa-app"])), model.CompiledPolicy)


def test_session_names_are_shared_and_the_path_follows_the_session() -> None:
    both = composed(["aaa-app", "zz-observer"])
    ctx = both.new_context()
    assert both.decide("PREPARE p AS SELECT 1", session=ctx).verdict == "allow"
    assert all("p" in part.names.prepared for part in ctx.parts)
    ctx.search_path = ("shop",)
    assert all(part.search_path == ("shop",) for part in ctx.parts)


def test_repeated_statements_return_the_same_decision_object() -> None:
    both = composed(["aaa-app", "baseline-security"])
    ctx = both.new_context()
    both.decide(
        "SELECT id FROM shop.orders WHERE id = 1", session=ctx
    )  # (first sight: not the cached object)
    first = both.decide("SELECT id FROM shop.orders WHERE id = 1", session=ctx)
    assert both.decide("SELECT id FROM shop.orders WHERE id = 1", session=ctx) is first
    shape = both.cached_shape("SELECT id FROM shop.orders WHERE id = 2", session=ctx)
    assert shape is not None and shape[1] is first
