"""The chart's operator Deployment and the operator agree on every DBGOV_* variable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from dbgov_operator import settings

from . import kube

CHART = kube.REPO_ROOT / "charts" / "dbgov"


def _operator_env(tools: kube.Tools, home: Path, *sets: str) -> dict[str, str]:
    args: list[str] = ["template", "rel", str(CHART), "--namespace", "dbgov-system"]
    for value in sets:
        args += ["--set", value]
    docs = kube.yaml_documents(kube.helm(tools, *args, home=home).stdout)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = "dbgov-system"  # what the downward API gives it there
    assert container["command"] == ["python", "-m", "dbgov_operator"]
    return env


def _service_port(tools: kube.Tools, home: Path) -> Any:
    docs = kube.yaml_documents(
        kube.helm(tools, "template", "rel", str(CHART), "--namespace", "dbgov-system", home=home).stdout
    )
    (service,) = [d for d in docs if d["kind"] == "Service"]
    return service


def test_default_values_configure_an_in_cluster_operator(kube_tools: kube.Tools, helm_home: Path) -> None:
    env = _operator_env(kube_tools, helm_home)
    unknown = {name for name in env if name.startswith("DBGOV_")} - KNOWN
    assert not unknown, f"the chart sets variables the operator does not read: {unknown}"
    config = settings.from_env(env)
    service = _service_port(kube_tools, helm_home)
    assert config.namespace == "dbgov-system"
    assert config.webhook.service_name == service["metadata"]["name"]
    assert config.webhook.service_port == service["spec"]["ports"][0]["port"]
    assert config.webhook.cert_source == "operator"
    assert config.webhook.cert_secret
    assert config.webhook.listen_addr == "0.0.0.0"
    assert config.peering == "rel-dbgov"  # two replicas by default, peering named after the release
    assert config.sidecar.token_audience == "dbgov"
    assert config.webhook.rotation_check_seconds == 300


@pytest.mark.parametrize(
    ("sets", "check"),
    [
        (("webhook.certManager.enabled=true",), lambda c: c.webhook.cert_source == "cert-manager"),
        (("operator.peering=dbgov",), lambda c: c.peering == "dbgov"),
        (("operator.peering=", "operator.replicas=1"), lambda c: c.peering == ""),  # standalone
        (("sidecar.proxyPort=6432",), lambda c: c.sidecar.proxy_port == 6432),
        (("sidecar.metricsPort=9300",), lambda c: c.sidecar.metrics_port == 9300),
    ],
)
def test_values_reach_the_operator(
    kube_tools: kube.Tools, helm_home: Path, sets: tuple[str, ...], check: Any
) -> None:
    assert check(settings.from_env(_operator_env(kube_tools, helm_home, *sets)))


KNOWN = frozenset(re.findall(r'"(DBGOV_[A-Z_]+)"', Path(settings.__file__).read_text()))
"""Every variable settings.from_env reads (the only module that reads them)."""
