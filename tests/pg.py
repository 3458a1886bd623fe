"""The embedded PostgreSQL for tests (it lives in dbgov_sidecar.embedded_pg, which the demo uses too),
plus helpers only tests need.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dbgov_sidecar.embedded_pg import (
    APP_PASSWORD,
    BIN,
    DEMO_SCHEMA,
    HBA,
    MD5_PASSWORD,
    PGBENCH_POLICY,
    SUPERUSER_PASSWORD,
    SYSTEM_USER,
    PgServer,
    debian_bin_dir,
    free_port,
    init_pgbench,
    run_psql,
    running_server,
)

__all__ = [
    "APP_PASSWORD",
    "BIN",
    "DEMO_SCHEMA",
    "HBA",
    "MD5_PASSWORD",
    "PGBENCH_POLICY",
    "SUPERUSER_PASSWORD",
    "SYSTEM_USER",
    "PgServer",
    "debian_bin_dir",
    "free_port",
    "init_pgbench",
    "make_certificate",
    "run_psql",
    "running_server",
    "scratch_database",
]


def make_certificate(
    directory: Path, *, name: str = "localhost", key_type: str = "p256"
) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem). ``key_type``:
    p256 (ECDSA with SHA-256), p384 (ECDSA with SHA-384) or ed25519 (no hash)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import NameOID

    key: Any
    algorithm: Any
    if key_type == "ed25519":
        key, algorithm = ed25519.Ed25519PrivateKey.generate(), None
    elif key_type == "p384":
        key, algorithm = ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()
    else:
        key, algorithm = ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, algorithm)
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@contextlib.contextmanager
def scratch_database(server: PgServer, prefix: str, schema: str) -> Iterator[str]:
    """A database of its own, owned by ``app`` and set up with ``schema`` (run as ``app``),
    dropped afterwards (connections and all); yields its name."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    admin_dsn = server.dsn(user="postgres", dbname="postgres")
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" OWNER app')
    try:
        with psycopg.connect(server.dsn(user="app", dbname=name), autocommit=True) as conn:
            conn.execute(schema)
        yield name
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
