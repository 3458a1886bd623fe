"""Workload identity decisions as data (testdata/identity/reviews.yaml), the endpoint's small
pure parts, and injection in cluster mode as a golden file.

The credential endpoint itself runs against a real kube-apiserver in tests/e2e/test_identity.py.
Refresh the golden file with DBGOV_UPDATE_GOLDEN=1, as test_injection's.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import pathlib
from typing import Any

import pytest
import yaml

from dbgov_operator import credential_server, identity, injection, settings
from dbgov_sidecar import audit, policy_port, session, workload_identity
from dbgov_sidecar.pgwire import messages

TESTDATA = pathlib.Path(__file__).parent / "testdata" / "identity"
DATA = yaml.safe_load((TESTDATA / "reviews.yaml").read_text())
CA = "-----BEGIN CERTIFICATE-----\nMIIB...test...\n-----END CERTIFICATE-----\n"


def _merged(base: dict[str, Any], case: dict[str, Any], key: str) -> Any:
    if key not in case:
        return base[key]
    value = case[key]
    if isinstance(value, dict):
        return {**base[key], **value}
    return value


@pytest.mark.parametrize("name", sorted(DATA["cases"]))
def test_review_and_pod_decide_the_identity(name: str) -> None:
    case = DATA["cases"][name]
    review = _merged(DATA["base"], case, "review")
    pod = _merged(DATA["base"], case, "pod")
    bound = identity.read_review(review, audience="dbgov")
    verdict = bound if isinstance(bound, identity.Refusal) else identity.check_pod(bound, pod)
    expect = case["expect"]
    if "refused" in expect:
        assert isinstance(verdict, identity.Refusal), verdict
        assert verdict.code == expect["refused"], verdict.detail
        assert verdict.message == identity.REASONS[verdict.code]
    else:
        assert isinstance(verdict, identity.Identity), verdict
        assert verdict.as_json() == expect["identity"]


def test_every_reason_code_is_exercised_by_a_case_or_the_endpoint() -> None:
    codes = {c["expect"].get("refused") for c in DATA["cases"].values()} - {None}
    # the header and the token's own claims, tested below
    assert set(identity.REASONS) - codes == {"missing_token", "audience_not_exclusive"}


def _token(claims: object) -> str:
    def part(value: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


@pytest.mark.parametrize(
    ("aud", "refused"),
    [
        (["dbgov"], None),
        ("dbgov", None),
        (["dbgov", "https://kubernetes.default.svc"], "audience_not_exclusive"),
        (["https://kubernetes.default.svc", "dbgov"], "audience_not_exclusive"),
        ([], "audience_not_exclusive"),
    ],
)
def test_only_a_token_for_dbgov_alone_is_accepted(aud: object, refused: str | None) -> None:
    got = identity.exclusive_audience(_token({"aud": aud, "sub": "x"}), audience="dbgov")
    assert (got.code if got else None) == refused
    if got is not None:
        assert got.message == identity.REASONS[got.code]


def test_unreadable_claims_are_an_invalid_token() -> None:
    for token in ("not-a-jwt", "a.%%%.c", _token({"sub": "no aud"})):
        got = identity.exclusive_audience(token, audience="dbgov")
        assert got is not None and got.code == "token_invalid"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer   abc ", "abc"),
        (None, None),
        ("", None),
        ("Basic dXNlcjpwdw==", None),
        ("Bearer ", None),
    ],
)
def test_bearer_token(header: str | None, expected: str | None) -> None:
    token = identity.bearer_token(header)
    if expected is None:
        assert isinstance(token, identity.Refusal) and token.code == "missing_token"
    else:
        assert token == expected


def test_token_expiry_reads_exp_and_survives_garbage() -> None:
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1_800_000_000}).encode()).rstrip(b"=").decode()
    expected = datetime.datetime.fromtimestamp(1_800_000_000, datetime.UTC)
    assert credential_server.token_expiry(f"e30.{claims}.sig") == expected
    for garbage in ("", "one-part", "a.!!!.c", "a.e30.c"):
        assert credential_server.token_expiry(garbage) is None


def test_token_buckets_limit_each_address_and_refill() -> None:
    now = [0.0]
    buckets = credential_server.TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.allow("a") for _ in range(4)] == [True, True, True, False]
    assert buckets.allow("b")  # another address has its own bucket
    now[0] = 0.5  # one token back at 2/s
    assert [buckets.allow("a") for _ in range(2)] == [True, False]


@pytest.mark.parametrize(
    ("env", "url"),
    [
        ({}, "https://127.0.0.1:7000/v1/credentials"),
        ({"DBGOV_WEBHOOK_URL_HOST": "::1"}, "https://[::1]:7000/v1/credentials"),
        (
            {"DBGOV_WEBHOOK_SERVICE": "dbgov-webhook", "DBGOV_NAMESPACE": "dbgov"},
            "https://dbgov-webhook.dbgov.svc:9444/v1/credentials",
        ),
    ],
)
def test_endpoint_url(env: dict[str, str], url: str) -> None:
    assert credential_server.endpoint_url(settings.from_env(env), port=7000) == url


def test_credential_port_behind_a_service_defaults_to_the_service_port() -> None:
    config = settings.from_env({"DBGOV_WEBHOOK_SERVICE": "dbgov-webhook"})
    assert (config.credentials.port, config.credentials.service_port) == (9444, 9444)
    assert settings.from_env({}).credentials.port == 0  # outside a cluster: any free port
    assert (
        settings.from_env({"DBGOV_WEBHOOK_LISTEN_ADDR": "127.0.0.1"}).credentials.listen_addr == "127.0.0.1"
    )


def test_injection_in_cluster_mode_golden() -> None:
    pod = yaml.safe_load((TESTDATA / "endpoint.pod.yaml").read_text())
    endpoint = injection.CredentialEndpoint(
        url="https://dbgov-webhook.dbgov.svc:9444/v1/credentials", ca_pem=CA
    )
    result = injection.inject(pod, sidecar=settings.SidecarSettings(), endpoint=endpoint).pod
    golden = TESTDATA / "endpoint.injected.yaml"
    if os.environ.get("DBGOV_UPDATE_GOLDEN") == "1":
        golden.write_text(yaml.safe_dump(result, sort_keys=False))
    assert result == yaml.safe_load(golden.read_text())
    (sidecar,) = result["spec"]["initContainers"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in sidecar["env"]}
    assert env["DBGOV_CREDENTIAL_URL"] == endpoint.url
    assert env["DBGOV_CREDENTIAL_CA"] == CA
    assert env["DBGOV_TOKEN_FILE"] == "/var/run/secrets/dbgov.io/serviceaccount/token"
    assert env["DBGOV_POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
    without = injection.inject(pod, sidecar=settings.SidecarSettings()).pod
    names = {e["name"] for e in without["spec"]["initContainers"][0]["env"]}
    assert not names & {"DBGOV_CREDENTIAL_URL", "DBGOV_CREDENTIAL_CA"}


# --- the sidecar's side of the same exchange -------------------------------------------------

ANSWER = {
    "identity": {"namespace": "shop", "serviceAccount": "orders", "pod": "o-1", "podUid": "u-1", "node": "n"},
    "expiresAt": "2026-12-05T10:00:00Z",
    "credentials": None,
}


def test_the_sidecar_reads_the_operators_answer() -> None:
    verified = workload_identity.parse_answer(json.dumps(ANSWER).encode(), pod_uid="u-1")
    assert verified.workload.audit_fields() == ANSWER["identity"]
    assert verified.credentials is None
    assert verified.expires_at == datetime.datetime(2026, 12, 5, 10, tzinfo=datetime.UTC)
    minted = {
        **ANSWER,
        "credentials": {"user": "dbgov_o", "password": "s3cret", "validUntil": "2026-12-05T09:00:00Z"},
    }
    credentials = workload_identity.parse_answer(json.dumps(minted).encode()).credentials
    assert credentials is not None and credentials.user == "dbgov_o" and "s3cret" not in repr(credentials)


@pytest.mark.parametrize(
    ("body", "pod_uid", "reason"),
    [
        (json.dumps(ANSWER).encode(), "other-uid", "the token is not this pod's"),
        (b"not json", None, "not what dbgov expects"),
        (json.dumps({"identity": {"pod": "x"}}).encode(), None, "not what dbgov expects"),
    ],
)
def test_the_sidecar_refuses_an_answer_it_cannot_trust(body: bytes, pod_uid: str | None, reason: str) -> None:
    with pytest.raises(workload_identity.Unverified, match=reason):
        workload_identity.parse_answer(body, pod_uid=pod_uid)


def test_an_error_answer_keeps_the_operators_code() -> None:
    body = json.dumps({"error": {"code": "pod_terminating", "message": identity.REASONS["pod_terminating"]}})
    err = workload_identity.refusal(403, body.encode())
    assert err.code == "pod_terminating" and "pod_terminating" in err.reason
    assert workload_identity.refusal(502, b"<html>").reason == "the operator answered HTTP 502"


LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]


def _session(workload: Any) -> session.Session:
    return session.Session(
        policy=policy_port.AllowAll,
        config=session.SessionConfig(workload=workload, upstream_user="app"),
        client=session.ClientInfo(address="127.0.0.1:1", session_id="s1"),
        backend_key=(1, 2),
        nonce="NONCE",
    )


def test_an_unverified_sidecar_refuses_clients_with_57P03() -> None:
    s = _session(lambda: None)
    s.client_data(messages.startup_message({"user": "u", "database": "d"}), 0.0)
    assert b"57P03" in bytes(s.to_client) and b"workload identity" in bytes(s.to_client)
    assert not [a for a in s.actions if isinstance(a, session.ConnectUpstream)]


def test_a_verified_sidecar_audits_its_workload_and_database_role() -> None:
    s = _session(lambda: dict(ANSWER["identity"]))
    s.client_data(messages.startup_message({"user": "u", "database": "d"}), 0.0)
    assert [a for a in s.actions if isinstance(a, session.ConnectUpstream)]
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0)
    s.client_data(messages.query("SELECT 1"), 0.0)
    s.server_data(messages.command_complete("SELECT 1") + messages.ready_for_query("I"), 0.0)
    statements = [dict(e) for e in s.events if e["type"] == "statement"]
    assert statements and all(
        e["workload"] == ANSWER["identity"] and e["db_user"] == "app" for e in statements
    )
    assert [tuple(e) for e in statements] == [audit.STATEMENT_KEYS]
