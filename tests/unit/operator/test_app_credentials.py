"""What an injected pod's app container is given: nothing that logs in to the database.

The app and its sidecar share one network namespace, so no NetworkPolicy keeps the app from the
database the sidecar reaches; the credentials do. The sidecar holds the pod's minted role, got by
presenting its projected token; the app must hold neither. Checked here, without a kubelet, on
every golden pod the webhook injects (testdata/*.pod.yaml), in cluster mode: the sidecar's
volumes are mounted in the sidecar alone, the app gets no dbgov variable, and the pod shares no
process namespace. tests/e2e/test_real_pods.py proves the same in real pods, and that every
login the app can try directly is refused. An app given a password by its own manifest is
warned: it would not need it, and it is a way past the proxy.
"""

import copy
import pathlib
from typing import Any

import pytest
import yaml

from dbgov_operator import injection, settings

TESTDATA = pathlib.Path(__file__).parent / "testdata"
CASES = sorted(
    {p.name.removesuffix(".pod.yaml") for p in TESTDATA.glob("*.pod.yaml")}
    - {p.name.removesuffix(".refused.txt") for p in TESTDATA.glob("*.refused.txt")}
)
SIDECAR = settings.SidecarSettings()
ENDPOINT = injection.CredentialEndpoint(
    url="https://dbgov-webhook.dbgov.svc:9444/v1/credentials",
    ca_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    bundle_key="AAAA",
)
HELD = "gives the app a database password"


def _load(case: str) -> dict[str, Any]:
    value = yaml.safe_load((TESTDATA / f"{case}.pod.yaml").read_text())
    assert isinstance(value, dict)
    return value


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _pod(env: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "orders", "labels": {"dbgov.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1", "env": env}]},
    }


@pytest.mark.parametrize("case", CASES)
def test_only_the_sidecar_mounts_its_token_and_bundle(case: str) -> None:
    pod = injection.inject(_load(case), sidecar=SIDECAR, endpoint=ENDPOINT).pod
    mounting = {
        c["name"]
        for c in _containers(pod)
        for m in c.get("volumeMounts") or []
        if m["name"] in injection.DBGOV_VOLUMES
    }
    assert mounting == {injection.SIDECAR_NAME}
    (token,) = [v for v in pod["spec"]["volumes"] if v["name"] == injection.TOKEN_VOLUME]
    (source,) = token["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == SIDECAR.token_audience
    # No other volume projects a token for the sidecar's audience, whoever mounts it.
    assert not [
        v
        for v in pod["spec"]["volumes"]
        if v["name"] != injection.TOKEN_VOLUME
        and any(
            (s.get("serviceAccountToken") or {}).get("audience") == SIDECAR.token_audience
            for s in (v.get("projected") or {}).get("sources") or []
        )
    ]


@pytest.mark.parametrize("case", CASES)
def test_the_app_gets_no_dbgov_setting_and_no_shared_processes(case: str) -> None:
    original = {c["name"]: c for c in _containers(_load(case))}
    pod = injection.inject(_load(case), sidecar=SIDECAR, endpoint=ENDPOINT).pod
    for container in _containers(pod):
        if container["name"] == injection.SIDECAR_NAME:
            continue
        names = {e["name"] for e in container.get("env") or []}
        assert not {n for n in names if n.startswith("DBGOV_")}, container["name"]
        assert container.get("envFrom") == original[container["name"]].get("envFrom")
        assert container.get("volumeMounts") == original[container["name"]].get("volumeMounts")
    assert pod["spec"].get("shareProcessNamespace") is not True
    assert pod["spec"].get("hostPID") is not True


def test_the_token_would_be_refused_to_an_app_container() -> None:
    """The other half of the property: a pod whose app asks for the sidecar's token is refused
    (claim-token-*.pod.yaml are the golden cases; this names the reason)."""
    pod = _pod([{"name": "PGHOST", "value": "db"}])
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": injection.TOKEN_VOLUME, "mountPath": "/token", "readOnly": True}
    ]
    with pytest.raises(injection.InjectionRefused, match="only the sidecar mounts"):
        injection.inject(pod, sidecar=SIDECAR, endpoint=ENDPOINT)


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ([{"name": "PGPASSWORD", "value": "app-pw"}], "PGPASSWORD in container 'app'"),
        (
            [{"name": "PGPASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}}],
            "PGPASSWORD in container 'app'",
        ),
        ([{"name": "PGPASSFILE", "value": "/secrets/pgpass"}], "PGPASSFILE in container 'app'"),
    ],
)
def test_an_app_given_a_password_is_warned(env: list[dict[str, Any]], where: str) -> None:
    pod = _pod([{"name": "PGHOST", "value": "db"}, *env])
    result = injection.inject(pod, sidecar=SIDECAR, endpoint=ENDPOINT)
    (warning,) = [w for w in result.warnings if HELD in w]
    assert warning.startswith(where)
    assert "past the proxy" in warning
    # Warned, never edited: the app's own variables stay as it set them.
    (app,) = result.pod["spec"]["containers"]
    assert [e for e in app["env"] if e["name"] in injection.PASSWORD_ENV] == env


def test_a_password_in_the_apps_url_is_warned() -> None:
    pod = _pod([{"name": "DB_URL", "value": "postgresql://app:secret@db:5432/shop"}])
    pod["metadata"]["annotations"] = {"dbgov.io/database-url-env": "DB_URL"}
    result = injection.inject(pod, sidecar=SIDECAR, endpoint=ENDPOINT)
    assert [w for w in result.warnings if w.startswith("DB_URL in container 'app'") and HELD in w]
    pod["spec"]["containers"][0]["env"][0]["value"] = "postgresql://app@db:5432/shop"
    assert not [w for w in injection.inject(pod, sidecar=SIDECAR, endpoint=ENDPOINT).warnings if HELD in w]


def test_an_app_given_no_password_is_not_warned() -> None:
    pod = _pod([{"name": "PGHOST", "value": "db"}, {"name": "PGUSER", "value": "app"}])
    assert injection.inject(pod, sidecar=SIDECAR, endpoint=ENDPOINT).warnings == ()


def test_without_minted_credentials_nothing_is_said_about_passwords() -> None:
    """No credential endpoint (injection without an operator's cluster mode): the sidecar's
    upstream login is configured elsewhere, and the app's password is none of this warning's
    business."""
    pod = _pod([{"name": "PGHOST", "value": "db"}, {"name": "PGPASSWORD", "value": "app-pw"}])
    assert not [w for w in injection.inject(pod, sidecar=SIDECAR).warnings if HELD in w]


def test_with_minted_credentials_no_app_volume_enters_the_sidecar() -> None:
    """The app named a "CA file" in the sidecar's site-packages (a .pth runs at every start) and
    the webhook mounted the app's ConfigMap there: the app's code ran in the sidecar, with its
    token. With the credential endpoint the sidecar opens none of the app's TLS files."""
    site = "/opt/dbgov/lib/python3.11/site-packages/zz_evil.pth"
    pod = _pod(
        [
            {"name": "PGHOST", "value": "postgres.db"},
            {"name": "PGSSLMODE", "value": "verify-full"},
            {"name": "PGSSLROOTCERT", "value": site},
            {"name": "PGSSLCERT", "value": "/etc/ssl/certs/client.pem"},
        ]
    )
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "evil", "mountPath": site, "subPath": "zz_evil.pth"},
        {"name": "certs", "mountPath": "/etc/ssl/certs"},
    ]
    pod["spec"]["volumes"] = [
        {"name": "evil", "configMap": {"name": "evil"}},
        {"name": "certs", "configMap": {"name": "c"}},
    ]
    minted = injection.inject(copy.deepcopy(pod), sidecar=SIDECAR, endpoint=ENDPOINT).pod
    (sidecar,) = [c for c in _containers(minted) if c["name"] == injection.SIDECAR_NAME]
    assert {m["name"] for m in sidecar["volumeMounts"]} <= set(injection.DBGOV_VOLUMES)
    # without the endpoint (the app's own static credentials) the files are still carried
    static = injection.inject(copy.deepcopy(pod), sidecar=SIDECAR).pod
    (sidecar,) = [c for c in _containers(static) if c["name"] == injection.SIDECAR_NAME]
    assert {"evil", "certs"} <= {m["name"] for m in sidecar["volumeMounts"]}
