"""Webhook certificates: made by cryptography, verified by Python's ssl as a client would."""

import datetime
import ssl
import tempfile

import pytest
from cryptography import x509

from dbgov_operator import certs

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
HOSTS = ("127.0.0.1", *certs.service_hostnames(service="dbgov-webhook", namespace="dbgov"))
LIFE = certs.Lifetimes()


def _sans(pem: bytes) -> set[str]:
    cert = x509.load_pem_x509_certificate(pem)
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(name.value) for name in ext}


def test_new_material_covers_every_hostname_and_chains_to_the_ca() -> None:
    made = certs.ensure(None, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    assert _sans(made.serving.cert_pem) == set(HOSTS)
    assert made.ca_bundle == made.ca.cert_pem
    assert not certs.needs_renewal(
        made.serving.cert_pem, ca=made.ca, hostnames=HOSTS, now=NOW, lifetimes=LIFE
    )


def test_ssl_accepts_the_chain_for_each_name() -> None:
    made = certs.ensure(None, hostnames=HOSTS, now=datetime.datetime.now(datetime.UTC), lifetimes=LIFE)
    with tempfile.NamedTemporaryFile() as cert, tempfile.NamedTemporaryFile() as key:
        cert.write(made.serving.cert_pem)
        key.write(made.serving.key_pem)
        cert.flush()
        key.flush()
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert.name, key.name)  # the key matches the certificate
    client = ssl.create_default_context(cadata=made.ca_bundle.decode())
    stored = client.get_ca_certs()
    assert [dict(c["subject"][0])["commonName"] for c in stored] == [certs.CA_NAME]


def test_unchanged_material_is_returned_as_is() -> None:
    made = certs.ensure(None, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    later = NOW + datetime.timedelta(days=59)
    assert certs.ensure(made, hostnames=HOSTS, now=later, lifetimes=LIFE) is made


def test_serving_cert_is_renewed_close_to_expiry_with_the_same_ca() -> None:
    made = certs.ensure(None, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    later = NOW + datetime.timedelta(days=61)
    renewed = certs.ensure(made, hostnames=HOSTS, now=later, lifetimes=LIFE)
    assert renewed.ca == made.ca
    assert renewed.serving != made.serving
    assert certs.not_after(renewed.serving.cert_pem) > certs.not_after(made.serving.cert_pem)


def test_serving_cert_is_renewed_when_a_hostname_is_added() -> None:
    made = certs.ensure(None, hostnames=("127.0.0.1",), now=NOW, lifetimes=LIFE)
    renewed = certs.ensure(made, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    assert renewed.serving != made.serving
    assert _sans(renewed.serving.cert_pem) == set(HOSTS)


def test_serving_cert_from_another_ca_is_replaced() -> None:
    ours = certs.ensure(None, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    theirs = certs.ensure(None, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    mixed = certs.WebhookCerts(ca=ours.ca, serving=theirs.serving)
    assert certs.needs_renewal(theirs.serving.cert_pem, ca=ours.ca, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    fixed = certs.ensure(mixed, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    assert not certs.needs_renewal(
        fixed.serving.cert_pem, ca=ours.ca, hostnames=HOSTS, now=NOW, lifetimes=LIFE
    )


def test_ca_rotation_keeps_the_old_ca_in_the_bundle_until_it_expires() -> None:
    made = certs.ensure(None, hostnames=HOSTS, now=NOW, lifetimes=LIFE)
    near_ca_expiry = certs.not_after(made.ca.cert_pem) - datetime.timedelta(days=10)
    rotated = certs.ensure(made, hostnames=HOSTS, now=near_ca_expiry, lifetimes=LIFE)
    assert rotated.ca != made.ca
    assert rotated.ca_bundle == rotated.ca.cert_pem + made.ca.cert_pem
    assert not certs.needs_renewal(
        rotated.serving.cert_pem,
        ca=rotated.ca,
        hostnames=HOSTS,
        now=near_ca_expiry,
        lifetimes=LIFE,
    )
    after_old_expiry = certs.not_after(made.ca.cert_pem) + datetime.timedelta(days=1)
    later = certs.ensure(rotated, hostnames=HOSTS, now=after_old_expiry, lifetimes=LIFE)
    assert later.ca_bundle == rotated.ca.cert_pem


def test_a_serving_cert_needs_a_hostname() -> None:
    ca = certs.make_ca(now=NOW)
    with pytest.raises(ValueError, match="hostname"):
        certs.make_serving(ca=ca, hostnames=(), now=NOW)
