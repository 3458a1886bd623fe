"""Sidecar injection as a pure function: a pod in, an edited copy of it out.

The mutating webhook diffs the copy against the original to build its JSON patch, so this module
never computes patch indexes (the edge cases of hand-written patches are where injectors break).
No I/O here: the pod, its namespace and the settings are all the input there is.
"""

import copy
import decimal
import json
import posixpath
import urllib.parse
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from dbgov_operator import annotations, bundle, settings
from dbgov_operator.kubetypes import Container, EnvVar, Probe, Volume, VolumeMount

SIDECAR_NAME = "dbgov-proxy"
SIDECAR_UID = 10001
"""The sidecar image's user (Dockerfile.sidecar): set explicitly so ``runAsNonRoot`` never
depends on the image's metadata."""
TOKEN_VOLUME = "dbgov-token"
POLICY_VOLUME = "dbgov-policy"
TOKEN_DIR = "/var/run/secrets/dbgov.io/serviceaccount"
POLICY_DIR = "/etc/dbgov/policy"
POLICY_KEY = "policy.yaml"
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "*"  # the sidecar binds every interface, IPv4 and IPv6 (kubelet probes use the pod IP)
METRICS_PORT_NAME = "dbgov-metrics"
"""Name of the sidecar's metrics/health port: its probes use it, and so can a PodMonitor."""
URL_SCHEMES = ("postgres", "postgresql")
PG_TLS_ENV = {
    "PGSSLMODE": "sslmode",
    "PGCHANNELBINDING": "channel_binding",
    "PGSSLROOTCERT": "sslrootcert",
    "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey",
}
"""The app's libpq TLS variables, and the DBGOV_UPSTREAM query parameter each becomes (the modes
first: a value from a Secret is put in the URL unescaped, and may cut off what follows it)."""
LOOPBACK_TLS_ENV = {
    "PGSSLMODE": "disable",
    "PGCHANNELBINDING": "disable",
    "PGSSLNEGOTIATION": "postgres",
    "PGGSSENCMODE": "disable",
}
"""What the app's encryption variables become: the hop to the proxy never leaves the pod, and the
proxy offers neither TLS, channel binding nor GSSAPI encryption there (libpq fails under
``require`` without them, and refuses ``sslnegotiation=direct`` with ``sslmode=disable``). The
sidecar's upstream keeps the TLS settings; it negotiates TLS the usual way (same protection)."""
LOOPBACK_URL_TLS = {
    "sslmode": "disable",
    "channel_binding": "disable",
    "gssencmode": "disable",
    "sslnegotiation": "postgres",
}
"""The same for the query parameters of a URL the app connects with."""


class InjectionRefused(Exception):
    """An enrolled pod asks for something the webhook cannot do; the pod is refused, not
    silently admitted without its sidecar (fail closed)."""

    def __init__(self, *, annotation: str | None, reason: str) -> None:
        super().__init__(f"{annotation}: {reason}" if annotation else reason)
        self.annotation = annotation
        """The annotation to change (``None`` when the fix is in the pod's own spec)."""
        self.reason = reason


@dataclass(frozen=True, slots=True, kw_only=True)
class CredentialEndpoint:
    """Where the sidecar presents its token, and the CA bundle it verifies that server with."""

    url: str
    """``https://.../v1/credentials`` of the operator's credential endpoint."""
    ca_pem: str
    """PEM CA bundle of the operator's serving certificate (the webhook's)."""
    bundle_key: str = ""
    """The operator's bundle signing public key (base64): the sidecar refuses a policy bundle
    file that does not verify against it, and gets the file's ``.sig`` beside it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    """Whether to inject a pod, and why (logged and reported in tests)."""

    inject: bool
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Injection:
    """The injected copy of a pod, plus warnings for the user who created it."""

    pod: dict[str, Any]
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class _UpstreamFile:
    """A TLS file the sidecar opens, and where the app named it (for a refusal's message)."""

    path: str
    container: Mapping[str, Any]
    """The app container whose variable names it: the sidecar gets that container's mount."""
    where: str
    """Which variable of which container names it, and how."""
    annotation: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Repointed:
    upstream: list[EnvVar]
    """The sidecar's DBGOV_UPSTREAM, and the variables it is built from."""
    files: tuple[_UpstreamFile, ...]
    """The literal TLS file paths the sidecar opens (the webhook cannot read a Secret's)."""
    warnings: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Overrides:
    image: str
    resources: Mapping[str, Any]
    proxy_port: int
    metrics_port: int
    database: str | None
    url_env: str | None


def excluded(namespace: str, *, config: settings.Settings) -> str | None:
    """Why dbgov never touches pods in ``namespace`` (``None`` if it may)."""
    if namespace in config.system_namespaces:
        return f"system namespace {namespace}"
    if namespace == config.namespace:
        return "the operator's own namespace"
    return None


def enforced(namespace_labels: Mapping[str, str] | None) -> bool:
    """Whether a namespace with these labels makes the sidecar mandatory (:data:`annotations.ENFORCE`)."""
    return (namespace_labels or {}).get(annotations.ENFORCE) == annotations.ENFORCE_ENABLED


def decide(
    pod: Mapping[str, Any], *, namespace: str, config: settings.Settings, enforce: bool = False
) -> Decision:
    """Decide whether ``pod`` (being created in ``namespace``) gets the sidecar.

    ``enforce``: the namespace is labelled :data:`annotations.ENFORCE`, so the pod's own
    :data:`annotations.INJECT` label cannot opt it out."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    reason = excluded(namespace, config=config)
    if reason is not None:
        return Decision(inject=False, reason=reason)
    if not enforce and labels.get(annotations.INJECT) != annotations.INJECT_ENABLED:
        return Decision(inject=False, reason=f"not labeled {annotations.INJECT}=true")
    # Nothing is "already injected" at CREATE: the webhook runs once per CREATE (its
    # reinvocationPolicy is Never), so a pod arriving with a sidecar or the status annotation made
    # them itself, and inject() refuses it (refuse_claims).
    return Decision(inject=True, reason="namespace enforces dbgov" if enforce else "enrolled")


def inject(
    pod: Mapping[str, Any],
    *,
    sidecar: settings.SidecarSettings,
    endpoint: CredentialEndpoint | None = None,
    enforce: bool = False,
    bound_databases: Collection[str] | None = None,
) -> Injection:
    """Return a copy of ``pod`` with the dbgov sidecar, its volumes, and the app re-pointed.

    With ``endpoint`` the sidecar presents its token there and refuses clients until the
    operator has verified who it is (cluster mode). ``enforce``: the namespace makes the sidecar
    mandatory, so a pod the sidecar could not serve is refused instead of warned about, and the
    pod is labelled enrolled whatever its own label said. ``bound_databases``: the ``databaseRef``
    names of the policies binding this pod; ``dbgov.io/database`` must be one of them (``None``:
    not checked, for callers without a cluster)."""
    refuse_claims(pod, sidecar=sidecar)
    out: dict[str, Any] = copy.deepcopy(dict(pod))
    meta = out.setdefault("metadata", {})
    spec = out.setdefault("spec", {})
    overrides = _overrides(meta.get("annotations") or {}, sidecar)
    if bound_databases is not None:
        _check_database(overrides.database, bound=bound_databases)
    # The ServiceAccount admission plugin normally defaults this before webhooks run; a token
    # projection is invalid without it, so say it explicitly where nothing did.
    service_account = spec.setdefault("serviceAccountName", "default") or "default"

    _check_ports(spec, overrides)
    apps = _repoint_apps(spec, overrides)
    if enforce and not apps.upstream and overrides.database is None:
        raise InjectionRefused(annotation=None, reason=_NO_UPSTREAM_ENFORCED)
    warnings = list(apps.warnings)
    if endpoint is not None:
        warnings.extend(held_passwords(pod, url_env=overrides.url_env))
    labels = meta.get("labels") or {}
    if enforce and labels.get(annotations.INJECT) != annotations.INJECT_ENABLED:
        if annotations.INJECT in labels:
            warnings.append(
                f"label {annotations.INJECT}={labels[annotations.INJECT]!r} ignored: this namespace is "
                f"labelled {annotations.ENFORCE}=true, so every pod in it gets the dbgov sidecar"
            )
        # The reconciler and its pod watch find enrolled pods by this label.
        meta["labels"] = {**labels, annotations.INJECT: annotations.INJECT_ENABLED}
    # With minted credentials the sidecar trusts only the operator's answer (its CA, or the
    # system store) and never opens the app's TLS files, so no app volume enters the sidecar:
    # one at a path the app names (site-packages, the entrypoint, /etc/ssl/certs, /etc/hosts)
    # ran the app's code inside the sidecar, with its token (found by an attacker).
    mounts = (
        [] if endpoint is not None else _upstream_file_mounts(apps.files, volumes=spec.get("volumes") or [])
    )
    container = _sidecar_container(
        overrides=overrides, upstream=apps.upstream, sidecar=sidecar, endpoint=endpoint
    )
    container["volumeMounts"].extend(mounts)
    spec["initContainers"] = [container, *spec.get("initContainers", [])]
    spec["volumes"] = [
        *spec.get("volumes", []),
        *_volumes(
            sidecar=sidecar,
            bundle=bundle.bundle_name(sidecar.bundle_prefix, service_account),
            key=_policy_file(overrides.database),
            signed=endpoint is not None and bool(endpoint.bundle_key),
        ),
    ]
    meta.setdefault("annotations", {})[annotations.STATUS] = annotations.STATUS_INJECTED
    return Injection(pod=out, warnings=tuple(warnings))


PASSWORD_ENV = ("PGPASSWORD", "PGPASSFILE")
"""libpq's variables that give a client its database password (directly, or a file of them)."""


def held_passwords(pod: Mapping[str, Any], *, url_env: str | None) -> list[str]:
    """Warnings for the database passwords ``pod``'s app containers are given.

    With minted credentials (cluster mode) the sidecar logs in upstream with the pod's own role,
    whose password only it receives, and admits the app on loopback without asking for one: the
    app needs no password. One it holds anyway is a way to the database past the proxy (the app
    shares the sidecar's network, so no NetworkPolicy can stop it), which only the credential
    itself, retired, can close. Warned, not removed: an app may read the variable itself, it may
    hold an end user's JWT for a policy's ``authentication.jwt`` (no database password), and a
    Secret it came from stays readable elsewhere."""
    found: list[str] = []
    for kind, container in _named_containers(pod.get("spec") or {}):
        if kind == "ephemeral" or container.get("name") == SIDECAR_NAME:
            continue
        for var in container.get("env") or []:
            name = var.get("name")
            url = str(var.get("value") or "")
            if name in PASSWORD_ENV or (name == url_env and _url_password(url)):
                found.append(f"{name} in container {container.get('name')!r}")
    if not found:
        return []
    return [
        f"{', '.join(found)} gives the app a database password, which it does not need: the dbgov "
        "sidecar logs in with this pod's minted role (the app presents at most an end user's JWT, "
        "where a policy's authentication.jwt asks for one). With a database password the app can log "
        "in directly, past the proxy; remove it and retire that password's role"
    ]


def _url_password(url: str) -> bool:
    try:
        return bool(urllib.parse.urlsplit(url).password)
    except ValueError:  # not a URL (a bad port, say): the webhook warns about it elsewhere or not at all
        return False


# --------------------------------------------------------------------------------------------
# What a pod may not claim at CREATE, and what may not change once it is injected
# --------------------------------------------------------------------------------------------

DBGOV_VOLUMES = (TOKEN_VOLUME, POLICY_VOLUME)
"""The volumes the webhook adds: the sidecar's token and its signed policy bundle."""

_RECREATE = (
    "(a manifest exported from a running pod, or kubectl debug --copy-to, carries what the webhook "
    "added: create the pod from its template instead, and the webhook adds its own)"
)


def refuse_claims(pod: Mapping[str, Any], *, sidecar: settings.SidecarSettings) -> None:
    """Refuse a pod being created with what only the webhook may add, or with a way to the
    sidecar's token: the pod's own claims are never trusted (every problem listed)."""
    problems = claims(pod, sidecar=sidecar)
    if not problems:
        return
    spec = pod.get("spec") or {}
    copied = annotations.STATUS in ((pod.get("metadata") or {}).get("annotations") or {}) or any(
        c.get("name") == SIDECAR_NAME for _, c in _named_containers(spec)
    )
    raise InjectionRefused(annotation=None, reason="; ".join(problems) + (f" {_RECREATE}" if copied else ""))


def claims(pod: Mapping[str, Any], *, sidecar: settings.SidecarSettings) -> list[str]:
    """What in ``pod``, being created, pretends to be dbgov's or reaches the sidecar's secrets."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    problems: list[str] = []
    status = (meta.get("annotations") or {}).get(annotations.STATUS)
    if status is not None:
        problems.append(
            f"annotation {annotations.STATUS}={status!r}: only the dbgov webhook writes it, as it injects "
            "the sidecar, and a pod cannot arrive with it"
        )
    for kind, container in _named_containers(spec):
        if container.get("name") == SIDECAR_NAME:
            problems.append(
                f"{kind} container {SIDECAR_NAME!r}: the name is the dbgov sidecar's, which only the "
                "webhook adds"
            )
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") in DBGOV_VOLUMES:
                problems.append(
                    f"{kind} container {container.get('name')!r} mounts volume {mount['name']!r}, the "
                    "name of the volume the webhook adds for the dbgov sidecar (its token or policy "
                    "bundle), which only the sidecar mounts"
                )
    for volume in spec.get("volumes") or []:
        problems.extend(_volume_claims(volume, audience=sidecar.token_audience))
    for field in ("shareProcessNamespace", "hostPID"):
        if spec.get(field) is True:
            problems.append(
                f"spec.{field}: true lets the pod's other containers see the dbgov sidecar's process and "
                "read its token and database credentials through /proc; remove it from enrolled pods"
            )
    if spec.get("hostNetwork") is True:
        problems.append(
            "spec.hostNetwork: true puts the sidecar's proxy on the node's loopback, where it admits "
            "every process and pod of the node as this workload; remove it from enrolled pods"
        )
    problems.extend(_resolution_claims(spec))
    return problems


def _resolution_claims(spec: Mapping[str, Any]) -> list[str]:
    """Name resolution the pod chooses is the sidecar's too (one network namespace): pointing
    the database's name at the app's own listener would have the sidecar log in there."""
    problems = []
    if spec.get("hostAliases"):
        problems.append(
            "spec.hostAliases: the sidecar resolves names through the pod's /etc/hosts, so an alias "
            "could send its database login to another server; remove it from enrolled pods"
        )
    if spec.get("dnsPolicy") == "None":
        problems.append(
            "spec.dnsPolicy: None lets the pod choose the resolver the sidecar asks for the database's "
            "address; use ClusterFirst (the default) in enrolled pods"
        )
    dns = spec.get("dnsConfig") or {}
    if dns.get("nameservers") or dns.get("searches"):
        problems.append(
            "spec.dnsConfig.nameservers/searches change how the sidecar resolves the database's name; "
            "remove them from enrolled pods (dnsConfig.options are fine)"
        )
    return problems


def _volume_claims(volume: Mapping[str, Any], *, audience: str) -> list[str]:
    name = volume.get("name")
    if name in DBGOV_VOLUMES:
        return [f"volume {name!r}: the name is the one the webhook gives the dbgov sidecar's own volume"]
    sources = (volume.get("projected") or {}).get("sources") or []
    if any((s.get("serviceAccountToken") or {}).get("audience") == audience for s in sources):
        return [
            f"volume {name!r} projects a ServiceAccount token for audience {audience!r}, the dbgov "
            "sidecar's: with it a container could ask for the pod's database credentials itself, "
            "bypassing the proxy; only the sidecar presents that audience"
        ]
    return []


def injected(pod: Mapping[str, Any]) -> bool:
    """Whether ``pod`` (stored, so admitted through the webhook) carries the dbgov sidecar."""
    meta = pod.get("metadata") or {}
    if (meta.get("annotations") or {}).get(annotations.STATUS) == annotations.STATUS_INJECTED:
        return True
    return _sidecar_of(pod) is not None


def update_problems(
    old: Mapping[str, Any],
    new: Mapping[str, Any],
    *,
    enforce: bool,
    allow_debug: bool,
) -> list[str]:
    """Why a pod UPDATE (main resource, ``ephemeralcontainers`` or ``resize``) must be refused.

    ``dbgov.io/`` labels and annotations never change after CREATE (they decide enrollment, the
    bundle and the database). Of an injected pod: the sidecar, its volumes and the app containers'
    environment stay as admitted, and an ephemeral container may neither mount the sidecar's
    volumes nor join its process namespace; in an enforced namespace (``enforce``) none is added
    unless the chart allows debug containers (``allow_debug``)."""
    problems = _metadata_changes(old, new)
    if not injected(old):
        return problems
    problems += _sidecar_changes(old, new)
    problems += _volume_changes(old, new)
    problems += _env_changes(old, new)
    problems += _ephemeral_problems(old, new, enforce=enforce, allow_debug=allow_debug)
    return problems


def _metadata_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    problems: list[str] = []
    for field, noun in (("labels", "label"), ("annotations", "annotation")):
        before = (old.get("metadata") or {}).get(field) or {}
        after = (new.get("metadata") or {}).get(field) or {}
        for key in sorted({*before, *after}):
            if key.startswith(f"{annotations.PREFIX}/") and before.get(key) != after.get(key):
                problems.append(
                    f"{noun} {key}: {_shown(before.get(key))} -> {_shown(after.get(key))}: dbgov's "
                    f"{noun}s on a pod are fixed when it is created (they decide its enrollment, bundle "
                    "and database); change the pod template and create a new pod"
                )
    return problems


def _shown(value: str | None) -> str:
    return "(none)" if value is None else repr(value)


def _sidecar_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    before = _sidecar_of(old)
    if before is None:
        return []
    after = _sidecar_of(new)
    if after is None:
        return [f"the {SIDECAR_NAME} container is removed: an enrolled pod keeps its dbgov sidecar"]
    changed = sorted(k for k in {*before, *after} if before.get(k) != after.get(k))
    if not changed:
        return []
    detail = ", ".join(
        f"image {before.get('image')!r} -> {after.get('image')!r}" if k == "image" else k for k in changed
    )
    return [
        f"the {SIDECAR_NAME} container changes ({detail}): the dbgov sidecar stays as the webhook "
        "injected it (another image would hold the pod's dbgov token and get its database credentials); "
        "roll out a new pod instead"
    ]


def _volume_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    def ours(pod: Mapping[str, Any]) -> dict[str, Any]:
        volumes = (pod.get("spec") or {}).get("volumes") or []
        return {v.get("name"): v for v in volumes if v.get("name") in DBGOV_VOLUMES}

    before, after = ours(old), ours(new)
    return [
        f"volume {name!r} changes: it is the dbgov sidecar's, as the webhook made it"
        for name in sorted(before)
        if before[name] != after.get(name)
    ]


def _env_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Changes to the app containers' environment (Kubernetes refuses them in pod updates today;
    checked so that a future API allowing them cannot point an app past the proxy)."""
    after = {c.get("name"): c for _, c in _named_containers(new.get("spec") or {})}
    problems: list[str] = []
    for kind, container in _named_containers(old.get("spec") or {}):
        name = container.get("name")
        if name == SIDECAR_NAME or kind == "ephemeral":
            continue
        other = after.get(name) or {}
        for field in ("env", "envFrom"):
            if (container.get(field) or []) != (other.get(field) or []):
                problems.append(
                    f"{kind} container {name!r}: {field} changes; the webhook pointed the app at the "
                    "dbgov proxy when the pod was created, and it stays so"
                )
    return problems


def _ephemeral_problems(
    old: Mapping[str, Any], new: Mapping[str, Any], *, enforce: bool, allow_debug: bool
) -> list[str]:
    existing = {c.get("name") for c in (old.get("spec") or {}).get("ephemeralContainers") or []}
    problems: list[str] = []
    for container in (new.get("spec") or {}).get("ephemeralContainers") or []:
        name = container.get("name")
        if name in existing:
            continue
        where = f"ephemeral container {name!r}"
        if enforce and not allow_debug:
            problems.append(
                f"{where}: this namespace is labelled {annotations.ENFORCE}=true and the platform does "
                "not allow debug containers in its pods (chart value sidecar.allowDebugContainers)"
            )
        for mount in container.get("volumeMounts") or []:
            if mount.get("name") in DBGOV_VOLUMES:
                problems.append(
                    f"{where} mounts volume {mount['name']!r}, the dbgov sidecar's (its token or policy "
                    "bundle): only the sidecar mounts it"
                )
        if container.get("targetContainerName") == SIDECAR_NAME:
            problems.append(
                f"{where} targets {SIDECAR_NAME}: it would share the sidecar's process namespace and "
                "could read its token and database credentials through /proc; target the app's container"
            )
    return problems


def _sidecar_of(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    init = (pod.get("spec") or {}).get("initContainers") or []
    return next((c for c in init if c.get("name") == SIDECAR_NAME), None)


def _named_containers(spec: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """Every container of a pod spec with its kind (``init``, ``app``, ``ephemeral``)."""
    kinds = (("initContainers", "init"), ("containers", "app"), ("ephemeralContainers", "ephemeral"))
    return [(kind, c) for field, kind in kinds for c in spec.get(field) or []]


def rewrite_database_url(url: str, *, port: int) -> str | None:
    """Point a ``postgres://`` URL at the loopback proxy; ``None`` if it is not such a URL.

    Credentials, database and options are kept; host/port move to the proxy, and the encryption
    settings become what ``LOOPBACK_TLS_ENV`` gives their variables (``sslmode``,
    ``channel_binding``, ``gssencmode`` ``disable``; ``sslnegotiation`` ``postgres``) because the
    hop to the proxy never leaves the pod (the proxy speaks TLS to the real database)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        return None
    userinfo, _, _hosts = parts.netloc.rpartition("@")
    netloc = f"{userinfo}@{LOOPBACK}:{port}" if userinfo else f"{LOOPBACK}:{port}"
    query = [
        (key, LOOPBACK_URL_TLS.get(key, value))
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if key not in ("host", "hostaddr", "port")
    ]
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), parts.fragment)
    )


def upstream_files(url: str) -> list[tuple[str, str]]:
    """The TLS files, as ``(parameter, path)``, that the sidecar opens for upstream ``url``.

    As ``dbgov proxy`` reads its URL: nothing under ``sslmode=disable``; ``sslrootcert`` only when
    it verifies the server (``verify-ca``, ``verify-full``, and ``require`` given a root CA, as
    libpq); ``sslcert`` and ``sslkey`` under every other mode, including its default, ``prefer``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        return []
    query = dict(urllib.parse.parse_qsl(parts.query))  # the sidecar's parse: the last value wins
    return [(key, query[key]) for key in _opened_keys(query.get("sslmode", "prefer")) if query.get(key)]


def _opened_keys(sslmode: str) -> list[str]:
    """The file parameters the sidecar opens under ``sslmode``."""
    if sslmode == "disable":
        return []
    keys = ["sslcert", "sslkey"]
    if sslmode in ("verify-ca", "verify-full", "require"):  # require + a root CA = verify-ca
        keys.insert(0, "sslrootcert")
    return keys


_NO_UPSTREAM_ENFORCED = (
    f"this namespace is labelled {annotations.ENFORCE}=true, so every pod in it runs behind the "
    "dbgov sidecar, and this pod names no database for it: no app container sets PGHOST in env, "
    f"no {annotations.DATABASE_URL_ENV} names a URL variable and no {annotations.DATABASE} names a "
    "Database. Set one of them, or ask the platform team to run the pod in a namespace without "
    "enforcement"
)


def _check_database(database: str | None, *, bound: Collection[str]) -> None:
    """Refuse a ``dbgov.io/database`` that no policy binding the pod names: its bundle file would
    hold another database's policies while the pod's upstream stays its own database."""
    if database is None or database in bound:
        return
    named = ", ".join(sorted(bound)) or "none"
    raise InjectionRefused(
        annotation=annotations.DATABASE,
        reason=(
            f"names Database {database!r}, but no DatabaseAccessPolicy binding this pod (by its "
            f"ServiceAccount or a podSelector) names it in databaseRef (they name: {named}); "
            "a pod may only use a database its policies are written for: name one of those, or "
            "ask the policy owners to bind this pod"
        ),
    )


def _image(pod_annotations: Mapping[str, str], sidecar: settings.SidecarSettings) -> str:
    wanted = pod_annotations.get(annotations.SIDECAR_IMAGE)
    if not wanted or wanted == sidecar.image or sidecar.allow_image_override:
        return wanted or sidecar.image
    raise InjectionRefused(
        annotation=annotations.SIDECAR_IMAGE,
        reason=(
            f"names image {wanted!r}, but the sidecar image is pinned by the platform to "
            f"{sidecar.image!r} (chart value image.sidecar); remove the annotation, or ask the "
            "platform team to set sidecar.allowImageOverride"
        ),
    )


def _overrides(pod_annotations: Mapping[str, str], sidecar: settings.SidecarSettings) -> _Overrides:
    resources: Mapping[str, Any] = sidecar.resources
    raw = pod_annotations.get(annotations.SIDECAR_RESOURCES)
    if raw is not None:
        resources = narrow_resources(sidecar.resources, _parse_resources(raw))
    return _Overrides(
        image=_image(pod_annotations, sidecar),
        resources=resources,
        proxy_port=_port(pod_annotations, annotations.PROXY_PORT, default=sidecar.proxy_port),
        metrics_port=_port(pod_annotations, annotations.SIDECAR_METRICS_PORT, default=sidecar.metrics_port),
        database=pod_annotations.get(annotations.DATABASE) or None,
        url_env=pod_annotations.get(annotations.DATABASE_URL_ENV) or None,
    )


def _port(pod_annotations: Mapping[str, str], key: str, *, default: int) -> int:
    raw = pod_annotations.get(key)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) < 65536:
        raise InjectionRefused(annotation=key, reason=f"not a port number: {raw!r}")
    return int(raw)


def _check_ports(spec: Mapping[str, Any], overrides: _Overrides) -> None:
    """Refuse a pod in which the sidecar's metrics server could not bind its port.

    It listens on every interface, so a port the pod's own containers declare, or the proxy's
    own port, would leave the sidecar or the app failing to start after admission; refusing
    now says which annotation to change instead."""
    port = overrides.metrics_port
    fix = f"set {annotations.SIDECAR_METRICS_PORT} on the pod to a free port"
    if port == overrides.proxy_port:
        raise InjectionRefused(
            annotation=annotations.SIDECAR_METRICS_PORT,
            reason=f"port {port} is also the proxy's port ({annotations.PROXY_PORT}); {fix}",
        )
    for container in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for declared in container.get("ports") or []:
            if declared.get("containerPort") == port and declared.get("protocol", "TCP") == "TCP":
                raise InjectionRefused(
                    annotation=annotations.SIDECAR_METRICS_PORT,
                    reason=(
                        f"port {port} is declared by container {container.get('name')!r}, and "
                        f"the dbgov sidecar serves its metrics and health checks there; {fix} "
                        "(the default is the chart value sidecar.metricsPort)"
                    ),
                )


def _parse_resources(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InjectionRefused(annotation=annotations.SIDECAR_RESOURCES, reason=f"not JSON: {err}") from err
    shape = 'expected a JSON object with only "requests" and "limits", each naming quantities'
    if not isinstance(value, dict) or not set(value) <= {"requests", "limits"}:
        raise InjectionRefused(annotation=annotations.SIDECAR_RESOURCES, reason=shape)
    for group in value.values():
        if not isinstance(group, dict) or not all(isinstance(q, str | int) for q in group.values()):
            raise InjectionRefused(annotation=annotations.SIDECAR_RESOURCES, reason=shape)
    return value


_SUFFIXES = {
    **{s: decimal.Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: decimal.Decimal(1000) ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "m": decimal.Decimal("0.001"),
    "": decimal.Decimal(1),
}


def quantity(raw: str | int) -> decimal.Decimal:
    """A Kubernetes resource quantity (``100m``, ``64Mi``, ``1.5``, ``1e3``) as a number."""
    text = str(raw).strip()
    suffix = next((s for s in sorted(_SUFFIXES, key=len, reverse=True) if s and text.endswith(s)), "")
    try:
        number = decimal.Decimal(text.removesuffix(suffix) if suffix else text)
    except decimal.InvalidOperation as err:
        raise ValueError(f"not a quantity: {raw!r}") from err
    if not number.is_finite() or number < 0:
        raise ValueError(f"not a quantity: {raw!r}")
    return number * _SUFFIXES[suffix]


def narrow_resources(chart: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """The chart's resources with a pod's narrowing applied, or a refusal naming what widens them.

    A limit may be lowered, never raised above or removed from the chart's; a resource the chart
    leaves unlimited may get a limit; a request may not exceed the resulting limit."""
    limits = {**(chart.get("limits") or {}), **(wanted.get("limits") or {})}
    requests = {**(chart.get("requests") or {}), **(wanted.get("requests") or {})}
    problems: list[str] = []
    try:
        for name, bound in (chart.get("limits") or {}).items():
            if quantity(limits[name]) > quantity(bound):
                problems.append(f"limits.{name} {limits[name]} is above the platform's {bound}")
        for name, value in requests.items():
            if name in limits and quantity(value) > quantity(limits[name]):
                problems.append(f"requests.{name} {value} is above its limit {limits[name]}")
    except ValueError as err:
        raise InjectionRefused(annotation=annotations.SIDECAR_RESOURCES, reason=str(err)) from err
    if problems:
        raise InjectionRefused(
            annotation=annotations.SIDECAR_RESOURCES,
            reason=(
                "may only narrow the sidecar's resources (chart value sidecar.resources): "
                + "; ".join(problems)
            ),
        )
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class _Found:
    var: Mapping[str, Any]
    """An app variable the sidecar's upstream is built from, as the pod had it."""
    container: Mapping[str, Any]
    """The first app container (init containers first) that sets it."""


def _repoint_apps(spec: dict[str, Any], overrides: _Overrides) -> _Repointed:
    """Point every app container at the proxy; say what the sidecar's upstream is."""
    url: _Found | None = None
    pg: dict[str, _Found] = {}
    differing: set[str] = set()
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    for container in containers:
        env: list[dict[str, Any]] = container.setdefault("env", [])
        _refuse_gss_encryption(container, env)
        for var in env:
            name = var.get("name", "")
            if name in ("PGHOST", "PGPORT", *PG_TLS_ENV) and name not in pg:
                pg[name] = _Found(var=dict(var), container=container)
            elif name in PG_TLS_ENV and pg[name].container is not container and pg[name].var != var:
                differing.add(name)
        _set_env(env, "PGHOST", LOOPBACK)
        _set_env(env, "PGPORT", str(overrides.proxy_port))
        for var in env:
            if overrides.url_env is not None and var.get("name") == overrides.url_env:
                if url is None:
                    url = _Found(var=dict(var), container=container)
                _repoint_url(var, port=overrides.proxy_port)
    warnings: list[str] = []
    if overrides.url_env is not None and url is None:
        warnings.append(
            f"{annotations.DATABASE_URL_ENV}: no container sets {overrides.url_env} in env; "
            "it was left unchanged (variables from envFrom cannot be rewritten)"
        )
    if url is not None:
        return _Repointed(
            upstream=[_renamed(url.var, "DBGOV_UPSTREAM")],
            files=_url_files(url, variable=overrides.url_env or ""),
            warnings=tuple(warnings),
        )
    if "PGHOST" not in pg:
        warnings.append(
            "no app container sets PGHOST in env and no dbgov.io/database-url-env names a URL: the "
            "dbgov sidecar has no database to connect to and will not start (set PGHOST, or annotate "
            f"{annotations.DATABASE_URL_ENV} with the variable holding the app's database URL)"
        )
        return _Repointed(upstream=[], files=(), warnings=tuple(warnings))
    for container in containers:
        _disable_loopback_tls(container["env"])
    warnings += [
        f"{name}: app containers set it differently, and the dbgov sidecar has one upstream for the "
        f"pod: it got the value of container {pg[name].container.get('name')!r}"
        for name in PG_TLS_ENV
        if name in differing
    ]
    files, unseen = _env_files(pg)
    return _Repointed(upstream=_upstream(pg), files=files, warnings=(*warnings, *unseen))


def _refuse_gss_encryption(container: Mapping[str, Any], env: list[dict[str, Any]]) -> None:
    """An app that requires GSSAPI encryption to its database cannot be proxied: the sidecar would
    connect with less (it encrypts with TLS only), so the pod is refused rather than downgraded."""
    for var in env:
        if var.get("name") == "PGGSSENCMODE" and var.get("value") == "require":
            raise InjectionRefused(
                annotation=None,
                reason=(
                    f"PGGSSENCMODE=require in container {container.get('name')!r}: the dbgov sidecar "
                    "does not speak GSSAPI encryption to the database; encrypt with TLS instead "
                    "(PGSSLMODE=verify-full), which the sidecar carries to its upstream"
                ),
            )


def _disable_loopback_tls(env: list[dict[str, Any]]) -> None:
    """Turn off TLS for the app's hop to the proxy, once its settings are the sidecar's upstream.

    Only then: with a URL upstream they are not carried, and an app that works again on
    loopback would have the sidecar connect with less than it asked for."""
    for name, value in LOOPBACK_TLS_ENV.items():
        if any(var.get("name") == name for var in env):  # left unset, libpq's default works
            _set_env(env, name, value)


def _url_files(url: _Found, *, variable: str) -> tuple[_UpstreamFile, ...]:
    """The TLS files a literal upstream URL has the sidecar open (none for a Secret's URL)."""
    if "valueFrom" in url.var:
        return ()
    name = url.container.get("name")
    return tuple(
        _UpstreamFile(
            path=path,
            container=url.container,
            where=f"{variable} in container {name!r} names {key}={path}",
            annotation=annotations.DATABASE_URL_ENV,
        )
        for key, path in upstream_files(str(url.var.get("value", "")))
    )


def _env_files(pg: Mapping[str, _Found]) -> tuple[tuple[_UpstreamFile, ...], tuple[str, ...]]:
    """The TLS files the app's PGSSL* variables have the sidecar open, and warnings for those
    whose paths come from a Secret or ConfigMap (the webhook cannot see them to mount them)."""
    mode = pg.get("PGSSLMODE")
    sslmode = "prefer"  # libpq's default, and the sidecar's
    if mode is not None and "valueFrom" in mode.var:
        sslmode = "verify-full"  # unknown here: as if it opened every file, so none goes unmounted
    elif mode is not None and mode.var.get("value"):
        sslmode = str(mode.var["value"])
    files: list[_UpstreamFile] = []
    warnings: list[str] = []
    for name, key in PG_TLS_ENV.items():
        found = pg.get(name)
        if found is None or key not in _opened_keys(sslmode):
            continue
        where = f"{name} in container {found.container.get('name')!r}"
        if "valueFrom" in found.var:
            warnings.append(
                f"{where} comes from valueFrom, so the webhook cannot see the path and gives the "
                "dbgov sidecar no volume for it; the sidecar opens it in its own container (set it to "
                "a literal path under a volumeMount and the webhook mounts that volume into the sidecar)"
            )
        elif found.var.get("value"):
            path = str(found.var["value"])
            files.append(
                _UpstreamFile(
                    path=path, container=found.container, where=f"{where} names {path}", annotation=None
                )
            )
    return tuple(files), tuple(warnings)


def _upstream_file_mounts(
    files: tuple[_UpstreamFile, ...], *, volumes: list[Mapping[str, Any]]
) -> list[VolumeMount]:
    """Give the sidecar, read-only, the app's volume mounts that hold the TLS files it opens.

    The sidecar opens them in its own container, at the same paths. A file no mount of the app
    container holds (in its image, say) cannot be given: the sidecar would fail to start and the
    pod never become ready, so the pod is refused with what to change instead."""
    mounts: list[VolumeMount] = []
    for file in files:
        mount = _sidecar_mount(file, volumes=volumes)
        if any(m["mountPath"] == mount["mountPath"] and m != mount for m in mounts):
            # Only with files named by different containers, each mounting its own volume there.
            raise InjectionRefused(
                annotation=file.annotation,
                reason=(
                    f"{file.where}, held by volumeMount {mount['name']!r} at {mount['mountPath']}, "
                    "where the sidecar already gets another container's volumeMount for another TLS "
                    "file; keep the files in one volume, mounted alike in the containers that name them"
                ),
            )
        if mount not in mounts:
            mounts.append(mount)
    return mounts


def _sidecar_mount(file: _UpstreamFile, *, volumes: list[Mapping[str, Any]]) -> VolumeMount:
    """The app's mount holding ``file``, as the sidecar gets it; refuse the pod without one."""
    found = _holding_mount(file.path, file.container.get("volumeMounts") or [])
    problem = _unmountable(file.path, found, volumes=volumes)
    if problem is not None or found is None:  # _unmountable says why when found is None
        raise InjectionRefused(annotation=file.annotation, reason=f"{file.where}, {problem}")
    mount: VolumeMount = {"name": found["name"], "mountPath": found["mountPath"], "readOnly": True}
    if found.get("subPath"):
        mount["subPath"] = found["subPath"]
    return mount


def _holding_mount(path: str, mounts: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The mount whose mountPath holds ``path`` (the longest, as a nested mount hides its parent)."""
    best: Mapping[str, Any] | None = None
    best_length = -1
    target = posixpath.normpath(path)
    for mount in mounts:
        root = posixpath.normpath(mount.get("mountPath") or "")
        holds = target == root or target.startswith(root.rstrip("/") + "/")
        if holds and root.startswith("/") and len(root) > best_length:
            best, best_length = mount, len(root)
    return best


def _unmountable(
    path: str, mount: Mapping[str, Any] | None, *, volumes: list[Mapping[str, Any]]
) -> str | None:
    """Why the sidecar cannot be given ``path`` through ``mount`` (``None``: it can)."""
    if not path.startswith("/"):
        hint = ""
        if path == "system":
            hint = " (sslrootcert=system is libpq's; without sslrootcert the sidecar uses its system trust store)"
        return (
            "not an absolute path: the dbgov sidecar reads it in its own container, from another "
            f"working directory; name the absolute path of a file mounted from a volume{hint}"
        )
    if mount is None:
        return (
            "which no volumeMount of that container holds (is it in the image?): the dbgov sidecar "
            "connects to the database from its own container and reads the file there; mount it "
            "into that container from a volume (a Secret or ConfigMap) and the webhook mounts the "
            "same volume, read-only, into the sidecar"
        )
    if mount.get("subPathExpr"):
        return (
            f"held by volumeMount {mount.get('name')!r}, whose subPathExpr expands that container's "
            "own variables, which the sidecar does not have; use subPath, or mount the whole volume"
        )
    if posixpath.normpath(mount["mountPath"]) in (TOKEN_DIR, POLICY_DIR):
        return f"held by a volumeMount at {mount['mountPath']}, where the sidecar mounts its own files; mount it elsewhere"
    if any(v.get("name") == mount.get("name") and "emptyDir" in v for v in volumes):
        # The sidecar opens its TLS files as it starts, and it starts first: the kubelet runs the
        # pod's other containers only once its startup probe passes, so none can have written them.
        return (
            f"held by volumeMount {mount.get('name')!r} of an emptyDir volume, which is empty when the "
            "sidecar reads it: it is the pod's first container and starts before any other could "
            "write the file; mount it from a Secret, ConfigMap, projected or CSI volume"
        )
    return None


def _upstream(pg: Mapping[str, _Found]) -> list[EnvVar]:
    """The sidecar's DBGOV_UPSTREAM built from the app's PGHOST/PGPORT and TLS variables."""
    port: EnvVar = {"name": "DBGOV_UPSTREAM_PGPORT", "value": "5432"}
    if "PGPORT" in pg:
        port = _renamed(pg["PGPORT"].var, "DBGOV_UPSTREAM_PGPORT")
    # $(VAR) expands variables defined earlier in the same container, even from Secrets.
    composed = "postgresql://$(DBGOV_UPSTREAM_PGHOST):$(DBGOV_UPSTREAM_PGPORT)"
    renamed: list[EnvVar] = []
    query: list[str] = []
    for name, key in PG_TLS_ENV.items():
        var = pg[name].var if name in pg else {}
        if "valueFrom" in var:
            # The kubelet expands $(VAR) verbatim: a value with & # + or % would be misread.
            renamed.append(_renamed(var, f"DBGOV_UPSTREAM_{name}"))
            query.append(f"{key}=$(DBGOV_UPSTREAM_{name})")
        elif var.get("value"):
            # Percent-encoded, so no $ is left for the kubelet to expand either.
            query.append(f"{key}={urllib.parse.quote(str(var['value']), safe='/')}")
    if query:
        composed += "?" + "&".join(query)
    host = _renamed(pg["PGHOST"].var, "DBGOV_UPSTREAM_PGHOST")
    if ":" in host.get("value", "") and not host["value"].startswith("["):
        host["value"] = f"[{host['value']}]"  # an IPv6 address, as a URL names its host
    return [
        host,
        port,
        *renamed,
        {"name": "DBGOV_UPSTREAM", "value": composed},
    ]


def _set_env(env: list[dict[str, Any]], name: str, value: str) -> None:
    """Set ``name`` to ``value`` (replacing its entry, or appended)."""
    for index, var in enumerate(env):
        if var.get("name") == name:
            env[index] = {"name": name, "value": value}
            return
    env.append({"name": name, "value": value})


def _repoint_url(var: dict[str, Any], *, port: int) -> None:
    rewritten = rewrite_database_url(var["value"], port=port) if "value" in var else None
    # A URL from a Secret cannot be edited in place: the sidecar gets the reference, and the
    # app gets a URL for the proxy that names no database (the proxy serves one upstream).
    var.pop("valueFrom", None)
    var["value"] = rewritten or f"postgresql://{LOOPBACK}:{port}"


def _renamed(var: Mapping[str, Any], name: str) -> EnvVar:
    renamed: EnvVar = {"name": name}
    if "valueFrom" in var:
        renamed["valueFrom"] = copy.deepcopy(var["valueFrom"])
    else:
        renamed["value"] = str(var.get("value", ""))
    return renamed


def _sidecar_container(
    *,
    overrides: _Overrides,
    upstream: list[EnvVar],
    sidecar: settings.SidecarSettings,
    endpoint: CredentialEndpoint | None,
) -> Container:
    env: list[EnvVar] = [
        {"name": "DBGOV_LISTEN", "value": f"{LOOPBACK}:{overrides.proxy_port}"},
        # Every interface, not loopback: the kubelet probes the pod IP. It serves only counters
        # and health, never data; the proxy itself stays on loopback.
        {"name": "DBGOV_METRICS", "value": f"{ALL_INTERFACES}:{overrides.metrics_port}"},
        {"name": "DBGOV_POLICY", "value": f"{POLICY_DIR}/{_policy_file(overrides.database)}"},
        {"name": "DBGOV_TOKEN_FILE", "value": f"{TOKEN_DIR}/token"},
        {"name": "DBGOV_TOKEN_AUDIENCE", "value": sidecar.token_audience},
        _field_env("DBGOV_POD_NAME", "metadata.name"),
        _field_env("DBGOV_POD_NAMESPACE", "metadata.namespace"),
        _field_env("DBGOV_POD_UID", "metadata.uid"),
        _field_env("DBGOV_SERVICE_ACCOUNT", "spec.serviceAccountName"),
    ]
    if overrides.database is not None:
        env.append({"name": "DBGOV_DATABASE", "value": overrides.database})
    if endpoint is not None:
        env.extend(_endpoint_env(endpoint))
    return {
        "name": SIDECAR_NAME,
        "image": overrides.image,
        "args": ["proxy"],
        "restartPolicy": "Always",
        "env": [*env, *upstream],
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": overrides.metrics_port, "protocol": "TCP"}],
        # A native sidecar counts as started when its startup probe passes: only then does the
        # kubelet start the app, so its first connection finds the proxy listening and ready.
        "startupProbe": _probe("/readyz", period=1, failures=120),
        # Out of the Service's endpoints while the proxy cannot serve (no policy loaded yet, audit
        # sink failing under fail-closed, shutting down): the sidecar's /readyz says why.
        "readinessProbe": _probe("/readyz", period=5, failures=2),
        "livenessProbe": _probe("/healthz", period=10, failures=3),
        "resources": copy.deepcopy(dict(overrides.resources)),
        # PodSecurity "restricted" holds for the sidecar whatever the pod sets: every field that
        # level checks on a container is set here, so an enrolled pod passes where its app does.
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": SIDECAR_UID,
            "runAsGroup": SIDECAR_UID,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
        ],
    }


def _endpoint_env(endpoint: CredentialEndpoint) -> list[EnvVar]:
    """The credential endpoint and its CA for the sidecar. The CA travels in the pod spec: the
    operator's namespace is not the pod's, and a CA bundle is public."""
    env: list[EnvVar] = [
        {"name": "DBGOV_CREDENTIAL_URL", "value": endpoint.url},
        {"name": "DBGOV_CREDENTIAL_CA", "value": endpoint.ca_pem},
    ]
    if endpoint.bundle_key:
        env.append({"name": "DBGOV_BUNDLE_KEY", "value": endpoint.bundle_key})
    return env


def _policy_file(database: str | None) -> str:
    # Same names as bundle.database_key; kept here so injection stays free of the compiler.
    return f"policy.{database}.yaml" if database else POLICY_KEY


def _probe(path: str, *, period: int, failures: int) -> Probe:
    return {
        "httpGet": {"path": path, "port": METRICS_PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
    }


def _field_env(name: str, path: str) -> EnvVar:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _volumes(
    *, sidecar: settings.SidecarSettings, bundle: str, key: str, signed: bool = False
) -> list[Volume]:
    token: Volume = {
        "name": TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": sidecar.token_audience,
                        "expirationSeconds": sidecar.token_expiration_seconds,
                        "path": "token",
                    }
                }
            ]
        },
    }
    # Fail closed without trusting the sidecar to: the kubelet will not start the pod until
    # the operator has written this ConfigMap *with this key* (it does so for every enrolled
    # pod's ServiceAccount and database as soon as the pod exists), so the proxy never runs
    # without its policy. Later bundle changes still reach the mounted file.
    policy: Volume = {
        "name": POLICY_VOLUME,
        "configMap": {
            "name": bundle,
            "optional": False,
            "items": [{"key": k, "path": k} for k in (key, *([f"{key}.sig"] if signed else []))],
        },
    }
    return [token, policy]
