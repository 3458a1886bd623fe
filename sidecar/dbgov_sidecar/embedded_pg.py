"""An embedded PostgreSQL 16 for the demo and the tests, from the binaries in the pgserver wheel.

One server per test session (per xdist worker), on 127.0.0.1 and a free port, in a fresh
temporary directory; stopped by its PID at the end. initdb and postgres refuse to run as root,
so as root (CI, containers) they run as an unprivileged system user created on demand, the way
the pgserver package itself does.

The pgserver build has no OpenSSL, so tests that need a server speaking TLS start one from
Debian's binaries instead (``debian_bin_dir``), with their own settings, pg_hba.conf and key
files (``running_server``'s keywords).

Roles: ``postgres`` (superuser, scram), ``app`` (scram, owns database ``shop`` with the demo
schema), ``md5user`` (md5 password) and ``trustuser`` (trust), so every upstream auth method
the proxy supports is exercised against the real server.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # pgserver computes a runtime directory it never uses here (each server gets its own
    # temporary directory) when its class is defined, and platformdirs warns where
    # XDG_RUNTIME_DIR is unset (containers, CI): a warning nobody can act on, on every import.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    import pgserver._commands

BIN = Path(pgserver._commands.POSTGRES_BIN_PATH)
"""The pgserver wheel's binaries: the default server, and the client tools (psql, pg_isready,
pgbench) used against any server."""
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin/postgres"
"""Where Debian's ``postgresql`` package puts each major version's server binary."""
DEMO_SCHEMA = Path(__file__).resolve().parent / "demo_schema.sql"
SYSTEM_USER = "dbgovpg"
SUPERUSER_PASSWORD = "postgres-pw"
APP_PASSWORD = "app-pw"
MD5_PASSWORD = "md5-pw"

HBA = """\
local all all trust
host all trustuser 127.0.0.1/32 trust
host all md5user 127.0.0.1/32 md5
host all all 127.0.0.1/32 scram-sha-256
"""


@dataclass(frozen=True, slots=True, kw_only=True)
class PgServer:
    """A running PostgreSQL and how to reach it."""

    host: str
    port: int
    datadir: Path
    pid: int

    def dsn(
        self,
        *,
        user: str = "app",
        password: str | None = None,
        dbname: str = "shop",
        via_socket: bool = False,
    ) -> str:
        """A libpq connection string (password defaults to the role's test password).

        TCP to ``host`` without TLS, or with ``via_socket`` the Unix socket in the data
        directory: the way in when pg_hba.conf admits TCP only with TLS, which the pgserver
        client tools cannot speak.
        """
        if password is None:
            password = {
                "postgres": SUPERUSER_PASSWORD,
                "app": APP_PASSWORD,
                "md5user": MD5_PASSWORD,
            }.get(user, "")
        host = self.datadir if via_socket else self.host
        return f"host={host} port={self.port} user={user} dbname={dbname} password={password} sslmode=disable"

    def psql(
        self, sql: str, *, user: str = "postgres", dbname: str = "shop", via_socket: bool = False
    ) -> str:
        """Run ``sql`` with psql (ON_ERROR_STOP) and return its unaligned output."""
        return run_psql(self.dsn(user=user, dbname=dbname, via_socket=via_socket), sql)


def run_psql(dsn: str, sql: str, *, check: bool = True) -> str:
    """Run psql against ``dsn`` with ``sql`` on stdin; unaligned, tuples only."""
    proc = subprocess.run(
        [str(BIN / "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", dsn],
        input=sql,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout if check else proc.stdout + proc.stderr


_pgbench_ready: set[int] = set()

PGBENCH_POLICY = """\
mode: enforce
default: block
rules:
  - name: pgbench
    verdict: allow
    statements: [select, insert, update, begin, commit, rollback]
    tables: [pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history]
"""
"""A policy allowing what pgbench's built-in scripts run (the benchmarks' and tests' policy)."""


def init_pgbench(server: PgServer, *, scale: int = 1) -> None:
    """Create the pgbench tables in ``shop`` (once per server), owned by ``app``."""
    if server.port in _pgbench_ready:
        return
    args = [str(BIN / "pgbench"), "-i", "-q", "-s", str(scale), "-h", server.host, "-p"]
    subprocess.run(
        [*args, str(server.port), "-U", "app", "shop"],
        env={**os.environ, "PGPASSWORD": APP_PASSWORD},
        capture_output=True,
        check=True,
        timeout=300,
    )
    _pgbench_ready.add(server.port)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn: send the child `sig` when the thread that started it dies (Linux).

    The normal path stops servers by PID; this covers the abnormal one (a test worker killed,
    a demo interrupted), which would otherwise leave a server running with no owner.
    """
    parent_pid = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

    def preexec() -> None:
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def debian_bin_dir() -> Path:
    """The bin directory of the newest PostgreSQL from Debian's packages (built with OpenSSL)."""
    found = [Path(path).parent for path in glob.glob(DEBIAN_BIN_GLOB)]
    if not found:
        raise RuntimeError(
            f"no PostgreSQL server matches {DEBIAN_BIN_GLOB}: install Debian's `postgresql` "
            "package (apt-get install postgresql), whose server is built with OpenSSL"
        )
    return max(found, key=lambda bin_dir: _version_key(bin_dir.parent.name))


def _version_key(name: str) -> tuple[int, ...]:
    """``"15"`` → (15,), ``"9.6"`` → (9, 6); names that are not versions sort first."""
    parts = name.split(".")
    return tuple(int(part) for part in parts) if all(p.isdigit() for p in parts) else (-1,)


@contextlib.contextmanager
def running_server(
    *,
    max_connections: int = 300,
    bin_dir: Path = BIN,
    settings: Mapping[str, str] | None = None,
    hba: str | None = None,
    files: Mapping[str, bytes] | None = None,
) -> Iterator[PgServer]:
    """Init, start, yield, then stop (by PID) and delete a PostgreSQL cluster.

    ``bin_dir`` holds initdb and postgres (the client tools always come from ``BIN``).
    ``settings`` are passed as ``-c name=value`` after the defaults, so they may override
    them; ``hba`` replaces ``HBA`` (provisioning connects through the Unix socket as
    ``postgres`` with its password, so a ``local`` line must admit that); ``files`` are
    written into the data directory before the start, owned by the server's account with mode
    0600 (the server refuses a private key others can read); names are plain file names, for
    settings such as ``ssl_key_file`` that resolve relative to the data directory.
    """
    user = _run_as_user()
    base = Path(tempfile.mkdtemp(prefix="dbgov-pg-"))
    try:
        datadir = _initdb(base, user, bin_dir=bin_dir, hba=HBA if hba is None else hba)
        _write_private_files(datadir, user, files or {})
        server = _start(
            datadir, user, bin_dir=bin_dir, max_connections=max_connections, settings=settings or {}
        )
        try:
            _provision(server)
            yield server
        finally:
            _stop(server.pid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged account to run PostgreSQL as when we are root, else None."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(SYSTEM_USER)
    # The account must be able to reach the binaries and libraries inside the venv.
    for path in (BIN, BIN.parent / "lib", BIN.parent / "share"):
        for parent in [path, *path.parents]:
            mode = parent.stat().st_mode
            wanted = mode | stat.S_IXOTH | stat.S_IROTH
            if mode != wanted:
                parent.chmod(wanted)
    return entry


def _uid(user: pwd.struct_passwd | None) -> int | None:
    return None if user is None else user.pw_uid


def _gid(user: pwd.struct_passwd | None) -> int | None:
    return None if user is None else user.pw_gid


def _initdb(base: Path, user: pwd.struct_passwd | None, *, bin_dir: Path, hba: str) -> Path:
    datadir = base / "data"
    pwfile = base / "pwfile"
    pwfile.write_text(SUPERUSER_PASSWORD + "\n")
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    subprocess.run(
        [
            str(bin_dir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            "postgres",
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
        user=_uid(user),
        group=_gid(user),
    )
    # initdb created the file as the server's account; rewriting it in place keeps that owner.
    (datadir / "pg_hba.conf").write_text(hba)
    return datadir


def _write_private_files(datadir: Path, user: pwd.struct_passwd | None, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into ``datadir``: mode 0600 from creation, owned by the server's account."""
    for name, content in files.items():
        if name in ("", ".", "..") or Path(name).name != name:
            raise ValueError(f"not a plain file name: {name!r}")
        fd = os.open(datadir / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with open(fd, "wb") as out:
            os.fchmod(fd, 0o600)  # a file that already existed keeps its mode through O_CREAT
            if user is not None:
                os.fchown(fd, user.pw_uid, user.pw_gid)
            out.write(content)


def _start(
    datadir: Path,
    user: pwd.struct_passwd | None,
    *,
    bin_dir: Path,
    max_connections: int,
    settings: Mapping[str, str],
) -> PgServer:
    port = free_port()
    extra = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
    log = open(datadir / "server.log", "wb")  # noqa: SIM115 - owned by the server process
    proc = subprocess.Popen(
        [
            str(bin_dir / "postgres"),
            "-D",
            str(datadir),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={datadir}",
            "-c",
            f"max_connections={max_connections}",
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "shared_buffers=64MB",
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # fast shutdown if we die without stopping it (preexec_fn is only safe with no other threads)
        preexec_fn=die_with_parent(signal.SIGINT) if threading.active_count() == 1 else None,  # noqa: PLW1509
        user=_uid(user),
        group=_gid(user),
    )
    log.close()
    server = PgServer(host="127.0.0.1", port=port, datadir=datadir, pid=proc.pid)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {proc.returncode}: {(datadir / 'server.log').read_text()}"
            )
        ready = subprocess.run(
            [str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "1"],
            capture_output=True,
            check=False,
        )
        if ready.returncode == 0:
            return server
        time.sleep(0.1)
    _stop(proc.pid)
    raise RuntimeError("postgres did not become ready within 60 s")


def _provision(server: PgServer) -> None:
    # Through the Unix socket: TCP may admit only TLS, which the pgserver psql lacks.
    server.psql(
        f"""
        CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';
        CREATE ROLE trustuser LOGIN;
        SET password_encryption = 'md5';
        CREATE ROLE md5user LOGIN PASSWORD '{MD5_PASSWORD}';
        RESET password_encryption;
        CREATE DATABASE shop OWNER app;
        """,
        dbname="postgres",
        via_socket=True,
    )
    server.psql(
        DEMO_SCHEMA.read_text()
        + "GRANT USAGE ON SCHEMA shop TO app, md5user, trustuser;"
        + "GRANT ALL ON ALL TABLES IN SCHEMA shop TO app, md5user, trustuser;"
        + "ALTER SCHEMA shop OWNER TO app;",
        user="postgres",
        via_socket=True,
    )


def _stop(pid: int) -> None:
    """Fast shutdown by PID; escalate to SIGKILL of the process group if it hangs."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
