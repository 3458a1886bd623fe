"""Enrollment is the platform's: an enforced namespace injects every pod, the pod's own label
cannot opt out, and pod annotations may only narrow (image pinned, database bound, resources
within the chart's). The e2e tests prove the same through a real apiserver
(tests/e2e/test_enrollment.py); these pin the decisions themselves."""

import decimal
from typing import Any

import pytest

from dbgov_operator import annotations, injection, settings

CONFIG = settings.Settings(namespace="dbgov-system")


def _pod(labels: dict[str, str] | None = None, **pod_annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "app", "labels": labels or {}, "annotations": pod_annotations},
        "spec": {
            "serviceAccountName": "orders",
            "containers": [
                {"name": "app", "image": "example/app:1", "env": [{"name": "PGHOST", "value": "db"}]}
            ],
        },
    }


@pytest.mark.parametrize("labels", [{}, {annotations.INJECT: "false"}, {"app": "x"}])
def test_enforced_namespace_injects_pods_that_opt_out(labels: dict[str, str]) -> None:
    pod = _pod(labels)
    assert not injection.decide(pod, namespace="apps", config=CONFIG).inject
    decision = injection.decide(pod, namespace="apps", config=CONFIG, enforce=True)
    assert decision == injection.Decision(inject=True, reason="namespace enforces dbgov")
    result = injection.inject(pod, sidecar=CONFIG.sidecar, enforce=True)
    assert result.pod["metadata"]["labels"][annotations.INJECT] == "true"
    assert result.pod["spec"]["initContainers"][0]["name"] == injection.SIDECAR_NAME
    ignored = [w for w in result.warnings if "ignored" in w]
    assert bool(ignored) == (annotations.INJECT in labels)


def test_enforcement_never_reaches_system_namespaces() -> None:
    decision = injection.decide(_pod(), namespace="kube-system", config=CONFIG, enforce=True)
    assert not decision.inject


def test_enforced_pod_without_a_database_is_refused() -> None:
    pod = _pod()
    pod["spec"]["containers"][0]["env"] = []
    # Opted in outside enforcement: admitted with a warning, as before.
    assert injection.inject(pod, sidecar=CONFIG.sidecar).warnings
    with pytest.raises(injection.InjectionRefused, match="names no database"):
        injection.inject(pod, sidecar=CONFIG.sidecar, enforce=True)


@pytest.mark.parametrize("enforce", [False, True])
def test_image_annotation_is_refused_unless_allowed(enforce: bool) -> None:
    pod = _pod({annotations.INJECT: "true"}, **{annotations.SIDECAR_IMAGE: "busybox:1.36"})
    with pytest.raises(injection.InjectionRefused, match="pinned by the platform") as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar, enforce=enforce)
    assert caught.value.annotation == annotations.SIDECAR_IMAGE
    allowing = settings.SidecarSettings(allow_image_override=True)
    sidecar = injection.inject(pod, sidecar=allowing).pod["spec"]["initContainers"][0]
    assert sidecar["image"] == "busybox:1.36"


def test_image_annotation_naming_the_pinned_image_is_accepted() -> None:
    pod = _pod({annotations.INJECT: "true"}, **{annotations.SIDECAR_IMAGE: CONFIG.sidecar.image})
    assert (
        injection.inject(pod, sidecar=CONFIG.sidecar).pod["spec"]["initContainers"][0]["image"]
        == CONFIG.sidecar.image
    )


def test_database_annotation_must_be_bound() -> None:
    pod = _pod({annotations.INJECT: "true"}, **{annotations.DATABASE: "billing"})
    with pytest.raises(injection.InjectionRefused, match=r"'billing'.*they name: orders") as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar, bound_databases={"orders"})
    assert caught.value.annotation == annotations.DATABASE
    with pytest.raises(injection.InjectionRefused, match="they name: none"):
        injection.inject(pod, sidecar=CONFIG.sidecar, bound_databases=set())
    injected = injection.inject(pod, sidecar=CONFIG.sidecar, bound_databases={"orders", "billing"}).pod
    env = {e["name"]: e.get("value") for e in injected["spec"]["initContainers"][0]["env"]}
    assert env["DBGOV_DATABASE"] == "billing"


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("64Mi", 64 * 2**20),
        ("100m", decimal.Decimal("0.1")),
        ("2", 2),
        ("1.5Gi", 3 * 2**29),
        ("1k", 1000),
        (3, 3),
    ],
)
def test_quantity(raw: str | int, value: decimal.Decimal | int) -> None:
    assert injection.quantity(raw) == value


@pytest.mark.parametrize("raw", ["", "lots", "-1Mi", "NaN"])
def test_quantity_refuses_nonsense(raw: str) -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        injection.quantity(raw)


CHART = {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}


def test_narrowing_keeps_the_chart_limit_and_lowers_what_is_asked() -> None:
    assert injection.narrow_resources(CHART, {"requests": {"memory": "32Mi"}, "limits": {"cpu": "200m"}}) == {
        "requests": {"cpu": "50m", "memory": "32Mi"},
        "limits": {"memory": "256Mi", "cpu": "200m"},
    }
    assert injection.narrow_resources(CHART, {"limits": {"memory": "128Mi"}})["limits"] == {"memory": "128Mi"}


@pytest.mark.parametrize(
    ("wanted", "problem"),
    [
        ({"limits": {"memory": "257Mi"}}, "limits.memory 257Mi is above the platform's 256Mi"),
        ({"requests": {"memory": "1Gi"}}, "requests.memory 1Gi is above its limit 256Mi"),
        ({"limits": {"cpu": "10m"}}, "requests.cpu 50m is above its limit 10m"),
        ({"limits": {"memory": "x"}}, "not a quantity: 'x'"),
    ],
)
def test_widening_is_refused(wanted: dict[str, Any], problem: str) -> None:
    with pytest.raises(injection.InjectionRefused, match=problem):
        injection.narrow_resources(CHART, wanted)
