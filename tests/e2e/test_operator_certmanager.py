"""Webhook certificate issued by someone else (cert-manager in a cluster; this test here).

With ``DBGOV_WEBHOOK_CERT_SOURCE=cert-manager`` the operator waits for the Secret, serves what
it holds, publishes its ``ca.crt`` as the caBundle, follows renewals, and never writes it.
"""

from __future__ import annotations

import base64
import datetime
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from dbgov_operator import certs

from . import kube, operator_proc
from . import test_operator as base


def _secret(issued: certs.KeyPair, ca: certs.KeyPair) -> client.V1Secret:
    return client.V1Secret(
        metadata=client.V1ObjectMeta(name=operator_proc.CERT_SECRET),
        type="kubernetes.io/tls",
        data={
            "tls.crt": base64.b64encode(issued.cert_pem).decode(),
            "tls.key": base64.b64encode(issued.key_pem).decode(),
            "ca.crt": base64.b64encode(ca.cert_pem).decode(),
        },
    )


ISSUER = certs.make_ca(now=datetime.datetime.now(datetime.UTC))
"""The CA this test issues from, standing in for cert-manager's."""


@pytest.fixture(scope="module")
def installed(
    kube_cluster: kube.KubeCluster,
    kube_tools: kube.Tools,
    dbgov_crds: list[str],
    helm_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[operator_proc.Installed]:
    workdir = tmp_path_factory.mktemp("certmanager")
    with base.deployed(
        kube_cluster,
        kube_tools,
        helm_home=helm_home,
        workdir=workdir,
        env={"DBGOV_WEBHOOK_CERT_SOURCE": "cert-manager"},
        start=False,
    ) as found:
        # The operator starts before the certificate exists, as it may in a cluster, and waits.
        found.operator.start()
        operator_proc.wait_for(
            "the operator to wait for the certificate",
            lambda: "waiting for the webhook certificate" in found.operator.log_text(),
        )
        issued = certs.make_serving(
            ca=ISSUER, hostnames=("127.0.0.1",), now=datetime.datetime.now(datetime.UTC)
        )
        found.core.create_namespaced_secret(found.namespace, _secret(issued, ISSUER))
        base.wait_served(found)
        yield found


def test_issued_certificate_is_served_and_its_ca_published(
    installed: operator_proc.Installed, namespace: str
) -> None:
    secret = installed.core.read_namespaced_secret(operator_proc.CERT_SECRET, installed.namespace)
    config = installed.admission.read_validating_webhook_configuration(installed.configuration)
    assert len(config.webhooks) == 4  # policies, cluster policies, Databases, enrolled pods' updates
    for hook in config.webhooks:
        assert base64.b64decode(hook.client_config.ca_bundle) == ISSUER.cert_pem
    pem = base64.b64decode(secret.data["tls.crt"]).decode()
    assert base.served_certificate(installed) == ssl.PEM_cert_to_DER_cert(pem)
    created = installed.core.create_namespaced_pod(namespace, base.pod("issued", labels=base.ENROLLED))
    assert [c.name for c in created.spec.init_containers] == ["dbgov-proxy"]


def test_renewal_by_the_issuer_is_followed_and_the_secret_never_written(
    installed: operator_proc.Installed, namespace: str
) -> None:
    renewed = certs.make_serving(ca=ISSUER, hostnames=("127.0.0.1",), now=datetime.datetime.now(datetime.UTC))
    written = installed.core.replace_namespaced_secret(
        operator_proc.CERT_SECRET, installed.namespace, _secret(renewed, ISSUER)
    )
    der = ssl.PEM_cert_to_DER_cert(renewed.cert_pem.decode())
    operator_proc.wait_for(
        "the renewed certificate to be served", lambda: base.served_or_empty(installed) == der
    )
    created = installed.core.create_namespaced_pod(namespace, base.pod("renewed", labels=base.ENROLLED))
    assert [c.name for c in created.spec.init_containers] == ["dbgov-proxy"]
    time.sleep(3)  # more than one rotation check (2 s): an operator-made certificate would be
    # written back here, since this Secret has no CA key the operator could sign with.
    secret = installed.core.read_namespaced_secret(operator_proc.CERT_SECRET, installed.namespace)
    assert secret.metadata.resource_version == written.metadata.resource_version
