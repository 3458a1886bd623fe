"""The admission webhook's server and the I/O around its certificates.

All replicas share one CA and serving certificate through a Secret in the operator's namespace,
so the ``caBundle`` kopf writes into the webhook configurations is the same whichever replica
wrote it last. Certificates are written to files that kopf's server re-reads: when rotation
changes them, kopf restarts the listener and the operator re-publishes the configurations.

The operator writes its webhook configurations itself rather than through kopf's managed mode:
kopf writes neither a ``namespaceSelector`` nor a timeout below the 30 s maximum, and enrollment
needs both -- pods in a namespace labelled ``dbgov.io/enforce=true`` all go through the webhook,
elsewhere only pods labelled ``dbgov.io/inject=true`` do, system namespaces and the operator's own
never, and a slow answer fails (closed) in seconds. Injection runs once per CREATE
(``reinvocationPolicy: Never``): a pod arriving with dbgov's sidecar or status annotation made them
itself and is refused. Enrolled pods' UPDATEs (the pod, ``pods/ephemeralcontainers``,
``pods/resize``) go to a validating webhook selected by the ``dbgov.io/inject=true`` label, which the
apiserver matches against the old object as well as the new, so removing the label is seen too. The chart creates the two configurations so
that ``helm uninstall`` deletes them; the operator only fills them in (and creates them when run
without the chart), with an ownerReference to the chart's ClusterRole where one is configured, so
the garbage collector removes any the operator re-created while it was being uninstalled.
"""

import asyncio
import base64
import datetime
import logging
import pathlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import kopf
import kubernetes
from kubernetes.client.exceptions import ApiException

from dbgov_operator import annotations, certs, settings

logger = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
_SECRET_KEYS = {
    "ca.crt": "ca_cert",
    "ca.key": "ca_key",
    "tls.crt": "cert",
    "tls.key": "key",
    "ca-previous.crt": "previous",
}


POD_INJECTION_ID = "inject.pods.dbgov.io"
"""kopf handler id of the pod mutation; the webhook server routes ``<path>/<id>`` to it."""
POLICY_VALIDATION_ID = "validate.policies.dbgov.io"
"""kopf handler id of the policy validation."""
CLUSTER_POLICY_VALIDATION_ID = "validate.clusterpolicies.dbgov.io"
"""kopf handler id of the ClusterDatabaseAccessPolicy validation."""
DATABASE_VALIDATION_ID = "validate.databases.dbgov.io"
"""kopf handler id of the Database validation (its Secrets granted to its namespace)."""
POD_GUARD_ID = "validate.pods.dbgov.io"
"""kopf handler id of the validation of enrolled pods' updates (and ephemeral containers)."""
POD_GUARD_SUBRESOURCES = ("ephemeralcontainers", "resize")
"""Pod subresources that change a pod's spec after admission, besides the pod itself."""

Publisher = Callable[[kopf.WebhookClientConfig], None]


class ServiceWebhookServer(kopf.WebhookServer):
    """kopf's HTTPS server, advertised as a ``service:`` reference (with ``service``) or a URL,
    publishing the webhook configurations each time it (re)starts listening (with ``publish``).

    kopf advertises ``url:`` client configs; inside a cluster the apiserver reaches webhooks
    through the Service instead (it usually cannot resolve cluster DNS names)."""

    def __init__(
        self,
        *,
        service: tuple[str, str, int] | None = None,
        publish: Publisher | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._service = service
        self._publish = publish

    async def __call__(self, fn: Any) -> AsyncIterator[kopf.WebhookClientConfig]:
        async for advertised in super().__call__(fn):
            client_config = advertised
            if self._service is not None:
                name, namespace, port = self._service
                client_config = {
                    "caBundle": advertised.get("caBundle"),
                    "service": {"name": name, "namespace": namespace, "port": port, "path": self.path},
                }
            if self._publish is not None:
                await asyncio.to_thread(self._publish, client_config)
            yield client_config


def hostnames(config: settings.Settings) -> tuple[str, ...]:
    """Names the serving certificate must cover."""
    hook = config.webhook
    names: tuple[str, ...] = (hook.url_host,)
    if hook.service_name:
        names = certs.service_hostnames(service=hook.service_name, namespace=config.namespace)
    return names


def lifetimes(config: settings.Settings) -> certs.Lifetimes:
    """Certificate lifetimes from settings."""
    return certs.Lifetimes(
        serving=datetime.timedelta(days=config.webhook.cert_validity_days),
        renew_before=datetime.timedelta(days=config.webhook.renew_before_days),
    )


def server(config: settings.Settings, *, publish: Publisher | None = None) -> kopf.WebhookServer:
    """The webhook server, reading the certificate files :func:`sync_certificates` writes, and
    calling ``publish`` with its client config whenever it starts listening."""
    hook = config.webhook
    directory = pathlib.Path(hook.cert_dir)
    common: dict[str, Any] = {
        "addr": hook.listen_addr,
        "port": hook.port,
        "certfile": str(directory / CERT_FILE),
        "pkeyfile": str(directory / KEY_FILE),
        "cafile": str(directory / CA_FILE),
        # kopf re-reads the files this often and restarts the listener when they changed.
        "file_check_interval": min(10.0, hook.rotation_check_seconds),
    }
    if hook.service_name:
        service = (hook.service_name, config.namespace, hook.service_port)
        return ServiceWebhookServer(service=service, publish=publish, **common)
    return ServiceWebhookServer(host=hook.url_host, publish=publish, **common)


# --------------------------------------------------------------------------------------------
# The webhook configurations
# --------------------------------------------------------------------------------------------


def _client_config(client_config: kopf.WebhookClientConfig, handler_id: str) -> dict[str, Any]:
    """The server's client config, pointed at one handler (kopf routes ``<path>/<id>``)."""
    out: dict[str, Any] = {"caBundle": client_config.get("caBundle")}
    if client_config.get("url"):
        out["url"] = f"{str(client_config['url']).rstrip('/')}/{handler_id}"
    service = client_config.get("service")
    if service:
        out["service"] = {**service, "path": f"{service.get('path') or ''}/{handler_id}"}
    return out


def excluded_namespaces(config: settings.Settings) -> list[str]:
    """Namespaces no webhook of the operator's is ever called for: system ones and its own."""
    return sorted({*config.system_namespaces, config.namespace})


def mutating_webhooks(
    config: settings.Settings, *, client_config: kopf.WebhookClientConfig
) -> list[dict[str, Any]]:
    """Two webhooks to the one injection handler: every pod in enforced namespaces, and pods
    labelled ``dbgov.io/inject=true`` elsewhere. Both fail closed, within the timeout, and are
    never called again for the same CREATE: the handler refuses a pod that already carries a
    sidecar, which after a reinvocation would be its own (``IfNeeded`` bought nothing before
    either: the second call injected nothing). A later mutating webhook is the cluster admin's
    and trusted; enrolled pods' updates are validated (:func:`validating_webhooks`)."""
    outside = _outside(config)
    enforce = {"key": annotations.ENFORCE, "values": [annotations.ENFORCE_ENABLED]}
    common = _common(config, client_config=client_config, handler_id=POD_INJECTION_ID)
    rules = [_rule("", "v1", "pods", ["CREATE"])]
    return [
        {
            **common,
            "name": f"enforced.{POD_INJECTION_ID}",
            "rules": rules,
            "namespaceSelector": {"matchExpressions": [outside, {**enforce, "operator": "In"}]},
            "reinvocationPolicy": "Never",
        },
        {
            **common,
            "name": POD_INJECTION_ID,
            "rules": rules,
            "namespaceSelector": {"matchExpressions": [outside, {**enforce, "operator": "NotIn"}]},
            "objectSelector": {"matchLabels": {annotations.INJECT: annotations.INJECT_ENABLED}},
            "reinvocationPolicy": "Never",
        },
    ]


def _outside(config: settings.Settings) -> dict[str, Any]:
    return {
        "key": annotations.NAMESPACE_NAME_LABEL,
        "operator": "NotIn",
        "values": excluded_namespaces(config),
    }


def validating_webhooks(
    config: settings.Settings, *, client_config: kopf.WebhookClientConfig
) -> list[dict[str, Any]]:
    """The policy validation, for policies in every namespace, and for cluster policies; the
    Database validation (a cross-namespace admin or CA Secret must be granted to the Database's
    namespace and pinned to its server: refused at apply time, not only in its status); the
    update validation of enrolled pods (every injected pod carries ``dbgov.io/inject=true``: the
    webhook sets it in enforced namespaces, and elsewhere it is what enrolled the pod)."""
    pods = [_rule("", "v1", "pods", ["UPDATE"])]
    pods += [_rule("", "v1", f"pods/{sub}", ["UPDATE"]) for sub in POD_GUARD_SUBRESOURCES]
    return [
        {
            **_common(config, client_config=client_config, handler_id=POLICY_VALIDATION_ID),
            "name": POLICY_VALIDATION_ID,
            "rules": [_rule("dbgov.io", "v1alpha1", "databaseaccesspolicies", ["CREATE", "UPDATE"])],
        },
        {
            **_common(config, client_config=client_config, handler_id=CLUSTER_POLICY_VALIDATION_ID),
            "name": CLUSTER_POLICY_VALIDATION_ID,
            "rules": [
                _rule(
                    "dbgov.io",
                    "v1alpha1",
                    "clusterdatabaseaccesspolicies",
                    ["CREATE", "UPDATE"],
                    scope="Cluster",
                )
            ],
        },
        {
            **_common(config, client_config=client_config, handler_id=DATABASE_VALIDATION_ID),
            "name": DATABASE_VALIDATION_ID,
            "rules": [_rule("dbgov.io", "v1alpha1", "databases", ["CREATE", "UPDATE"])],
        },
        {
            **_common(config, client_config=client_config, handler_id=POD_GUARD_ID),
            "name": POD_GUARD_ID,
            "rules": pods,
            "namespaceSelector": {"matchExpressions": [_outside(config)]},
            # Matched against the old object too: a change removing the label still comes here.
            "objectSelector": {"matchLabels": {annotations.INJECT: annotations.INJECT_ENABLED}},
        },
    ]


def _common(
    config: settings.Settings, *, client_config: kopf.WebhookClientConfig, handler_id: str
) -> dict[str, Any]:
    return {
        "clientConfig": _client_config(client_config, handler_id),
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Fail",
        "matchPolicy": "Equivalent",
        "timeoutSeconds": config.webhook.timeout_seconds,
    }


def _rule(
    group: str, version: str, resource: str, operations: list[str], *, scope: str = "Namespaced"
) -> dict[str, Any]:
    return {
        "apiGroups": [group],
        "apiVersions": [version],
        "resources": [resource],
        "operations": operations,
        "scope": scope,
    }


def publish(config: settings.Settings, *, client: Any, client_config: kopf.WebhookClientConfig) -> None:
    """Write both webhook configurations (creating a missing one), retrying on conflicts."""
    api: Any = kubernetes.client.AdmissionregistrationV1Api(client)
    owner = _owner(config, client=client)
    kinds = (
        ("mutating", "mutating_webhook_configuration", mutating_webhooks),
        ("validating", "validating_webhook_configuration", validating_webhooks),
    )
    for kind, noun, build in kinds:
        webhooks = build(config, client_config=client_config)
        logger.info("Reconfiguring the %s webhook %s.", kind, config.webhook.managed_name)
        _write(api, noun=noun, name=config.webhook.managed_name, webhooks=webhooks, owner=owner)


def _write(
    api: Any, *, noun: str, name: str, webhooks: list[dict[str, Any]], owner: dict[str, Any] | None
) -> None:
    read, create, replace = (getattr(api, f"{verb}_{noun}") for verb in ("read", "create", "replace"))
    for _ in range(5):
        try:
            current = api.api_client.sanitize_for_serialization(read(name))
        except ApiException as err:
            if err.status != 404:
                raise
            current = None
        meta = (current or {}).get("metadata") or {"name": name}
        labels = {**(meta.get("labels") or {}), annotations.MANAGED_BY_LABEL: annotations.MANAGED_BY_VALUE}
        meta = {**meta, "labels": labels}
        if owner is not None:
            others = [r for r in meta.get("ownerReferences") or [] if r.get("uid") != owner["uid"]]
            meta["ownerReferences"] = [*others, owner]
        body = {"metadata": meta, "webhooks": webhooks}
        try:
            if current is None:
                create(body)
            else:
                replace(name, body)
        except ApiException as err:
            if err.status == 403:
                raise RuntimeError(
                    f"not allowed to write the {noun.replace('_', ' ')} {name!r} ({err.reason}); the chart "
                    "creates it and lets the operator update it by name: is webhook.configurationName "
                    "the same in the chart and DBGOV_WEBHOOK_CONFIGURATION?"
                ) from err
            if err.status in (404, 409):
                continue  # deleted or changed meanwhile: read it again
            raise
        return
    raise RuntimeError(f"could not settle the {noun.replace('_', ' ')} {name!r}")


def _owner(config: settings.Settings, *, client: Any) -> dict[str, Any] | None:
    """An ownerReference to the chart's ClusterRole, so the configurations go with the release."""
    name = config.webhook.owner_cluster_role
    if not name:
        return None
    role: Any = kubernetes.client.RbacAuthorizationV1Api(client).read_cluster_role(name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "name": name,
        "uid": role.metadata.uid,
    }


class CertificatePending(Exception):
    """cert-manager has not issued the webhook certificate yet."""


def sync_certificates(
    config: settings.Settings, *, client: Any, now: datetime.datetime
) -> certs.WebhookCerts | None:
    """Load, renew if due, store and write the webhook certificates; return what the operator
    made (``None`` when cert-manager issues them and the operator only copies them)."""
    if config.webhook.cert_source == "cert-manager":
        _copy_issued(config, client=client)
        return None
    names = hostnames(config)
    life = lifetimes(config)
    if config.webhook.cert_secret:
        material = _sync_secret(config, client=client, names=names, life=life, now=now)
    else:
        material = certs.ensure(_read_files(config), hostnames=names, now=now, lifetimes=life)
    _write_files(config, material)
    return material


def _sync_secret(
    config: settings.Settings,
    *,
    client: Any,
    names: tuple[str, ...],
    life: certs.Lifetimes,
    now: datetime.datetime,
) -> certs.WebhookCerts:
    core: Any = kubernetes.client.CoreV1Api(client)  # dict bodies in, models out
    name, namespace = config.webhook.cert_secret, config.namespace
    for _ in range(5):
        secret = read_secret(client, name=name, namespace=namespace)
        current = _from_secret(secret.data or {}) if secret is not None else None
        material = certs.ensure(current, hostnames=names, now=now, lifetimes=life)
        if material is current:
            return material
        body = _to_secret(material, name=name, namespace=namespace)
        try:
            if secret is None:
                core.create_namespaced_secret(namespace, body)
            else:
                body["metadata"]["resourceVersion"] = secret.metadata.resource_version
                core.replace_namespaced_secret(name, namespace, body)
        except ApiException as err:
            if err.status != 409:
                raise
            logger.info("Another replica wrote the webhook certificate first; re-reading it")
            continue
        logger.info("Webhook certificate written to Secret %s/%s", namespace, name)
        return material
    raise RuntimeError(f"could not settle the webhook certificate in Secret {namespace}/{name}")


def read_secret(client: Any, *, name: str, namespace: str) -> Any:
    """The Secret, or ``None`` if it does not exist."""
    try:
        return kubernetes.client.CoreV1Api(client).read_namespaced_secret(name, namespace)
    except ApiException as err:
        if err.status == 404:
            return None
        raise


def _copy_issued(config: settings.Settings, *, client: Any) -> None:
    """Copy cert-manager's certificate, key and CA from its Secret into the server's files."""
    name, namespace = config.webhook.cert_secret, config.namespace
    secret = read_secret(client, name=name, namespace=namespace)
    data = (secret.data or {}) if secret is not None else {}
    missing = [key for key in ("tls.crt", "tls.key", "ca.crt") if not data.get(key)]
    if missing:
        raise CertificatePending(f"Secret {namespace}/{name} lacks {', '.join(missing)} (yet)")
    files = {CERT_FILE: "tls.crt", KEY_FILE: "tls.key", CA_FILE: "ca.crt"}
    _write_bytes(config, {file: base64.b64decode(data[key]) for file, key in files.items()})


def _from_secret(data: dict[str, str]) -> certs.WebhookCerts | None:
    raw = {field: base64.b64decode(data[key]) for key, field in _SECRET_KEYS.items() if key in data}
    if not {"ca_cert", "ca_key", "cert", "key"} <= set(raw):
        return None
    return certs.WebhookCerts(
        ca=certs.KeyPair(cert_pem=raw["ca_cert"], key_pem=raw["ca_key"]),
        serving=certs.KeyPair(cert_pem=raw["cert"], key_pem=raw["key"]),
        previous_ca_pem=raw.get("previous", b""),
    )


def _to_secret(material: certs.WebhookCerts, *, name: str, namespace: str) -> dict[str, Any]:
    values = {
        "ca.crt": material.ca.cert_pem,
        "ca.key": material.ca.key_pem,
        "tls.crt": material.serving.cert_pem,
        "tls.key": material.serving.key_pem,
        "ca-previous.crt": material.previous_ca_pem,
    }
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {annotations.MANAGED_BY_LABEL: annotations.MANAGED_BY_VALUE},
        },
        "data": {key: base64.b64encode(value).decode() for key, value in values.items()},
    }


def _read_files(config: settings.Settings) -> certs.WebhookCerts | None:
    """Certificates a previous run left in the directory (no Secret configured)."""
    directory = pathlib.Path(config.webhook.cert_dir)
    paths = [directory / n for n in (CERT_FILE, KEY_FILE, "ca-cert.pem", "ca-key.pem")]
    if not all(p.is_file() for p in paths):
        return None
    cert, key, ca_cert, ca_key = (p.read_bytes() for p in paths)
    return certs.WebhookCerts(
        ca=certs.KeyPair(cert_pem=ca_cert, key_pem=ca_key),
        serving=certs.KeyPair(cert_pem=cert, key_pem=key),
    )


def _write_files(config: settings.Settings, material: certs.WebhookCerts) -> None:
    files = {
        CERT_FILE: material.serving.cert_pem,
        KEY_FILE: material.serving.key_pem,
        CA_FILE: material.ca_bundle,
        "ca-cert.pem": material.ca.cert_pem,
        "ca-key.pem": material.ca.key_pem,
    }
    _write_bytes(config, files)


def _write_bytes(config: settings.Settings, files: dict[str, bytes]) -> None:
    directory = pathlib.Path(config.webhook.cert_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name, content in files.items():
        path = directory / name
        if path.is_file() and path.read_bytes() == content:
            continue  # unchanged files keep kopf's server from restarting needlessly
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(content)
        tmp.chmod(0o600)
        tmp.replace(path)
