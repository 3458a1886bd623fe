"""Fixtures for e2e tests against a real kube-apiserver (see kube.py).

Every test collected under tests/e2e gets the `e2e` marker. Each pytest process (each xdist
worker) starts its own control plane on the first test that needs one: it is ready in seconds,
and separate ports and data directories keep workers from seeing each other's objects. Real pods
need a node (node.py), of which a machine runs one: `e2e_node` takes a machine-wide lock for the
module that uses it, so another worker's module waits rather than sharing it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from . import images, kube, node

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


@pytest.fixture(scope="session")
def node_tools() -> node.NodeTools:
    """containerd, runc, the CNI plugins, kubelet and pause; fails (never skips) when missing."""
    try:
        return node.find_node_tools()
    except node.NodeMissingError as err:
        pytest.fail(str(err), pytrace=False)


@pytest.fixture(scope="session")
def pod_images(node_tools: node.NodeTools) -> dict[str, images.Image]:
    """The sidecar image (Dockerfile.sidecar as written) and the test app image (psql), built
    once per content (cached under ~/.cache/dbgov/images; one xdist worker builds, others wait)."""
    try:
        return {"sidecar": images.sidecar_image(), "app": images.app_image()}
    except images.ImageBuildError as err:
        pytest.fail(f"could not build the pod images: {err}", pytrace=False)


@pytest.fixture(scope="module")
def e2e_node(
    kube_cluster: kube.KubeCluster,
    node_tools: node.NodeTools,
    pod_images: dict[str, images.Image],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[node.Node]:
    """A real node (containerd + kubelet) registered to this worker's cluster, with the pod
    images imported. One node per machine: it holds a machine-wide lock for the module using it
    (another xdist worker's module waits), and is stopped by PID at the module's end."""
    workdir = tmp_path_factory.mktemp("node")
    with node.machine_lock():
        try:
            started = node.Node.start(cluster=kube_cluster, tools=node_tools, workdir=workdir)
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"the e2e node did not start (logs in {workdir}): {err}", pytrace=False)
        try:
            for image in pod_images.values():
                started.import_image(image)
            yield started
        finally:
            started.stop()


@pytest.fixture(scope="module")
def controller_manager(
    kube_cluster: kube.KubeCluster, dbgov_crds: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[kube.Process]:
    """kube-controller-manager (garbage collector and namespace controller only, each with its
    own ServiceAccount's credentials) for the module that asks for it, stopped by PID at its end
    so no other module ever runs beside a collector (it would take their ownerless objects)."""
    try:
        binary = kube.find_controller_manager()
    except kube.ToolsMissingError as err:
        pytest.fail(str(err), pytrace=False)
    workdir = tmp_path_factory.mktemp("controller-manager")
    try:
        process = kube.start_controller_manager(kube_cluster, binary=binary, workdir=workdir)
    except (RuntimeError, TimeoutError) as err:
        pytest.fail(f"kube-controller-manager did not start (logs in {workdir}): {err}", pytrace=False)
    try:
        yield process
    finally:
        process.stop()
        assert process.popen.poll() is not None, "kube-controller-manager outlived its module"
