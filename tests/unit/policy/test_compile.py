"""Policy compilation: valid documents compile, invalid ones list every problem with its path."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from dbgov_policy import compile as policy_compile
from dbgov_policy import model

EXAMPLE = pathlib.Path(__file__).resolve().parents[3] / "examples" / "policy.yaml"


def problems(doc: object) -> list[str]:
    with pytest.raises(policy_compile.PolicyInvalid) as info:
        policy_compile.compile_policy(doc)
    return [str(p) for p in info.value.problems]


def test_example_policy_compiles() -> None:
    policy = policy_compile.load_policy_text(EXAMPLE.read_text())
    assert policy.mode == "enforce" and policy.default == "block"
    assert [r.name for r in policy.rules][:2] == ["no-ddl", "read-shop"]
    assert policy.guardrails.require_where == {"update", "delete"}
    assert policy.guardrails.max_rows_affected == 100
    ssn = next(m for m in policy.masks if m.column == "ssn")
    assert (ssn.table, ssn.strategy, ssn.keep_last) == (
        model.QualifiedName(schema="shop", name="customers"),
        "partial",
        4,
    )


def test_whole_resource_is_accepted_and_paths_point_into_spec() -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    cr = {
        "apiVersion": "dbgov.io/v1alpha1",
        "kind": "DatabaseAccessPolicy",
        "metadata": {"name": "x"},
        "spec": spec,
    }
    assert policy_compile.compile_policy(cr).rules
    cr["spec"] = {**spec, "default": "maybe"}
    assert problems(cr) == ["spec.default: must be one of allow, approve, block, got 'maybe'"]
    assert "kind: expected DatabaseAccessPolicy, got 'Pod'" in problems({**cr, "kind": "Pod"})


def test_empty_document_is_a_block_everything_policy() -> None:
    policy = policy_compile.load_policy_text("")
    assert (policy.mode, policy.default, policy.rules, policy.masks) == ("enforce", "block", (), ())


def test_every_problem_is_reported_at_once_with_its_path() -> None:
    doc = {
        "mode": "enforced",
        "rules": [
            {
                "name": "a",
                "verdict": "allow",
                "statements": ["selct", "drop"],
                "tables": ["x.y.z", '"unterminated'],
            },
            {"verdict": "permit"},
            {"name": "a", "verdict": "block", "statements": [], "tables": []},
        ],
        "guardrails": {
            "maxRowsAffected": 0,
            "requireWhere": ["select"],
            "allowedSettings": {"role": ["x"]},
            "x": 1,
        },
        "masks": [
            {"table": "customers", "column": "ssn", "strategy": "shuffle", "keepLast": -1},
            "nope",
        ],
        "extra": True,
    }
    got = problems(doc)
    expected_paths = [
        "extra",
        "mode",
        "rules[0].statements[0]",
        "rules[0].tables[0]",
        "rules[0].tables[1]",
        "rules[1].name",
        "rules[1].verdict",
        "rules[2].name",
        "rules[2].statements",
        "rules[2].tables",
        "guardrails.x",
        "guardrails.requireWhere[0]",
        "guardrails.allowedSettings.role",
        "guardrails.maxRowsAffected",
        "masks[0].strategy",
        "masks[0].keepLast",
        "masks[1]",
    ]
    for path in expected_paths:
        assert any(p.startswith(f"{path}:") for p in got), (path, got)
    assert "did you mean 'select'?" in " ".join(got)


def test_a_rule_that_can_never_match_is_an_error() -> None:
    got = problems(
        {
            "rules": [
                {"name": "reads", "verdict": "allow", "statements": ["select"]},
                {
                    "name": "shadowed",
                    "verdict": "block",
                    "statements": ["select"],
                    "tables": ["secrets"],
                },
                {"name": "ddl", "verdict": "block", "statements": ["ddl"], "tables": ["public.*"]},
                {
                    "name": "truncate-shadowed",
                    "verdict": "allow",
                    "statements": ["truncate"],
                    "tables": ["orders"],
                },
                {
                    "name": "drop-is-also-dcl",
                    "verdict": "allow",
                    "statements": ["drop"],
                    "tables": ["orders"],
                },
            ]
        }
    )
    assert len(got) == 2
    assert got[0].startswith("rules[1]: rule 'shadowed' can never match: rules[0] ('reads')")
    assert got[1].startswith("rules[3]: rule 'truncate-shadowed' can never match: rules[2] ('ddl')")


def test_a_narrower_earlier_rule_does_not_shadow() -> None:
    policy = policy_compile.compile_policy(
        {
            "rules": [
                {
                    "name": "one",
                    "verdict": "block",
                    "statements": ["select"],
                    "tables": ["secrets"],
                },
                {"name": "all", "verdict": "allow", "statements": ["select"]},
            ]
        }
    )
    assert [r.name for r in policy.rules] == ["one", "all"]


def test_names_fold_like_postgresql() -> None:
    policy = policy_compile.compile_policy(
        {
            "rules": [{"name": "r", "verdict": "allow", "tables": ['Sales."Orders"', "PUBLIC.x"]}],
            "masks": [{"table": '"Cust"', "column": "SSN", "strategy": "null"}],
        }
    )
    assert [(p.schema, p.name) for p in policy.rules[0].tables or ()] == [
        ("sales", "Orders"),
        ("public", "x"),
    ]
    assert (policy.masks[0].table.name, policy.masks[0].column) == ("Cust", "ssn")


def test_duplicate_masks_and_wildcard_masks_are_rejected() -> None:
    got = problems(
        {
            "masks": [
                {"table": "c", "column": "a", "strategy": "null"},
                {"table": "public.c", "column": "A", "strategy": "redact"},
                {"table": "c*", "column": "b", "strategy": "redact"},
            ]
        }
    )
    assert got[0] == "masks[1]: public.c.a is already masked by masks[0]"
    assert got[1] == "masks[2].table: masks name one table; wildcards are not allowed"


def test_yaml_errors_are_reported_not_raised() -> None:
    with pytest.raises(policy_compile.PolicyInvalid) as info:
        policy_compile.load_policy_text("rules: [unclosed", source="p.yaml")
    assert "p.yaml is invalid" in str(info.value) and "not valid YAML" in str(info.value)


def test_merge_specs_unites_protection_and_keeps_rule_order() -> None:
    merged = policy_compile.merge_specs(
        [
            (
                "a",
                {
                    "mode": "dry-run",
                    "default": "allow",
                    "rules": [{"name": "r", "verdict": "allow", "statements": ["select"]}],
                    "guardrails": {"maxRowsReturned": 100, "deniedFunctions": ["f"]},
                    "masks": [{"table": "c", "column": "x", "strategy": "null"}],
                },
            ),
            (
                "b",
                {
                    "default": "approve",
                    "rules": [{"name": "r", "verdict": "block"}],
                    "guardrails": {"maxRowsReturned": 10, "deniedFunctions": ["g"]},
                    "masks": [
                        {"table": "c", "column": "x", "strategy": "null"},
                        {"table": "c", "column": "y", "strategy": "redact"},
                    ],
                },
            ),
        ]
    )
    assert merged["mode"] == "enforce" and merged["default"] == "approve"
    assert [r["name"] for r in merged["rules"]] == ["a/r", "b/r"]
    assert merged["guardrails"] == {"maxRowsReturned": 10, "deniedFunctions": ["f", "g"]}
    assert len(merged["masks"]) == 2
    policy_compile.compile_policy(merged)
    assert policy_compile.merge_specs([])["default"] == "block"


def test_a_writable_mask_lets_updates_assign_the_column() -> None:
    from dbgov_policy import engine

    def spec(writable: object) -> dict[str, object]:
        mask = {"table": "public.t", "column": "email", "strategy": "email", "writable": writable}
        return {"default": "allow", "masks": [mask]}

    sql = "UPDATE t SET email = 'new@example.com' WHERE id = 1"
    assert engine.Engine(policy_compile.compile_policy(spec(True))).decide(sql).verdict == "allow"
    assert engine.Engine(policy_compile.compile_policy(spec(False))).decide(sql).verdict == "block"
    assert problems(spec("yes")) == ["masks[0].writable: must be true or false, got 'yes'"]
