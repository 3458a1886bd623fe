"""A `hash` mask never hashes without a key: an unkeyed (or known-key) hash of a low-entropy
value (an SSN, a phone number) is reversed offline by hashing every candidate. Without a key the
rewrite refuses, naming the setting, and the proxy's defense-in-depth masking yields NULL."""

from __future__ import annotations

import hashlib
import hmac

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, mask, model

SPEC = {
    "default": "allow",
    "rules": [],
    "masks": [
        {"table": "shop.customers", "column": "ssn", "strategy": "hash"},
        {"table": "shop.customers", "column": "email", "strategy": "email"},
    ],
}
SSN = model.Mask(table=model.QualifiedName(schema="shop", name="customers"), column="ssn", strategy="hash")


def test_a_read_of_a_hash_masked_column_without_a_key_is_refused_naming_the_setting() -> None:
    d = engine.Engine(policy_compile.compile_policy(SPEC)).decide("SELECT ssn FROM shop.customers")
    assert d.verdict == "block", d
    assert "DBGOV_MASK_KEY" in d.reason and "shop.customers.ssn" in d.reason
    assert d.rewritten is None or "sha256" not in d.rewritten


def test_with_a_key_the_same_read_is_masked_and_the_key_is_not_guessable() -> None:
    d = engine.Engine(policy_compile.compile_policy(SPEC, mask_key="a-secret")).decide(
        "SELECT ssn FROM shop.customers"
    )
    assert d.verdict == "mask" and d.rewritten is not None and "sha256" in d.rewritten


def test_the_whole_table_is_refused_and_tables_without_a_hash_mask_need_no_key() -> None:
    spec = {
        **SPEC,
        "masks": [*SPEC["masks"], {"table": "shop.users", "column": "email", "strategy": "email"}],
    }
    decide = engine.Engine(policy_compile.compile_policy(spec)).decide
    # the rewrite masks every masked column of the table it reads, the hash one too
    d = decide("SELECT email FROM shop.customers")
    assert d.verdict == "block" and "DBGOV_MASK_KEY" in d.reason, d
    assert decide("SELECT email FROM shop.users").verdict == "mask"


def test_the_proxys_backstop_never_hashes_without_a_key() -> None:
    assert mask.mask_text(SSN, "123-45-6789", key="") is None
    keyed = mask.mask_text(SSN, "123-45-6789", key="k")
    assert keyed == hmac.new(b"k", b"123-45-6789", hashlib.sha256).hexdigest()[:11]
