"""Label and annotation keys dbgov reads or writes on Kubernetes objects.

These keys are a public API: users put them on pod templates and platform tooling matches on
them, so they are defined once, here, each with what it means and who writes it.
"""

from typing import Final

PREFIX: Final = "dbgov.io"
"""The domain every dbgov label and annotation key lives under."""

INJECT: Final = f"{PREFIX}/inject"
"""Pod label, set by users: ``"true"`` enrolls the pod; the webhook adds the dbgov sidecar.

In a namespace labelled :data:`ENFORCE` the label is not the pod's choice: every pod is injected
(the webhook sets it to ``"true"``), and ``"false"`` is ignored with a warning. Every injected pod
carries it, and it selects the pods whose updates the operator validates: once a pod exists, no
``dbgov.io/`` label or annotation of it may be added, changed or removed."""

INJECT_ENABLED: Final = "true"
"""The only value of :data:`INJECT` that enrolls a pod."""

ENFORCE: Final = f"{PREFIX}/enforce"
"""Namespace label, set by cluster admins (the platform team), never by workloads: ``"true"``
makes the sidecar mandatory for every pod created in the namespace. A pod there cannot opt out
with :data:`INJECT`; one the webhook cannot inject is refused, not admitted without its sidecar.
Namespace labels are cluster-scoped writes, so a namespace's own users cannot remove it."""

ENFORCE_ENABLED: Final = "true"
"""The only value of :data:`ENFORCE` that enforces injection."""

NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"
"""Namespace label the apiserver sets to the namespace's name: the webhook configurations'
namespaceSelector excludes system namespaces and the operator's own by it."""

STATUS: Final = f"{PREFIX}/status"
"""Pod annotation, written by the webhook: ``"injected"`` once the sidecar was added.

Never trusted from the pod: the webhook runs once per CREATE, so an enrolled pod that arrives
with it (or with a container named ``dbgov-proxy``) made it itself and is refused."""

STATUS_INJECTED: Final = "injected"
"""The value of :data:`STATUS` on a pod the webhook has injected."""

DATABASE_URL_ENV: Final = f"{PREFIX}/database-url-env"
"""Pod annotation, set by users: the name of the app's environment variable that holds the
database URL (e.g. ``DATABASE_URL``). The webhook points it at the in-pod proxy and hands the
original value to the sidecar as its upstream, with read-only mounts of the app's volumes that hold
the TLS files a literal URL names (``sslrootcert``, ``sslcert``, ``sslkey``)."""

SIDECAR_IMAGE: Final = f"{PREFIX}/sidecar-image"
"""Pod annotation, set by users: another sidecar image for this pod. The image is the platform's
(chart value ``image.sidecar``, pinned by digest where possible): the pod is refused unless the
annotation names that same image or the chart sets ``sidecar.allowImageOverride``."""

SIDECAR_RESOURCES: Final = f"{PREFIX}/sidecar-resources"
"""Pod annotation, set by users: JSON ``{"requests": {...}, "limits": {...}}`` narrowing the
sidecar's resource requirements. Keys it names replace the chart's; a limit may only be lowered
(never above, nor removing, the chart's), and a request may not exceed its limit."""

DATABASE: Final = f"{PREFIX}/database"
"""Pod annotation, set by users: the name of the ``Database`` resource (same namespace) the
pod uses. The sidecar loads only the policies whose ``databaseRef`` names it, and connects to it
when the upstream is not given by :data:`DATABASE_URL_ENV`. It may only name a database that a
policy binding the pod (by ServiceAccount or podSelector) names; any other is refused, so a pod
cannot pick another database's laxer policy."""

PROXY_PORT: Final = f"{PREFIX}/proxy-port"
"""Pod annotation, set by users: the loopback port the proxy listens on (default 5432)."""

SIDECAR_METRICS_PORT: Final = f"{PREFIX}/sidecar-metrics-port"
"""Pod annotation, set by users: the port of the sidecar's ``/metrics``, ``/healthz`` and
``/readyz`` server (default 9187), for a pod whose own containers already use that port. It
listens on every interface of the pod (the kubelet probes it there) and is named
``dbgov-metrics`` in the sidecar's ``ports``."""

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
"""Standard label on objects the operator creates (policy bundle ConfigMaps)."""

MANAGED_BY_VALUE: Final = "dbgov"
"""The value of :data:`MANAGED_BY_LABEL` on objects dbgov owns."""

BUNDLE_SERVICE_ACCOUNT: Final = f"{PREFIX}/service-account"
"""ConfigMap label, written by the operator: the ServiceAccount a policy bundle is for."""

BUNDLE_POLICIES: Final = f"{PREFIX}/policies"
"""ConfigMap annotation, written by the operator: comma-separated names of the policies merged
into the bundle, in merge order."""

FINALIZER: Final = f"{PREFIX}/finalizer"
"""The finalizer kopf would put on the objects it handles. None of dbgov's objects keeps it:
policies' delete handlers are optional and Databases' timers are registered without it
(``kopf_timers``), so nothing is left Terminating once the operator is gone; kopf removes one
an older release left."""

LAST_HANDLED: Final = "last-handled-configuration"
"""The key (under :data:`PREFIX`) of the annotation where kopf keeps the last spec it handled
(its diff base), on policies and Databases."""

# -- Secrets a Database names from another namespace (docs/credentials.md) ------------------

SECRET_ALLOWED_NAMESPACES: Final = f"{PREFIX}/allowed-namespaces"
"""Annotation on an admin or CA Secret, written by the platform: the namespaces (comma-separated,
exact names) whose Databases may name it from another namespace."""

SECRET_HOST: Final = f"{PREFIX}/host"
"""Annotation on a cross-namespace admin Secret, written by the platform: the only ``spec.host``
it may be used with."""

SECRET_PORT: Final = f"{PREFIX}/port"
"""Annotation on a cross-namespace admin Secret, written by the platform: the only ``spec.port``
it may be used with."""

SECRET_DBNAME: Final = f"{PREFIX}/dbname"
"""Annotation on a cross-namespace admin Secret, written by the platform: the only
``spec.dbname`` it may be used with."""

SECRET_MIN_SSLMODE: Final = f"{PREFIX}/min-sslmode"
"""Annotation on a cross-namespace admin Secret, written by the platform: the weakest
``spec.sslmode`` it may be used with (default ``verify-full``: without it a network attacker
could relay the admin's login)."""
