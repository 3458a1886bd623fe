"""Policy fixture cases: query string → expected decision and rule (cases/*.yaml), judged
against policy.yaml, or against the policy a case names in `p` (`p: permissive` is
policy_permissive.yaml, where only guardrails and a few rules refuse)."""

from __future__ import annotations

import pathlib
from typing import Any

import pytest
import yaml

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine

HERE = pathlib.Path(__file__).parent
POLICY = policy_compile.load_policy_text(
    (HERE / "policy.yaml").read_text(), source="tests/policy.yaml", mask_key="k"
)


def _cases() -> list[Any]:
    out = []
    for path in sorted((HERE / "cases").glob("*.yaml")):
        for i, case in enumerate(yaml.safe_load(path.read_text())):
            out.append(pytest.param(case, id=f"{path.stem}[{i}]"))
    return out


CASES = _cases()
POLICIES = {
    "permissive": policy_compile.load_policy_text(
        (HERE / "policy_permissive.yaml").read_text(), source="tests/policy_permissive.yaml", mask_key="k"
    )
}


def _policy(case: dict[str, str]) -> Any:
    return POLICIES[case["p"]] if "p" in case else POLICY


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 200


@pytest.mark.parametrize("case", CASES)
def test_case(case: dict[str, str]) -> None:
    eng = engine.Engine(_policy(case))
    d = eng.decide(case["sql"])
    expected_rule = case["r"] or None
    assert (d.verdict, d.rule) == (case["d"], expected_rule), d.reason
    if d.verdict == "mask":
        assert d.rewritten is not None and d.masked_columns
    else:
        assert d.rewritten is None or d.verdict == "approve"
    if d.verdict == "block":
        assert d.sqlstate in {"42501", "42601", "54000"} and d.hint


@pytest.mark.parametrize("case", CASES)
def test_cached_decision_matches_first_sight(case: dict[str, str]) -> None:
    eng = engine.Engine(_policy(case))
    first = eng.decide(case["sql"])
    second = eng.decide(case["sql"])
    assert (second.verdict, second.rule, second.rewritten) == (
        first.verdict,
        first.rule,
        first.rewritten,
    )
