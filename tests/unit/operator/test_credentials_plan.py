"""credentials.plan as data: desired state and actual roles → the ordered actions (pure, no database).

Each case names the pods that are bound, the pods that are alive and the roles the database
holds, and lists the actions expected as (action, role alias, reason): `G` is the group role,
`W1`, `W2` the pods' login roles. The same plans run against PostgreSQL in
tests/integration/test_credentials_apply.py.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

import pytest

from dbgov_operator import credentials, grants
from dbgov_policy import compile as policy_compile
from dbgov_policy import model

DB = "shop"
NOW = datetime.datetime(2026, 1, 1, 12, 0, tzinfo=datetime.UTC)
TTL = datetime.timedelta(hours=1)
SECRET = credentials.Secret(password="pw", verifier="SCRAM-SHA-256$4096:c2FsdA==$a:b")
READ = grants.Privilege(object_type="table", schema="shop", name="orders", privilege="SELECT")
USAGE = grants.Privilege(object_type="schema", schema="shop", privilege="USAGE")
GRANTS = grants.GroupGrants(privileges=frozenset({READ, USAGE}))
G = credentials.group_role_name(namespace="ns", policy="p", database=DB)


def _pod(n: int) -> credentials.Workload:
    return credentials.Workload(namespace="ns", service_account="sa", pod_name=f"pod-{n}", pod_uid=f"uid-{n}")


def _login(n: int) -> str:
    return credentials.login_role_name(pod_uid=f"uid-{n}", database=DB)


ALIAS = {"G": G, "W1": _login(1), "W2": _login(2)}
BY_NAME = sorted(["W1", "W2"], key=ALIAS.__getitem__)
"""Roles are planned in name order (the names are hashes)."""


def _owner(alias: str, database: str = DB) -> str:
    if alias == "G":
        return credentials.Owner(kind="group", namespace="ns", policy="p", database=database).comment()
    n = int(alias[1:])
    return credentials.Owner(
        kind="login",
        namespace="ns",
        database=database,
        service_account="sa",
        pod_name=f"pod-{n}",
        pod_uid=f"uid-{n}",
    ).comment()


def _role(
    alias: str, *, until: datetime.timedelta | None = TTL, login: bool = True, **kw: Any
) -> credentials.ActualRole:
    is_group = alias == "G"
    return credentials.ActualRole(
        name=ALIAS.get(alias, alias),
        can_login=login and not is_group,
        valid_until=None if is_group or until is None else NOW + until,
        comment=kw["comment"] if "comment" in kw else _owner(alias),
        member_of=frozenset(kw.get("member_of", () if is_group else (G,))),
    )


HELD = {G: GRANTS.privileges}
CASES: list[dict[str, Any]] = [
    {
        "id": "first-mint",
        "bound": [1],
        "roles": [],
        "expect": [
            ("CreateGroupRole", "G", "issued"),
            ("GrantPrivileges", "G", "issued"),
            ("CreateLoginRole", "W1", "issued"),
        ],
    },
    {
        "id": "converged-is-empty",
        "bound": [1],
        "roles": [_role("G"), _role("W1")],
        "held": HELD,
        "expect": [],
    },
    {
        "id": "renew-inside-the-window",
        "bound": [1],
        "roles": [_role("G"), _role("W1", until=datetime.timedelta(minutes=10))],
        "held": HELD,
        "expect": [("RenewLoginRole", "W1", "renewed")],
    },
    {
        "id": "second-pod-joins",
        "bound": [1, 2],
        "roles": [_role("G"), _role("W1")],
        "held": HELD,
        "expect": [("CreateLoginRole", "W2", "issued")],
    },
    {
        "id": "expired-is-revoked-then-issued-again",
        "bound": [1],
        "roles": [_role("G"), _role("W1", until=datetime.timedelta(seconds=-1))],
        "held": HELD,
        "expect": [
            ("DisableLogin", "W1", "expired"),
            ("TerminateSessions", "W1", "expired"),
            ("DropRole", "W1", "expired"),
            ("CreateLoginRole", "W1", "issued"),
        ],
    },
    {
        "id": "pod-deleted-and-group-unbound",
        "bound": [],
        "live": [],
        "roles": [_role("G"), _role("W1")],
        "held": HELD,
        "expect": [
            ("DisableLogin", "W1", "pod-deleted"),
            ("TerminateSessions", "W1", "pod-deleted"),
            ("DropRole", "W1", "pod-deleted"),
            ("DropRole", "G", "policy-unbound"),
        ],
    },
    {
        "id": "live-pod-no-longer-bound",
        "bound": [2],
        "live": [1, 2],
        "roles": [_role("G"), _role("W1"), _role("W2")],
        "held": HELD,
        "expect": [
            ("DisableLogin", "W1", "policy-unbound"),
            ("TerminateSessions", "W1", "policy-unbound"),
            ("DropRole", "W1", "policy-unbound"),
        ],
    },
    {
        "id": "all-nologin-before-any-termination",
        "bound": [],
        "live": [],
        "roles": [_role("W1"), _role("W2")],
        "expect": [
            (kind, w, "pod-deleted")
            for kind in ("DisableLogin", "TerminateSessions", "DropRole")
            for w in BY_NAME
        ],
    },
    {
        # A DBA's dbgov_dba, a hand-made look-alike, a forged COMMENT on a name that is not
        # its hash: none is provably the operator's, so no plan touches it (attack F6).
        "id": "dbgov-named-roles-the-operator-did-not-make-are-left-alone",
        "bound": [],
        "roles": [
            _role("dbgov_w_handmade", comment=None),
            _role("dbgov_g_handmade", comment='{"dbgov": 99}'),
            _role("dbgov_x", comment="not json"),
            _role("dbgov_dba", comment="human DBA account"),
            _role("dbgov_w_forged", comment=_owner("W1")),
        ],
        "expect": [],
    },
    {
        "id": "another-databases-roles-are-left-alone",
        "bound": [],
        "roles": [
            _role("W1", comment=_owner("W1", database="other")),
            _role("G", comment=_owner("G", database="other")),
        ],
        "expect": [],
    },
    {
        "id": "non-dbgov-roles-are-never-touched",
        "bound": [],
        "roles": [_role("app", comment=None), _role("dbgovernor", comment=None)],
        "expect": [],
    },
    {
        "id": "half-revoked-role-still-bound-is-finished-then-reissued",
        "bound": [1],
        "roles": [_role("G"), _role("W1", login=False)],
        "held": HELD,
        "expect": [
            ("DisableLogin", "W1", "orphan"),
            ("TerminateSessions", "W1", "orphan"),
            ("DropRole", "W1", "orphan"),
            ("CreateLoginRole", "W1", "issued"),
        ],
    },
    {
        "id": "lost-membership-is-restored",
        "bound": [1],
        "roles": [_role("G"), _role("W1", member_of=("dbgov_g_stale",))],
        "held": HELD,
        "expect": [("SetMembership", "W1", "grants-changed")],
    },
    {
        "id": "extra-privilege-is-revoked",
        "bound": [1],
        "roles": [_role("G"), _role("W1")],
        "held": {G: GRANTS.privileges | {dataclasses.replace(READ, privilege="DELETE")}},
        "expect": [("RevokePrivileges", "G", "grants-changed")],
    },
]


def _desired(case: dict[str, Any], group_grants: grants.GroupGrants = GRANTS) -> credentials.Desired:
    bound = case["bound"]
    return credentials.Desired(
        database=DB,
        groups=(credentials.DesiredGroup(namespace="ns", policy="p", grants=group_grants),) if bound else (),
        logins=tuple(credentials.DesiredLogin(workload=_pod(n), policies=("p",)) for n in bound),
        live_pods=frozenset(f"uid-{n}" for n in case.get("live", bound)),
    )


def _secrets() -> dict[str, credentials.Secret]:
    return {_login(n): SECRET for n in (1, 2)}


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_plan(case: dict[str, Any]) -> None:
    actual = credentials.Actual(roles=tuple(case["roles"]), privileges=case.get("held", {}))
    actions = credentials.plan(_desired(case), actual, now=NOW, secrets=_secrets())
    names = {v: k for k, v in ALIAS.items()}
    got = [(type(a).__name__, names.get(a.role, a.role), a.reason) for a in actions]
    assert got == case["expect"]


def test_created_login_carries_ttl_groups_owner_and_no_password_in_audit() -> None:
    desired = _desired({"bound": [1]})
    (create,) = [
        a
        for a in credentials.plan(desired, credentials.Actual(), now=NOW, secrets=_secrets())
        if isinstance(a, credentials.CreateLoginRole)
    ]
    assert create.valid_until == NOW + TTL and create.groups == (G,) and create.secret == SECRET
    event = create.audit()
    assert event["owner"] == {
        "kind": "login",
        "namespace": "ns",
        "database": DB,
        "policy": "p",
        "service_account": "sa",
        "pod_name": "pod-1",
        "pod_uid": "uid-1",
    }
    assert "pw" not in repr(event) and "pw" not in repr(create) and "SCRAM" not in repr(create)
    assert credentials.Owner.from_comment(create.owner.comment() if create.owner else None) == create.owner


def test_a_revoked_roles_objects_go_to_its_group_or_the_quarantine_never_the_admin() -> None:
    quarantine = credentials.quarantine_role_name(DB)
    kept = credentials.plan(
        _desired({"bound": [2]}),
        credentials.Actual(roles=(_role("G"), _role("W1"), _role("W2"))),
        now=NOW,
        secrets=_secrets(),
    )
    (drop,) = [a for a in kept if isinstance(a, credentials.DropRole)]
    assert (drop.role, drop.reassign_to) == (_login(1), G)  # the group stays: the next pod may alter them
    assert drop.audit()["reassignTo"] == G
    gone = credentials.plan(
        _desired({"bound": []}), credentials.Actual(roles=(_role("G"), _role("W1"))), now=NOW, secrets={}
    )
    drops = [(a.role, a.reassign_to) for a in gone if isinstance(a, credentials.DropRole)]
    assert drops == [(_login(1), G), (G, quarantine)]  # the group is dropped after, handing on
    groupless = credentials.plan(
        _desired({"bound": []}), credentials.Actual(roles=(_role("W1", member_of=()),)), now=NOW, secrets={}
    )
    assert [(a.role, a.reassign_to) for a in groupless if isinstance(a, credentials.DropRole)] == [
        (_login(1), quarantine)
    ]
    # The quarantine role is the operator's (provably) and is never revoked.
    q = credentials.ActualRole(
        name=quarantine,
        can_login=False,
        valid_until=None,
        comment=credentials.quarantine_owner(DB).comment(),
    )
    assert credentials.owned(q, DB) == credentials.quarantine_owner(DB)
    assert (
        credentials.plan(_desired({"bound": []}), credentials.Actual(roles=(q,)), now=NOW, secrets={}) == ()
    )
    assert credentials.unmanaged(credentials.Actual(roles=(q, _role("dbgov_dba", comment=None)))) == (
        "dbgov_dba",
    )


def test_rotation_renews_with_the_new_secret() -> None:
    desired = dataclasses.replace(
        _desired({"bound": [1]}),
        logins=(credentials.DesiredLogin(workload=_pod(1), policies=("p",), rotate_password=True),),
    )
    actual = credentials.Actual(roles=(_role("G"), _role("W1")), privileges=HELD)
    (renew,) = credentials.plan(desired, actual, now=NOW, secrets=_secrets())
    assert (
        isinstance(renew, credentials.RenewLoginRole) and renew.secret == SECRET and renew.audit()["rotated"]
    )


def test_revoking_table_select_grants_the_unmasked_columns_again() -> None:
    column = grants.Privilege(
        object_type="column", schema="shop", name="orders", column="id", privilege="SELECT"
    )
    want = grants.GroupGrants(privileges=frozenset({column, USAGE}))
    actual = credentials.Actual(
        roles=(_role("G"), _role("W1")), privileges={G: frozenset({READ, column, USAGE})}
    )
    actions = credentials.plan(_desired({"bound": [1]}, want), actual, now=NOW, secrets=_secrets())
    assert [(type(a).__name__, getattr(a, "privileges", ())) for a in actions] == [
        ("RevokePrivileges", (READ,)),
        ("GrantPrivileges", (column,)),
    ]


def test_masking_views_schema_key_and_stale_views() -> None:
    table = grants.Table(schema="shop", name="customers", columns=("id", "ssn"))
    spec = {"default": "allow", "masks": [{"table": "shop.customers", "column": "ssn", "strategy": "hash"}]}
    policy = policy_compile.compile_policy(spec, mask_key="k" * 32)
    want = grants.compile_grants(policy, grants.Catalog(schemas=("shop",), tables=(table,)), group_role=G)
    (view,) = want.views
    fresh = credentials.plan(
        _desired({"bound": [1]}, want), credentials.Actual(), now=NOW, secrets=_secrets()
    )
    assert [type(a).__name__ for a in fresh][:5] == [
        "EnsureMaskingSchema",
        "CreateGroupRole",
        "SetMaskKey",
        "GrantPrivileges",
        "CreateMaskingView",
    ]
    stale = credentials.ActualView(name="old.view", group_role=G, digest="x")
    current = credentials.ActualView(name=view.name, group_role=G, digest=view.digest)
    actual = credentials.Actual(
        roles=(_role("G"), _role("W1")),
        privileges={G: want.privileges},
        views=(stale, current),
        key_digests={G: want.pads.digest if want.pads else ""},
        masking_schema=True,
    )
    actions = credentials.plan(_desired({"bound": [1]}, want), actual, now=NOW, secrets=_secrets())
    assert [(type(a).__name__, getattr(a, "view", None)) for a in actions] == [
        ("DropMaskingView", "old.view")
    ]
    unbound = credentials.plan(_desired({"bound": [], "live": []}), actual, now=NOW, secrets={})
    assert [type(a).__name__ for a in unbound][-4:] == [
        "DropMaskingView",
        "DropMaskingView",
        "SetMaskKey",
        "DropRole",
    ]


@pytest.mark.parametrize(
    ("desired", "now", "secrets", "message"),
    [
        (_desired({"bound": [1]}), NOW, {}, "no secret for login role"),
        (_desired({"bound": [1]}), NOW.replace(tzinfo=None), _secrets(), "timezone-aware"),
        (
            credentials.Desired(
                database=DB, logins=(credentials.DesiredLogin(workload=_pod(1), policies=("p",)),)
            ),
            NOW,
            _secrets(),
            "which has no DesiredGroup",
        ),
    ],
    ids=["missing-secret", "naive-now", "unknown-policy"],
)
def test_plan_errors_name_the_cause(
    desired: credentials.Desired, now: datetime.datetime, secrets: Any, message: str
) -> None:
    with pytest.raises(credentials.PlanError, match=message):
        credentials.plan(desired, credentials.Actual(), now=now, secrets=secrets)


def test_role_names_are_deterministic_short_and_per_database() -> None:
    a = credentials.login_role_name(pod_uid="u" * 200, database="d" * 200)
    assert a == credentials.login_role_name(pod_uid="u" * 200, database="d" * 200)
    assert len(a.encode()) <= 63 and a.startswith("dbgov_w_")
    assert credentials.login_role_name(pod_uid="u", database="a") != credentials.login_role_name(
        pod_uid="u", database="b"
    )
    g = credentials.group_role_name(namespace="n", policy="p", database="d")
    assert g.startswith("dbgov_g_") and len(g) <= 63
    assert g != credentials.group_role_name(namespace="n", policy="p2", database="d")
    # The parts are separated, so ("ab", "c") and ("a", "bc") differ.
    assert credentials.group_role_name(
        namespace="ab", policy="c", database="d"
    ) != credentials.group_role_name(namespace="a", policy="bc", database="d")


CREDENTIAL_CASES: list[tuple[Any, Any]] = [
    (None, (TTL, TTL / 3)),
    ({}, (TTL, TTL / 3)),
    ({"ttl": "15m"}, (datetime.timedelta(minutes=15), datetime.timedelta(minutes=5))),
    (
        {"ttl": "1h30m", "renewBefore": "10m"},
        (datetime.timedelta(minutes=90), datetime.timedelta(minutes=10)),
    ),
    ({"ttl": "24h"}, (datetime.timedelta(hours=24), datetime.timedelta(hours=8))),
    ({"ttl": "1m"}, (datetime.timedelta(minutes=1), datetime.timedelta(seconds=20))),
    ({"ttl": "30s"}, ["spec.credentials.ttl: must be between 1m and 24h, got '30s'"]),
    ({"ttl": "25h"}, ["spec.credentials.ttl: must be between 1m and 24h, got '25h'"]),
    ({"ttl": 15}, ['spec.credentials.ttl: must be a duration like "15m", "1h" or "1h30m", got 15']),
    (
        {"ttl": "15 minutes"},
        ['spec.credentials.ttl: must be a duration like "15m", "1h" or "1h30m", got \'15 minutes\''],
    ),
    ({"ttl": ""}, ['spec.credentials.ttl: must be a duration like "15m", "1h" or "1h30m", got \'\'']),
    (
        {"ttl": "15m", "renewBefore": "15m"},
        ["spec.credentials.renewBefore: must be more than 0 and less than ttl (15m), got '15m'"],
    ),
    (
        {"ttl": "15m", "renewBefore": "0s"},
        ["spec.credentials.renewBefore: must be more than 0 and less than ttl (15m), got '0s'"],
    ),
    (
        {"tll": "15m", "renewBefore": "x"},
        [
            "spec.credentials.tll: unknown field; known fields: renewBefore, ttl",
            'spec.credentials.renewBefore: must be a duration like "15m", "1h" or "1h30m", got \'x\'',
        ],
    ),
    ("1h", ["spec.credentials: must be a mapping, got str"]),
]


@pytest.mark.parametrize(("value", "expect"), CREDENTIAL_CASES, ids=[repr(c[0]) for c in CREDENTIAL_CASES])
def test_parse_credentials(value: Any, expect: Any) -> None:
    if isinstance(expect, tuple):
        spec = credentials.parse_credentials(value)
        assert (spec.ttl, spec.renew_before) == expect
        return
    with pytest.raises(policy_compile.PolicyInvalid) as err:
        credentials.parse_credentials(value)
    assert [str(p) for p in err.value.problems] == expect


def test_credentials_field_is_accepted_by_the_policy_compiler() -> None:
    spec = {"credentials": {"ttl": "15m"}, "default": "block"}
    assert isinstance(policy_compile.compile_policy(spec), model.CompiledPolicy)


@pytest.mark.parametrize("module", [credentials, grants])
def test_plan_modules_stay_pure(module: Any) -> None:
    """credentials and grants decide; only pgapply may talk to a database (or anything else)."""
    import ast
    import pathlib

    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    forbidden = {"asyncio", "socket", "kopf", "kubernetes", "psycopg", "os", "subprocess", "secrets", "time"}
    assert not imported & forbidden
