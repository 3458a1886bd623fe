"""Fixtures for e2e tests against a real kube-apiserver (see kube.py).

Every test collected under tests/e2e gets the `e2e` marker. Each pytest process (each xdist
worker) starts its own control plane on the first test that needs one: it is ready in seconds,
and separate ports and data directories keep workers from seeing each other's objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import kube

E2E_DIR = Path(__file__).parent


def pytest_itemcollected(item: pytest.Item) -> None:
    if E2E_DIR in item.path.parents:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def kube_tools() -> kube.Tools:
    """The pinned etcd / kube-apiserver / helm binaries; fails (never skips) when missing."""
    try:
        return kube.find_tools()
    except kube.ToolsMissingError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def kube_cluster(
    kube_tools: kube.Tools, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[kube.KubeCluster]:
    """One etcd + kube-apiserver for the session, stopped by PID at the end (even on failure)."""
    workdir = tmp_path_factory.mktemp("kube")
    try:
        cluster = kube.KubeCluster.start(tools=kube_tools, workdir=workdir)
    except (RuntimeError, TimeoutError) as err:
        pytest.fail(f"control plane did not start (logs in {workdir}): {err}", pytrace=False)
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.remove_data()


@pytest.fixture(scope="session")
def kubeconfig(kube_cluster: kube.KubeCluster) -> Path:
    """Path of an admin kubeconfig for the session's cluster."""
    return kube_cluster.kubeconfig


@pytest.fixture(scope="session")
def dbgov_crds(kube_cluster: kube.KubeCluster) -> list[str]:
    """The dbgov.io CRDs from crds/, installed once and Established; returns their names."""
    crds = kube.load_crds()
    kube_cluster.install_crds(crds)
    return [crd["metadata"]["name"] for crd in crds]


@pytest.fixture(scope="session")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private HELM_*_HOME so tests never read or write the user's helm state."""
    return tmp_path_factory.mktemp("helm")


@pytest.fixture
def namespace(kube_cluster: kube.KubeCluster) -> Iterator[str]:
    """A fresh namespace for one test; deletion is requested afterwards."""
    name = kube_cluster.create_namespace()
    try:
        yield name
    finally:
        kube_cluster.delete_namespace(name)
