"""Operator settings: one root dataclass of grouped settings, read from the environment here only.

Every other module receives the group it needs as an argument, so tests build settings directly
and nothing else in the operator reads ``os.environ``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SYSTEM_NAMESPACES = ("kube-system", "kube-public", "kube-node-lease")


@dataclass(frozen=True, slots=True, kw_only=True)
class SidecarSettings:
    """What the webhook injects into enrolled pods."""

    image: str = "ghcr.io/dbgov/dbgov-sidecar:0.1.0"
    """The sidecar image, pinned by the platform (the chart, by digest where given)."""
    allow_image_override: bool = False
    """Whether a pod may name another image with ``dbgov.io/sidecar-image`` (refused if not)."""
    allow_debug_containers: bool = False
    """Whether ephemeral (debug) containers may be added to enrolled pods in namespaces labelled
    ``dbgov.io/enforce=true``; never one mounting the sidecar's volumes or targeting it."""
    resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )
    """Sidecar resource requirements; ``dbgov.io/sidecar-resources`` may only narrow them."""
    proxy_port: int = 5432
    """Loopback port the proxy listens on inside the pod (override: ``dbgov.io/proxy-port``)."""
    metrics_port: int = 9187
    """Port of the sidecar's ``/metrics``, ``/healthz`` and ``/readyz`` server, on every interface
    of the pod so the kubelet's probes and Prometheus reach it (override:
    ``dbgov.io/sidecar-metrics-port``)."""
    token_audience: str = "dbgov"
    """Audience of the projected ServiceAccount token the sidecar presents."""
    token_expiration_seconds: int = 3600
    """Lifetime the kubelet requests for the projected token (it rotates it before expiry)."""
    bundle_prefix: str = "dbgov-policy-"
    """ConfigMap name prefix of the per-ServiceAccount policy bundle."""
    bundle_signing_secret: str = "dbgov-bundle-signing-key"
    """Secret (operator namespace) with the Ed25519 key that signs bundles; the operator creates
    it when missing and never overwrites it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WebhookSettings:
    """Where the admission webhook listens and how the apiserver reaches it."""

    listen_addr: str = "0.0.0.0"
    """Address the HTTPS webhook server binds to."""
    port: int = 9443
    """Port the HTTPS webhook server binds to."""
    service_name: str = ""
    """Webhook Service name; when set, webhook configurations use the ``service:`` form."""
    service_port: int = 443
    """Port of the webhook Service (used with :attr:`service_name`)."""
    url_host: str = "127.0.0.1"
    """Host in ``url:`` form configurations (when no Service is set, e.g. in tests)."""
    cert_dir: str = "/tmp/dbgov-webhook-certs"
    """Directory the serving certificate, key and CA bundle are written to."""
    cert_secret: str = ""
    """Secret (operator namespace) holding the CA and serving cert, shared by all replicas."""
    cert_source: str = "operator"
    """``operator``: the operator makes and renews the certificate (in :attr:`cert_secret` if
    set); ``cert-manager``: cert-manager issues it into :attr:`cert_secret`, the operator only
    reads it (and re-reads it at :attr:`rotation_check_seconds`)."""
    cert_validity_days: int = 90
    """Lifetime of a new serving certificate."""
    renew_before_days: int = 30
    """Renew the serving certificate when it expires within this many days."""
    managed_name: str = "dbgov.io"
    """Name of the Validating/MutatingWebhookConfiguration objects the operator keeps current."""
    rotation_check_seconds: float = 3600.0
    """How often the operator checks whether the serving certificate is due for renewal."""
    timeout_seconds: int = 5
    """How long the apiserver waits for a webhook answer (1-30); failures stay closed (Fail)."""
    owner_cluster_role: str = ""
    """The chart's ClusterRole: the webhook configurations name it as their owner, so the garbage
    collector deletes them with the release (empty: no owner, e.g. outside the chart)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialSettings:
    """The credential endpoint sidecars present their projected token to (HTTPS, the webhook's
    serving certificate)."""

    listen_addr: str = "0.0.0.0"
    """Address the HTTPS credential endpoint binds to (unset: the webhook's listen address)."""
    port: int = 0
    """Port the credential endpoint binds to (the chart sets 9444). 0 binds any free port and
    tells sidecars the one bound (an operator outside a cluster, reached by URL); behind the
    webhook Service, 0 means :attr:`service_port`."""
    service_port: int = 9444
    """Port of the webhook Service that routes to the credential endpoint."""
    max_body_bytes: int = 4096
    """Largest request body accepted; the token travels in the header, the body is optional."""
    rate_per_second: float = 5.0
    """Requests per second one client address may make on average (a token bucket)."""
    burst: int = 20
    """Requests one client address may make at once before the rate applies."""
    max_concurrent_reviews: int = 16
    """TokenReviews in flight at once; more requests wait their turn."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """All operator settings."""

    namespace: str = "dbgov-system"
    """The operator's own namespace; pods there are never injected."""
    system_namespaces: tuple[str, ...] = DEFAULT_SYSTEM_NAMESPACES
    """Namespaces the webhook never touches."""
    peering: str = ""
    """kopf peering name for several replicas; empty runs standalone (one replica)."""
    peering_priority: int = 0
    """kopf peering priority; 0 picks a random one at startup, so that of several replicas
    exactly one is active (equal priorities would pause them all)."""
    log_level: str = "INFO"
    """Python logging level of the operator process."""
    sidecar: SidecarSettings = field(default_factory=SidecarSettings)
    """Injection settings."""
    webhook: WebhookSettings = field(default_factory=WebhookSettings)
    """Webhook server settings."""
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    """Credential endpoint settings."""
    database_check_seconds: float = 60.0
    """Seconds between two connection checks of a Database (a rotated password, a moved or
    stopped server shows in its Ready condition within this time)."""
    reap_seconds: float = 30.0
    """Seconds between two reaper runs on a Database: minted roles whose pod is gone, whose
    policy no longer binds it or whose VALID UNTIL passed are revoked within this time."""
    mask_key_secret: str = "dbgov-mask-key"
    """Secret (operator namespace) with the HMAC key of ``hash`` masks; the operator creates it
    with 32 random bytes when missing and never overwrites it."""


def from_env(env: Mapping[str, str]) -> Settings:
    """Read settings from ``DBGOV_*`` environment variables; unset ones keep their defaults."""
    side = SidecarSettings()
    hook = WebhookSettings()
    sidecar = SidecarSettings(
        image=env.get("DBGOV_SIDECAR_IMAGE", side.image),
        allow_image_override=_flag(env, "DBGOV_SIDECAR_ALLOW_IMAGE_OVERRIDE"),
        allow_debug_containers=_flag(env, "DBGOV_SIDECAR_ALLOW_DEBUG_CONTAINERS"),
        resources=_json(env, "DBGOV_SIDECAR_RESOURCES", side.resources),
        proxy_port=int(env.get("DBGOV_PROXY_PORT", side.proxy_port)),
        metrics_port=int(env.get("DBGOV_SIDECAR_METRICS_PORT", side.metrics_port)),
        token_audience=env.get("DBGOV_TOKEN_AUDIENCE", side.token_audience),
        token_expiration_seconds=int(
            env.get("DBGOV_TOKEN_EXPIRATION_SECONDS", side.token_expiration_seconds)
        ),
        bundle_prefix=env.get("DBGOV_BUNDLE_PREFIX", side.bundle_prefix),
        bundle_signing_secret=env.get("DBGOV_BUNDLE_SIGNING_SECRET", side.bundle_signing_secret),
    )
    if sidecar.metrics_port == sidecar.proxy_port:
        raise ValueError(
            f"DBGOV_SIDECAR_METRICS_PORT and DBGOV_PROXY_PORT must differ, both are {sidecar.proxy_port}"
        )
    webhook = WebhookSettings(
        listen_addr=env.get("DBGOV_WEBHOOK_LISTEN_ADDR", hook.listen_addr),
        port=int(env.get("DBGOV_WEBHOOK_PORT", hook.port)),
        service_name=env.get("DBGOV_WEBHOOK_SERVICE", hook.service_name),
        service_port=int(env.get("DBGOV_WEBHOOK_SERVICE_PORT", hook.service_port)),
        url_host=env.get("DBGOV_WEBHOOK_URL_HOST", hook.url_host),
        cert_dir=env.get("DBGOV_WEBHOOK_CERT_DIR", hook.cert_dir),
        cert_secret=env.get("DBGOV_WEBHOOK_CERT_SECRET", hook.cert_secret),
        cert_source=_choice(env, "DBGOV_WEBHOOK_CERT_SOURCE", ("operator", "cert-manager")),
        cert_validity_days=int(env.get("DBGOV_WEBHOOK_CERT_VALIDITY_DAYS", hook.cert_validity_days)),
        renew_before_days=int(env.get("DBGOV_WEBHOOK_RENEW_BEFORE_DAYS", hook.renew_before_days)),
        managed_name=env.get("DBGOV_WEBHOOK_CONFIGURATION", hook.managed_name),
        rotation_check_seconds=float(
            env.get("DBGOV_WEBHOOK_ROTATION_CHECK_SECONDS", hook.rotation_check_seconds)
        ),
        timeout_seconds=int(env.get("DBGOV_WEBHOOK_TIMEOUT_SECONDS", hook.timeout_seconds)),
        owner_cluster_role=env.get("DBGOV_WEBHOOK_OWNER_CLUSTERROLE", hook.owner_cluster_role),
    )
    if not 1 <= webhook.timeout_seconds <= 30:
        raise ValueError(
            f"DBGOV_WEBHOOK_TIMEOUT_SECONDS must be 1-30 (the apiserver's range), got {webhook.timeout_seconds}"
        )
    system = env.get("DBGOV_SYSTEM_NAMESPACES")
    cred = CredentialSettings()
    service_port = int(env.get("DBGOV_CREDENTIAL_SERVICE_PORT", cred.service_port))
    credentials = CredentialSettings(
        listen_addr=env.get("DBGOV_CREDENTIAL_LISTEN_ADDR", webhook.listen_addr),
        port=int(env.get("DBGOV_CREDENTIAL_PORT", cred.port))
        or (service_port if webhook.service_name else 0),
        service_port=service_port,
        max_body_bytes=int(env.get("DBGOV_CREDENTIAL_MAX_BODY_BYTES", cred.max_body_bytes)),
        rate_per_second=float(env.get("DBGOV_CREDENTIAL_RATE_PER_SECOND", cred.rate_per_second)),
        burst=int(env.get("DBGOV_CREDENTIAL_BURST", cred.burst)),
        max_concurrent_reviews=int(
            env.get("DBGOV_CREDENTIAL_MAX_CONCURRENT_REVIEWS", cred.max_concurrent_reviews)
        ),
    )
    return Settings(
        namespace=env.get("DBGOV_NAMESPACE", Settings().namespace),
        system_namespaces=(
            tuple(n.strip() for n in system.split(",") if n.strip())
            if system is not None
            else DEFAULT_SYSTEM_NAMESPACES
        ),
        peering=env.get("DBGOV_PEERING", ""),
        peering_priority=int(env.get("DBGOV_PEERING_PRIORITY", "0")),
        log_level=env.get("DBGOV_LOG_LEVEL", Settings().log_level),
        sidecar=sidecar,
        webhook=webhook,
        credentials=credentials,
        database_check_seconds=float(
            env.get("DBGOV_DATABASE_CHECK_SECONDS", Settings().database_check_seconds)
        ),
        reap_seconds=float(env.get("DBGOV_REAP_SECONDS", Settings().reap_seconds)),
        mask_key_secret=env.get("DBGOV_MASK_KEY_SECRET", Settings().mask_key_secret),
    )


def _json(env: Mapping[str, str], key: str, default: Mapping[str, Any]) -> Mapping[str, Any]:
    raw = env.get(key)
    if raw is None:
        return default
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError(f"{key} must be a JSON object")
    return value


def _flag(env: Mapping[str, str], key: str) -> bool:
    value = env.get(key, "false").strip().lower()
    if value not in ("true", "false"):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value == "true"


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    value = env.get(key, choices[0])
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value
