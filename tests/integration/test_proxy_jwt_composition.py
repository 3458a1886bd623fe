"""Attack finding F4 through the real proxy to the real PostgreSQL: a namespace user's policy
declares an issuer whose key they hold, composed with a cluster baseline that grants a table by
claim. The forged token still logs in (a namespace's rules may use its own identity provider),
but it satisfies none of the baseline's subjects: the baseline sees it as a session without a
token. A token from the baseline's own issuer (a real OIDC discovery + JWKS server) still does."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from test_proxy_jwt import IdP

from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_sidecar import config, policies, policy_port, session

pytestmark = pytest.mark.integration

EVIL = "https://evil.example"
ATTACKER_KEY = ec.generate_private_key(ec.SECP256R1())
ATTACKER_PEM = (
    ATTACKER_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
SELECT = "SELECT count(*) FROM shop.orders"


def _baseline(idp: IdP) -> dict[str, Any]:
    """The platform's ClusterDatabaseAccessPolicy: orders for analysts of its IdP, else blocked."""
    issuer = {
        "issuer": idp.issuer,
        "audiences": ["dbgov"],
        "algorithms": ["RS256"],
        "discovery": True,
        "claims": ["groups"],
    }
    return {
        "default": "allow",
        "authentication": {"jwt": {"issuers": [issuer]}},
        "rules": [
            {
                "name": "analysts-read",
                "verdict": "allow",
                "statements": ["select"],
                "tables": ["shop.orders"],
                "subjects": {"claims": {"groups": ["analysts"]}},
            },
            {"name": "no-orders", "verdict": "block", "tables": ["shop.orders"]},
        ],
    }


ATTACKER = {
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


def _forged(groups: list[str]) -> str:
    now = int(time.time())
    claims = {"iss": EVIL, "sub": "mallory", "aud": "dbgov", "exp": now + 120, "iat": now, "groups": groups}
    return jwt.encode(claims, ATTACKER_KEY, algorithm="ES256")


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP()
    yield server
    server.stop()


@pytest.fixture
def running(idp: IdP, make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    components = policy_compile.compile_components([("cluster:platform", _baseline(idp)), ("team", ATTACKER)])
    policy = policies.build(components)
    assert isinstance(policy, policy_port.ComposedPolicy)
    verifier = config.token_verifier(config.Settings(), policy_issuers=lambda: policy.jwt_issuers)
    return make_proxy(
        policy=policy, session_config=session.SessionConfig(client_token=True), token_verifier=verifier
    )


def _connect(running: RunningProxy, token: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(running.dsn(user="agent", extra=f"password={token}"), autocommit=True)


def test_a_token_signed_by_a_namespace_policy_issuer_gets_nothing_from_the_baseline(
    idp: IdP, running: RunningProxy
) -> None:
    with _connect(running, _forged(["analysts"])) as conn:  # the login itself is accepted
        assert conn.execute("SELECT count(*) FROM shop.customers").fetchone() is not None  # (unchanged)
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-orders"):
            conn.execute(SELECT)
    with _connect(running, idp.token({"groups": ["analysts"]})) as conn:
        assert conn.execute(SELECT).fetchone() is not None
    statements = [e for e in running.events if e["type"] == "statement" and e["statement"] == SELECT]
    seen = [(e["identity"]["issuer"], e["identity"]["subject"], e["decision"], e["rule"]) for e in statements]
    assert seen == [
        (EVIL, "mallory", "block", "cluster:platform/no-orders"),
        (idp.issuer, "alice", "allow", "cluster:platform/analysts-read"),
    ], json.dumps(statements)
