"""A composed policy's subject-scoped rules match only identities from issuers that policy may
trust (issue 12, attack finding F4): a namespace user who declares their own JWT issuer can
sign any token for it, so a baseline's ``subjects`` must never accept those tokens, while the
namespace's own rules may. Cases as data: who the session is, what it runs, what it gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from dbgov_operator import bundle
from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, model
from dbgov_sidecar import check_cli, policies, policy_port

CORP = "https://idp.corp.example"
EVIL = "https://evil.example"
PARTNER = "https://partner.example"
DEPLOYMENT = "https://deployment.example"  # trusted by the proxy's own settings, declared by no policy

ATTACKER_PEM = (
    ec.generate_private_key(ec.SECP256R1())
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def _issuer(url: str) -> dict[str, Any]:
    return {"issuer": url, "audiences": ["dbgov"], "algorithms": ["ES256"], "jwksUri": f"{url}/keys"}


PLATFORM = {  # the finding's ClusterDatabaseAccessPolicy, as the operator composes it
    "default": "allow",
    "authentication": {"jwt": {"issuers": [{**_issuer(CORP), "claims": ["groups"]}]}},
    "rules": [
        {
            "name": "hr-reads",
            "verdict": "allow",
            "statements": ["select"],
            "tables": ["hr.salaries"],
            "subjects": {"claims": {"groups": ["hr"]}},
        },
        {"name": "no-salaries", "verdict": "block", "tables": ["hr.salaries"]},
    ],
}
ATTACKER = {  # the namespace user's own policy: allows everything, adds an issuer they hold the key of
    "default": "allow",
    "authentication": {
        "jwt": {
            "issuers": [
                {
                    "issuer": EVIL,
                    "audiences": ["dbgov"],
                    "algorithms": ["ES256"],
                    "publicKeys": [ATTACKER_PEM],
                    "claims": ["groups"],
                }
            ]
        }
    },
}
TEAM = {  # a namespace's legitimate policy: its analysts, vouched for by the platform's IdP
    "default": "block",
    "rules": [
        {
            "name": "analysts-read",
            "verdict": "allow",
            "statements": ["select"],
            "tables": ["shop.orders"],
            "subjects": {"claims": {"groups": ["analysts"]}},
        },
        {
            "name": "corp-bots",
            "verdict": "allow",
            "statements": ["select"],
            "tables": ["shop.items"],
            "subjects": {"issuers": [CORP], "users": ["bot-*"]},
        },
    ],
}
PARTNERS = {  # a namespace's own IdP for its own rules
    "default": "block",
    "authentication": {"jwt": {"issuers": [_issuer(PARTNER)]}},
    "rules": [
        {
            "name": "partner-reads",
            "verdict": "allow",
            "statements": ["select"],
            "tables": ["shop.orders"],
            "subjects": {"issuers": [PARTNER]},
        },
    ],
}
HR_TEAM = {  # another namespaced policy granting hr by claim, without naming an issuer
    "default": "block",
    "rules": [
        {
            "name": "hr-team",
            "verdict": "allow",
            "statements": ["select"],
            "tables": ["hr.salaries"],
            "subjects": {"claims": {"groups": ["hr"]}},
        },
    ],
}
NAMING_EVIL = {  # a baseline that names a namespace's issuer: it may not trust it
    "default": "allow",
    "rules": [
        {
            "name": "evil-reads",
            "verdict": "allow",
            "tables": ["hr.salaries"],
            "subjects": {"issuers": [EVIL]},
        },
        {"name": "no-salaries", "verdict": "block", "tables": ["hr.salaries"]},
    ],
}
SECOND_BASELINE = {  # a cluster baseline without issuers of its own, relying on the first one's
    "default": "allow",
    "rules": [
        {
            "name": "hr-only",
            "verdict": "allow",
            "tables": ["hr.salaries"],
            "subjects": {"claims": {"groups": ["hr"]}},
        },
        {"name": "no-salaries", "verdict": "block", "tables": ["hr.salaries"]},
    ],
}
SPECS: dict[str, dict[str, Any]] = {
    "cluster:platform": PLATFORM,
    "cluster:second": SECOND_BASELINE,
    "cluster:naming-evil": NAMING_EVIL,
    "attacker": ATTACKER,
    "team": TEAM,
    "partners": PARTNERS,
    "hr-team": HR_TEAM,
}

SALARIES = "SELECT * FROM hr.salaries"
ORDERS = "SELECT * FROM shop.orders"
ITEMS = "SELECT * FROM shop.items"


def who(issuer: str, sub: str = "mallory", **claims: Any) -> model.Identity:
    return model.Identity(issuer=issuer, subject=sub, claims=claims)


# (case, policies composed, identity, statement, verdict, rule reported: of equally strict
# answers the first policy's, so "" where that is a baseline's default allow)
CASES: list[tuple[str, list[str], model.Identity | None, str, str, str]] = [
    # the finding, exactly: no token → block; a token the attacker signed → still block
    (
        "finding: no token",
        ["cluster:platform", "attacker"],
        None,
        SALARIES,
        "block",
        "cluster:platform/no-salaries",
    ),
    (
        "finding: forged hr token",
        ["cluster:platform", "attacker"],
        who(EVIL, groups=["hr"]),
        SALARIES,
        "block",
        "cluster:platform/no-salaries",
    ),
    (
        "finding: the platform's own hr token",
        ["cluster:platform", "attacker"],
        who(CORP, "carol", groups=["hr"]),
        SALARIES,
        "allow",
        "cluster:platform/hr-reads",
    ),
    # rules without subjects are unchanged: the attacker's policy allows what the baseline allows
    (
        "forged token, other tables",
        ["cluster:platform", "attacker"],
        who(EVIL, groups=["hr"]),
        ORDERS,
        "allow",
        "",
    ),
    # a namespaced policy's subject rules with the platform's issuer
    (
        "team: platform analyst",
        ["cluster:platform", "team"],
        who(CORP, "ann", groups=["analysts"]),
        ORDERS,
        "allow",
        "",  # (team/analysts-read: its default is block)
    ),
    (
        "team: platform bot named by issuer",
        ["cluster:platform", "team"],
        who(CORP, "bot-7"),
        ITEMS,
        "allow",
        "",  # (team/corp-bots: its default is block)
    ),
    (
        "team: analyst forged by another namespace policy",
        ["cluster:platform", "team", "attacker"],
        who(EVIL, groups=["analysts"]),
        ORDERS,
        "block",
        "team/default",
    ),
    # a namespaced policy's own issuer for its own rules
    (
        "partners: own issuer",
        ["cluster:platform", "partners"],
        who(PARTNER, "p1", groups=["hr"]),
        ORDERS,
        "allow",
        "",  # (partners/partner-reads: its default is block)
    ),
    (
        "partners: own issuer does not open the baseline",
        ["cluster:platform", "partners"],
        who(PARTNER, "p1", groups=["hr"]),
        SALARIES,
        "block",
        "cluster:platform/no-salaries",
    ),
    # another namespaced policy's claim rule: not with the attacker's issuer, yes with the platform's
    (
        "hr-team: forged",
        ["cluster:platform", "hr-team", "attacker"],
        who(EVIL, groups=["hr"]),
        SALARIES,
        "block",
        "cluster:platform/no-salaries",
    ),
    (
        "hr-team: platform",
        ["cluster:platform", "hr-team", "attacker"],
        who(CORP, groups=["hr"]),
        SALARIES,
        "allow",
        "cluster:platform/hr-reads",
    ),
    # a cluster baseline trusts the issuers of every cluster baseline, and only those
    (
        "second baseline: platform issuer",
        ["cluster:platform", "cluster:second", "attacker"],
        who(CORP, groups=["hr"]),
        SALARIES,
        "allow",
        "cluster:platform/hr-reads",
    ),
    (
        "second baseline: forged",
        ["cluster:platform", "cluster:second", "attacker"],
        who(EVIL, groups=["hr"]),
        SALARIES,
        "block",
        "cluster:platform/no-salaries",
    ),
    (
        "baseline naming a namespace issuer",
        ["cluster:naming-evil", "attacker"],
        who(EVIL),
        SALARIES,
        "block",
        "cluster:naming-evil/no-salaries",
    ),
    # an issuer no policy of the composition declares (the proxy's own settings): no policy's
    # subjects, since none may vouch for it (a removed policy's issuer looks the same)
    (
        "deployment issuer",
        ["cluster:platform", "hr-team"],
        who(DEPLOYMENT, groups=["hr"]),
        SALARIES,
        "block",
        "cluster:platform/no-salaries",
    ),
]


def _components(names: list[str]) -> tuple[compose.Component, ...]:
    return policy_compile.compile_components([(n, SPECS[n]) for n in names])


def _composed_policy(names: list[str]) -> policy_port.ComposedPolicy:
    built = policies.build(_components(names))
    assert isinstance(built, policy_port.ComposedPolicy)
    return built


Case = tuple[str, list[str], model.Identity | None, str, str, str]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_the_proxy_judges_each_policy_with_the_issuers_it_may_trust(case: Case) -> None:
    name, names, identity, sql, verdict, rule = case
    policy = policy_port.for_identity(_composed_policy(names), identity)
    decision = policy.decide(sql, policy.new_context())
    assert decision.verdict == verdict, (name, decision.rule, decision.reason)
    if rule:
        assert decision.rule == rule, name
    reversed_policy = policy_port.for_identity(_composed_policy(list(reversed(names))), identity)
    assert reversed_policy.decide(sql, reversed_policy.new_context()).verdict == verdict, name


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dbgov_check_judges_a_composition_alike(case: Case, tmp_path: Path) -> None:
    name, names, identity, sql, verdict, _ = case
    path = tmp_path / "bundle.yaml"
    path.write_text(yaml.safe_dump(policy_compile.bundle_document([(n, SPECS[n]) for n in names])))
    assert check_cli.judge_of([str(path)])(identity)(sql).verdict == verdict, name


def test_the_proxy_still_accepts_a_login_from_every_declared_issuer() -> None:
    policy = _composed_policy(["cluster:platform", "partners", "attacker"])
    assert {i.issuer for i in policy.jwt_issuers} == {CORP, PARTNER, EVIL}


def test_who_may_trust_which_issuer() -> None:
    components = _components(["cluster:platform", "cluster:second", "partners", "attacker", "team"])
    trusted = dict(zip([c.name for c in components], compose.trusted_issuers(components), strict=True))
    assert trusted == {
        "cluster:platform": {CORP},
        "cluster:second": {CORP},
        "partners": {CORP, PARTNER},
        "attacker": {CORP, EVIL},
        "team": {CORP},
    }


def test_a_policy_alone_keeps_any_issuer_the_proxy_trusted() -> None:
    """A standalone policy (or a bundle of one) judges as before: its subjects without
    ``issuers`` match whichever issuer verified the token (the proxy's own settings too)."""
    for loaded in (policy_compile.compile_policy(HR_TEAM), _components(["hr-team"])):
        policy = policy_port.for_identity(policies.build(loaded), who(DEPLOYMENT, groups=["hr"]))
        assert policy.decide(SALARIES, policy.new_context()).verdict == "allow"
    alone = compose.Composed(_components(["hr-team"]))
    scoped = alone.for_rules(
        lambda r: r.subjects is None or r.subjects.matches(who(DEPLOYMENT, groups=["hr"]))
    )
    assert scoped.decide(SALARIES).verdict == "allow"


def test_identities_no_policy_may_vouch_for_share_the_anonymous_subset() -> None:
    """Scoping stays per session and memoized: a forged identity gets the very composition a
    session without a token gets (its caches too)."""
    policy = _composed_policy(["cluster:platform", "hr-team", "attacker"])
    anonymous = policy.for_identity(None)
    assert policy.for_identity(who(EVIL, groups=["hr"])) is anonymous
    assert policy.for_identity(who(EVIL, "other", groups=["hr", "x"])) is anonymous
    platform_hr = policy.for_identity(who(CORP, groups=["hr"]))
    assert (
        platform_hr is not anonymous and policy.for_identity(who(CORP, "carol", groups=["hr"])) is platform_hr
    )


def test_a_subject_naming_an_issuer_its_policy_may_not_trust_is_reported() -> None:
    components = _components(["cluster:naming-evil", "attacker", "team"])
    found = compose.untrusted_subjects(components)
    assert [name for name, _ in found] == ["cluster:naming-evil", "team"]
    assert "evil-reads" in found[0][1] and EVIL in found[0][1] and "no cluster baseline" in found[0][1]
    assert "corp-bots" in found[1][1] and CORP in found[1][1] and "neither this policy" in found[1][1]
    assert compose.untrusted_subjects(_components(["cluster:platform", "partners", "team"])) == ()
    assert compose.untrusted_subjects(_components(["cluster:naming-evil"])) == ()  # alone: any issuer


def test_the_operator_names_cluster_baselines_as_composition_expects() -> None:
    assert bundle.CLUSTER_PREFIX == compose.CLUSTER_PREFIX
    assert compose.is_cluster(
        compose.Component(
            name=bundle.cluster_component("base"), policy=policy_compile.compile_policy({"default": "block"})
        )
    )
