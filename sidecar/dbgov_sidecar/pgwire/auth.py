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
    its hash with the certificate's own signature hash, SHA-256 in place of MD5 and SHA-1
    (RFC 5929 section 4.1). Read with the standard library alone: the sidecar image has no
    ``cryptography``."""
    try:
        algorithm = signature_hash(certificate)
    except ValueError as err:
        raise AuthenticationFailed(f"cannot read the server certificate for channel binding: {err}") from err
    if algorithm is None:
        raise AuthenticationFailed(
            "the server certificate's signature algorithm has no hash, so SCRAM channel binding "
            "(tls-server-end-point) is impossible with it"
        )
    return hashlib.new(algorithm, certificate).digest()


# Signature algorithms -> the hash tls-server-end-point uses (MD5 and SHA-1 become SHA-256).
_SIGNATURE_HASHES = {
    "1.2.840.113549.1.1.4": "sha256",  # md5WithRSAEncryption
    "1.2.840.113549.1.1.5": "sha256",  # sha1WithRSAEncryption
    "1.2.840.113549.1.1.14": "sha224",  # sha224WithRSAEncryption
    "1.2.840.113549.1.1.11": "sha256",  # sha256WithRSAEncryption
    "1.2.840.113549.1.1.12": "sha384",  # sha384WithRSAEncryption
    "1.2.840.113549.1.1.13": "sha512",  # sha512WithRSAEncryption
    "1.2.840.10045.4.1": "sha256",  # ecdsa-with-SHA1
    "1.2.840.10045.4.3.1": "sha224",  # ecdsa-with-SHA224
    "1.2.840.10045.4.3.2": "sha256",  # ecdsa-with-SHA256
    "1.2.840.10045.4.3.3": "sha384",  # ecdsa-with-SHA384
    "1.2.840.10045.4.3.4": "sha512",  # ecdsa-with-SHA512
    "1.2.840.10040.4.3": "sha256",  # dsa-with-sha1
    "2.16.840.1.101.3.4.3.1": "sha224",  # dsa-with-sha224
    "2.16.840.1.101.3.4.3.2": "sha256",  # dsa-with-sha256
    "2.16.840.1.101.3.4.3.9": "sha3_224",  # ecdsa-with-sha3-224
    "2.16.840.1.101.3.4.3.10": "sha3_256",
    "2.16.840.1.101.3.4.3.11": "sha3_384",
    "2.16.840.1.101.3.4.3.12": "sha3_512",
    "2.16.840.1.101.3.4.3.13": "sha3_224",  # rsassa-pkcs1-v1_5-with-sha3-224
    "2.16.840.1.101.3.4.3.14": "sha3_256",
    "2.16.840.1.101.3.4.3.15": "sha3_384",
    "2.16.840.1.101.3.4.3.16": "sha3_512",
}
_RSASSA_PSS = "1.2.840.113549.1.1.10"
_DIGESTS = {  # RSASSA-PSS names its hash in its parameters (SHA-1 when it names none)
    "1.3.14.3.2.26": "sha256",  # sha1
    "2.16.840.1.101.3.4.2.4": "sha224",
    "2.16.840.1.101.3.4.2.1": "sha256",
    "2.16.840.1.101.3.4.2.2": "sha384",
    "2.16.840.1.101.3.4.2.3": "sha512",
    "2.16.840.1.101.3.4.2.7": "sha3_224",
    "2.16.840.1.101.3.4.2.8": "sha3_256",
    "2.16.840.1.101.3.4.2.9": "sha3_384",
    "2.16.840.1.101.3.4.2.10": "sha3_512",
}


def signature_hash(certificate: bytes) -> str | None:
    """The hashlib name of the hash tls-server-end-point uses for ``certificate`` (DER), or None
    when its signature algorithm has none (Ed25519, Ed448) or is unknown. ValueError: not a
    certificate."""
    _, body, _ = _der(certificate, 0, 0x30)  # Certificate
    _, _, tbs_end = _der(certificate, body, 0x30)  # tbsCertificate
    _, algorithm, algorithm_end = _der(certificate, tbs_end, 0x30)  # signatureAlgorithm
    _, oid_start, oid_end = _der(certificate, algorithm, 0x06)
    oid = _oid(certificate[oid_start:oid_end])
    if oid != _RSASSA_PSS:
        return _SIGNATURE_HASHES.get(oid)
    if oid_end == algorithm_end:
        return _DIGESTS["1.3.14.3.2.26"]
    _, params, params_end = _der(certificate, oid_end, 0x30)  # RSASSA-PSS-params
    if params == params_end or certificate[params] != 0xA0:  # no [0] hashAlgorithm: SHA-1
        return _DIGESTS["1.3.14.3.2.26"]
    _, explicit, _ = _der(certificate, params, 0xA0)
    _, digest, _ = _der(certificate, explicit, 0x30)
    _, digest_oid, digest_oid_end = _der(certificate, digest, 0x06)
    return _DIGESTS.get(_oid(certificate[digest_oid:digest_oid_end]))


def _der(data: bytes, pos: int, tag: int) -> tuple[int, int, int]:
    """The DER element at ``pos``, which must have ``tag``: (tag, start, end) of its contents."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError(f"expected DER tag {tag:#04x} at offset {pos}")
    length = data[pos + 1]
    pos += 2
    if length & 0x80:
        size = length & 0x7F
        if not 1 <= size <= 4 or pos + size > len(data):
            raise ValueError("malformed DER length")
        length = int.from_bytes(data[pos : pos + size], "big")
        pos += size
    if pos + length > len(data):
        raise ValueError("truncated DER element")
    return tag, pos, pos + length


def _oid(body: bytes) -> str:
    if not body or body[-1] & 0x80:
        raise ValueError("malformed DER object identifier")
    first = min(body[0] // 40, 2)
    parts = [first, body[0] - 40 * first]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))


MAX_SCRAM_ITERATIONS = 1_000_000
"""Iterations a server may ask of a SCRAM client (PostgreSQL's default is 4096; OWASP asks
600,000 of PBKDF2-SHA256): above, the login is refused rather than the event loop stalled."""


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
        if iterations > MAX_SCRAM_ITERATIONS:
            # The derivation runs on the proxy's event loop: a server (or an impostor) asking for
            # two billion rounds would stall every session of the sidecar.
            raise ProtocolViolation(
                f"SCRAM iteration count {iterations} is above {MAX_SCRAM_ITERATIONS:,}: refusing to "
                "spend that long (PostgreSQL's default is 4096; lower scram_iterations for this role)"
            )
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
    """Server side of SCRAM-SHA-256 and SCRAM-SHA-256-PLUS, for proxies asking their clients for
    a password.

    ``binding`` is the channel-binding data (``tls_server_end_point`` of the proxy's own
    certificate) when the client connection is TLS and -PLUS was offered; the checks on the
    client's choice are PostgreSQL's (a client that could bind but thinks the server cannot is a
    downgrade and is refused)."""

    def __init__(self, *, keys: ScramKeys, nonce: str, binding: bytes | None = None) -> None:
        self._keys = keys
        self._nonce = nonce
        self._binding = binding
        self._gs2_header = b""
        self._bound = False
        self._client_first_bare = b""
        self._server_first = b""
        self._full_nonce = ""

    def server_first(self, client_first: bytes, mechanism: str = SCRAM_SHA_256) -> bytes:
        """Answer the client-first-message of the exchange ``mechanism`` the client selected."""
        plus = mechanism == SCRAM_SHA_256_PLUS
        if plus and self._binding is None:
            raise AuthenticationFailed(f"unsupported SASL mechanism {mechanism!r}")
        flag = client_first[:1]
        if flag == b"p":
            name, comma, _ = client_first[2:].partition(b",")
            if client_first[1:2] != b"=" or not comma:
                raise ProtocolViolation("malformed SCRAM client-first-message")
            if not plus:
                raise ProtocolViolation(
                    "the client selected SCRAM-SHA-256 without channel binding, but the SCRAM "
                    "message includes channel binding data"
                )
            if name != b"tls-server-end-point":
                raise ProtocolViolation(
                    f"unsupported SCRAM channel-binding type {name.decode(errors='replace')!r}"
                )
            at = 2 + len(name) + 1
        elif flag in (b"y", b"n"):
            if plus:
                raise ProtocolViolation(
                    "the client selected SCRAM-SHA-256-PLUS, but the SCRAM message does not include "
                    "channel binding data"
                )
            if flag == b"y" and self._binding is not None:
                raise ProtocolViolation(
                    "SCRAM channel binding negotiation error: the client supports SCRAM channel "
                    "binding but thinks the server does not; this server does support it"
                )
            if client_first[1:2] != b",":
                raise ProtocolViolation("malformed SCRAM client-first-message")
            at = 2
        else:
            raise ProtocolViolation("malformed SCRAM client-first-message: no channel-binding flag")
        if client_first[at : at + 2] == b"a=":
            raise ProtocolViolation("client uses authorization identity, but it is not supported")
        if client_first[at : at + 1] != b",":
            raise ProtocolViolation("malformed SCRAM client-first-message")
        self._gs2_header = client_first[: at + 1]
        self._bound = flag == b"p"
        self._client_first_bare = client_first[at + 1 :]
        attrs = _attributes(self._client_first_bare, "client-first-message")
        client_nonce = attrs.get("r")
        if not client_nonce:
            raise ProtocolViolation("SCRAM client-first-message has no nonce")
        self._full_nonce = client_nonce + self._nonce
        salt = base64.b64encode(self._keys.salt).decode()
        self._server_first = f"r={self._full_nonce},s={salt},i={self._keys.iterations}".encode()
        return self._server_first

    def server_final(self, client_final: bytes) -> bytes:
        """Check the channel binding and the client proof; return the server-final-message."""
        attrs = _attributes(client_final, "client-final-message")
        expected = self._gs2_header
        if self._bound and self._binding is not None:
            expected += self._binding
        if attrs.get("c") != base64.b64encode(expected).decode():
            raise ProtocolViolation("SCRAM channel binding check failed")
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
