"""The operator's bundle signing key, and signing bundle files with it.

Bundles are ConfigMaps in the workload's namespace, which namespace users can edit; the sidecar
trusts a bundle file only if it verifies against the operator's Ed25519 public key (envelope and
check: ``dbgov_sidecar.bundle_signature``). The key pair lives in one Secret in the operator's
namespace, shared by every replica: the first replica to start creates it, a replica that loses
the create race reads the winner's, and an existing Secret is never overwritten (a replaced key
would make every running sidecar refuse its next bundle). A Secret that exists but holds no
usable key stops the operator with a message saying what to do, rather than being replaced.
"""

import base64
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from kubernetes.client.exceptions import ApiException

from dbgov_sidecar import bundle_signature

logger = logging.getLogger(__name__)

PRIVATE_KEY = "ed25519.key"
"""Secret key: the PKCS#8 PEM private key."""
PUBLIC_KEY = "ed25519.pub"
"""Secret key: the raw public key, base64 (what the sidecar gets as DBGOV_BUNDLE_KEY)."""


class SigningKeyUnusable(Exception):
    """The signing Secret exists but holds no usable key; it is not overwritten."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Signer:
    """The operator's bundle signing key."""

    private_key: ed25519.Ed25519PrivateKey = field(repr=False)

    @property
    def public_raw(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def public_b64(self) -> str:
        """The public key as the sidecar's DBGOV_BUNDLE_KEY (base64 of the raw key)."""
        return base64.b64encode(self.public_raw).decode()

    @property
    def key_id(self) -> str:
        """The envelope's ``keyId`` for this key."""
        return bundle_signature.key_id(self.public_raw)

    def sign(self, content: str, *, namespace: str, service_account: str, file: str, generation: int) -> str:
        """The ``.sig`` file text for bundle file ``file`` holding ``content`` (its UTF-8 bytes,
        exactly as the ConfigMap stores and the kubelet mounts them)."""
        unsigned = bundle_signature.Envelope(
            key_id=self.key_id,
            namespace=namespace,
            service_account=service_account,
            file=file,
            generation=generation,
            signature=b"",
        )
        signed = bundle_signature.message(unsigned.header(), content.encode())
        envelope = bundle_signature.Envelope(
            key_id=self.key_id,
            namespace=namespace,
            service_account=service_account,
            file=file,
            generation=generation,
            signature=self.private_key.sign(signed),
        )
        return bundle_signature.encode(envelope)

    def verifies(
        self, content: str, signature_text: str | None, *, namespace: str, service_account: str, file: str
    ) -> int | None:
        """The generation of a valid signature of ours over ``content`` for this bundle file,
        or None (missing, tampered, another key, another namespace/ServiceAccount/file)."""
        expected = bundle_signature.Expected(namespace=namespace, service_account=service_account, file=file)
        try:
            envelope = bundle_signature.verify(
                content.encode(),
                signature_text,
                keys={self.key_id: self.public_raw},
                expected=expected,
            )
        except bundle_signature.BundleRejected:
            return None
        return envelope.generation


def generate() -> Signer:
    """A new key pair."""
    return Signer(private_key=ed25519.Ed25519PrivateKey.generate())


def to_secret_data(signer: Signer) -> dict[str, str]:
    """The Secret's ``data`` (base64 values, as the API wants them)."""
    pem = signer.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    values = {PRIVATE_KEY: pem, PUBLIC_KEY: signer.public_b64.encode()}
    return {key: base64.b64encode(value).decode() for key, value in values.items()}


def from_secret_data(data: Mapping[str, str], *, where: str) -> Signer:
    """The signer in a Secret's ``data``; :class:`SigningKeyUnusable` naming ``where`` if none."""
    advice = (
        f"delete Secret {where} to have the operator generate a new key pair (running sidecars "
        "then refuse new bundles until their pods are restarted), or restore the key it held"
    )
    raw = data.get(PRIVATE_KEY)
    if not raw:
        raise SigningKeyUnusable(f"Secret {where} has no {PRIVATE_KEY}; {advice}")
    try:
        key = serialization.load_pem_private_key(base64.b64decode(raw), password=None)
    except (ValueError, TypeError) as err:
        raise SigningKeyUnusable(
            f"Secret {where}: {PRIVATE_KEY} is not a PEM private key ({err}); {advice}"
        ) from err
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningKeyUnusable(f"Secret {where}: {PRIVATE_KEY} is not an Ed25519 key; {advice}")
    return Signer(private_key=key)


def ensure(client: Any, *, name: str, namespace: str) -> Signer:
    """The signing key in Secret ``namespace/name``, created on first start; never overwritten."""
    core: Any = kubernetes.client.CoreV1Api(client)
    where = f"{namespace}/{name}"
    for _ in range(3):
        try:
            secret = core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status != 404:
                raise
        else:
            return from_secret_data(secret.data or {}, where=where)
        signer = generate()
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "dbgov"},
            },
            "data": to_secret_data(signer),
        }
        try:
            core.create_namespaced_secret(namespace, body)
        except ApiException as err:
            if err.status != 409:
                raise
            logger.info("Another replica created the bundle signing key first; reading it")
            continue
        logger.info("Bundle signing key generated into Secret %s (key id %s)", where, signer.key_id)
        return signer
    raise RuntimeError(f"could not read or create the bundle signing key in Secret {where}")
