"""Kubernetes payload shapes the operator builds, as TypedDicts (field names as on the wire).

Objects the operator only reads (pods under admission, custom resources) stay plain mappings:
the apiserver validated them, and we copy them rather than re-declare every field.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class ObjectFieldSelector(TypedDict):
    fieldPath: str


class EnvVarSource(TypedDict, total=False):
    fieldRef: ObjectFieldSelector
    secretKeyRef: dict[str, Any]
    configMapKeyRef: dict[str, Any]


class EnvVar(TypedDict):
    name: str
    value: NotRequired[str]
    valueFrom: NotRequired[EnvVarSource]


class VolumeMount(TypedDict):
    name: str
    mountPath: str
    readOnly: NotRequired[bool]
    subPath: NotRequired[str]


class Capabilities(TypedDict):
    drop: list[str]


class SeccompProfile(TypedDict):
    type: Literal["RuntimeDefault", "Localhost", "Unconfined"]


class SecurityContext(TypedDict):
    allowPrivilegeEscalation: bool
    privileged: bool
    readOnlyRootFilesystem: bool
    runAsNonRoot: bool
    runAsUser: int
    runAsGroup: int
    capabilities: Capabilities
    seccompProfile: SeccompProfile


class ContainerPort(TypedDict):
    name: str
    containerPort: int
    protocol: Literal["TCP"]


class HTTPGetAction(TypedDict):
    path: str
    port: str
    """A port number or, as here, the name of one of the container's ports."""


class Probe(TypedDict):
    httpGet: HTTPGetAction
    periodSeconds: int
    failureThreshold: int


class Container(TypedDict):
    name: str
    image: str
    args: list[str]
    restartPolicy: Literal["Always"]
    env: list[EnvVar]
    ports: list[ContainerPort]
    startupProbe: Probe
    readinessProbe: Probe
    livenessProbe: Probe
    resources: dict[str, Any]
    securityContext: SecurityContext
    volumeMounts: list[VolumeMount]


class ServiceAccountTokenProjection(TypedDict):
    audience: str
    expirationSeconds: int
    path: str


class VolumeProjection(TypedDict):
    serviceAccountToken: ServiceAccountTokenProjection


class ProjectedVolumeSource(TypedDict):
    sources: list[VolumeProjection]


class KeyToPath(TypedDict):
    key: str
    path: str


class ConfigMapVolumeSource(TypedDict):
    name: str
    optional: bool
    items: list[KeyToPath]


class Volume(TypedDict):
    name: str
    projected: NotRequired[ProjectedVolumeSource]
    configMap: NotRequired[ConfigMapVolumeSource]


class OwnerReference(TypedDict):
    apiVersion: str
    kind: str
    name: str
    uid: str


class ObjectMeta(TypedDict):
    name: str
    namespace: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ownerReferences: NotRequired[list[OwnerReference]]


class ConfigMap(TypedDict):
    apiVersion: Literal["v1"]
    kind: Literal["ConfigMap"]
    metadata: ObjectMeta
    data: dict[str, str]


class Condition(TypedDict):
    type: str
    status: Literal["True", "False", "Unknown"]
    observedGeneration: int
    lastTransitionTime: str
    reason: str
    message: str


class BoundWorkload(TypedDict):
    kind: Literal["ServiceAccount"]
    name: str
    serviceAccount: str


class PolicyStatus(TypedDict):
    observedGeneration: int
    conditions: list[Condition]
    boundWorkloads: int
    """How many workloads the policy is in effect for (the Workloads printer column)."""
    workloads: list[BoundWorkload]
