"""Agents authenticate to the proxy with a signed JWT as their password."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jwt
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import RunningProxy
from dbgov_sidecar import config, session

pytestmark = pytest.mark.integration


def _connect(running: RunningProxy, token: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(
        f"host=127.0.0.1 port={running.port} user=agent dbname=shop sslmode=disable password={token}"
    )


def test_hs256_tokens(make_proxy: Callable[..., RunningProxy]) -> None:
    settings = config.Settings(
        client_jwt_key="s3cret-key-for-tests-only-32bytes", client_jwt_audience="dbgov"
    )
    running = make_proxy(
        session_config=session.SessionConfig(client_token=True),
        token_verifier=config.token_verifier(settings),
    )
    now = int(time.time())
    good = jwt.encode(
        {"sub": "agent-7", "aud": "dbgov", "exp": now + 60}, "s3cret-key-for-tests-only-32bytes"
    )
    with _connect(running, good) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
    assert any(
        e.get("identity") == {"issuer": "", "subject": "agent-7", "claims": {}} for e in running.events
    )
    expired = jwt.encode(
        {"sub": "agent-7", "aud": "dbgov", "exp": now - 60}, "s3cret-key-for-tests-only-32bytes"
    )
    wrong_key = jwt.encode({"sub": "x", "aud": "dbgov", "exp": now + 60}, "another-key-another-key-another-k")
    wrong_aud = jwt.encode({"sub": "x", "aud": "other", "exp": now + 60}, "s3cret-key-for-tests-only-32bytes")
    for token, reason in ((expired, "expired"), (wrong_key, "signature"), (wrong_aud, "audience")):
        with pytest.raises(psycopg.OperationalError, match=reason):
            _connect(running, token)


def test_es256_tokens_with_a_public_key_file(make_proxy: Callable[..., RunningProxy], tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    public = tmp_path / "issuer.pem"
    public.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    running = make_proxy(
        session_config=session.SessionConfig(client_token=True),
        token_verifier=config.token_verifier(config.Settings(client_jwt_key=str(public))),
    )
    token = jwt.encode({"sub": "agent-9", "exp": int(time.time()) + 60}, private, algorithm="ES256")
    with _connect(running, token) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    forged = jwt.encode({"sub": "agent-9", "exp": int(time.time()) + 60}, "g" * 32, algorithm="HS256")
    with pytest.raises(psycopg.OperationalError, match="token authentication failed"):
        _connect(running, forged)
