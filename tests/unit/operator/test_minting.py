"""The decisions of minting as data: which policies bind a pod, which database it gets, what the
desired state of a database holds, which planned actions run, and what the audit says.

The I/O around them (the apiserver, PostgreSQL) is proven in tests/e2e/test_minting.py.
"""

from __future__ import annotations

import base64
import datetime
from typing import Any

import pytest

from dbgov_operator import credential_server, credentials, grants, minting, reconcile

NOW = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.UTC)
NS = "shop"
DB = minting.database_id(namespace=NS, name="orders-db")
CATALOG = grants.Catalog(
    schemas=("public", "shop"),
    tables=(grants.Table(schema="shop", name="orders", columns=("id", "qty")),),
)


def _spec(database: str = "orders-db", **extra: Any) -> dict[str, Any]:
    return {
        "subjects": {"serviceAccounts": ["orders"]},
        "databaseRef": {"name": database},
        "default": "block",
        "rules": [{"name": "read", "verdict": "allow", "statements": ["select"]}],
        **extra,
    }


def _pod(name: str = "orders-1", uid: str = "uid-1", **extra: Any) -> minting.Pod:
    return minting.Pod(name=name, uid=uid, service_account=extra.pop("sa", "orders"), **extra)


def _refusal(call: Any) -> tuple[int, str, str]:
    with pytest.raises(credential_server.IssueRefused) as caught:
        call()
    return caught.value.status, caught.value.code, caught.value.message


# -- binding and the database ------------------------------------------------------------------


def test_policies_bind_by_service_account_or_labels_and_need_a_database() -> None:
    by_account = minting.Policy(name="a", spec=_spec())
    by_label = minting.Policy(name="b", spec=_spec(subjects={"podSelector": {"matchLabels": {"team": "ai"}}}))
    no_database = minting.Policy(name="c", spec={k: v for k, v in _spec().items() if k != "databaseRef"})
    policies = [by_account, by_label, no_database]
    assert minting.binding(policies, _pod()) == [by_account]
    assert minting.binding(policies, _pod(labels={"team": "ai"})) == [by_account, by_label]
    assert minting.binding(policies, _pod(sa="other")) == []


def test_the_database_is_the_one_the_policies_name_or_the_annotation_chooses() -> None:
    one = minting.Policy(name="a", spec=_spec("orders-db"))
    other = minting.Policy(name="b", spec=_spec("billing-db"))
    assert minting.choose_database([one], _pod()) == "orders-db"
    assert minting.choose_database([one, other], _pod(database="billing-db")) == "billing-db"
    status, code, message = _refusal(lambda: minting.choose_database([one, other], _pod()))
    assert (status, code) == (409, "database_ambiguous")
    assert "billing-db, orders-db" in message and "dbgov.io/database" in message
    status, code, message = _refusal(lambda: minting.choose_database([one], _pod(database="nope")))
    assert (status, code) == (409, "database_not_bound") and "'nope'" in message
    assert _refusal(lambda: minting.choose_database([], _pod()))[:2] == (409, "no_policy")


def test_invalid_and_deleting_policies_bind_nothing() -> None:
    from dbgov_operator import kubeapi

    def obj(name: str, spec: dict[str, Any], *, deleting: bool = False) -> kubeapi.PolicyObject:
        return kubeapi.PolicyObject(name=name, generation=1, spec=spec, status={}, deleting=deleting, body={})

    found = minting.valid_policies(
        [
            obj("ok", _spec()),
            obj("gone", _spec(), deleting=True),
            obj("bad-ttl", _spec(credentials={"ttl": "5s"})),
        ]
    )
    assert [p.name for p in found] == ["ok"]


def test_the_shortest_ttl_of_the_binding_policies_wins() -> None:
    long = minting.Policy(name="a", spec=_spec(credentials={"ttl": "2h", "renewBefore": "10m"}))
    short = minting.Policy(name="b", spec=_spec(credentials={"ttl": "15m", "renewBefore": "5m"}))
    spec = minting.credentials_spec([long, short])
    assert (spec.ttl, spec.renew_before) == (datetime.timedelta(minutes=15), datetime.timedelta(minutes=5))
    assert minting.credentials_spec([]) == credentials.CredentialsSpec()


# -- desired state and the actions that run ----------------------------------------------------


def _groups(policies: list[minting.Policy]) -> dict[str, credentials.DesiredGroup]:
    groups, failed = minting.compile_groups(policies, CATALOG, namespace=NS, database=DB, mask_key="k" * 32)
    assert failed == {}
    return groups


def _role(
    uid: str, *, can_login: bool = True, valid_until: datetime.datetime | None = None
) -> credentials.ActualRole:
    owner = credentials.Owner(kind="login", namespace=NS, database=DB, policy="a", pod_name=uid, pod_uid=uid)
    return credentials.ActualRole(
        name=credentials.login_role_name(pod_uid=uid, database=DB),
        can_login=can_login,
        valid_until=valid_until if valid_until is not None else NOW + datetime.timedelta(minutes=30),
        comment=owner.comment(),
    )


def test_desired_state_keeps_live_bound_holders_and_adds_only_the_presenting_pod() -> None:
    policy = minting.Policy(name="a", spec=_spec())
    pods = [_pod("holder", "u1"), _pod("asker", "u2"), _pod("idle", "u3"), _pod("stranger", "u4", sa="x")]
    actual = credentials.Actual(
        roles=(_role("u1"), _role("u4"), _role("gone")),
    )
    desired = minting.desired_state(
        namespace=NS,
        database=DB,
        policies=[policy],
        groups=_groups([policy]),
        pods=pods,
        actual=actual,
        now=NOW,
        presenting=pods[1],
    )
    logins = {d.workload.pod_name: d for d in desired.logins}
    assert set(logins) == {"holder", "asker"}  # idle has no role; stranger is not bound
    assert logins["asker"].rotate_password and not logins["holder"].rotate_password
    assert desired.live_pods == {"u1", "u2", "u3", "u4"}
    assert [g.policy for g in desired.groups] == ["a"]
    actions = credentials.plan(
        desired,
        actual,
        now=NOW,
        secrets={
            credentials.login_role_name(pod_uid="u2", database=DB): credentials.Secret(
                password="p", verifier="v"
            )
        },
    )
    revoked = {(a.role, a.reason) for a in actions if isinstance(a, credentials.DropRole)}
    assert revoked == {
        (credentials.login_role_name(pod_uid="u4", database=DB), "policy-unbound"),
        (credentials.login_role_name(pod_uid="gone", database=DB), "pod-deleted"),
    }


def test_expired_or_disabled_roles_of_others_are_not_kept() -> None:
    policy = minting.Policy(name="a", spec=_spec())
    pods = [_pod("expired", "u1"), _pod("half-revoked", "u2")]
    actual = credentials.Actual(
        roles=(_role("u1", valid_until=NOW - datetime.timedelta(seconds=1)), _role("u2", can_login=False))
    )
    desired = minting.desired_state(
        namespace=NS,
        database=DB,
        policies=[policy],
        groups=_groups([policy]),
        pods=pods,
        actual=actual,
        now=NOW,
    )
    assert desired.logins == () and desired.groups == ()


def test_only_the_presenting_role_is_created_or_renewed() -> None:
    mine = credentials.login_role_name(pod_uid="u1", database=DB)
    theirs = credentials.login_role_name(pod_uid="u2", database=DB)
    until = NOW + datetime.timedelta(hours=1)
    secret = credentials.Secret(password="p", verifier="v")
    actions: list[credentials.Action] = [
        credentials.CreateLoginRole(role=mine, reason="issued", secret=secret, valid_until=until, groups=()),
        credentials.RenewLoginRole(role=theirs, reason="renewed", valid_until=until),
        credentials.DropRole(
            role="dbgov_w_x",
            reason="expired",
            reassign_to="dbgov_g_y",
            quarantine=credentials.quarantine_owner(DB),
        ),
        credentials.GrantPrivileges(role="dbgov_g_y", reason="grants-changed", privileges=()),
    ]
    assert minting.applicable(actions, presenting_role=mine) == [actions[0], actions[2], actions[3]]
    assert minting.applicable(actions, presenting_role=None) == [actions[2], actions[3]]


def test_a_policy_whose_grants_cannot_compile_is_named() -> None:
    policy = minting.Policy(
        name="hashy",
        spec=_spec(masks=[{"table": "shop.orders", "column": "qty", "strategy": "hash"}]),
    )
    groups, failed = minting.compile_groups([policy], CATALOG, namespace=NS, database=DB, mask_key="")
    assert groups == {} and "mask key is empty" in failed["hashy"]


# -- audit and the mask key --------------------------------------------------------------------


def test_audit_lines_say_issued_renewed_revoked_and_never_the_password() -> None:
    secret = credentials.Secret(password="s3cret-password", verifier="SCRAM-SHA-256$verifier")
    owner = credentials.Owner(kind="login", namespace=NS, database=DB, pod_uid="u1")
    until = NOW + datetime.timedelta(hours=1)
    cases: dict[str, credentials.Action] = {
        "credential_issued": credentials.CreateLoginRole(
            role="r", reason="issued", owner=owner, secret=secret, valid_until=until, groups=("g",)
        ),
        "credential_renewed": credentials.RenewLoginRole(
            role="r", reason="renewed", owner=owner, valid_until=until, secret=secret
        ),
        "credential_revoked": credentials.DropRole(
            role="r",
            reason="pod-deleted",
            owner=owner,
            reassign_to="g",
            quarantine=credentials.quarantine_owner(DB),
        ),
        "credential_grants_changed": credentials.GrantPrivileges(role="g", reason="issued", privileges=()),
    }
    for kind, action in cases.items():
        event = minting.audit_event(action, database=DB, now=NOW)
        assert event["type"] == kind and event["database"] == DB and event["time"] == "2026-01-01T12:00:00Z"
        assert "s3cret" not in str(event) and "SCRAM" not in str(event)
    assert minting.audit_event(cases["credential_revoked"], database=DB, now=NOW)["owner"]["pod_uid"] == "u1"


def test_the_mask_key_must_be_there_and_long_enough() -> None:
    good = "x" * 43
    assert minting.mask_key_of({"maskKey": base64.b64encode(good.encode()).decode()}, where="ns/k") == good
    for data in ({}, {"maskKey": ""}, {"maskKey": base64.b64encode(b"short").decode()}, {"maskKey": "%%"}):
        with pytest.raises(minting.MaskKeyInvalid, match="ns/k"):
            minting.mask_key_of(data, where="ns/k")


def test_the_webhook_reports_every_credentials_problem_with_its_path() -> None:
    spec = _spec(credentials={"ttl": "30s", "renewBefore": "soon", "rotate": True})
    paths = {str(p.path) for p in reconcile.problems(spec)}
    assert {"credentials.ttl", "credentials.renewBefore", "credentials.rotate"} <= paths


def test_the_answer_carries_everything_to_log_in_upstream() -> None:
    until = NOW + datetime.timedelta(minutes=15)
    issued = credential_server.IssuedCredentials(
        user="dbgov_w_1",
        password="pw",
        valid_until=until,
        renew_at=until - datetime.timedelta(minutes=5),
        database="orders-db",
        host="pg",
        port=5433,
        dbname="shop",
        sslmode="verify-full",
        ca_pem="PEM",
        policies=("a",),
    )
    assert issued.as_json() == {
        "database": "orders-db",
        "host": "pg",
        "port": 5433,
        "dbname": "shop",
        "sslmode": "verify-full",
        "caPem": "PEM",
        "user": "dbgov_w_1",
        "password": "pw",
        "validUntil": "2026-01-01T12:15:00Z",
        "renewAt": "2026-01-01T12:10:00Z",
        "policies": ["a"],
    }
    # No mask key: the masking views hash in the database, and a key in the pod would let the
    # workload reverse the hashes of low-entropy values offline.
    assert "pw" not in repr(issued) and "PEM" not in repr(issued)
