"""Upstream TLS against a real PostgreSQL that admits TCP clients only over TLS.

The pgserver build the other tests use has no OpenSSL, so this module starts Debian's
PostgreSQL (``pg.debian_bin_dir``) once, with ``ssl=on``, a throwaway CA's server
certificate for 127.0.0.1 and localhost, and a pg_hba.conf whose only TCP line that admits
anyone is ``hostssl``. Every verdict is the server's or the TLS library's own: the proxy must
encrypt for real, verify for real, and pass PostgreSQL's refusals on.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

import pg
from conftest import RunningProxy
from dbgov_operator import certs
from dbgov_sidecar import policy_port
from dbgov_sidecar.pgwire import framing, messages

pytestmark = pytest.mark.integration

TLS_HBA = """\
local all postgres scram-sha-256
hostssl all certuser 127.0.0.1/32 cert
hostssl all all 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 reject
"""
SSL_QUERY = "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
LOCALHOST_ONLY_CERT = "localhost-only.crt"

MakeProxy = Callable[..., RunningProxy]


class Authority:
    """A throwaway certificate authority (the operator's own CA maker)."""

    def __init__(self) -> None:
        pair = certs.make_ca(now=datetime.datetime.now(datetime.UTC))
        self.cert = x509.load_pem_x509_certificate(pair.cert_pem)
        key = serialization.load_pem_private_key(pair.key_pem, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsPostgres:
    """The TLS-only server and the files a client needs to trust (or distrust) it."""

    server: pg.PgServer
    ca_pem: Path
    other_ca_pem: Path
    server_cert: bytes
    localhost_only_cert: bytes
    client_cert: Path
    """Certificate and key (one PEM file) of the role ``certuser``, from the server's CA."""
    stranger_cert: Path
    """The same name's certificate from another CA."""


def _server_certificate(
    ca: Authority, key: ec.EllipticCurvePrivateKey, names: list[x509.GeneralName]
) -> bytes:
    """A PEM server certificate for ``names``, signed by ``ca``."""
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dbgov test postgres")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _client_certificate(ca: Authority, user: str) -> bytes:
    """PEM certificate and key for ``user`` (PostgreSQL maps the CN to the role), signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _validity(x509.CertificateBuilder())
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, user)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


@pytest.fixture(scope="module")
def tls_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    """Debian's PostgreSQL with ssl=on and TLS-only TCP, stopped by PID after the module."""
    tmp = tmp_path_factory.mktemp("tls-postgres")
    ca, other_ca = Authority(), Authority()  # the same name, another key: a stranger
    key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _server_certificate(
        ca, key, [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    # Same key, but a name 127.0.0.1 is not: served only while a test wants a mismatch.
    localhost_only = _server_certificate(ca, key, [x509.DNSName("localhost")])
    (tmp / "ca.pem").write_bytes(ca.pem())
    (tmp / "other-ca.pem").write_bytes(other_ca.pem())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pg.running_server(
        max_connections=50,
        bin_dir=pg.debian_bin_dir(),
        # ssl_cert_file and ssl_key_file keep their defaults, server.crt and server.key in the
        # data directory: set on the command line, ALTER SYSTEM could not switch them.
        settings={"ssl": "on", "ssl_ca_file": "ca.crt"},
        hba=TLS_HBA,
        files={
            "server.crt": server_cert,
            "server.key": key_pem,
            "ca.crt": ca.pem(),
            LOCALHOST_ONLY_CERT: localhost_only,
        },
    ) as server:
        server.psql("CREATE ROLE certuser LOGIN;", dbname="postgres", via_socket=True)
        (tmp / "certuser.pem").write_bytes(_client_certificate(ca, "certuser"))
        (tmp / "stranger.pem").write_bytes(_client_certificate(other_ca, "certuser"))
        yield TlsPostgres(
            server=server,
            ca_pem=tmp / "ca.pem",
            other_ca_pem=tmp / "other-ca.pem",
            server_cert=server_cert,
            localhost_only_cert=localhost_only,
            client_cert=tmp / "certuser.pem",
            stranger_cert=tmp / "stranger.pem",
        )


def _proxy(make_proxy: MakeProxy, tls: TlsPostgres, **upstream: Any) -> RunningProxy:
    """A policy-free proxy in front of the TLS server, logging in as ``app``."""
    fields = {"host": tls.server.host, "port": tls.server.port, **upstream}
    return make_proxy(policy=policy_port.AllowAll(), upstream=fields)


def _hello(tls: TlsPostgres) -> tuple[bytes, list[str]]:
    """Start a login on the server directly over TLS, up to its authentication request.

    Returns the certificate it serves (PEM) and the SASL mechanisms it offers; checks only the
    chain, so it sees whichever certificate is being served.
    """
    ctx = ssl.create_default_context(cafile=str(tls.ca_pem))
    ctx.check_hostname = False
    with socket.create_connection((tls.server.host, tls.server.port), timeout=10) as raw:
        raw.sendall(messages.ssl_request())
        assert raw.recv(1) == b"S"
        with ctx.wrap_socket(raw) as conn:
            conn.sendall(messages.startup_message({"user": "app", "database": "shop"}))
            framer = framing.Framer(side="backend")
            while (msg := framer.next_message()) is None:
                framer.feed(conn.recv(65536))
            code, payload = messages.decode_authentication(msg.data)
            assert code == messages.AUTH_SASL, code
            der = conn.getpeercert(binary_form=True)
            assert der is not None
            return ssl.DER_cert_to_PEM_cert(der).encode(), messages.decode_sasl_mechanisms(payload)


def _encrypted(conn: psycopg.Connection[Any]) -> bool:
    """The server's own word on whether this session's connection is TLS 1.2 or later."""
    row = conn.execute(SSL_QUERY).fetchone()
    assert row is not None, "pg_stat_ssl has no row for this backend"
    tls_on, version = row
    return tls_on is True and version in ("TLSv1.2", "TLSv1.3")


def _same_cert(pem_a: bytes, pem_b: bytes) -> bool:
    return x509.load_pem_x509_certificate(pem_a) == x509.load_pem_x509_certificate(pem_b)


@contextlib.contextmanager
def _serving(tls: TlsPostgres, cert_file: str, expected: bytes) -> Iterator[None]:
    """Have the server present ``cert_file`` (reloaded on SIGHUP) until the block ends."""

    def switch(statement: str, want: bytes) -> None:
        tls.server.psql(f"{statement}; SELECT pg_reload_conf();", dbname="postgres", via_socket=True)
        deadline = time.monotonic() + 10
        while not _same_cert(_hello(tls)[0], want):
            assert time.monotonic() < deadline, "the server did not reload its certificate"
            time.sleep(0.05)

    switch(f"ALTER SYSTEM SET ssl_cert_file = '{cert_file}'", expected)
    try:
        yield
    finally:
        switch("ALTER SYSTEM RESET ssl_cert_file", tls.server_cert)


def test_the_server_offers_scram_plus_over_tls(tls_postgres: TlsPostgres) -> None:
    cert, mechanisms = _hello(tls_postgres)
    assert _same_cert(cert, tls_postgres.server_cert)
    # With TLS the server offers channel binding first; a client that picks plain SCRAM must
    # say it could not bind ("n" in the GS2 header), or the server suspects a downgrade.
    assert mechanisms == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_verify_full_reaches_postgres_encrypted(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres, host: str
) -> None:
    running = _proxy(
        make_proxy, tls_postgres, host=host, sslmode="verify-full", sslrootcert=str(tls_postgres.ca_pem)
    )
    with psycopg.connect(running.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
        assert _encrypted(conn)


def test_verify_full_refuses_a_server_from_another_ca(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres
) -> None:
    untrusting = _proxy(
        make_proxy, tls_postgres, sslmode="verify-full", sslrootcert=str(tls_postgres.other_ca_pem)
    )
    for _ in range(2):  # the refusal is per session: the proxy answers the second one the same
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(untrusting.dsn())
        assert "could not connect to the upstream" in str(refused.value)
        assert "certificate verify failed" in str(refused.value)
    trusting = _proxy(make_proxy, tls_postgres, sslmode="verify-full", sslrootcert=str(tls_postgres.ca_pem))
    with psycopg.connect(trusting.dsn()) as conn:
        assert _encrypted(conn)


def test_verify_full_refuses_a_certificate_for_another_name(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres
) -> None:
    running = _proxy(make_proxy, tls_postgres, sslmode="verify-full", sslrootcert=str(tls_postgres.ca_pem))
    with _serving(tls_postgres, LOCALHOST_ONLY_CERT, tls_postgres.localhost_only_cert):
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(running.dsn())
        assert "could not connect to the upstream" in str(refused.value)
        assert "IP address mismatch" in str(refused.value)
        # The same certificate is good for the name it was made for.
        by_name = _proxy(
            make_proxy,
            tls_postgres,
            host="localhost",
            sslmode="verify-full",
            sslrootcert=str(tls_postgres.ca_pem),
        )
        with psycopg.connect(by_name.dsn()) as conn:
            assert _encrypted(conn)
        # verify-ca checks the chain only: the name does not matter, the CA does.
        chain_only = _proxy(
            make_proxy, tls_postgres, sslmode="verify-ca", sslrootcert=str(tls_postgres.ca_pem)
        )
        with psycopg.connect(chain_only.dsn()) as conn:
            assert _encrypted(conn)
        stranger = _proxy(
            make_proxy, tls_postgres, sslmode="verify-ca", sslrootcert=str(tls_postgres.other_ca_pem)
        )
        with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
            psycopg.connect(stranger.dsn())
    with psycopg.connect(running.dsn()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_sslmode_disable_gets_the_servers_hba_refusal(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres
) -> None:
    running = _proxy(make_proxy, tls_postgres, sslmode="disable")
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects connection .*no encryption"):
        psycopg.connect(running.dsn())


def test_sslmode_require_encrypts_without_verifying(make_proxy: MakeProxy, tls_postgres: TlsPostgres) -> None:
    # No sslrootcert: nothing trusts the throwaway CA, so getting in proves no verification.
    running = _proxy(make_proxy, tls_postgres, sslmode="require")
    with psycopg.connect(running.dsn()) as conn:
        assert _encrypted(conn)


def test_sslmode_require_with_a_root_ca_verifies_like_libpq(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres
) -> None:
    """libpq: "if a root CA file exists, sslmode=require behaves as verify-ca"."""
    trusted = _proxy(make_proxy, tls_postgres, sslmode="require", sslrootcert=str(tls_postgres.ca_pem))
    with psycopg.connect(trusted.dsn()) as conn:
        assert _encrypted(conn)
    stranger = _proxy(make_proxy, tls_postgres, sslmode="require", sslrootcert=str(tls_postgres.other_ca_pem))
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(stranger.dsn())


@pytest.mark.parametrize("channel_binding", ["require", "disable"])
def test_scram_over_tls_with_and_without_channel_binding(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres, channel_binding: str
) -> None:
    # require: SCRAM-SHA-256-PLUS, so the server checks the proxy's tls-server-end-point hash
    # of its certificate. disable: plain SCRAM, whose GS2 header must be "n" (the client does
    # not bind); "y" would tell a server that offered PLUS that it was downgraded.
    running = _proxy(
        make_proxy,
        tls_postgres,
        sslmode="verify-full",
        sslrootcert=str(tls_postgres.ca_pem),
        channel_binding=channel_binding,
    )
    with psycopg.connect(running.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("app",)
        assert _encrypted(conn)


def test_a_client_certificate_logs_the_proxy_in_with_cert_authentication(
    make_proxy: MakeProxy, tls_postgres: TlsPostgres
) -> None:
    """pg_hba says `cert` for certuser: no password, the certificate's CN is the role."""
    base = {"sslmode": "verify-full", "sslrootcert": str(tls_postgres.ca_pem), "user": "certuser"}
    good = _proxy(make_proxy, tls_postgres, **base, password=None, sslcert=str(tls_postgres.client_cert))
    with psycopg.connect(good.dsn(user="certuser")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("certuser",)
        assert _encrypted(conn)
    for cert in (None, tls_postgres.stranger_cert):  # none at all, or one the server's CA did not sign
        refused = _proxy(make_proxy, tls_postgres, **base, password=None, sslcert=str(cert) if cert else None)
        # the server's "requires a valid client certificate", or a TLS alert: the stranger's CA
        # has the same name as the server's, so its signature is what fails ("decrypt error")
        with pytest.raises(
            psycopg.OperationalError, match=r"valid client certificate|unknown ca|decrypt error"
        ):
            psycopg.connect(refused.dsn(user="certuser"))
