"""A real Kubernetes control plane (etcd + kube-apiserver) for e2e tests, without Docker.

It runs what controller-runtime's envtest runs: etcd and kube-apiserver on loopback ports with a
throwaway PKI and data directory. CRDs, admission webhooks (by URL), RBAC, TokenRequest,
TokenReview and the OIDC discovery endpoints all work; nothing a controller does happens (pods
are stored, never run; namespaces stay Terminating after delete).

The binaries come from hack/build-tools.sh (`make tools`), pinned in hack/tools/versions.env.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dbgov_operator import certs
from dbgov_sidecar import embedded_pg

REPO_ROOT = Path(__file__).resolve().parents[2]
VERSIONS_FILE = REPO_ROOT / "hack" / "tools" / "versions.env"

# Readiness of a cold kube-apiserver on two busy cores can take most of a minute.
READY_TIMEOUT_S = 180.0


class ToolsMissingError(RuntimeError):
    """A pinned binary is not built yet; the message says how to build it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tools:
    """Paths of the pinned binaries built by hack/build-tools.sh."""

    etcd: Path
    kube_apiserver: Path
    helm: Path
    kube_version: str
    """The kube-apiserver release, e.g. v1.34.4."""


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """KEY=value pairs of hack/tools/versions.env (comments and blank lines ignored)."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            versions[key.strip()] = value.strip()
    return versions


def tools_dir() -> Path:
    """Where hack/build-tools.sh caches binaries (same default as the script)."""
    configured = os.environ.get("DBGOV_TOOLS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "dbgov" / "tools"


def find_tools() -> Tools:
    """The pinned binaries, or ToolsMissingError naming every missing one."""
    versions = read_versions()
    base = tools_dir()

    def path(name: str, version_key: str) -> Path:
        return base / f"{name}-{versions[version_key]}" / name

    tools = Tools(
        etcd=path("etcd", "ETCD_VERSION"),
        kube_apiserver=path("kube-apiserver", "KUBE_VERSION"),
        helm=path("helm", "HELM_VERSION"),
        kube_version=versions["KUBE_VERSION"],
    )
    missing = [str(p) for p in (tools.etcd, tools.kube_apiserver, tools.helm) if not _is_exe(p)]
    if missing:
        raise ToolsMissingError(
            "e2e binaries are not built: "
            + ", ".join(missing)
            + ". Run `make tools` (hack/build-tools.sh; 10-20 minutes cold)."
        )
    return tools


def _is_exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def helm(tools: Tools, *args: str | Path, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the pinned helm with its cache/config/data under `home` (never the user's)."""
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    env.pop("KUBECONFIG", None)
    result = subprocess.run(
        [str(tools.helm), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def yaml_documents(text: str) -> list[dict[str, Any]]:
    """The non-empty documents of a multi-document YAML stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


def helm_template(
    tools: Tools,
    chart: Path,
    *,
    home: Path,
    release: str,
    namespace: str,
    sets: Sequence[str] = (),
    show_only: Sequence[str] = (),
    include_crds: bool = False,
) -> list[dict[str, Any]]:
    """The objects `helm template` renders, with `--set` values, optionally only some templates
    (`--show-only templates/rbac.yaml`) or with the chart's crds/ directory too (helm installs
    those before the templates; `--show-only` leaves them out)."""
    args: list[str | Path] = ["template", release, chart, "--namespace", namespace]
    if include_crds:
        args.append("--include-crds")
    for value in sets:
        args += ["--set", value]
    for template in show_only:
        args += ["--show-only", template]
    return yaml_documents(helm(tools, *args, home=home).stdout)


# --------------------------------------------------------------------------------------------
# PKI
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CertKey:
    """A PEM certificate and key on disk."""

    cert: Path
    key: Path


def _name(common_name: str, organizations: Sequence[str] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


@dataclass(frozen=True, slots=True, kw_only=True)
class Authority:
    """A throwaway certificate authority that can issue serving and client certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path
    """PEM file of the CA certificate."""

    @classmethod
    def create(cls, *, directory: Path, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        path = directory / f"{name}.crt"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(cert=cert, key=key, path=path)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        *,
        directory: Path,
        name: str,
        common_name: str,
        organizations: Sequence[str] = (),
        hosts: Sequence[str] = (),
        client: bool = False,
    ) -> CertKey:
        """A leaf certificate: serving for `hosts` (DNS names or IPs), or a client certificate."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name, organizations))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False)
        )
        if hosts:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(certs.subject_alt_names(hosts)), False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        pair = CertKey(cert=directory / f"{name}.crt", key=directory / f"{name}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(pair.key, key)
        return pair


@dataclass(frozen=True, slots=True, kw_only=True)
class Pki:
    """Everything the control plane needs: serving CA + cert, client CA + admin cert, SA keys."""

    serving_ca: Authority
    serving: CertKey
    client_ca: Authority
    admin: CertKey
    sa_public: Path
    sa_private: Path

    @classmethod
    def create(cls, directory: Path) -> Pki:
        directory.mkdir(parents=True, exist_ok=True)
        serving_ca = Authority.create(directory=directory, name="serving-ca")
        client_ca = Authority.create(directory=directory, name="client-ca")
        sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        sa_private = directory / "sa.key"
        sa_public = directory / "sa.pub"
        _write_key(sa_private, sa_key)
        sa_public.write_bytes(
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(
            serving_ca=serving_ca,
            serving=serving_ca.issue(
                directory=directory,
                name="apiserver",
                common_name="kube-apiserver",
                hosts=["127.0.0.1", "localhost"],
            ),
            client_ca=client_ca,
            admin=client_ca.issue(
                directory=directory,
                name="admin",
                common_name="admin",
                organizations=["system:masters"],
                client=True,
            ),
            sa_public=sa_public,
            sa_private=sa_private,
        )


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback TCP ports nobody listens on right now."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))  # all held open at once, so the kernel can't repeat one
            ports.append(sock.getsockname()[1])
        return ports


@dataclass(slots=True, kw_only=True)
class Process:
    """A child process we started, its log file, and a way to stop exactly it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, *, name: str, argv: Sequence[str | Path], log: Path) -> Process:
        """Start `argv` with output to `log`.

        Started from the main thread, the child also gets SIGTERM if this process dies (from
        another thread that would fire when that thread ends, so it is not armed there).
        """
        on_main = threading.current_thread() is threading.main_thread()
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal must not race our shutdown
                preexec_fn=embedded_pg.die_with_parent(signal.SIGTERM) if on_main else None,  # noqa: PLW1509
            )
        return cls(name=name, popen=popen, log=log)

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise RuntimeError(f"{self.name} exited with {code}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM this PID, then SIGKILL it if it lingers; never touches other processes."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=timeout)


def _wait_until(
    *, what: str, process: Process, probe: Callable[[], bool], timeout: float = READY_TIMEOUT_S
) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        process.check_alive()
        try:
            if probe():
                return
        except (OSError, urllib.error.URLError, ssl.SSLError) as err:
            last_error = str(err)
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s ({last_error}):\n{process.log_tail()}")


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class KubeCluster:
    """A running etcd + kube-apiserver, and the helpers tests use to talk to it."""

    tools: Tools
    workdir: Path
    pki: Pki
    server: str
    """https://127.0.0.1:<port>"""
    kubeconfig: Path
    processes: list[Process] = field(default_factory=list)
    _api_client: Any = None
    _dynamic: Any = None

    # ---- lifecycle -----------------------------------------------------------------------

    @classmethod
    def start(cls, *, tools: Tools, workdir: Path) -> KubeCluster:
        """Start etcd then kube-apiserver; wait for /readyz. Stops what it started on error."""
        workdir.mkdir(parents=True, exist_ok=True)
        pki = Pki.create(workdir / "pki")
        port, etcd_client_port, etcd_peer_port = free_ports(3)
        server = f"https://127.0.0.1:{port}"
        cluster = cls(
            tools=tools,
            workdir=workdir,
            pki=pki,
            server=server,
            kubeconfig=workdir / "kubeconfig",
        )
        try:
            etcd_url = cluster._start_etcd(client_port=etcd_client_port, peer_port=etcd_peer_port)
            cluster._start_apiserver(port=port, etcd_url=etcd_url)
            cluster._write_kubeconfig()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_etcd(self, *, client_port: int, peer_port: int) -> str:
        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd = Process.start(
            name="etcd",
            log=self.workdir / "etcd.log",
            argv=[
                self.tools.etcd,
                "--name=default",
                f"--data-dir={self.workdir / 'etcd-data'}",
                f"--listen-client-urls={client_url}",
                f"--advertise-client-urls={client_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=default={peer_url}",
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ],
        )
        self.processes.append(etcd)

        def healthy() -> bool:
            with urllib.request.urlopen(f"{client_url}/health", timeout=2) as resp:
                return b'"health":"true"' in resp.read()

        _wait_until(what="etcd", process=etcd, probe=healthy, timeout=60)
        return client_url

    def _start_apiserver(self, *, port: int, etcd_url: str) -> None:
        pki = self.pki
        apiserver = Process.start(
            name="kube-apiserver",
            log=self.workdir / "kube-apiserver.log",
            argv=[
                self.tools.kube_apiserver,
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={pki.serving.cert}",
                f"--tls-private-key-file={pki.serving.key}",
                f"--client-ca-file={pki.client_ca.path}",
                # Node first, as kubeadm does: the kubelet runs as system:node:<name> and gets
                # what its pods need (their ConfigMaps, Secrets and tokens), no more; with
                # NodeRestriction a node asks tokens only for pods bound to itself.
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                f"--service-account-issuer={self.server}",
                f"--api-audiences={self.server},dbgov",
                f"--service-account-key-file={pki.sa_public}",
                f"--service-account-signing-key-file={pki.sa_private}",
                # No controller-manager creates default ServiceAccounts; tests create their own.
                "--disable-admission-plugins=ServiceAccount",
                # 127.0.0.1 is not a valid endpoint for the `kubernetes` Service; don't try.
                "--endpoint-reconciler-type=none",
            ],
        )
        self.processes.append(apiserver)
        ctx = self.ssl_context()

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.server}/readyz", timeout=5, context=ctx) as resp:
                return bool(resp.status == 200)

        _wait_until(what="kube-apiserver", process=apiserver, probe=ready)

    def _write_kubeconfig(self) -> None:
        self.write_kubeconfig(path=self.kubeconfig, user="admin", credentials=self.pki.admin)

    def client_certificate(self, *, name: str, user: str, groups: Sequence[str] = ()) -> CertKey:
        """A client certificate of the cluster's client CA: the apiserver authenticates it as
        `user` (CN) in `groups` (O), e.g. ``system:node:<name>`` in ``system:nodes``."""
        return self.pki.client_ca.issue(
            directory=self.workdir / "pki",
            name=name,
            common_name=user,
            organizations=groups,
            client=True,
        )

    def write_kubeconfig(self, *, path: Path, user: str, credentials: CertKey) -> Path:
        """A kubeconfig for this cluster that presents `credentials` (a client certificate)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "dbgov-e2e",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(self.pki.serving_ca.path),
                    },
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate": str(credentials.cert),
                        "client-key": str(credentials.key),
                    },
                }
            ],
            "contexts": [{"name": "dbgov-e2e", "context": {"cluster": "dbgov-e2e", "user": user}}],
            "current-context": "dbgov-e2e",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        path.chmod(0o600)
        return path

    def stop(self) -> None:
        """Stop the processes this cluster started, newest first, by PID."""
        if self._api_client is not None:
            self._api_client.close()
            self._api_client = self._dynamic = None
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def remove_data(self) -> None:
        """Delete the etcd data directory (the PKI and logs stay for post-mortems)."""
        shutil.rmtree(self.workdir / "etcd-data", ignore_errors=True)

    # ---- clients -------------------------------------------------------------------------

    def ssl_context(self) -> ssl.SSLContext:
        """TLS context that trusts the apiserver and presents the admin certificate."""
        ctx = ssl.create_default_context(cafile=str(self.pki.serving_ca.path))
        ctx.load_cert_chain(str(self.pki.admin.cert), str(self.pki.admin.key))
        return ctx

    def api_client(self) -> Any:
        """A shared `kubernetes.client.ApiClient` authenticated as cluster admin."""
        if self._api_client is None:
            from kubernetes import config

            self._api_client = config.new_client_from_config(  # type: ignore[no-untyped-call]
                config_file=str(self.kubeconfig)
            )
        return self._api_client

    def dynamic(self) -> Any:
        """A `kubernetes.dynamic.DynamicClient` over the admin client."""
        if self._dynamic is None:
            from kubernetes import dynamic

            self._dynamic = dynamic.DynamicClient(self.api_client())  # type: ignore[no-untyped-call]
        return self._dynamic

    def version(self) -> dict[str, Any]:
        """The server's /version document."""
        from kubernetes import client

        info = client.VersionApi(self.api_client()).get_code()
        return dict(info.to_dict())

    # ---- helpers -------------------------------------------------------------------------

    def create_namespace(self, prefix: str = "t") -> str:
        from kubernetes import client

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        client.CoreV1Api(self.api_client()).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name))
        )
        return name

    def delete_namespace(self, name: str) -> None:
        """Ask for deletion; without a controller-manager the namespace stays Terminating."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        with contextlib.suppress(ApiException):
            client.CoreV1Api(self.api_client()).delete_namespace(name)

    def create_service_account(self, *, namespace: str, name: str) -> None:
        from kubernetes import client

        client.CoreV1Api(self.api_client()).create_namespaced_service_account(
            namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name))
        )

    def service_account_token(
        self,
        *,
        namespace: str,
        name: str,
        audiences: Sequence[str] = ("dbgov",),
        expiration_seconds: int = 600,
    ) -> str:
        """A bound token for an existing ServiceAccount, minted through TokenRequest."""
        from kubernetes import client

        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=list(audiences), expiration_seconds=expiration_seconds)
        )
        response = client.CoreV1Api(self.api_client()).create_namespaced_service_account_token(
            name, namespace, request
        )
        if response.status is None or not response.status.token:
            raise RuntimeError(f"TokenRequest for {namespace}/{name} returned no token")
        return str(response.status.token)

    def apply_manifest(
        self,
        manifest: dict[str, Any],
        *,
        namespace: str | None = None,
        dry_run: bool = False,
        field_manager: str = "dbgov-e2e",
    ) -> Any:
        """Server-side apply one object (optionally `dryRun=All`) through the dynamic client."""
        resource = self.dynamic().resources.get(api_version=manifest["apiVersion"], kind=manifest["kind"])
        kwargs: dict[str, Any] = {"field_manager": field_manager, "force_conflicts": True}
        if dry_run:
            kwargs["dry_run"] = "All"
        if resource.namespaced:
            kwargs["namespace"] = manifest.get("metadata", {}).get("namespace") or namespace
        return resource.server_side_apply(body=manifest, **kwargs)

    def apply_documents(self, docs: Sequence[dict[str, Any]], *, namespace: str) -> list[Any]:
        """Server-side apply rendered objects as helm would order them: CRDs first (waiting
        until they are Established), then the rest, which may be of the kinds they define."""
        crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
        if crds:
            self.install_crds(crds)
        rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
        return [self.apply_manifest(doc, namespace=namespace) for doc in rest]

    def install_crds(self, crds: Sequence[dict[str, Any]], *, timeout: float = 60.0) -> None:
        """Server-side apply CRDs and wait until each is Established and its API is served."""
        for crd in crds:
            self.apply_manifest(crd)
        from kubernetes import client

        api = client.ApiextensionsV1Api(self.api_client())
        deadline = time.monotonic() + timeout
        pending = {crd["metadata"]["name"] for crd in crds}
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                status = api.read_custom_resource_definition(name).status
                conditions = (status.conditions if status else None) or []
                if any(c.type == "Established" and c.status == "True" for c in conditions):
                    pending.discard(name)
            if pending:
                time.sleep(0.2)
        if pending:
            raise TimeoutError(f"CRDs not Established after {timeout:.0f}s: {sorted(pending)}")
        self.dynamic().resources.invalidate_cache()


def load_crds(directory: Path = REPO_ROOT / "crds") -> list[dict[str, Any]]:
    """The canonical dbgov CRDs from the repository."""
    return [yaml.safe_load(p.read_text()) for p in sorted(directory.glob("*.yaml"))]


@contextlib.contextmanager
def running_cluster(workdir: Path) -> Iterator[KubeCluster]:
    """Start a cluster under `workdir` and always stop it (by PID) on the way out."""
    cluster = KubeCluster.start(tools=find_tools(), workdir=workdir)
    try:
        yield cluster
    finally:
        cluster.stop()
        cluster.remove_data()


# --------------------------------------------------------------------------------------------
# kube-controller-manager (garbage collection and namespace deletion, for the modules that ask)
# --------------------------------------------------------------------------------------------

GC_CONTROLLERS = ("garbage-collector-controller", "namespace-controller")
"""What the garbage-collection tests need: ownerReferences honoured, deleted namespaces emptied
and finalized. Nothing else (no ServiceAccount tokens, no Deployments, no node lifecycle)."""

CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
"""The controller-manager's own identity; RBAC bootstrap lets it create one ServiceAccount per
controller in kube-system, whose bootstrap roles (system:controller:...) each controller then uses
(`--use-service-account-credentials`), as in a real cluster."""

GC_SYNCED = "all resource monitors have synced"
"""What the garbage collector logs once it watches every resource and starts collecting."""


def find_controller_manager() -> Path:
    """The pinned kube-controller-manager, or ToolsMissingError saying how to build it."""
    versions = read_versions()
    binary = tools_dir() / f"kube-controller-manager-{versions['KUBE_VERSION']}" / "kube-controller-manager"
    if not _is_exe(binary):
        raise ToolsMissingError(
            f"e2e binary is not built: {binary}. Run `make tools` (hack/build-tools.sh; "
            "kube-controller-manager: a minute beside the other builds, 20 minutes alone cold)."
        )
    return binary


def start_controller_manager(
    cluster: KubeCluster,
    *,
    binary: Path,
    workdir: Path,
    controllers: Sequence[str] = GC_CONTROLLERS,
) -> Process:
    """Start kube-controller-manager against `cluster` running only `controllers`, with a client
    certificate of its own; wait until the garbage collector watches every resource (when it is
    one of them). The caller stops the returned process (by PID) when its tests are done: the
    garbage collector deletes what other tests keep ownerless or owner-dangling on purpose."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert = cluster.pki.client_ca.issue(
        directory=workdir,
        name="kube-controller-manager",
        common_name=CONTROLLER_MANAGER_USER,
        client=True,
    )
    kubeconfig = workdir / "kubeconfig"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "dbgov-e2e",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority": str(cluster.pki.serving_ca.path),
                },
            }
        ],
        "users": [
            {
                "name": CONTROLLER_MANAGER_USER,
                "user": {"client-certificate": str(cert.cert), "client-key": str(cert.key)},
            }
        ],
        "contexts": [
            {"name": "dbgov-e2e", "context": {"cluster": "dbgov-e2e", "user": CONTROLLER_MANAGER_USER}}
        ],
        "current-context": "dbgov-e2e",
    }
    kubeconfig.write_text(yaml.safe_dump(config, sort_keys=False))
    kubeconfig.chmod(0o600)
    process = Process.start(
        name="kube-controller-manager",
        log=workdir / "kube-controller-manager.log",
        argv=[
            binary,
            f"--kubeconfig={kubeconfig}",
            f"--controllers={','.join(controllers)}",
            "--use-service-account-credentials=true",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",  # no serving at all: readiness is read from its log
        ],
    )
    if "garbage-collector-controller" in controllers:
        try:
            _wait_until(
                what="kube-controller-manager's garbage collector",
                process=process,
                probe=lambda: GC_SYNCED in process.log.read_text(errors="replace"),
            )
        except BaseException:
            process.stop()
            raise
    return process
