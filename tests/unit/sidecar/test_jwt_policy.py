"""JWT issuers and subject-scoped rules in the policy, as data: a policy fragment and the field
paths of its problems; an identity and the rules that apply to it; and the per-subset engines
the proxy decides with (memoized, so decide() and its caches are untouched)."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, model
from dbgov_sidecar import check_cli, config, policy_port

ISSUER = {"issuer": "https://idp", "audiences": ["dbgov"], "algorithms": ["RS256"], "discovery": True}

# (case, authentication.jwt.issuers, expected problem paths)
ISSUER_CASES: list[tuple[str, list[Any], list[str]]] = [
    ("good", [ISSUER], []),
    ("alg none", [{**ISSUER, "algorithms": ["none"]}], ["authentication.jwt.issuers[0].algorithms[0]"]),
    (
        "HS256 with public keys",
        [{**ISSUER, "algorithms": ["HS256"]}],
        ["authentication.jwt.issuers[0].algorithms[0]"],
    ),
    (
        "RS256 with a secret",
        [{**{k: v for k, v in ISSUER.items() if k != "discovery"}, "secretFile": "/s"}],
        ["authentication.jwt.issuers[0].algorithms[0]"],
    ),
    ("two key sources", [{**ISSUER, "jwksUri": "https://idp/jwks"}], ["authentication.jwt.issuers[0]"]),
    (
        "no key source",
        [{k: v for k, v in ISSUER.items() if k != "discovery"}],
        ["authentication.jwt.issuers[0]"],
    ),
    (
        "no audiences",
        [{k: v for k, v in ISSUER.items() if k != "audiences"}],
        ["authentication.jwt.issuers[0].audiences"],
    ),
    ("empty audiences", [{**ISSUER, "audiences": []}], ["authentication.jwt.issuers[0].audiences"]),
    ("unknown alg", [{**ISSUER, "algorithms": ["RS257"]}], ["authentication.jwt.issuers[0].algorithms[0]"]),
    ("typo", [{**ISSUER, "audience": ["x"]}], ["authentication.jwt.issuers[0].audience"]),
    (
        "jwksUri not a URL",
        [{**{k: v for k, v in ISSUER.items() if k != "discovery"}, "jwksUri": "idp/jwks"}],
        ["authentication.jwt.issuers[0].jwksUri"],
    ),
    ("duplicate", [ISSUER, ISSUER], ["authentication.jwt.issuers[1].issuer"]),
    ("negative leeway", [{**ISSUER, "leewaySeconds": -1}], ["authentication.jwt.issuers[0].leewaySeconds"]),
]


@pytest.mark.parametrize(("case", "issuers", "paths"), ISSUER_CASES, ids=[c[0] for c in ISSUER_CASES])
def test_issuer_validation(case: str, issuers: list[Any], paths: list[str]) -> None:
    doc = {"authentication": {"jwt": {"issuers": issuers}}}
    if not paths:
        compiled = policy_compile.compile_policy(doc)
        assert compiled.jwt_issuers[0].issuer == "https://idp" and compiled.jwt_issuers[0].discovery
        return
    with pytest.raises(policy_compile.PolicyInvalid) as caught:
        policy_compile.compile_policy(doc)
    assert [p.path for p in caught.value.problems] == paths


def test_subject_problems_have_field_paths() -> None:
    doc = {
        "rules": [
            {"name": "a", "verdict": "allow", "tables": ["t0"], "subjects": {}},
            {"name": "b", "verdict": "allow", "tables": ["t1"], "subjects": {"users": []}},
            {
                "name": "c",
                "verdict": "allow",
                "tables": ["t2"],
                "subjects": {"claims": {"groups": "analysts"}},
            },
            {"name": "d", "verdict": "allow", "tables": ["t3"], "subjects": {"user": ["x"]}},
        ]
    }
    with pytest.raises(policy_compile.PolicyInvalid) as caught:
        policy_compile.compile_policy(doc)
    assert [p.path for p in caught.value.problems] == [
        "rules[0].subjects",
        "rules[1].subjects.users",
        "rules[2].subjects.claims.groups",
        "rules[3].subjects.user",
    ]


POLICY = yaml.safe_load(
    """
default: block
rules:
  - {name: analysts-read, verdict: allow, statements: [select], subjects: {claims: {groups: [analysts]}}}
  - {name: bots, verdict: allow, statements: [select, insert], subjects: {users: ["bot-*"], issuers: [https://idp]}}
  - {name: everyone-tx, verdict: allow, statements: [tcl]}
"""
)


def who(sub: str, **claims: Any) -> model.Identity:
    return model.Identity(issuer="https://idp", subject=sub, claims=claims)


# (case, identity, rules that apply)
SUBJECT_CASES: list[tuple[str, model.Identity | None, list[str]]] = [
    ("no identity", None, ["everyone-tx"]),
    ("an analyst", who("alice", groups=["analysts", "x"]), ["analysts-read", "everyone-tx"]),
    ("a string claim", who("alice", groups="analysts"), ["analysts-read", "everyone-tx"]),
    ("not an analyst", who("carol", groups=["sales"]), ["everyone-tx"]),
    ("a bot", who("bot-7"), ["bots", "everyone-tx"]),
    ("a bot of another issuer", model.Identity(issuer="https://other", subject="bot-7"), ["everyone-tx"]),
]


@pytest.mark.parametrize(("case", "identity", "names"), SUBJECT_CASES, ids=[c[0] for c in SUBJECT_CASES])
def test_rules_for_identity(case: str, identity: model.Identity | None, names: list[str]) -> None:
    policy = policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(POLICY)))
    scoped = policy.for_identity(identity)
    assert isinstance(scoped, policy_port.EnginePolicy)
    assert [r.name for r in scoped._engine.policy.rules] == names
    ctx = scoped.new_context()
    verdict = scoped.decide("SELECT 1 FROM t", ctx).verdict
    assert verdict == ("allow" if {"analysts-read", "bots"} & set(names) else "block")


def test_one_engine_per_distinct_subset() -> None:
    policy = policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(POLICY)))
    a = policy.for_identity(who("alice", groups=["analysts"]))
    assert policy.for_identity(who("dave", groups=["analysts"])) is a
    assert policy.for_identity(None) is policy.for_identity(who("eve"))
    assert policy.for_identity(None) is not a
    plain = policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy({"default": "allow"})))
    assert plain.for_identity(who("alice")) is plain  # no scoped rules: the policy itself


def test_a_scoped_rule_never_shadows() -> None:
    doc = {
        "rules": [
            {"name": "ops-all", "verdict": "allow", "subjects": {"users": ["ops"]}},
            {"name": "rest-select", "verdict": "allow", "statements": ["select"]},
        ]
    }
    assert len(policy_compile.compile_policy(doc).rules) == 2


def test_merged_specs_keep_issuers_and_subjects() -> None:
    spec = {**POLICY, "authentication": {"jwt": {"issuers": [ISSUER]}}}
    merged = policy_compile.merge_specs([("a", spec), ("b", {"authentication": spec["authentication"]})])
    compiled = policy_compile.compile_policy(merged)
    assert [i.issuer for i in compiled.jwt_issuers] == ["https://idp"]
    assert compiled.rules[0].subjects is not None


def test_issuers_file_and_legacy_key(tmp_path: Path) -> None:
    path = tmp_path / "issuers.yaml"
    path.write_text(yaml.safe_dump({"issuers": [ISSUER]}))
    verifier = config.token_verifier(config.Settings(jwt_issuers_file=str(path), client_jwt_key="k" * 32))
    assert verifier is not None
    assert config.token_verifier(config.Settings()) is None
    path.write_text(yaml.safe_dump({"issuers": [{**ISSUER, "algorithms": ["none"]}]}))
    with pytest.raises(ValueError, match=r"issuers\[0\]\.algorithms\[0\]: alg none"):
        config.token_verifier(config.Settings(jwt_issuers_file=str(path)))
    cfg = config.proxy_config(
        config.Settings(jwt_issuers_file=None), salt=b"x" * 16, policy_issuers=lambda: ()
    )
    assert cfg.token_verifier is None and not cfg.session.client_token
    issuer = policy_compile.compile_policy({"authentication": {"jwt": {"issuers": [ISSUER]}}}).jwt_issuers
    cfg = config.proxy_config(config.Settings(), salt=b"x" * 16, policy_issuers=lambda: issuer)
    assert cfg.token_verifier is not None and cfg.session.client_token


def test_check_judges_as_a_given_end_user(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(POLICY))

    def check(*extra: str) -> str:
        parser = argparse.ArgumentParser()
        check_cli.add_parser(parser.add_subparsers())
        args = parser.parse_args(
            ["check", "--policy", str(path), "--format", "json", *extra, "SELECT 1 FROM t"]
        )
        out = io.StringIO()
        assert args.func(args, out=out) == 0
        return str(json.loads(out.getvalue())["decision"])

    assert check() == "block"
    assert check("--identity-sub", "alice", "--identity-claim", "groups=analysts") == "allow"
    assert check("--identity-sub", "alice", "--identity-claim", "groups=sales") == "block"
    assert check("--identity", json.dumps({"issuer": "https://idp", "subject": "bot-1"})) == "allow"
