"""Settings come from DBGOV_* variables, in one place."""

import pytest

from dbgov_operator import settings


def test_defaults() -> None:
    config = settings.from_env({})
    assert config == settings.Settings()
    assert config.system_namespaces == ("kube-system", "kube-public", "kube-node-lease")
    assert config.sidecar.token_audience == "dbgov"


def test_chart_environment_is_read() -> None:
    config = settings.from_env(
        {
            "DBGOV_NAMESPACE": "dbgov",
            "DBGOV_SYSTEM_NAMESPACES": "kube-system, istio-system,",
            "DBGOV_PEERING": "dbgov",
            "DBGOV_SIDECAR_IMAGE": "registry/sidecar:1",
            "DBGOV_SIDECAR_RESOURCES": '{"requests": {"cpu": "10m"}}',
            "DBGOV_PROXY_PORT": "6432",
            "DBGOV_SIDECAR_METRICS_PORT": "9300",
            "DBGOV_WEBHOOK_SERVICE": "dbgov-webhook",
            "DBGOV_WEBHOOK_SERVICE_PORT": "8443",
            "DBGOV_WEBHOOK_CERT_SECRET": "dbgov-webhook-cert",
        }
    )
    assert config.namespace == "dbgov"
    assert config.system_namespaces == ("kube-system", "istio-system")
    assert config.peering == "dbgov"
    assert config.sidecar.image == "registry/sidecar:1"
    assert config.sidecar.resources == {"requests": {"cpu": "10m"}}
    assert config.sidecar.proxy_port == 6432
    assert config.sidecar.metrics_port == 9300
    assert (config.webhook.service_name, config.webhook.service_port) == ("dbgov-webhook", 8443)
    assert config.webhook.cert_secret == "dbgov-webhook-cert"


def test_metrics_port_defaults_to_9187_and_must_differ_from_the_proxy_port() -> None:
    assert settings.from_env({}).sidecar.metrics_port == 9187
    with pytest.raises(ValueError, match="DBGOV_SIDECAR_METRICS_PORT and DBGOV_PROXY_PORT"):
        settings.from_env({"DBGOV_PROXY_PORT": "9187"})


def test_resources_must_be_an_object() -> None:
    with pytest.raises(ValueError, match="DBGOV_SIDECAR_RESOURCES"):
        settings.from_env({"DBGOV_SIDECAR_RESOURCES": "[1]"})


def test_cert_source_is_checked() -> None:
    assert settings.from_env({"DBGOV_WEBHOOK_CERT_SOURCE": "cert-manager"}).webhook.cert_source == (
        "cert-manager"
    )
    with pytest.raises(ValueError, match="DBGOV_WEBHOOK_CERT_SOURCE"):
        settings.from_env({"DBGOV_WEBHOOK_CERT_SOURCE": "vault"})
