"""Password authentication exchanges as pure functions and small state objects.

The proxy authenticates to the upstream database with md5 or SCRAM-SHA-256 (RFC 5802 / 7677,
as PostgreSQL implements it: empty username in the SCRAM messages), over TLS with
SCRAM-SHA-256-PLUS and ``tls-server-end-point`` channel binding (RFC 5929) so that a man in the
middle holding another certificate cannot relay the login, and may ask its own clients for a
password. Nonces and salts are parameters, never drawn here, so every
exchange is reproducible in a test.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import stringprep
import unicodedata
from dataclasses import dataclass

from dbgov_sidecar.pgwire.errors import AuthenticationFailed, ProtocolViolation

SCRAM_SHA_256 = "SCRAM-SHA-256"
SCRAM_SHA_256_PLUS = "SCRAM-SHA-256-PLUS"
_GS2_HEADER = b"n,,"
_GS2_PLUS = b"p=tls-server-end-point,,"
_GS2_SUPPORTED = b"y,,"  # the client could bind, the server did not offer it (downgrade check)


def md5_password(*, user: str, password: str, salt: bytes) -> bytes:
    """The PasswordMessage payload for AuthenticationMD5Password (NUL-terminated)."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    outer = hashlib.md5(inner.encode() + salt).hexdigest()
    return b"md5" + outer.encode() + b"\0"


def saslprep(password: str) -> bytes:
    """SASLprep (RFC 4013) as PostgreSQL applies it: fall back to the raw bytes if invalid."""
    mapped = "".join(
        " " if stringprep.in_table_c12(ch) else ch for ch in password if not stringprep.in_table_b1(ch)
    )
    normalized = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_c12,
        stringprep.in_table_c21_c22,
        stringprep.in_table_c3,
        stringprep.in_table_c4,
        stringprep.in_table_c5,
        stringprep.in_table_c6,
        stringprep.in_table_c7,
        stringprep.in_table_c8,
        stringprep.in_table_c9,
        stringprep.in_table_a1,
    )
    if not normalized or any(check(ch) for ch in normalized for check in prohibited):
        return password.encode()
    return normalized.encode()


@dataclass(frozen=True, slots=True, kw_only=True)
class ScramKeys:
    """What a server stores for a SCRAM-SHA-256 password (PostgreSQL's rolpassword)."""

    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes

    def verifier(self) -> str:
        """The ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`` form pg_authid keeps."""
        b64 = base64.b64encode
        return (
            f"{SCRAM_SHA_256}${self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )


def scram_keys(password: str, *, salt: bytes, iterations: int = 4096) -> ScramKeys:
    """Derive the stored and server keys for ``password``."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    client_key = _hmac(salted, b"Client Key")
    return ScramKeys(
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.sha256(client_key).digest(),
        server_key=_hmac(salted, b"Server Key"),
    )


def tls_server_end_point(certificate: bytes) -> bytes:
    """Channel-binding data of type ``tls-server-end-point`` for a server certificate (DER):
    its hash with the certificate's own signature hash, SHA-256 in place of MD5 and SHA-1."""
    from cryptography import x509  # noqa: PLC0415 - only logins over TLS need it
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415

    try:
        algorithm = x509.load_der_x509_certificate(certificate).signature_hash_algorithm
    except (ValueError, x509.UnsupportedGeneralNameType) as err:
        raise AuthenticationFailed(f"cannot read the server certificate for channel binding: {err}") from err
    if algorithm is None:
        raise AuthenticationFailed(
            "the server certificate's signature algorithm has no hash, so SCRAM channel binding "
            "(tls-server-end-point) is impossible with it"
        )
    if isinstance(algorithm, (hashes.MD5, hashes.SHA1)):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate)
    return digest.finalize()


class ScramClient:
    """Client side of SCRAM-SHA-256 (-PLUS): first message, final message, server proof check.

    ``binding`` is the channel-binding data when the exchange is SCRAM-SHA-256-PLUS;
    ``could_bind`` marks a plain exchange over TLS (the server did not offer -PLUS), which a
    server that does support it must refuse as a downgrade.
    """

    def __init__(
        self,
        *,
        password: str,
        nonce: str,
        username: str = "",
        binding: bytes | None = None,
        could_bind: bool = False,
    ) -> None:
        # PostgreSQL ignores the SCRAM username (the startup packet names the role).
        self._password = password
        self._nonce = nonce
        self._first_bare = f"n={username},r={nonce}".encode()
        self._server_signature: bytes | None = None
        self._header = _GS2_PLUS if binding is not None else _GS2_SUPPORTED if could_bind else _GS2_HEADER
        self._binding = binding or b""

    @property
    def mechanism(self) -> str:
        """The SASL mechanism this exchange speaks."""
        return SCRAM_SHA_256_PLUS if self._header == _GS2_PLUS else SCRAM_SHA_256

    def client_first(self) -> bytes:
        """The client-first-message for SASLInitialResponse."""
        return self._header + self._first_bare

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final-message answering the server-first-message."""
        attrs = _attributes(server_first, "server-first-message")
        nonce, salt_b64, iter_text = attrs.get("r"), attrs.get("s"), attrs.get("i")
        if nonce is None or salt_b64 is None or iter_text is None:
            raise ProtocolViolation("SCRAM server-first-message lacks r, s or i")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise AuthenticationFailed("SCRAM server nonce does not extend the client nonce")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
            iterations = int(iter_text)
        except ValueError as err:
            raise ProtocolViolation("SCRAM server-first-message has a bad salt or count") from err
        if iterations < 1:
            raise ProtocolViolation(f"SCRAM iteration count {iterations} is not positive")
        salted = salted_password(self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        without_proof = b"c=" + base64.b64encode(self._header + self._binding) + b",r=" + nonce.encode()
        auth_message = self._first_bare + b"," + server_first + b"," + without_proof
        signature = _hmac(hashlib.sha256(client_key).digest(), auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return without_proof + b",p=" + base64.b64encode(proof)

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server's signature; raise AuthenticationFailed if it does not match."""
        attrs = _attributes(server_final, "server-final-message")
        if "e" in attrs:
            raise AuthenticationFailed(f"SCRAM server reported error {attrs['e']!r}")
        verifier = attrs.get("v")
        if verifier is None or self._server_signature is None:
            raise ProtocolViolation("SCRAM server-final-message out of order or without v")
        try:
            got = base64.b64decode(verifier, validate=True)
        except ValueError as err:
            raise ProtocolViolation("SCRAM server signature is not base64") from err
        if not hmac.compare_digest(got, self._server_signature):
            raise AuthenticationFailed("SCRAM server signature does not match")


class ScramServer:
    """Server side of SCRAM-SHA-256, for proxies asking their clients for a password."""

    def __init__(self, *, keys: ScramKeys, nonce: str) -> None:
        self._keys = keys
        self._nonce = nonce
        self._client_first_bare = b""
        self._server_first = b""
        self._full_nonce = ""

    def server_first(self, client_first: bytes) -> bytes:
        """Answer the client-first-message."""
        if not client_first.startswith((b"n,,", b"y,,")):
            raise AuthenticationFailed("SCRAM channel binding is not supported")
        self._client_first_bare = client_first[3:]
        attrs = _attributes(self._client_first_bare, "client-first-message")
        client_nonce = attrs.get("r")
        if not client_nonce:
            raise ProtocolViolation("SCRAM client-first-message has no nonce")
        self._full_nonce = client_nonce + self._nonce
        salt = base64.b64encode(self._keys.salt).decode()
        self._server_first = f"r={self._full_nonce},s={salt},i={self._keys.iterations}".encode()
        return self._server_first

    def server_final(self, client_final: bytes) -> bytes:
        """Check the client proof and return the server-final-message."""
        attrs = _attributes(client_final, "client-final-message")
        if attrs.get("r") != self._full_nonce or "p" not in attrs:
            raise AuthenticationFailed("SCRAM client-final-message has a wrong nonce or no proof")
        without_proof = client_final[: client_final.rindex(b",p=")]
        auth_message = self._client_first_bare + b"," + self._server_first + b"," + without_proof
        signature = _hmac(self._keys.stored_key, auth_message)
        try:
            proof = base64.b64decode(attrs["p"], validate=True)
        except ValueError as err:
            raise ProtocolViolation("SCRAM client proof is not base64") from err
        if len(proof) != len(signature):
            raise AuthenticationFailed("password authentication failed")
        client_key = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._keys.stored_key):
            raise AuthenticationFailed("password authentication failed")
        return b"v=" + base64.b64encode(_hmac(self._keys.server_key, auth_message))


@functools.lru_cache(maxsize=64)
def salted_password(password: str, salt: bytes, iterations: int) -> bytes:
    """SCRAM's SaltedPassword (PBKDF2), memoized: a server reuses a role's salt for every login,
    and thousands of iterations per connection would stall a proxy under a connection storm."""
    return hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _attributes(message: bytes, what: str) -> dict[str, str]:
    try:
        text = message.decode()
    except UnicodeDecodeError as err:
        raise ProtocolViolation(f"SCRAM {what} is not UTF-8") from err
    attrs: dict[str, str] = {}
    for part in text.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ProtocolViolation(f"SCRAM {what} has malformed attribute {part!r}")
        attrs.setdefault(part[0], part[2:])
    return attrs
