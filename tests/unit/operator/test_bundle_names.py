"""Bundle names stay valid object names and label values whatever the ServiceAccount's name
(issue 12, F2: a 245-character name made the write fail, and the namespace's reconcile with it)."""

import re
from typing import Any

import pytest

from dbgov_operator import bundle, injection, settings

PREFIX = "dbgov-policy-"
GOOD: dict[str, Any] = {
    "subjects": {"serviceAccounts": ["orders"]},
    "databaseRef": {"name": "db"},
    "default": "block",
    "rules": [{"name": "read", "verdict": "allow", "statements": ["select"]}],
}
SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LONG = "a" * 240 + "-.x" + "b" * 2  # 245 characters


@pytest.mark.parametrize("name", ["orders", "a" * 240, LONG, "x" * 253, "a." * 120 + "abc", "a-" * 126 + "z"])
def test_bundle_names_are_valid_bounded_and_keep_the_prefix(name: str) -> None:
    found = bundle.bundle_name(PREFIX, name)
    assert len(found) <= bundle.NAME_MAX
    assert SUBDOMAIN.match(found), found
    assert found.startswith(PREFIX)
    label = bundle.service_account_label(name)
    assert len(label) <= bundle.LABEL_VALUE_MAX
    assert LABEL_VALUE.match(label), label


def test_a_name_that_fits_is_unchanged() -> None:
    assert bundle.bundle_name(PREFIX, "orders") == "dbgov-policy-orders"
    fits = "a" * (253 - len(PREFIX))
    assert bundle.bundle_name(PREFIX, fits) == PREFIX + fits
    assert bundle.service_account_label("a" * 63) == "a" * 63


def test_long_names_are_stable_and_distinct() -> None:
    one, two = "a" * 244 + "1", "a" * 244 + "2"  # the same up to the last character
    assert bundle.bundle_name(PREFIX, one) == bundle.bundle_name(PREFIX, one)
    assert bundle.bundle_name(PREFIX, one) != bundle.bundle_name(PREFIX, two)
    assert bundle.service_account_label(one) != bundle.service_account_label(two)


def test_plan_and_config_map_use_the_bounded_name_and_keep_the_full_one() -> None:
    spec = {**GOOD, "subjects": {"serviceAccounts": [LONG]}}
    plan = bundle.plan([bundle.Policy(name="p", spec=spec, valid=True)], [], prefix=PREFIX)
    (item,) = plan.bundles
    assert item.config_map == bundle.bundle_name(PREFIX, LONG)
    body = bundle.config_map(item, namespace="apps", owner={"name": LONG, "uid": "u"})
    meta = body["metadata"]
    assert meta["labels"]["dbgov.io/service-account"] == bundle.service_account_label(LONG)
    assert bundle.bundle_service_account(meta) == LONG
    short = bundle.config_map(
        bundle.plan([bundle.Policy(name="p", spec=GOOD, valid=True)], [], prefix=PREFIX).bundles[0],
        namespace="apps",
    )
    assert "dbgov.io/service-account" not in short["metadata"]["annotations"]  # unchanged for short names


def test_injection_mounts_the_bounded_name() -> None:
    pod: dict[str, Any] = {
        "metadata": {"name": "p", "labels": {"dbgov.io/inject": "true"}},
        "spec": {"serviceAccountName": LONG, "containers": [{"name": "app", "image": "app"}]},
    }
    result = injection.inject(pod, sidecar=settings.SidecarSettings(), endpoint=None)
    names = [v["configMap"]["name"] for v in result.pod["spec"]["volumes"] if "configMap" in v]
    assert names == [bundle.bundle_name(PREFIX, LONG)]
