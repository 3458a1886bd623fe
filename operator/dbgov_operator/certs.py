"""The webhook's TLS material: a private CA and a serving certificate it signs, made and renewed
with ``cryptography``.

kopf's own self-signed helper needs ``oscrypto``, which fails on OpenSSL >= 3.0.10, and it makes
a new self-signed certificate per process; a CA shared by all replicas keeps the webhook
configurations' ``caBundle`` stable while serving certificates come and go. Pure: the clock is
an argument, and nothing here touches files or the network.
"""

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_NAME = "dbgov-webhook-ca"
CA_VALIDITY = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyPair:
    """A PEM certificate and its PEM (PKCS#8, unencrypted) private key."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookCerts:
    """Everything the webhook server and its configurations need."""

    ca: KeyPair
    """The CA that signs serving certificates; its certificate is the ``caBundle``."""
    serving: KeyPair
    """The server's certificate (signed by :attr:`ca`) and key."""
    previous_ca_pem: bytes = b""
    """The CA this one replaced, kept in the bundle until it expires (so no request fails
    while configurations and servers switch over)."""

    @property
    def ca_bundle(self) -> bytes:
        """PEM bundle for ``clientConfig.caBundle``: the current CA, then the previous one."""
        return self.ca.cert_pem + self.previous_ca_pem


@dataclass(frozen=True, slots=True, kw_only=True)
class Lifetimes:
    """How long certificates live and when they are renewed."""

    serving: datetime.timedelta = datetime.timedelta(days=90)
    """Lifetime of a new serving certificate."""
    renew_before: datetime.timedelta = datetime.timedelta(days=30)
    """Renew a certificate (serving or CA) that expires within this period."""


def service_hostnames(*, service: str, namespace: str) -> tuple[str, ...]:
    """The DNS names the apiserver may use for a webhook ``service:`` reference."""
    return (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    )


def ensure(
    current: WebhookCerts | None,
    *,
    hostnames: Sequence[str],
    now: datetime.datetime,
    lifetimes: Lifetimes,
) -> WebhookCerts:
    """Return ``current`` if it is still good for ``hostnames``; otherwise renewed material.

    The CA is replaced only when it nears its own expiry; the serving certificate when it nears
    expiry, does not cover every hostname, or was not signed by the current CA."""
    if current is None:
        ca = make_ca(now=now)
        return WebhookCerts(ca=ca, serving=make_serving(ca=ca, hostnames=hostnames, now=now))
    ca, previous = current.ca, current.previous_ca_pem
    if _expires_within(ca.cert_pem, now=now, period=lifetimes.renew_before):
        ca, previous = make_ca(now=now), current.ca.cert_pem
    if previous and _expires_within(previous, now=now, period=datetime.timedelta(0)):
        previous = b""  # expired: nothing it signed can still be served
    serving = current.serving
    if needs_renewal(serving.cert_pem, ca=ca, hostnames=hostnames, now=now, lifetimes=lifetimes):
        serving = make_serving(ca=ca, hostnames=hostnames, now=now, validity=lifetimes.serving)
    renewed = WebhookCerts(ca=ca, serving=serving, previous_ca_pem=previous)
    return current if renewed == current else renewed


def needs_renewal(
    cert_pem: bytes,
    *,
    ca: KeyPair,
    hostnames: Sequence[str],
    now: datetime.datetime,
    lifetimes: Lifetimes,
) -> bool:
    """Whether a serving certificate must be replaced."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    if cert.issuer != ca_cert.subject:
        return True
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return True
    if _expires_within(cert_pem, now=now, period=lifetimes.renew_before):
        return True
    return not set(subject_alt_names(hostnames)) <= set(_cert_sans(cert))


def make_ca(*, now: datetime.datetime, validity: datetime.timedelta = CA_VALIDITY) -> KeyPair:
    """A new self-signed CA allowed to sign serving certificates only."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    cert = (
        _builder(subject=name, issuer=name, key=key, now=now, validity=validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pair(cert, key)


def make_serving(
    *,
    ca: KeyPair,
    hostnames: Sequence[str],
    now: datetime.datetime,
    validity: datetime.timedelta = datetime.timedelta(days=90),
) -> KeyPair:
    """A serving certificate for ``hostnames`` (DNS names and/or IP addresses), signed by
    ``ca``."""
    if not hostnames:
        raise ValueError("a serving certificate needs at least one hostname")
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the webhook CA key must be an EC key")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    cert = (
        _builder(subject=subject, issuer=ca_cert.subject, key=key, now=now, validity=validity)
        .add_extension(x509.SubjectAlternativeName(subject_alt_names(hostnames)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _pair(cert, key)


def not_after(cert_pem: bytes) -> datetime.datetime:
    """When a PEM certificate expires (UTC)."""
    return x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc


def _expires_within(cert_pem: bytes, *, now: datetime.datetime, period: datetime.timedelta) -> bool:
    if not cert_pem:
        return True
    return not_after(cert_pem) - now <= period


def _builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    now: datetime.datetime,
    validity: datetime.timedelta,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
    )


def subject_alt_names(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    """IP addresses as IP SANs, everything else as DNS names."""
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _cert_sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _pair(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> KeyPair:
    return KeyPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
