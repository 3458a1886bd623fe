"""Injection golden files: testdata/<case>.pod.yaml -> <case>.injected.yaml, or, for a pod the
webhook refuses, -> <case>.refused.txt (the message; create it empty for a new case).

Refresh the expected files with DBGOV_UPDATE_GOLDEN=1 after an intended change, and read the
diff before committing it.
"""

import copy
import os
import pathlib
import re
from typing import Any

import jsonpatch
import kopf
import pytest
import yaml

from dbgov_operator import annotations, handlers, injection, settings

TESTDATA = pathlib.Path(__file__).parent / "testdata"
REFUSED = sorted(p.name.removesuffix(".refused.txt") for p in TESTDATA.glob("*.refused.txt"))
CASES = sorted({p.name.removesuffix(".pod.yaml") for p in TESTDATA.glob("*.pod.yaml")} - set(REFUSED))
CONFIG = settings.Settings(namespace="dbgov-system")


def _load(path: pathlib.Path) -> dict[str, Any]:
    value = yaml.safe_load(path.read_text())
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    pod = _load(TESTDATA / f"{case}.pod.yaml")
    original = copy.deepcopy(pod)
    assert injection.decide(pod, namespace="apps", config=CONFIG).inject
    result = injection.inject(pod, sidecar=CONFIG.sidecar)
    assert pod == original, "inject must not modify its input"
    golden = TESTDATA / f"{case}.injected.yaml"
    if os.environ.get("DBGOV_UPDATE_GOLDEN") == "1":
        golden.write_text(yaml.safe_dump(result.pod, sort_keys=False))
    assert result.pod == _load(golden)


@pytest.mark.parametrize("case", REFUSED)
def test_golden_refusal(case: str) -> None:
    pod = _load(TESTDATA / f"{case}.pod.yaml")
    assert injection.decide(pod, namespace="apps", config=CONFIG).inject
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    golden = TESTDATA / f"{case}.refused.txt"
    if os.environ.get("DBGOV_UPDATE_GOLDEN") == "1":
        golden.write_text(f"{caught.value}\n")
    assert f"{caught.value}\n" == golden.read_text()


@pytest.mark.parametrize("case", CASES)
def test_patch_from_diff_reproduces_the_injected_pod(case: str) -> None:
    pod = _load(TESTDATA / f"{case}.pod.yaml")
    result = injection.inject(pod, sidecar=CONFIG.sidecar)
    patch = kopf.Patch(body=kopf.Body(pod))
    handlers.replace_body(patch, result.pod)
    ops = patch.as_json_patch()
    assert jsonpatch.apply_patch(pod, ops) == result.pod
    # The app's own containers and volumes are never removed or replaced wholesale.
    whole = re.compile(r"^/spec/(containers|initContainers|volumes)(/\d+)?$")
    assert not [op for op in ops if op["op"] != "add" and whole.match(op["path"])], ops


@pytest.mark.parametrize("case", CASES)
def test_an_injected_pod_created_again_is_refused(case: str) -> None:
    """Nothing is already injected at CREATE (the webhook runs once per CREATE): a pod arriving
    with the webhook's own output, exactly as it made it, copied it and is refused."""
    pod = injection.inject(_load(TESTDATA / f"{case}.pod.yaml"), sidecar=CONFIG.sidecar).pod
    assert injection.decide(pod, namespace="apps", config=CONFIG).inject
    with pytest.raises(injection.InjectionRefused, match="only the dbgov webhook writes it"):
        injection.inject(pod, sidecar=CONFIG.sidecar)


@pytest.mark.parametrize("case", CASES)
def test_sidecar_mounts_each_path_once_read_only(case: str) -> None:
    sidecar = _sidecar(injection.inject(_load(TESTDATA / f"{case}.pod.yaml"), sidecar=CONFIG.sidecar).pod)
    paths = [m["mountPath"] for m in sidecar["volumeMounts"]]
    assert len(paths) == len(set(paths))
    assert all(m["readOnly"] is True for m in sidecar["volumeMounts"])


def test_sidecar_without_status_annotation_is_refused() -> None:
    pod = injection.inject(_load(TESTDATA / "basic.pod.yaml"), sidecar=CONFIG.sidecar).pod
    del pod["metadata"]["annotations"][annotations.STATUS]
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert "init container 'dbgov-proxy': the name is the dbgov sidecar's" in str(caught.value)
    assert "volume 'dbgov-policy'" in str(caught.value)


@pytest.mark.parametrize(
    ("namespace", "reason"),
    [
        ("kube-system", "system namespace kube-system"),
        ("kube-public", "system namespace kube-public"),
        ("kube-node-lease", "system namespace kube-node-lease"),
        ("dbgov-system", "the operator's own namespace"),
    ],
)
def test_never_in_system_or_own_namespace(namespace: str, reason: str) -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    assert injection.decide(pod, namespace=namespace, config=CONFIG) == injection.Decision(
        inject=False, reason=reason
    )


@pytest.mark.parametrize("labels", [None, {}, {"dbgov.io/inject": "false"}, {"app": "x"}])
def test_unlabeled_pods_are_left_alone(labels: dict[str, str] | None) -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    pod["metadata"]["labels"] = labels
    assert not injection.decide(pod, namespace="apps", config=CONFIG).inject


def test_bundle_volume_names_the_pods_service_account() -> None:
    pod = injection.inject(_load(TESTDATA / "url-literal.pod.yaml"), sidecar=CONFIG.sidecar).pod
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["dbgov-policy"]["configMap"]["name"] == "dbgov-policy-orders"
    token = volumes["dbgov-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "dbgov"


def test_native_sidecar_runs_first() -> None:
    pod = injection.inject(_load(TESTDATA / "overrides.pod.yaml"), sidecar=CONFIG.sidecar).pod
    first, second = pod["spec"]["initContainers"]
    assert (first["name"], first["restartPolicy"]) == ("dbgov-proxy", "Always")
    assert second["name"] == "migrate"
    assert "restartPolicy" not in second


def test_missing_url_variable_warns() -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    pod["metadata"]["annotations"] = {annotations.DATABASE_URL_ENV: "DB_URL"}
    result = injection.inject(pod, sidecar=CONFIG.sidecar)
    assert len(result.warnings) == 2
    assert "DB_URL" in result.warnings[0]
    assert "no database to connect to and will not start" in result.warnings[1]


def test_a_pod_without_a_database_is_warned_that_its_sidecar_cannot_start() -> None:
    """Neither PGHOST nor a URL: the sidecar has no upstream (it refuses to start rather than
    connect to its own address); admission says so, and how to fix it."""
    result = injection.inject(_load(TESTDATA / "basic.pod.yaml"), sidecar=CONFIG.sidecar)
    assert [w for w in result.warnings if "set PGHOST" in w]
    pod = _load(TESTDATA / "basic.pod.yaml")
    pod["spec"]["containers"][0].setdefault("env", []).append({"name": "PGHOST", "value": "db"})
    assert injection.inject(pod, sidecar=CONFIG.sidecar).warnings == ()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (annotations.SIDECAR_RESOURCES, "{nope", "not JSON"),
        (annotations.SIDECAR_RESOURCES, '{"cpu": "1"}', "only"),
        (annotations.PROXY_PORT, "70000", "not a port number"),
        (annotations.PROXY_PORT, "http", "not a port number"),
        (annotations.SIDECAR_METRICS_PORT, "0", "not a port number"),
        (annotations.SIDECAR_METRICS_PORT, "9187/TCP", "not a port number"),
        (annotations.SIDECAR_METRICS_PORT, "\u0661\u0662", "not a port number"),  # Arabic-Indic digits
    ],
)
def test_invalid_override_refuses_the_pod(key: str, value: str, reason: str) -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    pod["metadata"]["annotations"] = {key: value}
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert caught.value.annotation == key
    assert reason in caught.value.reason


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = pod["spec"]["initContainers"][0]
    assert first["name"] == "dbgov-proxy"
    return first


def test_sidecar_serves_metrics_and_probes_on_every_interface() -> None:
    sidecar = _sidecar(injection.inject(_load(TESTDATA / "basic.pod.yaml"), sidecar=CONFIG.sidecar).pod)
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["DBGOV_METRICS"] == "*:9187"
    assert env["DBGOV_LISTEN"] == "127.0.0.1:5432"  # the proxy itself stays on loopback
    assert sidecar["ports"] == [{"name": "dbgov-metrics", "containerPort": 9187, "protocol": "TCP"}]

    def probe(path: str, period: int, failures: int) -> dict[str, Any]:
        return {
            "httpGet": {"path": path, "port": "dbgov-metrics"},
            "periodSeconds": period,
            "failureThreshold": failures,
        }

    assert sidecar["startupProbe"] == probe("/readyz", 1, 120)
    assert sidecar["readinessProbe"] == probe("/readyz", 5, 2)
    assert sidecar["livenessProbe"] == probe("/healthz", 10, 3)


def test_metrics_port_comes_from_the_settings() -> None:
    config = settings.SidecarSettings(metrics_port=9300)
    sidecar = _sidecar(injection.inject(_load(TESTDATA / "basic.pod.yaml"), sidecar=config).pod)
    assert {"name": "DBGOV_METRICS", "value": "*:9300"} in sidecar["env"]
    assert [p["containerPort"] for p in sidecar["ports"]] == [9300]


@pytest.mark.parametrize("kind", ["containers", "initContainers"])
def test_a_container_declaring_the_metrics_port_refuses_the_pod(kind: str) -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    exporter = {"name": "exporter", "image": "example/exporter:1", "ports": [{"containerPort": 9187}]}
    pod["spec"].setdefault(kind, []).append(exporter)
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert caught.value.annotation == annotations.SIDECAR_METRICS_PORT
    assert "port 9187 is declared by container 'exporter'" in caught.value.reason
    assert "sidecar.metricsPort" in caught.value.reason
    # The annotation the message names is the way out.
    pod["metadata"]["annotations"] = {annotations.SIDECAR_METRICS_PORT: "9188"}
    sidecar = _sidecar(injection.inject(pod, sidecar=CONFIG.sidecar).pod)
    assert [p["containerPort"] for p in sidecar["ports"]] == [9188]


def test_a_udp_port_with_the_same_number_does_not_clash() -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 9187, "protocol": "UDP"}]
    pod["spec"]["containers"][0].setdefault("env", []).append({"name": "PGHOST", "value": "db"})
    assert injection.inject(pod, sidecar=CONFIG.sidecar).warnings == ()


@pytest.mark.parametrize(
    "pod_annotations",
    [
        {annotations.PROXY_PORT: "9187"},
        {annotations.SIDECAR_METRICS_PORT: "5432"},
        {annotations.PROXY_PORT: "7000", annotations.SIDECAR_METRICS_PORT: "7000"},
    ],
)
def test_metrics_port_equal_to_the_proxy_port_refuses_the_pod(pod_annotations: dict[str, str]) -> None:
    pod = _load(TESTDATA / "basic.pod.yaml")
    pod["metadata"]["annotations"] = pod_annotations
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert caught.value.annotation == annotations.SIDECAR_METRICS_PORT
    assert "also the proxy's port (dbgov.io/proxy-port)" in caught.value.reason


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u:p@db:5432/app", "postgresql://u:p@127.0.0.1:5432/app"),
        ("postgres://db/app?sslmode=require", "postgres://127.0.0.1:5432/app?sslmode=disable"),
        (
            "postgres://db/app?sslmode=verify-full&channel_binding=require",
            "postgres://127.0.0.1:5432/app?sslmode=disable&channel_binding=disable",
        ),
        (
            "postgres://db/app?sslmode=verify-full&sslnegotiation=direct&gssencmode=prefer",
            "postgres://127.0.0.1:5432/app?sslmode=disable&sslnegotiation=postgres&gssencmode=disable",
        ),
        ("postgresql://u@h1:5432,h2:5432/app", "postgresql://u@127.0.0.1:5432/app"),
        ("postgresql:///app?host=/var/run/pg&port=5433", "postgresql://127.0.0.1:5432/app"),
        ("mysql://u@db/app", None),
        ("not a url", None),
    ],
)
def test_rewrite_database_url(url: str, expected: str | None) -> None:
    assert injection.rewrite_database_url(url, port=5432) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sslmode=verify-full&sslrootcert=/ca.pem", [("sslrootcert", "/ca.pem")]),
        (
            "sslkey=/k&sslmode=verify-ca&sslcert=/c&sslrootcert=/ca.pem",
            [("sslrootcert", "/ca.pem"), ("sslcert", "/c"), ("sslkey", "/k")],
        ),
        ("sslrootcert=/ca.pem&sslcert=/c", [("sslcert", "/c")]),  # the sidecar's default: prefer
        ("sslmode=require&sslrootcert=/ca.pem", [("sslrootcert", "/ca.pem")]),  # libpq: = verify-ca
        ("sslmode=require", []),  # encrypts, verifies nothing
        ("sslmode=disable&sslrootcert=/ca.pem&sslcert=/c&sslkey=/k", []),
        ("sslmode=verify-full&sslrootcert=", []),  # empty: the system trust store
        ("sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem", [("sslrootcert", "/etc/ca.pem")]),
        ("sslrootcert=/old.pem&sslmode=verify-full&sslrootcert=/new.pem", [("sslrootcert", "/new.pem")]),
    ],
)
def test_upstream_files_are_those_the_sidecar_opens(query: str, expected: list[tuple[str, str]]) -> None:
    assert injection.upstream_files(f"postgresql://u@db:5432/app?{query}") == expected


def test_upstream_files_of_a_non_postgres_url_are_none() -> None:
    assert injection.upstream_files("mysql://db/app?sslmode=verify-full&sslrootcert=/ca.pem") == []


def test_a_tls_file_mount_where_the_sidecar_mounts_its_policy_refuses_the_pod() -> None:
    pod = _load(TESTDATA / "tls-secret-ca.pod.yaml")
    web = pod["spec"]["containers"][0]
    web["env"][0]["value"] = "postgresql://db/app?sslmode=verify-full&sslrootcert=/etc/dbgov/policy/ca.pem"
    web["volumeMounts"] = [{"name": "db-certs", "mountPath": "/etc/dbgov/policy/"}]
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert caught.value.annotation == annotations.DATABASE_URL_ENV
    assert "where the sidecar mounts its own files" in caught.value.reason


def test_a_mount_of_another_container_does_not_count() -> None:
    pod = _load(TESTDATA / "tls-client-key-unmounted.pod.yaml")
    pod["spec"]["containers"].reverse()  # the URL still comes from web, the mount is sidekick's
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert "sslkey=/etc/db/key/tls.key, which no volumeMount" in caught.value.reason


def _pgenv_pod(env: list[dict[str, Any]], mounts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    web: dict[str, Any] = {"name": "web", "image": "example/app:1", "env": env}
    if mounts is not None:
        web["volumeMounts"] = mounts
    return {
        "metadata": {"name": "app", "labels": {annotations.INJECT: annotations.INJECT_ENABLED}},
        "spec": {"containers": [web], "volumes": [{"name": "certs", "secret": {"secretName": "db-certs"}}]},
    }


def _expanded(env: list[dict[str, Any]], given: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: ``given`` stands for the values
    from Secrets and ConfigMaps, $(VAR) expands variables defined earlier, $$ is a $."""
    values: dict[str, str] = {}
    for var in env:
        if "valueFrom" in var:
            values[var["name"]] = given.get(var["name"], "")
            continue
        values[var["name"]] = re.sub(
            r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
            lambda m: "$" if m[0] == "$$" else values.get(m[1], m[0]),
            var["value"],
        )
    return values


def _sidecar_upstream(pod: dict[str, Any], given: dict[str, str] | None = None) -> Any:
    """The upstream the sidecar makes of its DBGOV_UPSTREAM, parsed by its own config module."""
    from dbgov_sidecar import config as sidecar_config  # the contract: the sidecar's own parse

    env = _expanded(_sidecar(pod)["env"], given or {})
    return sidecar_config.upstream_config(sidecar_config.Settings(upstream=env["DBGOV_UPSTREAM"]))


def test_pg_tls_variables_reach_the_sidecars_parse() -> None:
    env = [
        {"name": "PGHOST", "value": "db.prod"},
        {"name": "PGSSLMODE", "value": "verify-full"},
        {"name": "PGCHANNELBINDING", "value": "require"},
        {"name": "PGSSLROOTCERT", "value": "/certs/ca.pem"},
        {"name": "PGSSLCERT", "value": "/certs/tls.crt"},
        {"name": "PGSSLKEY", "value": "/certs/tls.key"},
    ]
    pod = injection.inject(
        _pgenv_pod(env, [{"name": "certs", "mountPath": "/certs"}]), sidecar=CONFIG.sidecar
    ).pod
    upstream = _sidecar_upstream(pod)
    assert (upstream.host, upstream.port, upstream.sslmode, upstream.channel_binding) == (
        "db.prod",
        5432,
        "verify-full",
        "require",
    )
    assert (upstream.sslrootcert, upstream.sslcert, upstream.sslkey) == (
        "/certs/ca.pem",
        "/certs/tls.crt",
        "/certs/tls.key",
    )
    assert _sidecar(pod)["volumeMounts"][2:] == [{"name": "certs", "mountPath": "/certs", "readOnly": True}]
    app = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert app["PGSSLMODE"] == {"name": "PGSSLMODE", "value": "disable"}
    assert app["PGCHANNELBINDING"] == {"name": "PGCHANNELBINDING", "value": "disable"}
    assert app["PGSSLROOTCERT"]["value"] == "/certs/ca.pem"  # unused under disable, left alone


def test_a_literal_tls_path_is_escaped_for_the_url_and_the_kubelet() -> None:
    path = "/certs/a b&c#d+e%f$(HOME)/ca.pem"
    env = [
        {"name": "PGHOST", "value": "db.prod"},
        {"name": "PGSSLMODE", "value": "verify-ca"},
        {"name": "PGSSLROOTCERT", "value": path},
    ]
    pod = injection.inject(
        _pgenv_pod(env, [{"name": "certs", "mountPath": "/certs"}]), sidecar=CONFIG.sidecar
    ).pod
    upstream = _sidecar_upstream(pod)
    assert (upstream.sslmode, upstream.sslrootcert) == ("verify-ca", path)


def test_pg_tls_variables_from_secrets_are_referenced_not_copied() -> None:
    def ref(key: str) -> dict[str, Any]:
        return {"secretKeyRef": {"name": "db", "key": key}}

    env = [
        {"name": name, "valueFrom": ref(name.lower())} for name in ("PGHOST", "PGPORT", *injection.PG_TLS_ENV)
    ]
    result = injection.inject(_pgenv_pod(env), sidecar=CONFIG.sidecar)
    sidecar_env = {e["name"]: e for e in _sidecar(result.pod)["env"]}
    for name in injection.PG_TLS_ENV:
        assert sidecar_env[f"DBGOV_UPSTREAM_{name}"]["valueFrom"] == ref(name.lower())
    given = {
        "DBGOV_UPSTREAM_PGHOST": "db.prod",
        "DBGOV_UPSTREAM_PGPORT": "6543",
        "DBGOV_UPSTREAM_PGSSLMODE": "verify-full",
        "DBGOV_UPSTREAM_PGCHANNELBINDING": "require",
        "DBGOV_UPSTREAM_PGSSLROOTCERT": "/certs/ca.pem",
        "DBGOV_UPSTREAM_PGSSLCERT": "/certs/tls.crt",
        "DBGOV_UPSTREAM_PGSSLKEY": "/certs/tls.key",
    }
    upstream = _sidecar_upstream(result.pod, given)
    assert (upstream.port, upstream.sslmode, upstream.channel_binding, upstream.sslkey) == (
        6543,
        "verify-full",
        "require",
        "/certs/tls.key",
    )
    # Paths the webhook cannot see get no mount, and a warning each.
    assert _sidecar(result.pod)["volumeMounts"][2:] == []
    assert [w.split(" comes from valueFrom")[0] for w in result.warnings] == [
        "PGSSLROOTCERT in container 'web'",
        "PGSSLCERT in container 'web'",
        "PGSSLKEY in container 'web'",
    ]
    app = {e["name"]: e for e in result.pod["spec"]["containers"][0]["env"]}
    assert app["PGSSLMODE"] == {"name": "PGSSLMODE", "value": "disable"}


@pytest.mark.parametrize("sslmode", ["prefer", "disable"])  # require + a CA verifies, as libpq
def test_an_unverified_mode_opens_no_ca_so_an_unmounted_one_is_admitted(sslmode: str) -> None:
    env = [
        {"name": "PGHOST", "value": "db.prod"},
        {"name": "PGSSLMODE", "value": sslmode},
        {"name": "PGSSLROOTCERT", "value": "/app/ca.pem"},  # in the image
    ]
    pod = injection.inject(_pgenv_pod(env), sidecar=CONFIG.sidecar).pod
    assert _sidecar_upstream(pod).sslmode == sslmode
    assert _sidecar(pod)["volumeMounts"][2:] == []


@pytest.mark.parametrize(
    ("extra", "opened"),
    [
        ([], "sslcert"),  # no PGSSLMODE: prefer, which sends a client certificate
        (
            [{"name": "PGSSLMODE", "valueFrom": {"configMapKeyRef": {"name": "db", "key": "mode"}}}],
            "sslrootcert",
        ),
    ],
)
def test_a_file_the_sidecar_may_open_refuses_the_pod_when_unmounted(
    extra: list[dict[str, Any]], opened: str
) -> None:
    env = [
        {"name": "PGHOST", "value": "db.prod"},
        *extra,
        {"name": "PGSSLROOTCERT" if opened == "sslrootcert" else "PGSSLCERT", "value": "/app/file.pem"},
    ]
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(_pgenv_pod(env), sidecar=CONFIG.sidecar)
    assert caught.value.annotation is None
    assert "names /app/file.pem, which no volumeMount of that container holds" in str(caught.value)


def test_pg_tls_variables_that_differ_between_containers_warn() -> None:
    pod = _pgenv_pod([{"name": "PGHOST", "value": "db.prod"}, {"name": "PGSSLMODE", "value": "require"}])
    worker = {
        "name": "worker",
        "image": "example/app:1",
        "env": [{"name": "PGSSLMODE", "value": "verify-full"}],
    }
    pod["spec"]["containers"].append(worker)
    result = injection.inject(pod, sidecar=CONFIG.sidecar)
    assert _sidecar_upstream(result.pod).sslmode == "require"
    (warning,) = result.warnings
    assert warning.startswith("PGSSLMODE: app containers set it differently")
    assert warning.endswith("container 'web'")
    assert {"name": "PGSSLMODE", "value": "disable"} in result.pod["spec"]["containers"][1]["env"]


def test_tls_files_at_one_path_from_two_volumes_refuse_the_pod() -> None:
    pod = _pgenv_pod(
        [{"name": "PGHOST", "value": "db.prod"}, {"name": "PGSSLCERT", "value": "/certs/tls.crt"}],
        [{"name": "certs", "mountPath": "/certs"}],
    )
    worker = {
        "name": "worker",
        "image": "example/app:1",
        "env": [{"name": "PGSSLKEY", "value": "/certs/tls.key"}],
        "volumeMounts": [{"name": "keys", "mountPath": "/certs"}],
    }
    pod["spec"]["containers"].append(worker)
    pod["spec"]["volumes"].append({"name": "keys", "secret": {"secretName": "db-keys"}})
    with pytest.raises(injection.InjectionRefused) as caught:
        injection.inject(pod, sidecar=CONFIG.sidecar)
    assert str(caught.value).startswith(
        "PGSSLKEY in container 'worker' names /certs/tls.key, held by volumeMount 'keys'"
    )


@pytest.mark.parametrize("upstream", ["url", "none"])
def test_pg_tls_variables_not_carried_to_the_sidecar_are_left_to_the_app(upstream: str) -> None:
    # With a URL upstream, or no PGHOST to build one, the sidecar does not get them: turning them
    # off on loopback would let the app connect through a sidecar that verifies less than it asked.
    pod = _load(TESTDATA / ("url-literal.pod.yaml" if upstream == "url" else "basic.pod.yaml"))
    env = pod["spec"]["containers"][0].setdefault("env", [])
    env += [{"name": "PGSSLMODE", "value": "verify-full"}, {"name": "PGCHANNELBINDING", "value": "require"}]
    if upstream == "url":
        env.append({"name": "PGHOST", "value": "db.prod"})
    result = injection.inject(pod, sidecar=CONFIG.sidecar)
    names = [e["name"] for e in _sidecar(result.pod)["env"] if e["name"].startswith("DBGOV_UPSTREAM")]
    assert names == (["DBGOV_UPSTREAM"] if upstream == "url" else [])
    app = result.pod["spec"]["containers"][0]["env"]
    assert {"name": "PGSSLMODE", "value": "verify-full"} in app
    assert {"name": "PGCHANNELBINDING", "value": "require"} in app
