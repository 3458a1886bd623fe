"""End users with JWTs through the real proxy to the real PostgreSQL, psycopg giving the token
as its password; the issuer is a real OIDC discovery + JWKS server on 127.0.0.1 (http.server in
a thread). Keys rotate, unknown kids are rate-limited, every refusal is a FATAL naming its cause
and a login_refused event, claims select rules, and every event of a session carries the identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import pg
from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import config, policy_port, session

pytestmark = pytest.mark.integration

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
NEW_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SIGNERS: dict[str, tuple[Any, str]] = {
    "r1": (RSA_KEY, "RS256"),
    "e1": (EC_KEY, "ES256"),
    "d1": (ED_KEY, "EdDSA"),
    "r2": (NEW_KEY, "RS256"),
}
COOLDOWN = 2.0


def _jwk(kid: str) -> dict[str, Any]:
    key, alg = SIGNERS[kid]
    return {**json.loads(jwt.get_algorithm_by_name(alg).to_jwk(key.public_key())), "kid": kid, "use": "sig"}


class IdP:
    """OIDC discovery and JWKS over HTTP on 127.0.0.1, counting what it serves."""

    def __init__(self) -> None:
        self.kids = ["r1", "e1", "d1"]
        self.hits: dict[str, int] = {}
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                idp.hits[self.path] = idp.hits.get(self.path, 0) + 1
                if self.path == "/.well-known/openid-configuration":
                    body: Any = {"issuer": idp.issuer, "jwks_uri": f"{idp.issuer}/jwks"}
                elif self.path == "/jwks":
                    body = {"keys": [_jwk(k) for k in idp.kids]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def token(self, claims: dict[str, Any] | None = None, *, kid: str = "r1", alg: str | None = None) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "sub": "alice",
            "aud": "dbgov",
            "exp": now + 120,
            "iat": now,
            "email": "alice@example.com",
        }
        body.update(claims or {})
        key, default_alg = SIGNERS[kid]
        return jwt.encode(
            {k: v for k, v in body.items() if v is not None},
            key,
            algorithm=alg or default_alg,
            headers={"kid": kid},
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP()
    yield server
    server.stop()


def _policy(idp: IdP) -> policy_port.EnginePolicy:
    doc = {
        "default": "block",
        "authentication": {
            "jwt": {
                "issuers": [
                    {
                        "issuer": idp.issuer,
                        "audiences": ["dbgov"],
                        "algorithms": ["RS256", "ES256", "EdDSA"],
                        "discovery": True,
                        "claims": ["email", "groups"],
                        "refreshCooldownSeconds": COOLDOWN,
                        "leewaySeconds": 5,
                    }
                ]
            }
        },
        "rules": [
            {
                "name": "analysts-read",
                "verdict": "allow",
                "statements": ["select"],
                "tables": ["shop.orders"],
                "subjects": {"claims": {"groups": ["analysts"]}},
            },
            {"name": "tx", "verdict": "allow", "statements": ["tcl"]},
        ],
    }
    return policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(doc)))


@pytest.fixture
def running(idp: IdP, make_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    policy = _policy(idp)
    verifier = config.token_verifier(config.Settings(), policy_issuers=lambda: policy.jwt_issuers)
    return make_proxy(
        policy=policy, session_config=session.SessionConfig(client_token=True), token_verifier=verifier
    )


def _connect(running: RunningProxy, token: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(running.dsn(user="agent", extra=f"password={token}"))


SELECT = "SELECT count(*) FROM shop.orders"


def test_claims_select_rules_and_every_event_carries_the_identity(idp: IdP, running: RunningProxy) -> None:
    for kid in ("r1", "e1", "d1"):  # RS256, ES256, EdDSA
        with _connect(running, idp.token({"groups": ["analysts"]}, kid=kid)) as conn:
            assert conn.execute(SELECT).fetchone() is not None
    bob_token = idp.token({"sub": "bob", "groups": ["sales"]})
    with (
        _connect(running, bob_token) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="default"),
    ):
        conn.execute(SELECT)
    events = running.events
    by_session: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("identity") is not None:
            by_session.setdefault(event["session_id"], []).append(event)
    assert len(by_session) == 4
    for trail in by_session.values():
        assert trail[0]["type"] == "session_start" and trail[-1]["type"] == "session_end"
        assert len({json.dumps(e["identity"], sort_keys=True) for e in trail}) == 1
    alice = {
        "issuer": idp.issuer,
        "subject": "alice",
        "claims": {"email": "alice@example.com", "groups": ["analysts"]},
    }
    bob = {
        "issuer": idp.issuer,
        "subject": "bob",
        "claims": {"email": "alice@example.com", "groups": ["sales"]},
    }
    statements = [e for e in events if e["type"] == "statement" and e["statement"] == SELECT]
    assert [(e["identity"], e["rule"]) for e in statements] == [(alice, "analysts-read")] * 3 + [
        (bob, "default")
    ]


REFUSALS: list[tuple[str, Callable[[IdP], str], str, str]] = [
    (
        "forged",
        lambda i: jwt.encode(
            {"iss": i.issuer, "sub": "x", "aud": "dbgov", "exp": int(time.time()) + 60},
            NEW_KEY,
            algorithm="RS256",
            headers={"kid": "r1"},
        ),
        "bad_signature",
        "signature does not verify",
    ),
    ("expired", lambda i: i.token({"exp": int(time.time()) - 600}), "expired", "the token expired at"),
    ("not yet valid", lambda i: i.token({"nbf": int(time.time()) + 600}), "not_yet_valid", "not valid yet"),
    ("wrong audience", lambda i: i.token({"aud": "another-service"}), "wrong_audience", "another audience"),
    (
        "wrong issuer",
        lambda i: i.token({"iss": "https://evil.example"}),
        "unknown_issuer",
        "is not trusted here",
    ),
    (
        "unknown kid",
        lambda i: jwt.encode(
            {"iss": i.issuer, "sub": "x", "aud": "dbgov", "exp": int(time.time()) + 60},
            NEW_KEY,
            algorithm="RS256",
            headers={"kid": "zz"},
        ),
        "unknown_kid",
        "has no key with kid 'zz'",
    ),
    (
        "alg none",
        lambda i: jwt.encode(
            {"iss": i.issuer, "sub": "x", "aud": "dbgov", "exp": int(time.time()) + 60},
            None,
            algorithm="none",
        ),
        "algorithm_not_allowed",
        "signed with alg 'none'",
    ),
]


def test_every_refusal_is_a_clear_fatal_and_an_audit_event(idp: IdP, running: RunningProxy) -> None:
    for case, make_token, code, text in REFUSALS:
        token = make_token(idp)
        with pytest.raises(psycopg.OperationalError) as caught:
            _connect(running, token)
        assert "token authentication failed" in str(caught.value) and text in str(caught.value), case
        refused = [e for e in running.events if e["type"] == "login_refused"]
        assert refused[-1]["reason"] == code, case
        assert token not in json.dumps(refused[-1]) and refused[-1]["identity"] is None


def test_rotated_keys_work_after_a_rate_limited_refresh(idp: IdP, running: RunningProxy) -> None:
    with _connect(running, idp.token()) as conn:
        conn.execute("BEGIN")
    assert idp.hits == {"/.well-known/openid-configuration": 1, "/jwks": 1}
    idp.kids.append("r2")  # the IdP rotates in a new key
    flood = [idp.token(kid="r2")] + [
        jwt.encode(
            {"iss": idp.issuer, "sub": "x", "aud": "dbgov", "exp": int(time.time()) + 60},
            NEW_KEY,
            algorithm="RS256",
            headers={"kid": f"random-{n}"},
        )
        for n in range(20)
    ]
    for token in flood:  # unknown kids within the cooldown: not one fetch
        with pytest.raises(psycopg.OperationalError, match="has no key with kid"):
            _connect(running, token)
    assert idp.hits["/jwks"] == 1
    time.sleep(COOLDOWN + 0.2)
    for _ in range(3):
        with _connect(running, idp.token({"sub": "carol"}, kid="r2")) as conn:
            conn.execute("BEGIN")
    assert idp.hits == {"/.well-known/openid-configuration": 1, "/jwks": 2}
    assert any(e.get("identity", {}) and e["identity"]["subject"] == "carol" for e in running.events)


def test_dbgov_proxy_takes_its_issuers_from_the_policy_file(
    idp: IdP, pg_server: pg.PgServer, tmp_path: Path
) -> None:
    """`dbgov proxy` as the sidecar runs: issuers in the policy file turn token login on."""
    policy = tmp_path / "policy.yaml"
    issuer = {
        "issuer": idp.issuer,
        "audiences": ["dbgov"],
        "algorithms": ["ES256"],
        "discovery": True,
        "claims": ["groups"],
    }
    rules = [
        {
            "name": "analysts",
            "verdict": "allow",
            "statements": ["select"],
            "subjects": {"claims": {"groups": ["analysts"]}},
        }
    ]
    policy.write_text(
        yaml.safe_dump({"default": "block", "authentication": {"jwt": {"issuers": [issuer]}}, "rules": rules})
    )
    audit_file = tmp_path / "audit.jsonl"
    port = pg.free_port()
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app:{pg.APP_PASSWORD}@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_POLICY": str(policy),
        "DBGOV_AUDIT": str(audit_file),
        "DBGOV_METRICS": "",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "dbgov_sidecar.proxy_cli"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        dsn = f"host=127.0.0.1 port={port} user=agent dbname=shop sslmode=disable"
        deadline = time.monotonic() + 20
        while True:
            try:
                conn = psycopg.connect(f"{dsn} password={idp.token({'groups': ['analysts']}, kid='e1')}")
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with conn:
            assert conn.execute(SELECT).fetchone() is not None
        with pytest.raises(psycopg.OperationalError, match="is not a signed JWT"):
            psycopg.connect(f"{dsn} password=hunter2")
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    events = [json.loads(line) for line in audit_file.read_text().splitlines()]
    statement = next(e for e in events if e["type"] == "statement" and e["statement"] == SELECT)
    assert statement["identity"] == {
        "issuer": idp.issuer,
        "subject": "alice",
        "claims": {"groups": ["analysts"]},
    }
    assert statement["rule"] == "analysts"
    assert [e["reason"] for e in events if e["type"] == "login_refused"] == ["malformed"]
