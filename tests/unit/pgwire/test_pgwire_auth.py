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
