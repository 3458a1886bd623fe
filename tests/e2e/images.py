"""Container images for the e2e node without a registry or a Docker engine.

Neither is reachable here (no Docker engine, no image registry; Debian's packages and PyPI are),
so images are built the long way: a Debian root filesystem from ``debootstrap`` stands in for
each ``FROM`` image, the Dockerfile's own instructions (ENV, WORKDIR, COPY, RUN, USER, EXPOSE,
ENTRYPOINT, CMD) are carried out on it, RUN in a chroot, and the result is written as an OCI
image layout tarball that ``ctr images import`` loads. The sidecar image is built from
Dockerfile.sidecar itself, so it holds exactly what that file installs: a test of the image,
not of the checkout.

Python 3.11 comes from Debian bookworm's python3 (3.11.2), where the Dockerfile names the
python:3.11 images (3.11.x too). Images are cached under ~/.cache/dbgov/images (override:
``DBGOV_IMAGES_DIR``), keyed by a hash of everything they are built from, and built under a
file lock so xdist workers build each one once. Needs root (chroot) and debootstrap
(hack/install-node-deps.sh).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import kube

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FROM_IMAGES: dict[str, tuple[str, ...]] = {
    # The official python images are Debian with CPython, pip and (the full one) a compiler.
    # python:3.11 is buildpack-deps: a compiler and common -dev packages (the lane needs OpenSSL's).
    "python:3.11": (
        "python3",
        "python3-venv",
        "python3-dev",
        "python-is-python3",
        "gcc",
        "libc6-dev",
        "libssl-dev",
        "libffi-dev",
        "zlib1g-dev",
        "ca-certificates",
    ),
    "python:3.11-slim": ("python3", "python-is-python3", "ca-certificates"),
    "debian:bookworm-slim": (),
}
"""What each FROM image is built from: debootstrap's minbase plus these Debian packages."""
BUILD_PRODUCTS = ("__pycache__", "*.pyc", "*.so", "_lane.c", "*.egg-info")
"""In the work tree after an editable install, never in a fresh clone (.gitignore)."""
RUN_TIMEOUT_S = 1800
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
"""The host's CA bundle, lent to RUN steps (pip behind this machine's TLS setup), never kept."""


class ImageBuildError(RuntimeError):
    """An image could not be built; the message names the step and its output."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Image:
    """An OCI image layout tarball and the name it imports under."""

    ref: str
    """e.g. ``dbgov.test/sidecar:3f2a...`` (a domain of its own: never pulled from anywhere)."""
    archive: Path


def cache_dir() -> Path:
    configured = os.environ.get("DBGOV_IMAGES_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "dbgov" / "images"


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    cache_dir().mkdir(parents=True, exist_ok=True)
    with (cache_dir() / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(argv: Sequence[str | Path], *, what: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


# --------------------------------------------------------------------------------------------
# base root filesystems
# --------------------------------------------------------------------------------------------


def base_rootfs(name: str) -> Path:
    """The root filesystem standing in for FROM ``name`` (cached; built by debootstrap)."""
    if name not in FROM_IMAGES:
        raise ImageBuildError(f"FROM {name}: no Debian stand-in known; add it to images.FROM_IMAGES")
    target = cache_dir() / f"base-{_base_key(name)}"
    packages = FROM_IMAGES[name]
    if (target / ".complete").exists():
        return target
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap is not installed: run hack/install-node-deps.sh (make node-deps)")
    partial = target.with_name(target.name + ".partial")
    unmount_under(partial)  # debootstrap mounts /proc and /sys while it runs: if it was killed
    shutil.rmtree(partial, ignore_errors=True)
    argv: list[str | Path] = ["debootstrap", "--variant=minbase", f"--cache-dir={_debs_dir()}"]
    if packages:
        argv.append("--include=" + ",".join(packages))
    _run([*argv, SUITE, partial, MIRROR], what=f"debootstrap for FROM {name}")
    # Like the official images: no package lists or downloaded archives in the image.
    for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
        for path in (partial / leftover).glob("*"):
            if path.is_file():
                path.unlink()
    (partial / ".complete").touch()
    partial.rename(target)
    return target


def unmount_under(directory: Path) -> None:
    """Unmount everything mounted under ``directory`` (deepest first; lazily if busy)."""
    prefix = str(directory.resolve()) + "/"
    for _ in range(3):
        mounts = [
            line.split()[4]
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if (line.split()[4] + "/").startswith(prefix)
        ]
        if not mounts:
            return
        for mount in sorted(set(mounts), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def _base_key(name: str) -> str:
    return hashlib.sha256(repr((SUITE, MIRROR, "minbase", FROM_IMAGES[name])).encode()).hexdigest()[:16]


def _debs_dir() -> Path:
    path = cache_dir() / "debs"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# Dockerfile instructions
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Stage:
    """One FROM stage as the instructions left it."""

    name: str
    rootfs: Path
    env: dict[str, str] = field(default_factory=lambda: {"PATH": BASE_PATH})
    workdir: str = "/"
    user: str = ""
    exposed: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) of each instruction, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    for raw in re.sub(r"\\\n", " ", text).splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def context_files(sources: Sequence[str], *, context: Path) -> list[tuple[Path, str]]:
    """(file, path relative to the COPY destination) for COPY sources, without build products."""
    files: list[tuple[Path, str]] = []
    for source in sources:
        origin = context / source
        if origin.is_dir():
            for path in sorted(origin.rglob("*")):
                relative = path.relative_to(origin)
                if path.is_file() and not _build_product(relative):
                    files.append((path, str(relative)))
        elif origin.is_file():
            files.append((origin, origin.name))
        else:
            raise ImageBuildError(f"COPY {source}: not in the build context {context}")
    return files


def _build_product(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in BUILD_PRODUCTS)


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), value)


def _words(rest: str) -> list[str]:
    if rest.startswith("["):
        words: list[str] = json.loads(rest)
        return words
    return ["/bin/sh", "-c", rest]


def _inside(rootfs: Path, path: str) -> Path:
    return rootfs / path.lstrip("/")


def _copy(sources: list[tuple[Path, str]], *, into: Path, single: bool) -> None:
    for origin, relative in sources:
        target = into if single and not into.is_dir() else into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, target, follow_symlinks=False)


def _run_in(stage: Stage, argv: list[str]) -> None:
    """RUN: in a chroot of the stage's rootfs, its own /proc, the host's network and DNS."""
    rootfs = stage.rootfs
    resolv = rootfs / "etc" / "resolv.conf"
    kept = resolv.read_bytes() if resolv.exists() else None
    lent_ca = rootfs / "tmp" / "host-ca.crt"
    resolv.unlink(missing_ok=True)
    shutil.copy2("/etc/resolv.conf", resolv)
    env = {"HOME": "/root", **stage.env}
    if HOST_CA_BUNDLE.exists():
        shutil.copy2(HOST_CA_BUNDLE, lent_ca)
        env.setdefault("PIP_CERT", "/tmp/host-ca.crt")
    workdir = _inside(rootfs, stage.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    script = f"cd {shlex.quote(stage.workdir)} && exec " + shlex.join(argv)
    try:
        _run(
            [
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                f"--mount-proc={rootfs / 'proc'}",
                "chroot",
                rootfs,
                "/usr/bin/env",
                "-i",
                *[f"{k}={v}" for k, v in env.items()],
                "/bin/sh",
                "-c",
                script,
            ],
            what=f"RUN {shlex.join(argv)} (FROM {stage.name})",
        )
    finally:
        lent_ca.unlink(missing_ok=True)
        resolv.unlink(missing_ok=True)
        if kept is not None:
            resolv.write_bytes(kept)


def build_dockerfile(text: str, *, context: Path, workdir: Path) -> Stage:
    """Carry out a (multi-stage) Dockerfile's instructions; returns the last stage."""
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage{len(stages)}"
            rootfs = workdir / name
            shutil.rmtree(rootfs, ignore_errors=True)
            _run(["cp", "-a", base_rootfs(words[0]), rootfs], what=f"copying the FROM {words[0]} rootfs")
            (rootfs / ".complete").unlink(missing_ok=True)
            stage = stages[name] = Stage(name=words[0], rootfs=rootfs)
            continue
        if stage is None:
            raise ImageBuildError(f"{keyword} before FROM")
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                stage.env[key] = _expand(value, stage.env)
        elif keyword == "WORKDIR":
            stage.workdir = _expand(rest, stage.env)
            _inside(stage.rootfs, stage.workdir).mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            words = shlex.split(rest)
            origin = [w for w in words if w.startswith("--from=")]
            *sources, dest = [w for w in words if not w.startswith("--")]
            dest_path = dest if dest.startswith("/") else f"{stage.workdir.rstrip('/')}/{dest}"
            into = _inside(stage.rootfs, dest_path)
            if origin:
                source_stage = stages[origin[0].removeprefix("--from=")]
                for source in sources:
                    _run(["cp", "-a", _inside(source_stage.rootfs, source), into], what=f"COPY {rest}")
            else:
                files = context_files(sources, context=context)
                single = len(files) == 1 and not dest.endswith("/") and not (context / sources[0]).is_dir()
                _copy(files, into=into, single=single)
        elif keyword == "RUN":
            _run_in(stage, _words(rest))
        elif keyword == "USER":
            stage.user = rest
        elif keyword == "EXPOSE":
            stage.exposed += [p if "/" in p else f"{p}/tcp" for p in rest.split()]
        elif keyword == "ENTRYPOINT":
            stage.entrypoint = _words(rest)
        elif keyword == "CMD":
            stage.cmd = _words(rest)
        else:
            raise ImageBuildError(f"Dockerfile instruction {keyword} is not supported here")
    if stage is None:
        raise ImageBuildError("no FROM in the Dockerfile")
    return stage


# --------------------------------------------------------------------------------------------
# OCI image layout
# --------------------------------------------------------------------------------------------


def _blob(layout: tarfile.TarFile, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    _add_bytes(layout, f"blobs/sha256/{digest}", data)
    return f"sha256:{digest}"


def _add_bytes(layout: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    layout.addfile(info, _Reader(data))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._at + size
        chunk = bytes(self._data[self._at : end])
        self._at += len(chunk)
        return chunk


def write_oci_archive(
    *, rootfs: Path, ref: str, config: dict[str, object], archive: Path, workdir: Path
) -> None:
    """One gzip layer holding ``rootfs``, the image config and manifest, as an OCI layout tar."""
    layer = workdir / "layer.tar"
    # GNU tar keeps hard links, device nodes, owners and modes as they are in the rootfs.
    _run(
        [
            "tar",
            "--numeric-owner",
            "--xattrs",
            "--sort=name",
            "--exclude=./.complete",
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "-C",
            rootfs,
            "-cf",
            layer,
            ".",
        ],
        what="packing the image layer",
    )
    diff_id = "sha256:" + _file_sha256(layer)
    layer_gz = workdir / "layer.tar.gz"
    with layer.open("rb") as src, gzip.open(layer_gz, "wb", compresslevel=1) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    layer.unlink()
    full_config = {**config, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    partial = archive.with_name(archive.name + ".partial")
    with tarfile.open(partial, "w") as layout:
        _add_bytes(layout, "oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        layer_digest = "sha256:" + _file_sha256(layer_gz)
        layout.add(layer_gz, arcname=f"blobs/sha256/{layer_digest.removeprefix('sha256:')}")
        config_bytes = json.dumps(full_config).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _blob(layout, config_bytes),
                "size": len(config_bytes),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": layer_digest,
                    "size": layer_gz.stat().st_size,
                }
            ],
        }
        manifest_bytes = json.dumps(manifest).encode()
        index = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _blob(layout, manifest_bytes),
                    "size": len(manifest_bytes),
                    "platform": {"architecture": "amd64", "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref.rpartition(":")[2],
                    },
                }
            ],
        }
        _add_bytes(layout, "index.json", json.dumps(index).encode())
    layer_gz.unlink()
    partial.rename(archive)


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def _stage_config(stage: Stage) -> dict[str, object]:
    config: dict[str, object] = {
        "Env": [f"{k}={v}" for k, v in stage.env.items()],
        "WorkingDir": stage.workdir,
    }
    if stage.user:
        config["User"] = stage.user
    if stage.exposed:
        config["ExposedPorts"] = {port: {} for port in stage.exposed}
    if stage.entrypoint:
        config["Entrypoint"] = stage.entrypoint
    if stage.cmd:
        config["Cmd"] = stage.cmd
    return {"architecture": "amd64", "os": "linux", "config": config}


# --------------------------------------------------------------------------------------------
# the images the tests use
# --------------------------------------------------------------------------------------------


def image_from_dockerfile(
    text: str, *, repository: str, context: Path, files: Sequence[tuple[Path, str]] = ()
) -> Image:
    """The image ``text`` builds from ``context``, cached by a hash of the Dockerfile, the files
    its COPYs take (``files``: (path, name) pairs) and the FROM stand-ins."""
    bases = sorted({rest.split()[0] for keyword, rest in instructions(text) if keyword == "FROM"})
    stand_ins = [(base, FROM_IMAGES.get(base)) for base in bases]
    sha = hashlib.sha256(text.encode() + repr(stand_ins).encode() + SUITE.encode() + MIRROR.encode())
    for path, name in sorted(files, key=lambda item: item[1]):
        sha.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    key = sha.hexdigest()[:16]
    ref = f"dbgov.test/{repository}:{key}"
    archive = cache_dir() / f"{repository}-{key}.oci.tar"
    if archive.exists():  # written under its final name only when complete
        return Image(ref=ref, archive=archive)
    with _locked("build"):
        if archive.exists():
            return Image(ref=ref, archive=archive)
        _remove_interrupted_builds()
        workdir = cache_dir() / f"work-{repository}-{key}"
        workdir.mkdir(parents=True)
        try:
            stage = build_dockerfile(text, context=context, workdir=workdir)
            write_oci_archive(
                rootfs=stage.rootfs, ref=ref, config=_stage_config(stage), archive=archive, workdir=workdir
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        for stale in cache_dir().glob(f"{repository}-*.oci.tar"):
            if stale != archive:
                stale.unlink(missing_ok=True)
    return Image(ref=ref, archive=archive)


def _remove_interrupted_builds() -> None:
    """Work folders of builds that were killed, and root filesystems no FROM stand-in uses any
    more (only one build runs at a time, under the lock; pause images build under their own)."""
    current = {f"base-{_base_key(name)}" for name in FROM_IMAGES}
    leftovers = [p for p in cache_dir().glob("work-*") if not p.name.startswith("work-pause-")]
    leftovers += [p for p in cache_dir().glob("base-*") if p.name not in current]
    for stale in leftovers:
        unmount_under(stale)
        shutil.rmtree(stale, ignore_errors=True)


SIDECAR_DOCKERFILE = kube.REPO_ROOT / "Dockerfile.sidecar"


def sidecar_image() -> Image:
    """Dockerfile.sidecar, built as written (its COPYs from the repository)."""
    text = SIDECAR_DOCKERFILE.read_text()
    copied = [
        word
        for keyword, rest in instructions(text)
        if keyword == "COPY" and "--from=" not in rest
        for word in shlex.split(rest)[:-1]
    ]
    files = context_files(copied, context=kube.REPO_ROOT)
    return image_from_dockerfile(text, repository="sidecar", context=kube.REPO_ROOT, files=files)


APP_DOCKERFILE = """\
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client \\
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/bin/sh", "-c"]
"""
"""The test pods' app: psql from Debian's postgresql-client, and a shell to script it."""


def app_image() -> Image:
    return image_from_dockerfile(APP_DOCKERFILE, repository="app", context=kube.REPO_ROOT)


def pause_image(pause_binary: Path) -> Image:
    """The pod sandbox image: the one static binary of hack/tools/pause."""
    key = _file_sha256(pause_binary)[:16]
    ref = f"dbgov.test/pause:{key}"
    archive = cache_dir() / f"pause-{key}.oci.tar"
    with _locked("pause"):
        if not archive.exists():
            workdir = cache_dir() / f"work-pause-{key}"
            shutil.rmtree(workdir, ignore_errors=True)
            (workdir / "rootfs").mkdir(parents=True)
            shutil.copy2(pause_binary, workdir / "rootfs" / "pause")
            config = {"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/pause"]}}
            try:
                write_oci_archive(
                    rootfs=workdir / "rootfs", ref=ref, config=config, archive=archive, workdir=workdir
                )
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return Image(ref=ref, archive=archive)
