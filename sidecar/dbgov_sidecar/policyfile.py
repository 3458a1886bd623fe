"""Reading a policy file from disk: the I/O half of `dbgov_policy.compile.load_policy_text`,
and of `bundle_signature.verify` for bundles the operator signs.

In a cluster the file is a key of the pod's bundle ConfigMap, mounted with its ``.sig`` beside
it; the kubelet swaps both at once (a new ``..data`` directory), so a signature read before and
after the file that differs means the read straddled a swap, and it is read again.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from dataclasses import dataclass

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, model
from dbgov_sidecar import bundle_signature

_READ_ATTEMPTS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class Trust:
    """Whose bundles this sidecar loads: the operator's public key(s) and what it is."""

    keys: Mapping[str, bytes]
    """Trusted public keys by key id."""
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    """A bundle file that verified: its text (the bytes the signature covers) and generation."""

    text: str
    generation: int


def trust(*, key: str | None, namespace: str | None, service_account: str | None) -> Trust | None:
    """The trust of a sidecar given DBGOV_BUNDLE_KEY (None without a key: local mode, unsigned
    policy files); ValueError naming what is missing or wrong."""
    if not key:
        return None
    if not namespace or not service_account:
        raise ValueError(
            "DBGOV_BUNDLE_KEY is set but DBGOV_POD_NAMESPACE or DBGOV_SERVICE_ACCOUNT is not: a "
            "signed bundle can only be checked against the namespace and ServiceAccount it is for "
            "(the injected pod spec sets both)"
        )
    try:
        raw = bundle_signature.public_key(key)
    except ValueError as err:
        raise ValueError(f"DBGOV_BUNDLE_KEY is not a usable Ed25519 public key: {err}") from err
    return Trust(
        keys={bundle_signature.key_id(raw): raw}, namespace=namespace, service_account=service_account
    )


def signature_path(path: str | pathlib.Path) -> pathlib.Path:
    """Where a bundle file's signature is mounted."""
    p = pathlib.Path(path)
    return p.with_name(p.name + bundle_signature.SUFFIX)


def read_verified(path: str | pathlib.Path, *, trust: Trust, loaded_generation: int | None) -> Verified:
    """Read a bundle file and its signature and verify them; raise `BundleRejected` (also when
    either cannot be read) naming the reason."""
    p = pathlib.Path(path)
    expected = bundle_signature.Expected(
        namespace=trust.namespace, service_account=trust.service_account, file=p.name
    )
    for _ in range(_READ_ATTEMPTS):
        before = _read_signature(p)
        content = _read(p)
        if _read_signature(p) == before:
            break
    envelope = bundle_signature.verify(
        content, before, keys=trust.keys, expected=expected, loaded_generation=loaded_generation
    )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:  # signed by the operator, so never expected
        raise bundle_signature.BundleRejected("malformed", f"the bundle is not UTF-8: {err}") from err
    return Verified(text=text, generation=envelope.generation)


def _read(path: pathlib.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise bundle_signature.BundleRejected(
            "unreadable", f"cannot read the policy file {path}: {err.strerror or err}"
        ) from err


def _read_signature(path: pathlib.Path) -> str | None:
    try:
        return signature_path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise bundle_signature.BundleRejected(
            "malformed", f"cannot read the signature {signature_path(path)}: {err}"
        ) from err


def load_policy_file(
    path: str | pathlib.Path, *, mask_key: str = "", text: str | None = None
) -> model.CompiledPolicy:
    """Read and compile a policy file; raise `PolicyInvalid` naming every problem. ``text``:
    the file's content already read (and verified), compiled instead of reading it again."""
    p = pathlib.Path(path)
    if text is not None:
        return policy_compile.load_policy_text(text, source=str(p), mask_key=mask_key)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        problem = policy_compile.Problem(
            path="", message=f"cannot read the policy file: {err.strerror or err}"
        )
        raise policy_compile.PolicyInvalid([problem], source=str(p)) from err
    except UnicodeDecodeError as err:
        problem = policy_compile.Problem(path="", message=f"the policy file is not UTF-8: {err}")
        raise policy_compile.PolicyInvalid([problem], source=str(p)) from err
    return policy_compile.load_policy_text(text, source=str(p), mask_key=mask_key)


def load_file(
    path: str | pathlib.Path, *, mask_key: str = "", text: str | None = None
) -> model.CompiledPolicy | tuple[compose.Component, ...]:
    """Read and compile a policy file or an operator bundle (several named policies, composed
    by the caller); raise `PolicyInvalid` naming every problem. ``text``: the file's content
    already read (and verified), compiled instead of reading it again."""
    p = pathlib.Path(path)
    if text is None:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            problem = policy_compile.Problem(path="", message=f"cannot read the policy file: {err}")
            raise policy_compile.PolicyInvalid([problem], source=str(p)) from err
    return policy_compile.load_text(text, source=str(p), mask_key=mask_key)
