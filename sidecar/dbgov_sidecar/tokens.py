"""Client authentication with a signed JWT given as the database password (local mode).

An agent presents a token instead of a password; the proxy checks its signature, expiry and
audience and records its subject as the session's identity. The key is an HMAC secret (HS256)
or a PEM public key (RS256 / ES256), inline or as a file path. Uses PyJWT, imported only when
token authentication is configured.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

from dbgov_sidecar.pgwire import AuthenticationFailed

ASYMMETRIC = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256"]


def verifier(key: str, *, audience: str | None = None, leeway: float = 5.0) -> Callable[[str], str]:
    """A function that returns a token's subject, or raises AuthenticationFailed."""
    try:
        jwt: Any = importlib.import_module("jwt")
    except ImportError as err:
        raise ValueError("JWT client auth needs PyJWT (pip install 'dbgov[operator]')") from err
    material = key
    if not key.startswith("-----BEGIN") and os.path.isfile(key):
        with open(key, encoding="utf-8") as handle:
            material = handle.read()
    algorithms = ASYMMETRIC if material.startswith("-----BEGIN") else ["HS256", "HS384", "HS512"]

    def verify(token: str) -> str:
        try:
            claims = jwt.decode(
                token,
                material,
                algorithms=algorithms,
                audience=audience,
                leeway=leeway,
                options={"require": ["exp", "sub"], "verify_aud": audience is not None},
            )
        except jwt.PyJWTError as err:
            raise AuthenticationFailed(str(err) or type(err).__name__) from err
        return str(claims["sub"])

    return verify
