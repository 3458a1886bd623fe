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
    assert set(identity.REASONS) - codes == {"missing_token"}  # the header, tested below


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
    assert settings.from_env({"DBGOV_WEBHOOK_LISTEN_ADDR": "127.0.0.1"}).credentials.listen_addr == "127.0.0.1"


def test_injection_in_cluster_mode_golden() -> None:
    pod = yaml.safe_load((TESTDATA / "endpoint.pod.yaml").read_text())
    endpoint = injection.CredentialEndpoint(url="https://dbgov-webhook.dbgov.svc:9444/v1/credentials", ca_pem=CA)
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
