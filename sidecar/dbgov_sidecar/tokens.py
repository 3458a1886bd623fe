"""End users and agents as identities: a signed JWT given as the database password.

An agent (or a person's tool) presents a token from an identity provider instead of a password.
The proxy trusts a list of issuers (the policy's ``authentication.jwt.issuers``, or a file named
by ``DBGOV_JWT_ISSUERS_FILE``): the token's ``iss`` selects one, whose allow-listed algorithms
and keys (a JWKS URL, OIDC discovery, or static keys) must verify it; then ``aud``, ``exp``,
``nbf``, ``iat`` and ``sub`` are checked. The result is the session's identity: issuer, subject
and the claims that issuer's configuration keeps; rules can be scoped to it and every audit
event carries it. A token that fails gets a ``Refusal`` naming the cause, never echoing the token.

Why here and not in the session: fetching keys is network I/O and the session is sans-I/O.
The session asks for a verification with a ``VerifyToken`` action; the proxy shell awaits
``Verifier.verify`` (fetches run in a thread, ``urllib`` with the issuer's CA) and answers with
``Session.token_verified`` or ``Session.token_refused``. Keys are cached per issuer for
``cacheSeconds``, and an unknown ``kid`` fetches again at most once per ``refreshCooldownSeconds``
(concurrent logins share one fetch), so a flood of tokens with random kids cannot hammer the
identity provider. PyJWT's own ``PyJWKClient`` is not used: before 2.15 it refetches on every
unknown kid, and it fetches on the caller's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import os
import ssl
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from dbgov_policy import model

try:  # PyJWT (with cryptography) comes with the `operator` extra; the proxy needs it only for tokens
    import jwt as _jwt_module
except ImportError:  # pragma: no cover - exercised only in images without the extra
    _jwt_module = None  # type: ignore[assignment]
jwt: Any = _jwt_module

log = logging.getLogger("dbgov.tokens")

FETCH_TIMEOUT = 5.0
"""Seconds one fetch of a discovery document or a JWKS may take."""
MAX_DOCUMENT = 1 << 20
"""Largest discovery document or JWKS read."""
MAX_TOKEN = 16 * 1024
"""Longest token verified (longer passwords are refused unread: parsing costs event-loop time)."""
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
"""Hosts plain http is allowed to without ``allowHttp`` (tests, a local IdP)."""

_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP", "HS": "oct"}


class Refusal(Exception):
    """A token that does not authenticate: ``code`` for the audit event, ``message`` for the
    client (with what to do), ``sqlstate`` 28P01 (bad credentials) or 28000 (not acceptable here)."""

    def __init__(self, code: str, message: str, *, sqlstate: str = "28P01") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.sqlstate = sqlstate


Fetch = Callable[[str, "model.JwtIssuer"], Awaitable[Any]]
"""Fetch a JSON document for an issuer (``fetch_json`` in a thread, or a test's stand-in)."""


def _short(value: object) -> str:
    """A token-supplied value, quoted and cut short, for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_url(url: str, issuer: model.JwtIssuer) -> None:
    """Keys come over HTTPS; plain http only to loopback or with ``allowHttp``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (
        parts.scheme == "http" and (issuer.allow_http or parts.hostname in LOOPBACK)
    ):
        return
    raise ValueError(f"{url} is not https:// (plain http only to 127.0.0.1, or with allowHttp: true)")


def fetch_json_blocking(url: str, issuer: model.JwtIssuer) -> Any:
    """GET ``url`` and parse its JSON (blocking: run it in a thread)."""
    check_url(url, issuer)
    context = ssl.create_default_context(cafile=issuer.ca_file)
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _CheckedRedirect(issuer)
    )
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "dbgov"})
    with opener.open(request, timeout=FETCH_TIMEOUT) as answer:
        body = answer.read(MAX_DOCUMENT + 1)
    if len(body) > MAX_DOCUMENT:
        raise ValueError(f"{url} answered more than {MAX_DOCUMENT} bytes")
    return json.loads(body)


class _CheckedRedirect(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only where a first request could go (never from https to http)."""

    def __init__(self, issuer: model.JwtIssuer) -> None:
        self._issuer = issuer

    def redirect_request(  # noqa: PLR0917 - urllib calls it so
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        check_url(newurl, self._issuer)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


async def fetch_json(url: str, issuer: model.JwtIssuer) -> Any:
    """``fetch_json_blocking`` off the event loop."""
    return await asyncio.to_thread(fetch_json_blocking, url, issuer)


# --- keys ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """One verification key: its ``kid`` (None: none given), key type and ``alg`` if pinned."""

    kid: str | None
    kty: str
    alg: str | None
    key: Any = dataclasses.field(repr=False)

    def fits(self, alg: str) -> bool:
        return (self.alg is None or self.alg == alg) and _KTY.get(alg[:2]) == self.kty


def keys_from_jwks(document: Any) -> tuple[Key, ...]:
    """The signature keys of a JWK set (or of one JWK); keys PyJWT cannot use are skipped."""
    if not isinstance(document, Mapping):
        raise ValueError("a JWKS must be a JSON object")
    entries = document.get("keys") if "keys" in document else [document]
    if not isinstance(entries, list):
        raise ValueError('a JWKS must have a "keys" list')
    keys = []
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK.from_dict(dict(entry))
        except jwt.PyJWTError as err:
            log.info("skipping a JWK PyJWT cannot use (kid %s): %s", entry.get("kid"), err)
            continue
        kid = entry.get("kid")
        keys.append(
            Key(
                kid=str(kid) if kid is not None else None,
                kty=str(entry.get("kty")),
                alg=entry.get("alg"),
                key=jwk.key,
            )
        )
    return tuple(keys)


def static_keys(issuer: model.JwtIssuer, *, inline_secret: bytes | None = None) -> tuple[Key, ...]:
    """The keys an issuer names in its configuration: read from files here (at startup, or
    the first time the issuer is used after a policy reload)."""
    if issuer.secret_file is not None or inline_secret is not None:
        if inline_secret is None:
            with open(issuer.secret_file or "", "rb") as handle:
                inline_secret = handle.read().strip()
        if len(inline_secret) < 32:
            raise ValueError("the HMAC secret is shorter than 32 bytes: too easy to guess")
        return (Key(kid=None, kty="oct", alg=None, key=inline_secret),)
    keys: list[Key] = []
    for text in issuer.public_keys:
        material = text
        if not text.lstrip().startswith(("-----BEGIN", "{")):
            with open(text, encoding="utf-8") as handle:
                material = handle.read()
        if material.lstrip().startswith("{"):
            keys.extend(keys_from_jwks(json.loads(material)))
        else:
            keys.append(_pem_key(material))
    return tuple(keys)


def _pem_key(pem: str) -> Key:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 - with PyJWT's crypto extra
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa  # noqa: PLC0415

    data = pem.encode()
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        from cryptography import x509  # noqa: PLC0415

        key = x509.load_pem_x509_certificate(data).public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return Key(kid=None, kty="RSA", alg=None, key=key)
    if isinstance(key, ec.EllipticCurvePublicKey):
        return Key(kid=None, kty="EC", alg=None, key=key)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return Key(kid=None, kty="OKP", alg=None, key=key)
    raise ValueError(f"unsupported public key type {type(key).__name__}")


@dataclasses.dataclass(slots=True)
class _KeyState:
    """What one issuer's keys are now: fetched (or read) keys and when."""

    keys: tuple[Key, ...] = ()
    fetched_at: float | None = None
    attempted_at: float | None = None
    jwks_uri: str | None = None
    error: str = ""
    inflight: asyncio.Future[None] | None = None
    fetches: int = 0


class Verifier:
    """Verifies client tokens against the trusted issuers; keeps each issuer's keys."""

    def __init__(
        self,
        issuers: Callable[[], Iterable[model.JwtIssuer]],
        *,
        fetch: Fetch = fetch_json,
        clock: Callable[[], float] = time.monotonic,
        inline_secrets: Mapping[str, bytes] | None = None,
    ) -> None:
        if jwt is None:
            raise ValueError(
                "JWT client authentication needs PyJWT and cryptography (pip install 'dbgov[operator]')"
            )
        self._issuers = issuers
        self._fetch = fetch
        self._clock = clock
        self._inline = dict(inline_secrets or {})
        self._state: dict[model.JwtIssuer, _KeyState] = {}

    def fetches(self, issuer: str) -> int:
        """How many times the keys of ``issuer`` were fetched (tests, metrics)."""
        return sum(s.fetches for i, s in self._state.items() if i.issuer == issuer)

    def check_static(self) -> None:
        """Read every static key now, so a bad key file stops the proxy at startup."""
        for issuer in self._issuers():
            if not (issuer.jwks_uri or issuer.discovery):
                self._keys_state(issuer)

    async def verify(self, token: str) -> model.Identity:
        """The identity ``token`` proves, or ``Refusal``."""
        if len(token) > MAX_TOKEN:
            raise Refusal("malformed", f"the password is longer than a token may be ({MAX_TOKEN} bytes)")
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            raise Refusal(
                "malformed",
                f"the password is not a signed JWT ({err}); give the token itself as the password",
            ) from err
        alg = header.get("alg")
        iss = unverified.get("iss", "")
        issuer = next((i for i in self._issuers() if i.issuer == iss), None)
        if issuer is None:
            raise Refusal(
                "unknown_issuer",
                f"the token's issuer {_short(iss or None)} is not trusted here; use a token from a trusted "
                "issuer, or add it to the policy's authentication.jwt.issuers",
                sqlstate="28000",
            )
        name = issuer.issuer or "the configured key"
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise Refusal(
                "algorithm_not_allowed",
                f"the token is signed with alg {_short(alg)}, which {name} does not allow "
                f"(allowed: {', '.join(issuer.algorithms)}); ask the issuer for a token signed with one of those",
                sqlstate="28000",
            )
        kid = header.get("kid")
        candidates = await self._candidates(issuer, alg, None if kid is None else str(kid))
        claims = self._decode(token, issuer, alg, candidates, unverified)
        return model.Identity(
            issuer=issuer.issuer,
            subject=str(claims["sub"]),
            claims={c: claims[c] for c in issuer.claims if c in claims},
        )

    def _decode(
        self,
        token: str,
        issuer: model.JwtIssuer,
        alg: str,
        keys: tuple[Key, ...],
        unverified: Mapping[str, Any],
    ) -> dict[str, Any]:
        name = issuer.issuer or "the configured key"
        required = ["exp", "sub", *(["iss"] if issuer.issuer else []), *(["aud"] if issuer.audiences else [])]
        bad_signature: jwt.InvalidSignatureError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=list(issuer.audiences) or None,
                    issuer=issuer.issuer or None,
                    leeway=issuer.leeway,
                    options={"require": required, "verify_aud": bool(issuer.audiences)},
                )
            except jwt.InvalidSignatureError as err:
                bad_signature = err
                continue
            except jwt.PyJWTError as err:
                raise _refusal(err, issuer, unverified) from err
            return claims
        raise Refusal(
            "bad_signature",
            f"the token's signature does not verify with the keys of {name} (forged, altered, or "
            "signed by another issuer); get a new token from the issuer",
        ) from bad_signature

    async def _candidates(self, issuer: model.JwtIssuer, alg: str, kid: str | None) -> tuple[Key, ...]:
        state = self._keys_state(issuer)
        if issuer.jwks_uri or issuer.discovery:
            now = self._clock()
            if state.fetched_at is None or now - state.fetched_at >= issuer.cache_seconds:
                await self._refresh(issuer, state, now=now)
            found = _matching(state.keys, alg, kid)
            if not found and kid is not None:
                await self._refresh(issuer, state, now=self._clock())
                found = _matching(state.keys, alg, kid)
            if not state.keys and state.error:
                raise Refusal(
                    "keys_unavailable",
                    f"could not fetch the keys of {issuer.issuer} ({state.error}); retry shortly "
                    "(the proxy's log says more)",
                    sqlstate="28000",
                )
        else:
            found = _matching(state.keys, alg, kid)
            if not found and kid is not None and not any(k.kid for k in state.keys):
                found = _matching(state.keys, alg, None)  # static keys without kids: try them all
        if not found:
            if kid is not None:
                raise Refusal(
                    "unknown_kid",
                    f"{issuer.issuer or 'the configured key'} has no key with kid {_short(kid)} for {alg} "
                    f"(keys are fetched again at most every {issuer.refresh_cooldown:g} s); if the issuer "
                    "just rotated its keys retry shortly, otherwise the token is not the issuer's",
                )
            raise Refusal(
                "bad_signature",
                f"{issuer.issuer or 'the configured key'} has no {alg} key for this token; get a token "
                "signed with one of its keys",
            )
        return found

    def _keys_state(self, issuer: model.JwtIssuer) -> _KeyState:
        state = self._state.get(issuer)
        if state is None:
            if len(self._state) > 64:  # issuers of policies no longer loaded
                current = set(self._issuers())
                self._state = {i: s for i, s in self._state.items() if i in current}
            state = _KeyState()
            if not (issuer.jwks_uri or issuer.discovery):
                state.keys = static_keys(issuer, inline_secret=self._inline.get(issuer.issuer))
            self._state[issuer] = state
        return state

    async def _refresh(self, issuer: model.JwtIssuer, state: _KeyState, *, now: float) -> None:
        """Fetch the keys again, unless a fetch ran within the cooldown; concurrent callers
        share one fetch."""
        if state.inflight is not None:
            await asyncio.shield(state.inflight)
            return
        if state.attempted_at is not None and now - state.attempted_at < issuer.refresh_cooldown:
            return
        state.attempted_at = now
        state.inflight = asyncio.get_running_loop().create_future()
        try:
            state.fetches += 1
            uri = issuer.jwks_uri or state.jwks_uri
            if uri is None:
                discovery = await self._fetch(
                    issuer.issuer.rstrip("/") + "/.well-known/openid-configuration", issuer
                )
                if not isinstance(discovery, Mapping) or not isinstance(discovery.get("jwks_uri"), str):
                    raise ValueError("the OIDC discovery document has no jwks_uri")
                if discovery.get("issuer") != issuer.issuer:
                    raise ValueError(f"the discovery document names issuer {_short(discovery.get('issuer'))}")
                uri = str(discovery["jwks_uri"])
                check_url(uri, issuer)
            state.keys = keys_from_jwks(await self._fetch(uri, issuer))
            state.jwks_uri = uri
            state.fetched_at = self._clock()
            state.error = ""
        except Exception as err:  # the IdP is down or answers nonsense: keep the keys we have
            state.error = str(err) or type(err).__name__
            log.warning("could not fetch the keys of issuer %s: %s", issuer.issuer, state.error)
        finally:
            state.inflight.set_result(None)
            state.inflight = None


def _matching(keys: tuple[Key, ...], alg: str, kid: str | None) -> tuple[Key, ...]:
    return tuple(k for k in keys if k.fits(alg) and (kid is None or k.kid is None or k.kid == kid))


def _when(claims_time: object) -> str:
    if isinstance(claims_time, int | float):
        return datetime.datetime.fromtimestamp(claims_time, datetime.UTC).isoformat(timespec="seconds")
    return "an unreadable time"


def _refusal(err: Exception, issuer: model.JwtIssuer, claims: Mapping[str, Any]) -> Refusal:
    name = issuer.issuer or "the configured key"
    if isinstance(err, jwt.ExpiredSignatureError):
        return Refusal(
            "expired", f"the token expired at {_when(claims.get('exp'))}; get a new token from {name}"
        )
    if isinstance(err, jwt.ImmatureSignatureError):
        return Refusal(
            "not_yet_valid",
            f"the token is not valid yet ({err}); check the clocks of the issuer and this host "
            f"(leeway {issuer.leeway:g} s)",
        )
    if isinstance(err, jwt.InvalidAudienceError):
        return Refusal(
            "wrong_audience",
            f"the token is for another audience ({err}); this proxy accepts {', '.join(issuer.audiences)}: "
            "ask the issuer for a token with that audience",
        )
    if isinstance(err, jwt.InvalidIssuerError):
        return Refusal("wrong_issuer", f"the token's issuer does not match {name} ({err})")
    if isinstance(err, jwt.MissingRequiredClaimError):
        return Refusal(
            "missing_claim",
            f"the token has no {err.claim!r} claim, which dbgov requires; ask {name} to include it",
        )
    if isinstance(err, jwt.InvalidAlgorithmError):
        return Refusal(
            "algorithm_not_allowed", f"the token's algorithm is not allowed ({err})", sqlstate="28000"
        )
    return Refusal("invalid", f"the token is not valid ({type(err).__name__}: {err})")


def legacy_issuer(key: str, *, audience: str | None) -> tuple[model.JwtIssuer, bytes | None]:
    """``DBGOV_CLIENT_JWT_KEY`` as an issuer: tokens with no ``iss``, checked with one key (an
    HMAC secret, or a PEM public key / path), and the inline secret if it is one."""
    pem = key.lstrip().startswith("-----BEGIN")
    if not pem and os.path.isfile(key):
        with open(key, encoding="utf-8") as handle:
            pem = handle.read().lstrip().startswith("-----BEGIN")
    audiences = (audience,) if audience else ()
    if pem:
        algs = ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA")
        return model.JwtIssuer(
            issuer="", audiences=audiences, algorithms=algs, public_keys=(key,), leeway=5.0
        ), None
    if os.path.isfile(key):
        issuer = model.JwtIssuer(
            issuer="", audiences=audiences, algorithms=model.JWT_HMAC, secret_file=key, leeway=5.0
        )
        return issuer, None
    return model.JwtIssuer(
        issuer="", audiences=audiences, algorithms=model.JWT_HMAC, leeway=5.0
    ), key.encode()
