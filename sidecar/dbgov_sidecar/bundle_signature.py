"""Signed policy bundles: the envelope the operator writes and the check the sidecar makes.

A bundle ConfigMap lives in the workload's namespace, where namespace users can edit it. So the
operator signs each bundle file (Ed25519, its key in a Secret of its own namespace) and the
sidecar, which gets the public key from the injected pod spec, refuses any file that does not
verify. Next to every file ``policy.yaml`` the ConfigMap holds ``policy.yaml.sig``: one JSON line

    {"version":1,"algorithm":"ed25519","keyId":..,"namespace":..,"serviceAccount":..,
     "file":"policy.yaml","generation":..,"signature":"<base64>"}

The signature covers a domain tag, every field but ``signature`` (canonical JSON) and the file's
exact bytes, so a valid envelope cannot be moved to another namespace, ServiceAccount or file
name, and ``generation`` (milliseconds since the epoch when the operator wrote it, strictly
increasing per bundle) lets a sidecar refuse a replayed older, laxer bundle once it has loaded a
newer one. What a fresh sidecar cannot tell is whether a bundle that verifies is the newest one:
the operator repairs such a replay within seconds (it watches its ConfigMaps).

Pure: bytes and text in, a verdict out. The sidecar reads the files (``policyfile``); the
operator signs (``dbgov_operator.signing``). ``cryptography`` is imported only to verify, so
local mode (no key configured) does not need it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SUFFIX = ".sig"
"""The ConfigMap key (and mounted file) of a bundle file's signature: ``<file>.sig``."""
VERSION = 1
ALGORITHM = "ed25519"
DOMAIN = b"dbgov-policy-bundle-v1\n"
"""Prefix of every signed message: a signature over anything else never verifies a bundle."""
_FIELDS = ("version", "algorithm", "keyId", "namespace", "serviceAccount", "file", "generation")


class BundleRejected(Exception):
    """A bundle file the sidecar must not load; ``code`` is machine-readable, ``reason`` says
    what is wrong and what to do."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    """Whom a bundle file must be for: what this sidecar is (from its pod spec)."""

    namespace: str
    service_account: str
    file: str
    """The file name loaded (``policy.yaml``, ``policy.<database>.yaml``)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Envelope:
    """A parsed ``.sig`` file."""

    key_id: str
    namespace: str
    service_account: str
    file: str
    generation: int
    signature: bytes

    def header(self) -> dict[str, Any]:
        """Every signed field but the signature, as written."""
        return {
            "version": VERSION,
            "algorithm": ALGORITHM,
            "keyId": self.key_id,
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "file": self.file,
            "generation": self.generation,
        }


def key_id(public_key: bytes) -> str:
    """A short name of a public key (raw 32 bytes), written in envelopes and messages."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def message(header: Mapping[str, Any], content: bytes) -> bytes:
    """The bytes that are signed: domain tag, canonical header JSON, newline, file bytes."""
    canonical = json.dumps(dict(header), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return DOMAIN + canonical.encode() + b"\n" + content


def encode(envelope: Envelope) -> str:
    """The ``.sig`` file text."""
    body = {**envelope.header(), "signature": base64.b64encode(envelope.signature).decode()}
    return json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n"


def parse(text: str) -> Envelope:
    """Read a ``.sig`` file; :class:`BundleRejected` ("malformed") if it is not one."""
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise BundleRejected("malformed", f"the signature file is not JSON ({err})") from err
    if not isinstance(raw, dict):
        raise BundleRejected("malformed", "the signature file is not a JSON object")
    missing = [name for name in (*_FIELDS, "signature") if name not in raw]
    if missing:
        raise BundleRejected("malformed", f"the signature file lacks {', '.join(missing)}")
    if raw["version"] != VERSION or raw["algorithm"] != ALGORITHM:
        raise BundleRejected(
            "malformed",
            f"signature version {raw['version']!r} / algorithm {raw['algorithm']!r} is not "
            f"{VERSION} / {ALGORITHM}; the operator and the sidecar image are of different releases",
        )
    strings = ("keyId", "namespace", "serviceAccount", "file", "signature")
    if not all(isinstance(raw[name], str) for name in strings) or type(raw["generation"]) is not int:
        raise BundleRejected("malformed", "the signature file has fields of the wrong type")
    try:
        signature = base64.b64decode(raw["signature"], validate=True)
    except (binascii.Error, ValueError) as err:
        raise BundleRejected("malformed", "the signature is not base64") from err
    return Envelope(
        key_id=raw["keyId"],
        namespace=raw["namespace"],
        service_account=raw["serviceAccount"],
        file=raw["file"],
        generation=raw["generation"],
        signature=signature,
    )


def public_key(text: str) -> bytes:
    """A raw Ed25519 public key from base64 (32 bytes) or a PEM ``PUBLIC KEY``; ValueError
    naming the problem otherwise."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        lines = [ln for ln in text.splitlines() if ln and not ln.startswith("-----")]
        der = base64.b64decode("".join(lines))
        # SubjectPublicKeyInfo of Ed25519 is a fixed 12-byte prefix and the 32-byte key.
        if len(der) != 44 or der[:12] != bytes.fromhex("302a300506032b6570032100"):
            raise ValueError("the PEM public key is not an Ed25519 key")
        return der[12:]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("the bundle key is neither base64 nor PEM") from err
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return raw


def verify(
    content: bytes,
    signature_text: str | None,
    *,
    keys: Mapping[str, bytes],
    expected: Expected,
    loaded_generation: int | None = None,
) -> Envelope:
    """Check one bundle file against its ``.sig`` text; return the envelope or raise
    :class:`BundleRejected`. ``keys``: trusted public keys by :func:`key_id`;
    ``loaded_generation``: the generation in force (an older one is a rollback)."""
    if signature_text is None:
        raise BundleRejected(
            "unsigned",
            f"{expected.file} has no signature ({expected.file}{SUFFIX}); the bundle was not "
            "written by the dbgov operator, which rewrites it within seconds",
        )
    envelope = parse(signature_text)
    key = keys.get(envelope.key_id)
    if key is None:
        raise BundleRejected(
            "unknown_key",
            f"signed with key {envelope.key_id}, not with the operator key this pod trusts "
            f"({', '.join(sorted(keys)) or 'none'}); if the operator's signing key was replaced, "
            "restart the pod so injection gives it the new public key",
        )
    if not _valid(key, envelope.signature, message(envelope.header(), content)):
        raise BundleRejected(
            "bad_signature",
            f"the signature does not match {expected.file}: its content was changed after the "
            "operator signed it",
        )
    for code, field, got, want in (
        ("wrong_namespace", "namespace", envelope.namespace, expected.namespace),
        ("wrong_service_account", "ServiceAccount", envelope.service_account, expected.service_account),
        ("wrong_file", "file", envelope.file, expected.file),
    ):
        if got != want:
            raise BundleRejected(code, f"the bundle was signed for {field} {got!r}, this pod's is {want!r}")
    if loaded_generation is not None and envelope.generation < loaded_generation:
        raise BundleRejected(
            "rollback",
            f"generation {envelope.generation} is older than the one in force ({loaded_generation}): "
            "an old bundle was put back",
        )
    return envelope


def _valid(key: bytes, signature: bytes, signed: bytes) -> bool:
    try:
        from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 -- only to verify
        from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: PLC0415
    except ImportError as err:
        raise BundleRejected(
            "no_verifier",
            "a bundle key is configured but the cryptography package is missing: install "
            "dbgov with the jwt extra (the sidecar image has it)",
        ) from err
    try:
        ed25519.Ed25519PublicKey.from_public_bytes(key).verify(signature, signed)
    except (InvalidSignature, ValueError):
        return False
    return True
