"""Client tokens (tokens.Verifier) as data: each case is a token made by changing one thing of
a good one, and the refusal code (or the subject) it must get. Keys come from a stand-in fetch
with a stand-in clock, so caching and the unknown-kid rate limit are exact; the real JWKS/OIDC
server over HTTP is tests/integration/test_proxy_jwt.py."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from dbgov_policy import model
from dbgov_sidecar import tokens

ISS = "https://idp.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KEYS = {
    "rsa": (RSA_KEY, "RS256"),
    "ec": (EC_KEY, "ES256"),
    "ed": (ED_KEY, "EdDSA"),
    "other": (OTHER_RSA, "RS256"),
}


def jwk(name: str, kid: str) -> dict[str, Any]:
    key, alg = KEYS[name]
    algorithm = jwt.get_algorithm_by_name(alg)
    return {**json.loads(algorithm.to_jwk(key.public_key())), "kid": kid, "use": "sig"}


class IdP:
    """A stand-in identity provider: discovery + JWKS documents, counting fetches."""

    def __init__(self) -> None:
        self.keys = [jwk("rsa", "r1"), jwk("ec", "e1"), jwk("ed", "d1")]
        self.fetched: list[str] = []
        self.now = 1000.0
        self.down = False

    async def fetch(self, url: str, issuer: model.JwtIssuer) -> Any:
        self.fetched.append(url)
        if self.down:
            raise OSError("connection refused")
        if url.endswith("/.well-known/openid-configuration"):
            return {"issuer": ISS, "jwks_uri": f"{ISS}/jwks"}
        return {"keys": list(self.keys)}


ISSUER = model.JwtIssuer(
    issuer=ISS,
    audiences=("dbgov",),
    algorithms=("RS256", "ES256", "EdDSA"),
    discovery=True,
    claims=("email", "groups"),
    leeway=5.0,
    refresh_cooldown=30.0,
    cache_seconds=300.0,
)


def make(
    claims: dict[str, Any] | None = None, *, key: str = "rsa", kid: str | None = "r1", **header: Any
) -> str:
    now = int(time.time())
    body = {
        "iss": ISS,
        "sub": "alice",
        "aud": "dbgov",
        "exp": now + 60,
        "iat": now,
        "email": "a@x",
        "groups": ["analysts"],
    }
    body.update(claims or {})
    body = {k: v for k, v in body.items() if v is not None}
    private, alg = KEYS[key]
    headers = {"kid": kid} if kid is not None else {}
    return jwt.encode(body, private, algorithm=header.pop("alg", alg), headers={**headers, **header})


NOW = int(time.time())


def _hs_confusion() -> str:
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = {"iss": ISS, "sub": "mallory", "aud": "dbgov", "exp": NOW + 60}
    header = {"alg": "HS256", "kid": "r1", "typ": "JWT"}
    signing = (
        jwt.utils.base64url_encode(json.dumps(header).encode())
        + b"."
        + jwt.utils.base64url_encode(json.dumps(body).encode())
    )
    import hashlib
    import hmac

    signature = jwt.utils.base64url_encode(hmac.new(pem, signing, hashlib.sha256).digest())
    return (signing + b"." + signature).decode()


# (case, token, expected: a subject or "refused:<code>")
CASES: list[tuple[str, Any, str]] = [
    ("rs256", make, "alice"),
    ("es256", lambda: make(key="ec", kid="e1"), "alice"),
    ("eddsa", lambda: make(key="ed", kid="d1"), "alice"),
    ("audience in a list", lambda: make({"aud": ["other", "dbgov"]}), "alice"),
    ("expired", lambda: make({"exp": NOW - 60}), "refused:expired"),
    ("expired within leeway", lambda: make({"exp": int(time.time()) - 2}), "alice"),
    ("not yet valid", lambda: make({"nbf": NOW + 600}), "refused:not_yet_valid"),
    ("issued in the future", lambda: make({"iat": NOW + 600}), "refused:not_yet_valid"),
    ("wrong audience", lambda: make({"aud": "other"}), "refused:wrong_audience"),
    ("no audience", lambda: make({"aud": None}), "refused:missing_claim"),
    ("no subject", lambda: make({"sub": None}), "refused:missing_claim"),
    ("no expiry", lambda: make({"exp": None}), "refused:missing_claim"),
    ("unknown issuer", lambda: make({"iss": "https://evil.example"}), "refused:unknown_issuer"),
    ("no issuer", lambda: make({"iss": None}), "refused:unknown_issuer"),
    ("forged: another key, a known kid", lambda: make(key="other", kid="r1"), "refused:bad_signature"),
    ("unknown kid", lambda: make(key="other", kid="nope"), "refused:unknown_kid"),
    (
        "alg none",
        lambda: jwt.encode({"iss": ISS, "sub": "x"}, None, algorithm="none"),
        "refused:algorithm_not_allowed",
    ),
    ("HS256 with the public key as secret", _hs_confusion, "refused:algorithm_not_allowed"),
    ("alg not in the allow-list", lambda: make(alg="RS512"), "refused:algorithm_not_allowed"),
    ("not a JWT", lambda: "hunter2", "refused:malformed"),
]


def verify(verifier: tokens.Verifier, token: str) -> str:
    try:
        identity = asyncio.run(verifier.verify(token))
    except tokens.Refusal as refusal:
        assert token not in refusal.message
        assert refusal.sqlstate in ("28P01", "28000")
        return f"refused:{refusal.code}"
    return identity.subject


@pytest.mark.parametrize(("case", "token", "expected"), CASES, ids=[c[0] for c in CASES])
def test_tokens(case: str, token: Any, expected: str) -> None:
    idp = IdP()
    verifier = tokens.Verifier(lambda: [ISSUER], fetch=idp.fetch, clock=lambda: idp.now)
    assert verify(verifier, token()) == expected


def test_identity_keeps_only_the_chosen_claims() -> None:
    idp = IdP()
    verifier = tokens.Verifier(lambda: [ISSUER], fetch=idp.fetch, clock=lambda: idp.now)
    identity = asyncio.run(verifier.verify(make({"secret_stuff": "x"})))
    assert identity.audit_fields() == {
        "issuer": ISS,
        "subject": "alice",
        "claims": {"email": "a@x", "groups": ["analysts"]},
    }


def test_keys_are_cached_refreshed_on_ttl_and_unknown_kids_are_rate_limited() -> None:
    idp = IdP()
    verifier = tokens.Verifier(lambda: [ISSUER], fetch=idp.fetch, clock=lambda: idp.now)

    async def run() -> None:
        await verifier.verify(make())
        assert idp.fetched == [f"{ISS}/.well-known/openid-configuration", f"{ISS}/jwks"]
        for _ in range(5):
            await verifier.verify(make())
        assert len(idp.fetched) == 2  # cached
        # A flood of random kids inside the cooldown: no fetch at all.
        idp.now += 1
        results = await asyncio.gather(
            *(verifier.verify(make(kid=f"random-{i}")) for i in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, tokens.Refusal) and r.code == "unknown_kid" for r in results)
        assert len(idp.fetched) == 2
        # The IdP rotates: the new kid works once the cooldown has passed, with one fetch.
        idp.keys.append(jwk("other", "r2"))
        with pytest.raises(tokens.Refusal):
            await verifier.verify(make(key="other", kid="r2"))
        idp.now += ISSUER.refresh_cooldown
        results = await asyncio.gather(*(verifier.verify(make(key="other", kid="r2")) for _ in range(20)))
        assert {r.subject for r in results} == {"alice"}
        assert idp.fetched[2:] == [f"{ISS}/jwks"]  # one shared fetch (jwks_uri remembered)
        # TTL: fetched again after cacheSeconds even for a known kid.
        idp.now += ISSUER.cache_seconds
        await verifier.verify(make())
        assert len(idp.fetched) == 4

    asyncio.run(run())


def test_an_unreachable_idp_refuses_clearly_and_keeps_old_keys() -> None:
    idp = IdP()
    idp.down = True
    verifier = tokens.Verifier(lambda: [ISSUER], fetch=idp.fetch, clock=lambda: idp.now)
    with pytest.raises(tokens.Refusal) as caught:
        asyncio.run(verifier.verify(make()))
    assert caught.value.code == "keys_unavailable" and "connection refused" in caught.value.message
    assert caught.value.sqlstate == "28000"
    assert verify(verifier, make()) == "refused:keys_unavailable" and len(idp.fetched) == 1  # cooldown
    idp.down, idp.now = False, idp.now + 31
    assert verify(verifier, make()) == "alice"
    idp.down, idp.now = True, idp.now + 301  # stale keys beat no keys while the IdP is down
    assert verify(verifier, make()) == "alice"


def test_static_pem_jwk_and_hmac_secret_file(tmp_path: Path) -> None:
    pem = tmp_path / "ec.pem"
    pem.write_bytes(
        EC_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    static = model.JwtIssuer(
        issuer="https://static",
        audiences=("dbgov",),
        algorithms=("ES256", "EdDSA"),
        public_keys=(str(pem), json.dumps(jwk("ed", "d1"))),
    )
    secret = tmp_path / "secret"
    secret.write_text("s" * 40 + "\n")
    hmac_issuer = model.JwtIssuer(
        issuer="https://hmac", audiences=("dbgov",), algorithms=("HS256",), secret_file=str(secret)
    )
    verifier = tokens.Verifier(lambda: [static, hmac_issuer])
    verifier.check_static()
    assert verify(verifier, make({"iss": "https://static"}, key="ec", kid=None)) == "alice"
    assert verify(verifier, make({"iss": "https://static"}, key="ed", kid="d1")) == "alice"
    assert verify(verifier, make({"iss": "https://static"}, key="ed", kid="zz")) == "refused:unknown_kid"
    good = jwt.encode({"iss": "https://hmac", "sub": "bob", "aud": "dbgov", "exp": NOW + 60}, "s" * 40)
    assert verify(verifier, good) == "bob"
    forged = jwt.encode({"iss": "https://hmac", "sub": "bob", "aud": "dbgov", "exp": NOW + 60}, "t" * 40)
    assert verify(verifier, forged) == "refused:bad_signature"


def test_keys_only_over_https_or_to_loopback() -> None:
    issuer = model.JwtIssuer(
        issuer=ISS, audiences=("a",), algorithms=("RS256",), jwks_uri="http://idp.example/jwks"
    )
    with pytest.raises(ValueError, match="not https"):
        tokens.check_url("http://idp.example/jwks", issuer)
    tokens.check_url("http://127.0.0.1:8080/jwks", issuer)
    tokens.check_url(
        "http://idp.example/jwks",
        model.JwtIssuer(issuer=ISS, audiences=("a",), algorithms=("RS256",), allow_http=True),
    )


def test_fetch_follows_no_redirect_to_plain_http_and_refuses_huge_passwords() -> None:
    """A loopback server (allowed over http) redirecting to http elsewhere: refused."""

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", "http://idp.example/jwks")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
        with pytest.raises(ValueError, match="not https"):
            tokens.fetch_json_blocking(url, ISSUER)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    verifier = tokens.Verifier(lambda: [ISSUER], fetch=IdP().fetch)
    assert verify(verifier, "a" * (tokens.MAX_TOKEN + 1)) == "refused:malformed"
