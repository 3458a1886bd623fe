"""A real node for the e2e control plane: containerd and a kubelet that run real pods.

kube.py's apiserver stores pods and never runs them; what only a kubelet can prove (a native
sidecar's startup probe holding the app, a ConfigMap update reaching a running container, the
image as built) needs this node. It is Debian's containerd, runc and CNI plugins
(hack/install-node-deps.sh) and a kubelet built from Go modules (hack/build-tools.sh), each
started here with directories of its own and stopped by PID. Facts behind the settings:
/work/shared/notes/real-pods.md in the team's notes, summarised where they are used.

One node per machine: node name, ports, the kubepods cgroups, the CNI bridge and
/var/lib/kubelet/device-plugins are machine-wide. A node therefore holds a machine-wide file
lock from start to stop; an xdist worker that wants one while another worker holds it waits.
Pods reach the host through a private bridge (no route out, no masquerade); the only host
service they reach is what a `Relay` listens for on the bridge's own address.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from . import images, kube

NODE_NAME = "localhost"
"""The apiserver reaches the kubelet (logs, exec) by the node's hostname: this one resolves to
the loopback address the kubelet listens on."""
NODE_USER = f"system:node:{NODE_NAME}"
"""Who the kubelet is to the apiserver (its client certificate's CN)."""
NODES_GROUP = "system:nodes"
"""The group every node is in (its client certificate's O)."""
BRIDGE = "dbgove2e0"
SUBNET_PREFIX = "10.244.77"
GATEWAY = f"{SUBNET_PREFIX}.1"
"""The bridge's address on the host: what pods reach host services at (see `Relay`)."""
CNI_BIN_DIR = Path("/usr/lib/cni")
LOCK_FILE = Path("/run/lock/dbgov-e2e-node.lock")
RUNTIME_PREFIX = "/run/dbgov-e2e-node-"
"""containerd's socket and state, short paths (a unix socket path has at most 107 bytes)."""
START_TIMEOUT_S = 60.0
DEBIAN_PACKAGES = {"containerd": "containerd", "ctr": "containerd", "runc": "runc"}


class NodeMissingError(RuntimeError):
    """Something the node runs is not installed; the message says how to install it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeTools:
    containerd: Path
    ctr: Path
    kubelet: Path
    pause: Path


def find_node_tools() -> NodeTools:
    """containerd/ctr/runc and the CNI plugins from Debian, kubelet and pause from build-tools."""
    missing: list[str] = []
    found: dict[str, Path] = {}
    for name, package in DEBIAN_PACKAGES.items():
        path = Path("/usr/bin") / name
        if not path.exists():
            missing.append(f"{path} (Debian package {package})")
        found[name] = path
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append(f"{CNI_BIN_DIR}/bridge (Debian package containernetworking-plugins)")
    if missing:
        raise NodeMissingError(
            "the e2e node needs " + ", ".join(missing) + ": run `make node-deps` (hack/install-node-deps.sh)"
        )
    versions = kube.read_versions()
    base = kube.tools_dir()
    kubelet = base / f"kubelet-{versions['KUBE_VERSION']}" / "kubelet"
    pause = base / f"pause-{versions['PAUSE_VERSION']}" / "pause"
    built = [str(p) for p in (kubelet, pause) if not (p.is_file() and os.access(p, os.X_OK))]
    if built:
        raise NodeMissingError(f"not built: {', '.join(built)}. Run `make tools` (hack/build-tools.sh).")
    return NodeTools(containerd=found["containerd"], ctr=found["ctr"], kubelet=kubelet, pause=pause)


def node_ip() -> str:
    """The machine's own non-loopback IPv4 address (the kubelet refuses a loopback node IP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the source address
        address: str = probe.getsockname()[0]
    if address.startswith("127."):
        raise RuntimeError("the e2e node needs a non-loopback IPv4 address on this machine (none found)")
    return address


@contextlib.contextmanager
def machine_lock(path: Path = LOCK_FILE) -> Iterator[None]:
    """The one-node-per-machine lock (flock: released by the kernel if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(slots=True, kw_only=True)
class Node:
    """A running containerd + kubelet registered to a test cluster."""

    cluster: kube.KubeCluster
    tools: NodeTools
    workdir: Path
    socket: Path
    processes: list[kube.Process] = field(default_factory=list)
    imported: dict[str, images.Image] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return NODE_NAME

    @classmethod
    def start(cls, *, cluster: kube.KubeCluster, tools: NodeTools, workdir: Path) -> Node:
        """Start containerd (with the pause image imported) and the kubelet; wait for Ready."""
        began = time.monotonic()
        _clean_machine_state()
        # unix socket paths are limited to 108 bytes: keep the runtime's short
        runtime = Path(f"{RUNTIME_PREFIX}{os.getpid()}")
        runtime.mkdir(parents=True, exist_ok=True)
        node = cls(cluster=cluster, tools=tools, workdir=workdir, socket=runtime / "containerd.sock")
        try:
            _create_bridge()
            pause = images.pause_image(tools.pause)
            node._start_containerd(pause_ref=pause.ref, runtime=runtime)
            node.import_image(pause)
            node.timings["containerd"] = time.monotonic() - began
            node._start_kubelet()
            node._wait_ready()
        except BaseException:
            node.stop()
            raise
        node.timings["ready"] = time.monotonic() - began
        return node

    # ----------------------------------------------------------------------------------------

    def _start_containerd(self, *, pause_ref: str, runtime: Path) -> None:
        cni_conf = self.workdir / "cni" / "conf"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-dbgov-e2e.conflist").write_text(_cni_conflist(self.workdir / "cni" / "ipam"))
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""\
version = 2
root = "{self.workdir / "containerd" / "root"}"
state = "{runtime / "state"}"
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[metrics]
  address = ""
[{cri}]
  sandbox_image = "{pause_ref}"
  # root here lacks CAP_SYS_RESOURCE: runc could not raise oom_score_adj
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  enable_selinux = false
  disable_apparmor = true
[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{cni_conf}"
  max_conf_num = 1
"""
        path = self.workdir / "containerd.toml"
        path.write_text(config)
        self.processes.append(
            kube.Process.start(
                name="containerd",
                argv=[self.tools.containerd, "--config", path],
                log=self.workdir / "containerd.log",
            )
        )
        _wait(
            "containerd to answer",
            lambda: self._ctr("version", check=False).returncode == 0,
            process=self.processes[-1],
            timeout=START_TIMEOUT_S,
        )

    def _ctr(
        self, *args: str | Path, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.tools.ctr), "--address", str(self.socket), "--namespace", "k8s.io", *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(map(str, args))} failed: {result.stderr.strip()}")
        return result

    def import_image(self, image: images.Image) -> None:
        """Load an OCI archive into the node's image store (pods use it with no pull)."""
        if image.ref in self.imported:
            return
        began = time.monotonic()
        self._ctr("images", "import", "--no-unpack=false", image.archive)
        listed = self._ctr("images", "ls", "-q").stdout.split()
        if image.ref not in listed:
            raise RuntimeError(f"{image.archive} imported, but {image.ref} is not among {listed}")
        self.imported[image.ref] = image
        self.timings[f"import {image.ref}"] = time.monotonic() - began

    def _start_kubelet(self) -> None:
        # Beside containerd's state, so a node whose test process was killed leaves its mounts
        # where the next node start finds and removes them (`_clean_machine_state`).
        root = self.socket.parent / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        port, healthz = kube.free_ports(2)
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": port,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": healthz,
            # The fixture's apiserver has no kubelet client certificate.
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "enforceNodeAllocatable": [],
            "localStorageCapacityIsolation": False,
            "makeIPTablesUtilChains": False,
            "resolvConf": "",
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "containerRuntimeEndpoint": f"unix://{self.socket}",
            "serializeImagePulls": False,
            # fast tests: ConfigMap volumes and statuses follow within seconds
            "syncFrequency": "2s",
            "fileCheckFrequency": "5s",
            "nodeStatusUpdateFrequency": "2s",
            "nodeStatusReportFrequency": "10s",
            "shutdownGracePeriod": "0s",
        }
        path = self.workdir / "kubelet.yaml"
        path.write_text(yaml.safe_dump(config))
        argv: list[str | Path] = [
            self.tools.kubelet,
            "--config", path,
            "--kubeconfig", self._node_kubeconfig(),
            "--root-dir", root,
            "--cert-dir", self.workdir / "kubelet-pki",
            "--hostname-override", NODE_NAME,
            "--node-ip", node_ip(),
            "--v", "2",
        ]  # fmt: skip
        self.processes.append(kube.Process.start(name="kubelet", argv=argv, log=self.workdir / "kubelet.log"))

    def _node_kubeconfig(self) -> Path:
        """The kubelet's own identity, as a real node has: a client certificate of the cluster's
        client CA for ``system:node:<name>`` in ``system:nodes``. The apiserver's Node
        authorizer gives it what its pods need and NodeRestriction keeps it to its own pods
        (tokens included), never the admin's rights."""
        credentials = self.cluster.client_certificate(
            name=f"node-{NODE_NAME}", user=NODE_USER, groups=[NODES_GROUP]
        )
        return self.cluster.write_kubeconfig(
            path=self.workdir / "kubelet.kubeconfig", user=NODE_USER, credentials=credentials
        )

    def _wait_ready(self) -> None:
        core = client.CoreV1Api(self.cluster.api_client())

        def ready() -> bool:
            try:
                found = core.read_node(NODE_NAME)
            except ApiException:
                return False
            return any(c.type == "Ready" and c.status == "True" for c in found.status.conditions or [])

        _wait("the node to be Ready", ready, process=self.processes[-1], timeout=START_TIMEOUT_S)

    # ----------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Remove the node's pods, stop kubelet and containerd by PID, leave no mount, cgroup,
        bridge or shim behind."""
        kubelet = next((p for p in self.processes if p.name == "kubelet"), None)
        if kubelet is not None and kubelet.popen.poll() is None:
            self._drain()
        for process in reversed(self.processes):
            process.stop(timeout=20)
        self.processes.clear()
        with contextlib.suppress(ApiException):  # the cluster outlives the node: no NotReady ghost
            client.CoreV1Api(self.cluster.api_client()).delete_node(NODE_NAME)
        _kill_shims(self.socket)
        images.unmount_under(self.workdir)
        images.unmount_under(self.socket.parent)
        _clean_machine_state()

    def _drain(self, timeout: float = 30.0) -> None:
        """Delete every pod bound to the node and let the kubelet tear them down (CNI and
        netns cleanup happen only through it)."""
        core = client.CoreV1Api(self.cluster.api_client())
        selector = f"spec.nodeName={NODE_NAME}"
        with contextlib.suppress(ApiException):
            for pod in core.list_pod_for_all_namespaces(field_selector=selector).items:
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(
                        pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0
                    )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tasks = self._ctr("tasks", "ls", "-q", check=False, timeout=10)
            if tasks.returncode == 0 and not tasks.stdout.split():
                return
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def _cni_conflist(ipam_dir: Path) -> str:
    import json

    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "dbgov-e2e",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    # the bridge holds the gateway address; no route beyond the subnet
                    # (no isDefaultGateway), no masquerade: pod traffic stays on this machine
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": f"{SUBNET_PREFIX}.0/24", "gateway": GATEWAY}]],
                        "dataDir": str(ipam_dir),
                    },
                }
            ],
        },
        indent=2,
    )


def _wait(what: str, probe: Any, *, process: kube.Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check_alive()
        if probe():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (log: {process.log})")


def _kill_shims(address: Path | str) -> None:
    """containerd-shim processes outlive containerd by design; kill those serving this node's
    containerd (their command line names its socket, or starts with ``address``), and their
    containers with them."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and any(a.startswith(str(address).encode()) for a in argv):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(proc.name), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)


def _clean_machine_state() -> None:
    """The machine-wide leftovers of a node (ours, or one killed before it could clean up):
    shims and containerd state of a node whose test process died, the bridge and the kubepods
    cgroups, depth first. Only called holding the machine lock, so no live node is touched."""
    _kill_shims(RUNTIME_PREFIX)
    for stale in Path(RUNTIME_PREFIX).parent.glob(Path(RUNTIME_PREFIX).name + "*"):
        images.unmount_under(stale)
        _remove_tree(stale)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True, check=False)
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if top.is_dir():
            for path in sorted(
                (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
            ):
                with contextlib.suppress(OSError):
                    path.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()


def _create_bridge() -> None:
    """The pods' bridge with the gateway address, made before any pod so host services (the
    operator, `Relay`) can listen on it from the start; the CNI bridge plugin adopts it."""
    for argv in (
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ):
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _remove_tree(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], capture_output=True, check=False)


# --------------------------------------------------------------------------------------------
# a host service for pods
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Relay:
    """A TCP relay from the bridge's address to a loopback server (the test PostgreSQL), so
    pods reach it while it keeps listening on 127.0.0.1 only. Stopped by `close`."""

    target: tuple[str, int]
    listener: socket.socket
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    @classmethod
    def start(cls, *, target: tuple[str, int], host: str = GATEWAY) -> Relay:
        listener = socket.create_server((host, 0))
        listener.settimeout(0.2)
        relay = cls(target=target, listener=listener)
        thread = threading.Thread(target=relay._accept, name="relay-accept", daemon=True)
        relay._threads.append(thread)
        thread.start()
        return relay

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._pipe, args=(conn,), daemon=True)
            thread.start()

    def _pipe(self, conn: socket.socket) -> None:
        with conn, socket.create_connection(self.target, timeout=10) as upstream:
            pair = {conn: upstream, upstream: conn}
            while not self._stop.is_set():
                readable, _, _ = select.select(list(pair), [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pair[sock].sendall(data)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


def tail(path: Path, lines: int = 40) -> str:
    text: IO[str]
    with path.open(errors="replace") as text:
        return "".join(text.readlines()[-lines:])
