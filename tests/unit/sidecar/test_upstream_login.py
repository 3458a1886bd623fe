"""The upstream login state machine: SCRAM channel binding choices (libpq's channel_binding)."""

from __future__ import annotations

import base64
import datetime
import subprocess
import sys
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric import ed25519 as ed25519_keys
from cryptography.x509.oid import NameOID

from dbgov_sidecar import login
from dbgov_sidecar.pgwire import AuthenticationFailed, auth, framing, messages


def _certificate(
    algorithm: hashes.HashAlgorithm | None, *, rsa_key: bool = False, pss: bool = False, ed25519: bool = False
) -> bytes:
    key: Any = (
        ed25519_keys.Ed25519PrivateKey.generate()
        if ed25519
        else rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if rsa_key or pss
        else ec.generate_private_key(ec.SECP256R1())
    )
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "db.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(
            key,
            algorithm,
            rsa_padding=padding.PSS(mgf=padding.MGF1(algorithm), salt_length=32)
            if pss and algorithm
            else None,
        )
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("signed_with", "hashed_with"),
    [
        (hashes.SHA256(), hashes.SHA256()),
        (hashes.SHA384(), hashes.SHA384()),
        (hashes.SHA512(), hashes.SHA512()),
    ],
)
def test_tls_server_end_point_hashes_the_certificate_with_its_signature_hash(
    signed_with: hashes.HashAlgorithm, hashed_with: hashes.HashAlgorithm
) -> None:
    der = _certificate(signed_with)
    digest = hashes.Hash(hashed_with)
    digest.update(der)
    assert auth.tls_server_end_point(der) == digest.finalize()


def test_tls_server_end_point_uses_sha256_for_sha1_signatures() -> None:
    # OpenSSL no longer signs with SHA-1: relabel an RSA/SHA-256 certificate as RSA/SHA-1 (same
    # length OID; the signature is never checked here, only the algorithm read).
    sha256_rsa, sha1_rsa = bytes.fromhex("2a864886f70d01010b"), bytes.fromhex("2a864886f70d010105")
    der = _certificate(hashes.SHA256(), rsa_key=True).replace(sha256_rsa, sha1_rsa)
    assert isinstance(x509.load_der_x509_certificate(der).signature_hash_algorithm, hashes.SHA1)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    assert auth.tls_server_end_point(der) == digest.finalize()


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])
def test_tls_server_end_point_reads_the_hash_of_an_rsa_pss_signature(algorithm: hashes.HashAlgorithm) -> None:
    der = _certificate(algorithm, pss=True)
    named = x509.load_der_x509_certificate(der).signature_hash_algorithm
    assert named is not None and named.name == algorithm.name
    digest = hashes.Hash(algorithm)
    digest.update(der)
    assert auth.tls_server_end_point(der) == digest.finalize()


def test_tls_server_end_point_refuses_what_it_cannot_bind_to() -> None:
    with pytest.raises(AuthenticationFailed, match="no hash"):
        auth.tls_server_end_point(_certificate(None, ed25519=True))
    der = _certificate(hashes.SHA256())
    for broken in (b"", b"\x30\x82", der[:40], b"\x04" + der[1:]):
        with pytest.raises(AuthenticationFailed, match="cannot read the server certificate"):
            auth.tls_server_end_point(broken)


def test_tls_server_end_point_needs_only_the_standard_library() -> None:
    """The sidecar image installs dbgov without ``cryptography``: channel binding to a TLS
    upstream must work there too."""
    der = _certificate(hashes.SHA384())
    code = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from dbgov_sidecar.pgwire import auth\n"
        f"print(auth.tls_server_end_point(bytes.fromhex('{der.hex()}')).hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    digest = hashes.Hash(hashes.SHA384())
    digest.update(der)
    assert out.strip() == digest.finalize().hex()


def _message(data: bytes) -> framing.Message:
    return framing.Message(data[0], data)


def _login(mode: str, *, tls: bool) -> login.UpstreamLogin:
    state = login.UpstreamLogin(user="app", password="pw", params={}, nonce="NONCE", channel_binding=mode)
    if tls:
        state.server_certificate = _certificate(hashes.SHA256())
    return state


def _sasl(*mechanisms: str) -> framing.Message:
    return _message(messages.authentication_sasl(list(mechanisms)))


def _first(reply: bytes) -> tuple[str, bytes]:
    return messages.decode_sasl_initial_response(reply)


def test_over_tls_the_plus_mechanism_binds_to_the_server_certificate() -> None:
    state = _login("prefer", tls=True)
    state.startup()
    mechanism, first = _first(state.on_message(_sasl(auth.SCRAM_SHA_256_PLUS, auth.SCRAM_SHA_256)))
    assert mechanism == auth.SCRAM_SHA_256_PLUS and first.startswith(b"p=tls-server-end-point,,")
    server_first = b"r=NONCEserver,s=" + base64.b64encode(b"salt") + b",i=4096"
    final = messages.decode_password(
        state.on_message(_message(messages.authentication(messages.AUTH_SASL_CONTINUE, server_first)))
    )
    assert state.server_certificate is not None
    channel = b"p=tls-server-end-point,," + auth.tls_server_end_point(state.server_certificate)
    assert final.startswith(b"c=" + base64.b64encode(channel) + b",r=NONCEserver,p=")


@pytest.mark.parametrize(("mode", "tls", "header"), [("prefer", True, b"y,,"), ("prefer", False, b"n,,")])
def test_without_plus_on_offer_the_header_says_whether_we_could_bind(
    mode: str, tls: bool, header: bytes
) -> None:
    state = _login(mode, tls=tls)
    mechanism, first = _first(state.on_message(_sasl(auth.SCRAM_SHA_256)))
    assert mechanism == auth.SCRAM_SHA_256 and first.startswith(header)


def test_disable_never_binds() -> None:
    state = _login("disable", tls=True)
    mechanism, first = _first(state.on_message(_sasl(auth.SCRAM_SHA_256_PLUS, auth.SCRAM_SHA_256)))
    assert mechanism == auth.SCRAM_SHA_256 and first.startswith(b"n,,")


def test_require_refuses_every_way_around_binding() -> None:
    with pytest.raises(AuthenticationFailed, match="not TLS"):
        _login("require", tls=False).startup()
    with pytest.raises(AuthenticationFailed, match="offers only SCRAM-SHA-256"):
        _login("require", tls=True).on_message(_sasl(auth.SCRAM_SHA_256))
    for code in (messages.AUTH_CLEARTEXT, messages.AUTH_OK):
        with pytest.raises(AuthenticationFailed, match="channel_binding=require"):
            _login("require", tls=True).on_message(_message(messages.authentication(code)))
    with pytest.raises(AuthenticationFailed, match="channel_binding=require"):
        _login("require", tls=True).on_message(_message(messages.authentication(messages.AUTH_MD5, b"salt")))


def test_an_unknown_channel_binding_setting_is_refused() -> None:
    with pytest.raises(ValueError, match="disable, prefer, require"):
        login.UpstreamLogin(user="app", password="pw", params={}, nonce="N", channel_binding="maybe")


def _minted() -> login.UpstreamLogin:
    return login.UpstreamLogin(
        user="dbgov_w_1", password="MINTED-SECRET", params={}, nonce="NONCE", scram_only=True
    )


def test_a_minted_login_never_sends_its_password_to_a_server_that_asks_for_it() -> None:
    """An app that points its sidecar at a listener of its own (a hostAlias, its own DNS, a
    Database host the pod resolves otherwise) and asks for a cleartext or MD5 password would
    read the minted password and log in directly; a minted role's verifier is SCRAM's."""
    for reply in (
        messages.authentication(messages.AUTH_CLEARTEXT),
        messages.authentication(messages.AUTH_MD5, b"salt"),
        messages.authentication(messages.AUTH_OK),  # trust: not the server whose verifier it is
    ):
        state = _minted()
        with pytest.raises(AuthenticationFailed, match="not the database the operator named"):
            state.on_message(_message(reply))
    # SCRAM still works, and a static (not minted) login still answers cleartext as libpq does
    mechanism, _ = _first(_minted().on_message(_sasl(auth.SCRAM_SHA_256)))
    assert mechanism == auth.SCRAM_SHA_256
    static = login.UpstreamLogin(user="app", password="pw", params={}, nonce="N")
    assert b"pw\0" in static.on_message(_message(messages.authentication(messages.AUTH_CLEARTEXT)))


def test_a_server_cannot_stall_the_sidecar_with_a_huge_iteration_count() -> None:
    state = _minted()
    state.on_message(_sasl(auth.SCRAM_SHA_256))
    server_first = b"r=NONCEserver,s=" + base64.b64encode(b"salt") + b",i=2000000000"
    with pytest.raises(Exception, match="above 1,000,000"):
        state.on_message(_message(messages.authentication(messages.AUTH_SASL_CONTINUE, server_first)))
