"""The few Kubernetes API calls the operator makes, over the official client.

Kept behind one small class so the reconciler reads as data in, data out, and unit tests can
substitute an in-memory fake; e2e tests run it against a real apiserver.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import kubernetes
from kubernetes.client.exceptions import ApiException

from dbgov_operator import annotations, bundle
from dbgov_operator.kubetypes import ConfigMap, PolicyStatus

GROUP = "dbgov.io"
VERSION = "v1alpha1"
POLICIES = "databaseaccesspolicies"
CLUSTER_POLICIES = "clusterdatabaseaccesspolicies"


class Conflict(Exception):
    """Someone else changed the object between our read and our write; retry from a fresh read."""


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing new can be created there, and nothing needs to."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyObject:
    """A DatabaseAccessPolicy as listed: what the reconciler needs, plus the raw body."""

    name: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    deleting: bool
    body: Mapping[str, Any] = field(repr=False)


class Api(Protocol):
    """What the reconciler needs from the cluster."""

    def list_policies(self, namespace: str) -> list[PolicyObject]: ...
    def list_workloads(self, namespace: str) -> list[bundle.Workload]: ...
    def list_bundles(self, namespace: str) -> dict[str, Mapping[str, Any]]: ...
    def write_bundle(self, desired: ConfigMap, *, existing: Mapping[str, Any] | None) -> None: ...
    def delete_bundle(self, *, namespace: str, name: str, resource_version: str | None) -> None: ...
    def list_service_accounts(self, namespace: str) -> dict[str, str]: ...
    def patch_policy_status(self, *, namespace: str, name: str, status: PolicyStatus) -> None: ...


class KubeApi:
    """:class:`Api` over ``kubernetes.client``."""

    def __init__(self, client: Any) -> None:
        # Plain dicts (our TypedDicts) go in and come out; the client's model classes would
        # only be converted back and forth, so its APIs are held untyped.
        self._core: Any = kubernetes.client.CoreV1Api(client)
        self._custom: Any = kubernetes.client.CustomObjectsApi(client)
        self._client = client

    def list_policies(self, namespace: str) -> list[PolicyObject]:
        listed = self._custom.list_namespaced_custom_object(GROUP, VERSION, namespace, POLICIES)
        return [policy_object(item) for item in listed.get("items", [])]

    def list_cluster_policies(self) -> list[PolicyObject]:
        """Every ClusterDatabaseAccessPolicy (cluster-scoped)."""
        try:
            listed = self._custom.list_cluster_custom_object(GROUP, VERSION, CLUSTER_POLICIES)
        except ApiException as err:
            if err.status == 404:
                return []  # the kind is not installed: there is no baseline to apply
            raise
        return [policy_object(item) for item in listed.get("items", [])]

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        """A namespace's labels, read now (None when it is gone): which cluster policies apply."""
        try:
            found = self._core.read_namespace(namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return dict(found.metadata.labels or {})

    def list_namespaces(self) -> dict[str, dict[str, str]]:
        """Every namespace's labels, by name (where a cluster policy's selector applies)."""
        listed = self._core.list_namespace()
        return {item.metadata.name: dict(item.metadata.labels or {}) for item in listed.items}

    def patch_cluster_policy_status(self, *, name: str, status: Mapping[str, Any]) -> None:
        try:
            self._custom.patch_cluster_custom_object_status(
                GROUP, VERSION, CLUSTER_POLICIES, name, {"status": dict(status)}
            )
        except ApiException as err:
            if err.status == 404:
                return  # deleted meanwhile: nothing left to report on
            raise

    def list_workloads(self, namespace: str) -> list[bundle.Workload]:
        selector = f"{annotations.INJECT}={annotations.INJECT_ENABLED}"
        pods = self._core.list_namespaced_pod(namespace, label_selector=selector)
        return [
            bundle.Workload(
                service_account=pod.spec.service_account_name or "default",
                labels=dict(pod.metadata.labels or {}),
                database=(pod.metadata.annotations or {}).get(annotations.DATABASE, ""),
            )
            for pod in pods.items
        ]

    def list_bundles(self, namespace: str) -> dict[str, Mapping[str, Any]]:
        selector = f"{annotations.MANAGED_BY_LABEL}={annotations.MANAGED_BY_VALUE}"
        listed = self._core.list_namespaced_config_map(namespace, label_selector=selector)
        return {
            item.metadata.name: self._client.sanitize_for_serialization(item)
            for item in listed.items
            if (item.metadata.labels or {}).get(annotations.BUNDLE_SERVICE_ACCOUNT)
        }

    def write_bundle(self, desired: ConfigMap, *, existing: Mapping[str, Any] | None) -> None:
        meta = desired["metadata"]
        try:
            if existing is None:
                try:
                    self._core.create_namespaced_config_map(meta["namespace"], dict(desired))
                except ApiException as err:
                    if err.status != 409:
                        raise
                    # There, but not listed as ours: someone removed its labels. Take it back.
                    found = self._core.read_namespaced_config_map(meta["name"], meta["namespace"])
                    taken: dict[str, Any] = {
                        **desired,
                        "metadata": {**meta, "resourceVersion": found.metadata.resource_version},
                    }
                    self._core.replace_namespaced_config_map(meta["name"], meta["namespace"], taken)
            else:
                version = (existing.get("metadata") or {}).get("resourceVersion")
                body: dict[str, Any] = {**desired, "metadata": {**meta, "resourceVersion": version}}
                self._core.replace_namespaced_config_map(meta["name"], meta["namespace"], body)
        except ApiException as err:
            if err.status == 409:
                raise Conflict(f"ConfigMap {meta['namespace']}/{meta['name']}") from err
            if err.status == 403 and "NamespaceTerminating" in str(err.body):
                raise NamespaceTerminating(meta["namespace"]) from err
            raise

    def delete_bundle(self, *, namespace: str, name: str, resource_version: str | None) -> None:
        # Only the version we judged unneeded: one rewritten meanwhile is judged again.
        options = {"preconditions": {"resourceVersion": resource_version}} if resource_version else None
        try:
            self._core.delete_namespaced_config_map(name, namespace, body=options)
        except ApiException as err:
            if err.status == 404:
                return
            if err.status == 409:
                raise Conflict(f"ConfigMap {namespace}/{name}") from err
            raise

    def list_service_accounts(self, namespace: str) -> dict[str, str]:
        """ServiceAccount name -> uid (a bundle's owner)."""
        listed = self._core.list_namespaced_service_account(namespace)
        return {item.metadata.name: item.metadata.uid for item in listed.items}

    def patch_policy_status(self, *, namespace: str, name: str, status: PolicyStatus) -> None:
        try:
            self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, POLICIES, name, {"status": dict(status)}
            )
        except ApiException as err:
            if err.status == 404:
                return  # deleted meanwhile: nothing left to report on
            raise


def policy_object(item: Mapping[str, Any]) -> PolicyObject:
    """A listed (Cluster)DatabaseAccessPolicy body as the reconciler sees it."""
    return PolicyObject(
        name=item["metadata"]["name"],
        generation=int(item["metadata"].get("generation") or 0),
        spec=item.get("spec") or {},
        status=item.get("status") or {},
        deleting=bool(item["metadata"].get("deletionTimestamp")),
        body=item,
    )


def bundle_service_account(config_map: Mapping[str, Any]) -> str | None:
    """The ServiceAccount a managed bundle ConfigMap is for."""
    return bundle.bundle_service_account(config_map.get("metadata") or {})
