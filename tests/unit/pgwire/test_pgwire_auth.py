"""md5 and SCRAM-SHA-256 exchanges against published vectors and each other."""

from __future__ import annotations

import base64
import hashlib

import pytest

from dbgov_sidecar.pgwire import AuthenticationFailed, ProtocolViolation, auth


def test_md5_matches_postgresql_formula() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secretalice").hexdigest()
    expected = "md5" + hashlib.md5(inner.encode() + salt).hexdigest()
    assert auth.md5_password(user="alice", password="secret", salt=salt) == (expected.encode() + b"\0")


def test_scram_rfc7677_vector() -> None:
    client = auth.ScramClient(password="pencil", nonce="rOprNGfwEbeRWgbNEkqO", username="user")
    assert client.client_first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    final = client.client_final(server_first)
    assert final == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify_server_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(AuthenticationFailed, match="signature does not match"):
        client.verify_server_final(b"v=" + base64.b64encode(b"x" * 32))


def test_scram_client_server_pair() -> None:
    keys = auth.scram_keys("hunter2", salt=b"0123456789abcdef")
    assert keys.verifier().startswith("SCRAM-SHA-256$4096:")
    client = auth.ScramClient(password="hunter2", nonce="clientnonce")
    server = auth.ScramServer(keys=keys, nonce="servernonce")
    final = client.client_final(server.server_first(client.client_first()))
    client.verify_server_final(server.server_final(final))

    wrong = auth.ScramClient(password="hunter3", nonce="clientnonce")
    server = auth.ScramServer(keys=keys, nonce="servernonce")
    final = wrong.client_final(server.server_first(wrong.client_first()))
    with pytest.raises(AuthenticationFailed, match="password authentication failed"):
        server.server_final(final)


BINDING = hashlib.sha256(b"the proxy's certificate").digest()


def _exchange(client: auth.ScramClient, server: auth.ScramServer, mechanism: str | None = None) -> None:
    final = client.client_final(server.server_first(client.client_first(), mechanism or client.mechanism))
    client.verify_server_final(server.server_final(final))


def test_scram_plus_binds_to_the_servers_certificate() -> None:
    keys = auth.scram_keys("hunter2", salt=b"0123456789abcdef")
    _exchange(
        auth.ScramClient(password="hunter2", nonce="c", binding=BINDING),
        auth.ScramServer(keys=keys, nonce="s", binding=BINDING),
    )
    # A man in the middle terminates TLS with its own certificate: the client binds to that one.
    other = hashlib.sha256(b"another certificate").digest()
    with pytest.raises(ProtocolViolation, match="channel binding check failed"):
        _exchange(
            auth.ScramClient(password="hunter2", nonce="c", binding=other),
            auth.ScramServer(keys=keys, nonce="s", binding=BINDING),
        )
    # Plain SCRAM still works where -PLUS is offered, from a client that cannot bind (n,,).
    _exchange(
        auth.ScramClient(password="hunter2", nonce="c"),
        auth.ScramServer(keys=keys, nonce="s", binding=BINDING),
    )


@pytest.mark.parametrize(
    ("client", "mechanism", "server_binding", "error", "match"),
    [
        # It could bind, thinks the server cannot, and the server can: a downgrade.
        (
            auth.ScramClient(password="p", nonce="c", could_bind=True),
            None,
            BINDING,
            ProtocolViolation,
            "negotiation error",
        ),
        (
            auth.ScramClient(password="p", nonce="c", binding=BINDING),
            auth.SCRAM_SHA_256,
            BINDING,
            ProtocolViolation,
            "includes channel binding data",
        ),
        (
            auth.ScramClient(password="p", nonce="c"),
            auth.SCRAM_SHA_256_PLUS,
            BINDING,
            ProtocolViolation,
            "does not include",
        ),
        (
            auth.ScramClient(password="p", nonce="c", binding=BINDING),
            None,
            None,
            AuthenticationFailed,
            "unsupported SASL mechanism",
        ),
    ],
)
def test_scram_server_refuses_what_postgresql_refuses(
    client: auth.ScramClient,
    mechanism: str | None,
    server_binding: bytes | None,
    error: type[Exception],
    match: str,
) -> None:
    server = auth.ScramServer(
        keys=auth.scram_keys("p", salt=b"0123456789abcdef"), nonce="s", binding=server_binding
    )
    with pytest.raises(error, match=match):
        server.server_first(client.client_first(), mechanism or client.mechanism)


@pytest.mark.parametrize(
    ("first", "match"),
    [
        (b"p=tls-unique,,n=,r=c", "unsupported SCRAM channel-binding type"),
        (b"n,a=admin,n=,r=c", "authorization identity"),
        (b"x,,n=,r=c", "no channel-binding flag"),
        (b"n;,n=,r=c", "malformed"),
    ],
)
def test_scram_server_refuses_malformed_headers(first: bytes, match: str) -> None:
    server = auth.ScramServer(keys=auth.scram_keys("p", salt=b"0123456789abcdef"), nonce="s", binding=BINDING)
    mechanism = auth.SCRAM_SHA_256_PLUS if first.startswith(b"p") else auth.SCRAM_SHA_256
    with pytest.raises(ProtocolViolation, match=match):
        server.server_first(first, mechanism)


def test_scram_server_checks_the_binding_field_of_a_plain_exchange() -> None:
    """c= must repeat the client's own header even without binding data (RFC 5802)."""
    keys = auth.scram_keys("p", salt=b"0123456789abcdef")
    client = auth.ScramClient(password="p", nonce="c")
    server = auth.ScramServer(keys=keys, nonce="s")
    final = client.client_final(server.server_first(client.client_first()))
    assert final.startswith(b"c=biws,")
    with pytest.raises(ProtocolViolation, match="channel binding check failed"):
        server.server_final(b"c=eSws" + final[len(b"c=biws") :])


def test_scram_client_rejects_bad_server_messages() -> None:
    client = auth.ScramClient(password="p", nonce="abc")
    with pytest.raises(AuthenticationFailed, match="does not extend"):
        client.client_final(b"r=zzz,s=AAAA,i=4096")
    with pytest.raises(ProtocolViolation, match="lacks r, s or i"):
        client.client_final(b"r=abcd")
    with pytest.raises(ProtocolViolation, match="malformed attribute"):
        client.client_final(b"garbage")
    with pytest.raises(AuthenticationFailed, match="reported error"):
        client.verify_server_final(b"e=invalid-proof")


def test_saslprep_maps_spaces_and_keeps_invalid_input() -> None:
    assert auth.saslprep("a\u00a0b") == b"a b"
    assert auth.saslprep("I\u00adX") == b"IX"
    assert auth.saslprep("\u0007bell") == "\u0007bell".encode()
