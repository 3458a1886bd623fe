"""The sidecar as the image installs it: a clean virtualenv holding only what Dockerfile.sidecar's
install line brings runs `dbgov proxy` and `dbgov check` end to end against PostgreSQL.

The test follows the Dockerfile rather than restating it: the build stage's ENV, its
`python -m venv`, its COPYs and its `pip install` line are read from the file and run here, with
/opt/dbgov replaced by a folder in a cache (``DBGOV_INSTALLED_DIR``, default
~/.cache/dbgov/installed) keyed by a hash of the Dockerfile, the copied sources and the Python
version, so a re-run with nothing changed is fast. The proxy's stdout is a regular file (the
default audit target; uvloop once aborted there), and the audit lines must land in it. Building
needs PyPI, which this machine and CI reach; the test never skips.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

import pg
from dbgov_sidecar import audit

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile.sidecar"
IMAGE_PREFIX = "/opt/dbgov"
"""Where the Dockerfile builds the virtualenv; here, a folder in the cache."""
BUILD_PRODUCTS = ("__pycache__", "*.pyc", "*.so", "_lane.c", "*.egg-info")
"""In the work tree after an editable install, never in a fresh clone (.gitignore)."""
PIP_SHOWS_THE_BACKEND = {"PIP_VERBOSE": "1"}
"""pip prints what setuptools warns while building only when verbose (the image's build hides it)."""
UNUSED_FOR = 3600.0
"""Seconds after which a cached environment for other sources is deleted."""
DEV_ONLY = ("pgserver", "pytest", "_pytest", "hypothesis", "psycopg", "platformdirs")

POLICY = """\
mode: enforce
default: block
rules:
  - {name: no-ddl, verdict: block, statements: [drop, truncate, alter]}
  - {name: read-shop, verdict: allow, statements: [select], tables: [shop.products, shop.customers]}
masks:
  - {table: shop.customers, column: email, strategy: email}
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class BuildStage:
    """What Dockerfile.sidecar's build stage does, in order, up to its install line."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    copies: list[tuple[list[str], str]] = field(default_factory=list)
    """(sources in the build context, destination relative to the work dir)."""
    runs: list[list[str]] = field(default_factory=list)
    """Every RUN up to and including the pip install line, as argv."""


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    for raw in joined.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            yield keyword.upper(), rest.strip()


def parse_build_stage(text: str) -> BuildStage:
    stage = BuildStage()
    workdir = "/"
    seen_from = False
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            if seen_from:
                break  # the runtime stage only copies the built virtualenv
            seen_from = True
        elif keyword == "ENV":
            for pair in shlex.split(rest):
                name, _, value = pair.partition("=")
                stage.env[name] = value
        elif keyword == "WORKDIR":
            workdir = rest
        elif keyword == "COPY" and not rest.startswith("--"):
            *sources, dest = shlex.split(rest)
            stage.copies.append((sources, dest))
        elif keyword == "RUN":
            argv = shlex.split(rest)
            stage.runs.append(argv)
            if "pip" in Path(argv[0]).name and "install" in argv:
                return BuildStage(env=stage.env, workdir=workdir, copies=stage.copies, runs=stage.runs)
    raise AssertionError(f"{DOCKERFILE.name}: no `RUN .../pip install ...` line in its build stage")


def test_the_dockerfile_is_read_as_docker_would() -> None:
    stage = parse_build_stage(DOCKERFILE.read_text())
    assert stage.runs[-1] == [f"{IMAGE_PREFIX}/bin/pip", "install", ".[fast,jwt]"]
    assert ["python", "-m", "venv", IMAGE_PREFIX] in stage.runs
    copied = {source for sources, _ in stage.copies for source in sources}
    assert {"pyproject.toml", "setup.py", "README.md", "sidecar", "operator"} <= copied
    assert stage.env["PIP_NO_CACHE_DIR"] == "1"


def _context_files(stage: BuildStage) -> list[tuple[Path, str]]:
    """(file in the repository, its path in the build's work dir), sorted."""
    files: list[tuple[Path, str]] = []
    for sources, dest in stage.copies:
        for source in sources:
            origin = ROOT / source
            if origin.is_dir():
                base = dest.rstrip("/") if dest not in ("./", ".") else source
                for path in sorted(origin.rglob("*")):
                    relative = path.relative_to(origin)
                    if path.is_file() and not _build_product(relative):
                        files.append((path, f"{base}/{relative}"))
            else:
                target = f"{dest.rstrip('/')}/{source}" if dest.endswith("/") else dest
                files.append((origin, target))
    return sorted(files, key=lambda item: item[1])


def _build_product(relative: Path) -> bool:
    return any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in BUILD_PRODUCTS)


def _digest(stage: BuildStage, files: list[tuple[Path, str]]) -> str:
    sha = hashlib.sha256(
        DOCKERFILE.read_bytes() + sys.version.encode() + repr(PIP_SHOWS_THE_BACKEND).encode()
    )
    for origin, target in files:
        sha.update(target.encode() + b"\0" + origin.read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def _cache_root() -> Path:
    return Path(os.environ.get("DBGOV_INSTALLED_DIR") or Path.home() / ".cache" / "dbgov" / "installed")


def _clean_env(prefix: Path | None = None) -> dict[str, str]:
    """The environment without this test run's virtualenv (and with the image's one first)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")
        and not k.startswith(("PIP_", "DBGOV_"))
    }
    dev_bin = str(Path(sys.executable).parent)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != dev_bin]
    if prefix is not None:
        path.insert(0, str(prefix / "bin"))
    env["PATH"] = os.pathsep.join(path)
    return env


@dataclass(frozen=True, slots=True, kw_only=True)
class Installed:
    prefix: Path
    """The virtualenv (the image's /opt/dbgov)."""
    pip_log: str
    """What the install line printed."""

    @property
    def python(self) -> Path:
        return self.prefix / "bin" / "python"

    @property
    def dbgov(self) -> Path:
        return self.prefix / "bin" / "dbgov"


def _build(stage: BuildStage, files: list[tuple[Path, str]], target: Path) -> None:
    source, prefix = target / "src", target / "venv"
    for origin, relative in files:
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(origin, source / relative)
    env = {**_clean_env(prefix), **stage.env, **PIP_SHOWS_THE_BACKEND}
    log = []
    for run in stage.runs:
        argv = [arg.replace(IMAGE_PREFIX, str(prefix)) for arg in run]
        if argv[0] == "python":  # the image's interpreter: here, the one running the tests
            argv[0] = sys.executable
        proc = subprocess.run(
            argv, cwd=source, env=env, capture_output=True, text=True, timeout=1200, check=False
        )
        log.append(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            pytest.fail(
                f"the image's build step `{shlex.join(argv)}` exited {proc.returncode} (it needs PyPI "
                f"and a C compiler, as the image's build stage has):\n{log[-1][-6000:]}",
                pytrace=False,
            )
    (target / "pip.log").write_text("\n".join(log))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prune(root: Path, *, keep: Path) -> None:
    """Each environment is a few hundred files: drop those no run has used for an hour (another
    checkout's tests may still be using a recent one)."""
    for old in root.glob("sidecar-*"):
        built = old / ".built"
        if old != keep and (not built.exists() or time.time() - built.stat().st_mtime > UNUSED_FOR):
            shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="module")
def installed() -> Installed:
    """The image's virtualenv, built (once per content) as Dockerfile.sidecar builds it."""
    stage = parse_build_stage(DOCKERFILE.read_text())
    files = _context_files(stage)
    root = _cache_root()
    # A virtualenv cannot move (its scripts name its interpreter): built where it stays.
    target = root / f"sidecar-{_digest(stage, files)}"
    with _locked(root / "sidecar.lock"):
        if not (target / ".built").exists():
            shutil.rmtree(target, ignore_errors=True)  # a build that was interrupted
            target.mkdir(parents=True)
            _build(stage, files, target)
            (target / ".built").touch()
        (target / ".built").touch()
        _prune(root, keep=target)
    return Installed(prefix=target / "venv", pip_log=(target / "pip.log").read_text())


def test_the_install_line_prints_no_setuptools_deprecation(installed: Installed) -> None:
    assert "Successfully installed" in installed.pip_log
    assert "Building wheel for dbgov" in installed.pip_log  # built here, so setuptools had its say
    assert "SetuptoolsDeprecationWarning" not in installed.pip_log, installed.pip_log[-4000:]
    assert not re.search(r"(?i)license.*deprecat|deprecat.*license", installed.pip_log)


PROBE = textwrap.dedent(
    """
    import importlib.util, json, sys
    dev_only = sys.argv[1].split(",")
    clean = {name: importlib.util.find_spec(name) is None for name in dev_only}
    import jwt, cryptography.hazmat  # the `jwt` extra: token logins need them from the image
    # Now make them importable (the dev environment's packages, after the image's own), so
    # that importing them would succeed and show.
    sys.path.append(sys.argv[2])
    import dbgov_sidecar.cli, dbgov_sidecar.proxy_cli, dbgov_sidecar.check_cli, dbgov_sidecar._lane, uvloop
    dbgov_sidecar.cli.build_parser().parse_args(["proxy"])
    print(json.dumps({
        "clean": clean,
        "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(dev_only)),
        "from": dbgov_sidecar.cli.__file__,
        "sources": sorted(p.name for p in __import__("pathlib").Path(dbgov_sidecar.cli.__file__).parent.glob("*.c")),
    }))
    """
)


def test_the_runtime_imports_nothing_from_the_dev_extras(installed: Installed) -> None:
    dev_site = sysconfig.get_paths()["purelib"]
    proc = subprocess.run(
        [str(installed.python), "-c", PROBE, ",".join(DEV_ONLY), dev_site],
        env=_clean_env(installed.prefix),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert all(result["clean"].values()), f"the image's virtualenv holds dev packages: {result['clean']}"
    assert result["loaded"] == [], f"importing the CLI imported {result['loaded']}"
    assert result["from"].startswith(str(installed.prefix)), result["from"]
    assert result["sources"] == [], f"the package ships generated C: {result['sources']}"


def test_check_from_the_installed_set(installed: Installed, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    proc = subprocess.run(
        [
            str(installed.dbgov),
            "check",
            "--policy",
            str(policy),
            "SELECT email FROM shop.customers WHERE id = 3",
            "DROP TABLE shop.orders",
        ],
        env=_clean_env(installed.prefix),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MASK     SELECT email FROM shop.customers WHERE id = 3" in proc.stdout, proc.stdout
    assert "BLOCK    DROP TABLE shop.orders" in proc.stdout, proc.stdout
    assert proc.stderr == "", proc.stderr  # no warning on a newcomer's first screen


def _connect(port: int, proxy: subprocess.Popen[bytes]) -> psycopg.Connection[tuple[object, ...]]:
    deadline = time.monotonic() + 30
    while True:
        try:
            return psycopg.connect(
                f"host=127.0.0.1 port={port} user=app dbname=shop sslmode=disable", autocommit=True
            )
        except psycopg.OperationalError:
            assert proxy.poll() is None, f"the installed proxy exited {proxy.returncode}"
            assert time.monotonic() < deadline, "the installed proxy did not accept within 30s"
            time.sleep(0.1)


def test_proxy_from_the_installed_set_masks_refuses_and_audits_to_a_file(
    installed: Installed, pg_server: pg.PgServer, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port, metrics_port = pg.free_port(), pg.free_port()
    env = {
        **_clean_env(installed.prefix),
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@127.0.0.1:{pg_server.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": pg.APP_PASSWORD,
        "DBGOV_POLICY": str(policy),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",  # never the default port: other proxies run
    }
    stdout, stderr = tmp_path / "proxy.log", tmp_path / "proxy.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:  # stdout a regular file: the audit
        proxy = subprocess.Popen([str(installed.dbgov), "proxy"], env=env, stdout=out, stderr=err)
    try:
        with _connect(port, proxy) as conn:
            row = conn.execute("SELECT id, email FROM shop.customers WHERE id = 3").fetchone()
            assert row == (3, "*********@example.com")
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as refused:
                conn.execute("DROP TABLE shop.orders")
            assert "no-ddl" in str(refused.value)
            assert conn.execute("SELECT name FROM shop.products WHERE id = 1").fetchone() == ("Widget",)
    finally:
        proxy.send_signal(signal.SIGTERM)
        try:
            status = proxy.wait(30)
        finally:
            if proxy.poll() is None:
                proxy.kill()
                proxy.wait()
    errors = stderr.read_text()
    assert status == 0, errors[-3000:]
    assert "Traceback" not in errors and "arning" not in errors, errors[-3000:]
    text = stdout.read_text()
    assert "customer3@example.com" not in text  # masked values never reach the audit
    events = [json.loads(line) for line in text.splitlines()]
    statements = [(e["statement"], e["enforced"]) for e in events if e["type"] == "statement"]
    assert statements == [
        ("SELECT id, email FROM shop.customers WHERE id = 3", "mask"),
        ("DROP TABLE shop.orders", "block"),
        ("SELECT name FROM shop.products WHERE id = 1", "allow"),
    ]
    assert events[0]["type"] == "session_start" and events[-1]["type"] == "session_end"
    assert audit.verify(events)
