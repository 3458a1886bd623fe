"""Bundle signatures: the operator signs, the sidecar's pure verifier and its policy holder refuse
anything else (the real operator, apiserver and proxy are in tests/e2e/test_bundle_integrity.py)."""

import base64
import datetime
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from dbgov_operator import bundle, signing
from dbgov_sidecar import bundle_signature, policies, policy_port, policyfile

POLICY = "default: block\nrules:\n  - name: read\n    verdict: allow\n    statements: [select]\n"
LAX = "default: allow\nmode: dry-run\n"
FOR = bundle_signature.Expected(namespace="apps", service_account="orders", file="policy.yaml")
SIGNER = signing.generate()
KEYS = {SIGNER.key_id: SIGNER.public_raw}


def _sign(
    content: str = POLICY, *, signer: signing.Signer = SIGNER, generation: int = 100, **where: str
) -> str:
    target = {"namespace": "apps", "service_account": "orders", "file": "policy.yaml", **where}
    return signer.sign(content, generation=generation, **target)


def _verify(content: str, sig: str | None, *, loaded: int | None = None) -> bundle_signature.Envelope:
    return bundle_signature.verify(content.encode(), sig, keys=KEYS, expected=FOR, loaded_generation=loaded)


def _refused(content: str, sig: str | None, *, loaded: int | None = None) -> str:
    with pytest.raises(bundle_signature.BundleRejected) as caught:
        _verify(content, sig, loaded=loaded)
    return caught.value.code


def test_a_signed_file_verifies_with_its_generation() -> None:
    envelope = _verify(POLICY, _sign())
    assert (envelope.generation, envelope.namespace, envelope.service_account) == (100, "apps", "orders")
    assert _verify(POLICY, _sign(), loaded=100).generation == 100  # the same bundle read again


@pytest.mark.parametrize("index", [0, len(POLICY) // 2, len(POLICY) - 1])
def test_one_changed_byte_is_refused(index: int) -> None:
    raw = bytearray(POLICY.encode())
    raw[index] ^= 0x01
    assert _refused(raw.decode(), _sign()) == "bad_signature"


def test_the_lax_bundle_of_the_issue_is_refused() -> None:
    assert _refused(LAX, _sign()) == "bad_signature"


def test_another_namespaces_bundle_is_refused() -> None:
    assert _refused(POLICY, _sign(namespace="other")) == "wrong_namespace"


def test_another_service_accounts_bundle_is_refused() -> None:
    assert _refused(POLICY, _sign(service_account="admin")) == "wrong_service_account"


def test_another_files_signature_is_refused() -> None:
    assert _refused(POLICY, _sign(file="policy.other-db.yaml")) == "wrong_file"


def test_a_replayed_older_generation_is_refused() -> None:
    assert _refused(POLICY, _sign(generation=99), loaded=100) == "rollback"


def test_an_unsigned_file_is_refused() -> None:
    assert _refused(POLICY, None) == "unsigned"


def test_another_keys_signature_is_refused() -> None:
    assert _refused(POLICY, _sign(signer=signing.generate())) == "unknown_key"


def test_a_forged_envelope_claiming_our_key_id_is_refused() -> None:
    forged = _sign(signer=signing.generate())
    theirs = bundle_signature.parse(forged)
    envelope = bundle_signature.Envelope(
        key_id=SIGNER.key_id,
        namespace="apps",
        service_account="orders",
        file="policy.yaml",
        generation=theirs.generation,
        signature=theirs.signature,
    )
    assert _refused(POLICY, bundle_signature.encode(envelope)) == "bad_signature"


@pytest.mark.parametrize(
    "text", ["", "not json", "[]", '{"version": 1}', _sign().replace('"version":1', '"version":2')]
)
def test_a_malformed_signature_is_refused(text: str) -> None:
    assert _refused(POLICY, text) == "malformed"


def test_changed_generation_in_the_envelope_breaks_the_signature() -> None:
    sig = _sign(generation=100).replace('"generation":100', '"generation":999')
    assert _refused(POLICY, sig) == "bad_signature"


def test_public_key_reads_base64_and_pem() -> None:
    pem = SIGNER.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert bundle_signature.public_key(SIGNER.public_b64) == SIGNER.public_raw
    assert bundle_signature.public_key(pem.decode()) == SIGNER.public_raw
    with pytest.raises(ValueError, match="32 bytes"):
        bundle_signature.public_key(base64.b64encode(b"short").decode())


def test_the_secret_round_trips_and_an_unusable_one_is_not_replaced() -> None:
    data = signing.to_secret_data(SIGNER)
    assert signing.from_secret_data(data, where="ns/key").public_raw == SIGNER.public_raw
    with pytest.raises(signing.SigningKeyUnusable, match="delete Secret ns/key"):
        signing.from_secret_data({signing.PUBLIC_KEY: data[signing.PUBLIC_KEY]}, where="ns/key")


def test_config_map_signs_every_file_and_is_current_checks_the_signatures() -> None:
    item = bundle.Bundle(
        service_account="orders",
        config_map="dbgov-policy-orders",
        policies=("read",),
        files={"policy.yaml": POLICY, "policy.db.yaml": POLICY},
    )
    body = bundle.config_map(item, namespace="apps", signer=SIGNER, generation=7)
    data = body["data"]
    assert _verify(data["policy.yaml"], data["policy.yaml.sig"]).generation == 7
    assert bundle.is_current(dict(body), body, signer=SIGNER)
    assert bundle.signed_generation(dict(body), signer=SIGNER, namespace="apps") == 7
    resigned = bundle.config_map(item, namespace="apps", signer=SIGNER, generation=8)
    assert bundle.is_current(dict(body), resigned, signer=SIGNER)  # only the generation differs
    swapped: dict[str, Any] = {**body, "data": {**data, "policy.yaml.sig": data["policy.db.yaml.sig"]}}
    assert not bundle.is_current(swapped, resigned, signer=SIGNER)
    extra: dict[str, Any] = {**body, "data": {**data, "policy.evil.yaml": LAX}}
    assert not bundle.is_current(extra, resigned, signer=SIGNER)
    other = bundle.config_map(item, namespace="apps", signer=signing.generate(), generation=9)
    assert not bundle.is_current(dict(other), resigned, signer=SIGNER)


# --------------------------------------------------------------------------------------------
# the sidecar's policy holder
# --------------------------------------------------------------------------------------------

TRUST = policyfile.Trust(keys=KEYS, namespace="apps", service_account="orders")


def _write(directory: Path, content: str, sig: str | None, *, stamp: int) -> Path:
    path = directory / "policy.yaml"
    path.write_text(content)
    sig_path = directory / "policy.yaml.sig"
    if sig is None:
        sig_path.unlink(missing_ok=True)
    else:
        sig_path.write_text(sig)
        os.utime(sig_path, (stamp, stamp))
    os.utime(path, (stamp, stamp))
    return path


def _holder(path: Path, events: list[Mapping[str, Any]]) -> policies.PolicyHolder:
    holder = policies.PolicyHolder(str(path), trust=TRUST)
    holder.attach_audit(events.append)
    return holder


def _decides(holder: policies.PolicyHolder, sql: str) -> str:
    policy = holder.current
    return policy.decide(sql, policy.new_context()).verdict


def test_holder_loads_a_signed_bundle_and_keeps_it_when_a_tampered_one_arrives(tmp_path: Path) -> None:
    path = _write(tmp_path, POLICY, _sign(generation=100), stamp=1)
    events: list[Mapping[str, Any]] = []
    holder = _holder(path, events)
    assert holder.generation == 100 and _decides(holder, "DELETE FROM t") == "block"
    _write(tmp_path, LAX, _sign(generation=100), stamp=2)
    assert holder.changed()
    assert holder.reload()[0].startswith("bundle refused (bad_signature)")
    assert _decides(holder, "DELETE FROM t") == "block"  # the last good bundle stays in force
    assert holder.reload_failures == 1 and holder.rejected is not None
    assert [(e["type"], e["reason"], e["generation_in_force"]) for e in events] == [
        ("bundle_rejected", "bad_signature", 100)
    ]
    _write(tmp_path, POLICY, _sign(generation=50), stamp=3)
    assert holder.reload()[0].startswith("bundle refused (rollback)")
    _write(
        tmp_path,
        POLICY.replace("select", "insert"),
        _sign(POLICY.replace("select", "insert"), generation=101),
        stamp=4,
    )
    assert holder.reload() == []
    assert holder.generation == 101 and holder.rejected is None


def test_holder_without_a_good_bundle_refuses_everything_and_says_why(tmp_path: Path) -> None:
    path = _write(tmp_path, LAX, None, stamp=1)
    events: list[Mapping[str, Any]] = []
    holder = _holder(path, events)
    assert isinstance(holder.current, policy_port.RefuseAll)
    assert "unsigned" in holder.current.reason
    assert _decides(holder, "SELECT 1") == "block"
    # The event of the first load reaches the audit log attached after it.
    assert [(e["type"], e["reason"], e["generation_in_force"]) for e in events] == [
        ("bundle_rejected", "unsigned", None)
    ]


def test_holder_compiles_the_bytes_that_verified(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The file changes between the check and the compile: the checked text is what loads.
    path = _write(tmp_path, POLICY, _sign(generation=100), stamp=1)
    real = policyfile.read_verified

    def then_swapped(*args: Any, **kwargs: Any) -> policyfile.Verified:
        verified = real(*args, **kwargs)
        path.write_text(LAX)
        return verified

    monkeypatch.setattr(policyfile, "read_verified", then_swapped)
    holder = policies.PolicyHolder(str(path), trust=TRUST)
    assert _decides(holder, "DELETE FROM t") == "block"


def test_local_mode_without_a_key_loads_an_unsigned_file(tmp_path: Path) -> None:
    path = _write(tmp_path, POLICY, None, stamp=1)
    holder = policies.PolicyHolder(str(path))
    assert _decides(holder, "SELECT 1") == "allow"
    assert policyfile.trust(key=None, namespace=None, service_account=None) is None
    with pytest.raises(ValueError, match="DBGOV_POD_NAMESPACE"):
        policyfile.trust(key=SIGNER.public_b64, namespace=None, service_account="orders")


def test_generation_is_the_clock_and_never_goes_back() -> None:
    from dbgov_operator import reconcile

    now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    stamp = int(now.timestamp() * 1000)
    assert reconcile.signing_generation(None, now=now) == stamp
    assert reconcile.signing_generation(stamp + 50, now=now) == stamp + 51
