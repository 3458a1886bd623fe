"""Webhook server wiring and certificate storage, without a cluster."""

import asyncio
import base64
import datetime
import pathlib
from typing import Any

import pytest

from dbgov_operator import certs, settings, webhook

NOW = datetime.datetime.now(datetime.UTC)


def _config(tmp_path: pathlib.Path, **hook: Any) -> settings.Settings:
    return settings.Settings(
        namespace="dbgov",
        webhook=settings.WebhookSettings(
            listen_addr="127.0.0.1", port=0, cert_dir=str(tmp_path / "certs"), **hook
        ),
    )


def test_files_are_written_and_reused(tmp_path: pathlib.Path) -> None:
    config = _config(tmp_path)
    first = webhook.sync_certificates(config, client=None, now=NOW)
    assert first is not None
    directory = tmp_path / "certs"
    assert (directory / "tls.crt").read_bytes() == first.serving.cert_pem
    assert (directory / "ca.crt").read_bytes() == first.ca_bundle
    assert (directory / "tls.key").stat().st_mode & 0o077 == 0
    again = webhook.sync_certificates(config, client=None, now=NOW)
    assert again == first


def test_secret_round_trip() -> None:
    material = certs.ensure(None, hostnames=("127.0.0.1",), now=NOW, lifetimes=certs.Lifetimes())
    body = webhook._to_secret(material, name="cert", namespace="dbgov")
    assert body["type"] == "kubernetes.io/tls"
    assert base64.b64decode(body["data"]["tls.crt"]) == material.serving.cert_pem
    assert webhook._from_secret(body["data"]) == material
    assert webhook._from_secret({"tls.crt": body["data"]["tls.crt"]}) is None


def test_hostnames_follow_the_service(tmp_path: pathlib.Path) -> None:
    assert webhook.hostnames(_config(tmp_path)) == ("127.0.0.1",)
    names = webhook.hostnames(_config(tmp_path, service_name="dbgov-webhook"))
    assert "dbgov-webhook.dbgov.svc" in names


@pytest.mark.parametrize("service", ["", "dbgov-webhook"])
def test_server_advertises_url_or_service(tmp_path: pathlib.Path, service: str) -> None:
    config = _config(tmp_path, service_name=service, service_port=443)
    material = webhook.sync_certificates(config, client=None, now=NOW)
    assert material is not None
    server = webhook.server(config)

    async def first_client_config() -> dict[str, Any]:
        async def never_called(*_: Any, **__: Any) -> Any:
            raise AssertionError("no request expected")

        configs = server(never_called)
        try:
            return dict(await anext(configs))
        finally:
            await configs.aclose()

    advertised = asyncio.run(first_client_config())
    assert base64.b64decode(advertised["caBundle"]) == material.ca_bundle
    if service:
        assert advertised["service"] == {
            "name": "dbgov-webhook",
            "namespace": "dbgov",
            "port": 443,
            "path": None,
        }
        assert "url" not in advertised
    else:
        assert advertised["url"].startswith("https://127.0.0.1:")


class _Secret:
    def __init__(self, data: dict[str, str]) -> None:
        self.data = data


def test_cert_manager_source_copies_the_issued_secret(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, cert_source="cert-manager", cert_secret="issued")
    issued = certs.ensure(None, hostnames=("127.0.0.1",), now=NOW, lifetimes=certs.Lifetimes())
    data = {
        "tls.crt": base64.b64encode(issued.serving.cert_pem).decode(),
        "tls.key": base64.b64encode(issued.serving.key_pem).decode(),
        "ca.crt": base64.b64encode(issued.ca.cert_pem).decode(),
    }
    monkeypatch.setattr(webhook, "read_secret", lambda *_, **__: _Secret(data))
    assert webhook.sync_certificates(config, client=None, now=NOW) is None
    directory = tmp_path / "certs"
    assert (directory / "tls.crt").read_bytes() == issued.serving.cert_pem
    assert (directory / "ca.crt").read_bytes() == issued.ca.cert_pem
    assert not (directory / "ca-key.pem").exists()


def test_cert_manager_source_waits_for_the_secret(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, cert_source="cert-manager", cert_secret="issued")
    monkeypatch.setattr(webhook, "read_secret", lambda *_, **__: None)
    with pytest.raises(webhook.CertificatePending, match=r"lacks tls\.crt, tls\.key, ca\.crt"):
        webhook.sync_certificates(config, client=None, now=NOW)
