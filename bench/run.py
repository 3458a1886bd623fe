"""pgbench through direct PostgreSQL, pgbouncer and dbgov; prints a table, then one JSON line.

Workloads (scale 10, -c 8 -j 2): -S simple, -S extended, -S prepared, TPC-B (simple protocol).
pgbouncer runs in transaction mode (session mode for prepared statements, which pgbouncer 1.18
cannot keep across transactions); dbgov runs as its own process with a policy that allows the
pgbench tables. Results are printed, never asserted. Everything started here is stopped by PID.

Environment: BENCH_SECONDS (default 10) per run, BENCH_SCALE (default 10).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import pg  # noqa: E402 - the test harness starts PostgreSQL

SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
SCALE = int(os.environ.get("BENCH_SCALE", "10"))
CLIENTS = ["-c", "8", "-j", "2"]
WORKLOADS = {
    "select-simple": ["-S", "-M", "simple"],
    "select-extended": ["-S", "-M", "extended"],
    "select-prepared": ["-S", "-M", "prepared"],
    "tpcb": ["-M", "simple"],
}
BENCH_POLICY = pg.PGBENCH_POLICY


def main() -> int:
    pgbouncer = ensure_pgbouncer()
    with pg.running_server(max_connections=100) as server:
        print(f"initializing pgbench scale {SCALE} ...", flush=True)
        pg.init_pgbench(server, scale=SCALE)
        pg.run_psql(server.dsn(user="postgres"), "VACUUM ANALYZE; CHECKPOINT;")
        results: dict[str, dict[str, float]] = {}
        cpu: dict[str, dict[str, float]] = {}
        for name, args in WORKLOADS.items():
            results[name], cpu[name] = {}, {}
            results[name]["direct"] = pgbench(server.port, args)
            if pgbouncer is not None:
                mode = "session" if "prepared" in args else "transaction"
                with pgbouncer_running(pgbouncer, server, mode=mode) as (port, pid):
                    tps, us = measured(pid, port, args, label=f"pgbouncer/{name}")
                    results[name]["pgbouncer"], cpu[name]["pgbouncer"] = tps, us
            with dbgov_running(server) as (port, pid):
                tps, us = measured(pid, port, args, label=f"dbgov/{name}")
                results[name]["dbgov"], cpu[name]["dbgov"] = tps, us
            print(f"  {name}: " + ", ".join(f"{k} {v:.0f} tps" for k, v in results[name].items()), flush=True)
    report(results, cpu)
    return 0


def pgbench(port: int, args: list[str]) -> float:
    proc = subprocess.run(
        [str(pg.BIN / "pgbench"), "-n", *CLIENTS, *args, "-T", str(SECONDS), *target(port)],
        env={**os.environ, "PGPASSWORD": pg.APP_PASSWORD},
        capture_output=True,
        text=True,
        check=False,
        timeout=SECONDS + 120,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("tps ="):
            return float(line.split()[2])
    raise RuntimeError(f"pgbench failed: {proc.stderr.strip() or proc.stdout.strip()}")


def target(port: int) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(port), "-U", "app", "shop"]


SYSTEM_SHARE: dict[str, float] = {}
"""Per target, the share of its CPU time spent in the kernel (socket I/O), for the report."""


def measured(pid: int, port: int, args: list[str], *, label: str = "") -> tuple[float, float]:
    """TPS, and the proxy's CPU microseconds per transaction."""
    user0, sys0 = cpu_seconds(pid)
    tps = pgbench(port, args)
    user1, sys1 = cpu_seconds(pid)
    spent = (user1 - user0) + (sys1 - sys0)
    if label and spent > 0:
        SYSTEM_SHARE[label] = (sys1 - sys0) / spent
    return tps, spent * 1e6 / max(tps * SECONDS, 1)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def ensure_pgbouncer() -> str | None:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("installing pgbouncer from Debian packages ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "pgbouncer"],
        check=False,
        env=env,
        capture_output=True,
    )
    # The package starts its own service; this benchmark runs its own instance only.
    subprocess.run(["service", "pgbouncer", "stop"], check=False, capture_output=True)
    return shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )


@contextmanager
def pgbouncer_running(
    binary: str, server: pg.PgServer, *, mode: str, pool_size: int = 8, max_clients: int = 100
) -> Iterator[tuple[int, int]]:
    port = pg.free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dbgov-bench-pgb-"))
    (workdir / "userlist.txt").write_text(f'"app" "{pg.APP_PASSWORD}"\n')
    (workdir / "pgbouncer.ini").write_text(
        f"""[databases]
shop = host=127.0.0.1 port={server.port} dbname=shop
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir}/userlist.txt
pool_mode = {mode}
default_pool_size = {pool_size}
max_client_conn = {max_clients}
logfile = {workdir}/pgbouncer.log
pidfile = {workdir}/pgbouncer.pid
"""
    )
    kwargs: dict[str, int] = {}
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        user = pwd.getpwnam(pg.SYSTEM_USER)
        for path in workdir.iterdir():
            os.chown(path, user.pw_uid, user.pw_gid)
        os.chown(workdir, user.pw_uid, user.pw_gid)
        kwargs = {"user": user.pw_uid, "group": user.pw_gid}
    proc = subprocess.Popen(
        [binary, str(workdir / "pgbouncer.ini")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )
    try:
        wait_port(port, proc)
        yield port, proc.pid
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def dbgov_running(
    server: pg.PgServer,
    *,
    command: list[str] | None = None,
    workdir: Path | None = None,
    exited: list[int] | None = None,
    **extra_env: str,
) -> Iterator[tuple[int, int]]:
    """The proxy as its own process: (port, pid). Its audit log is ``workdir/audit.jsonl`` (a
    temporary directory, removed afterwards, unless ``workdir`` is given); its exit status is
    appended to ``exited``."""
    port = pg.free_port()
    keep = workdir is not None
    workdir = workdir or Path(tempfile.mkdtemp(prefix="dbgov-bench-"))
    policy = workdir / "policy.yaml"
    policy.write_text(BENCH_POLICY)
    env = {
        **os.environ,
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@127.0.0.1:{server.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": pg.APP_PASSWORD,
        "DBGOV_AUDIT": str(workdir / "audit.jsonl"),
        "DBGOV_METRICS": "",
        **extra_env,
    }
    if policy_engine_available():
        env["DBGOV_POLICY"] = str(policy)
    log = open(workdir / "proxy.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, *(command or ["-m", "dbgov_sidecar.proxy_cli"])],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_port(port, proc)
        yield port, proc.pid
    finally:
        stop(proc)
        log.close()
        if exited is not None:
            exited.append(proc.returncode)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def policy_engine_available() -> bool:
    try:
        import dbgov_policy.engine  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        ready = subprocess.run(
            [str(pg.BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-t", "1"],
            capture_output=True,
            check=False,
        )
        if ready.returncode in (0, 1):  # 1: rejecting connections, but listening
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def report(results: dict[str, dict[str, float]], cpu: dict[str, dict[str, float]]) -> None:
    header = f"{'workload':<17}{'direct':>10}{'pgbouncer':>11}{'dbgov':>10}{'dbgov/pgb':>11}{'dbgov/dir':>11}"
    header += f"{'pgb µs/tx':>11}{'dbgov µs/tx':>13}"
    print()
    print(header)
    print("-" * len(header))
    summary: dict[str, dict[str, float | None]] = {}
    for name, row in results.items():
        direct, pgb, dbg = row.get("direct"), row.get("pgbouncer"), row.get("dbgov")
        vs_pgb = dbg / pgb if dbg and pgb else None
        vs_direct = dbg / direct if dbg and direct else None
        summary[name] = {
            "direct_tps": direct,
            "pgbouncer_tps": pgb,
            "dbgov_tps": dbg,
            "dbgov_vs_pgbouncer": None if vs_pgb is None else round(vs_pgb, 3),
            "dbgov_vs_direct": None if vs_direct is None else round(vs_direct, 3),
            "pgbouncer_cpu_us_per_tx": _round(cpu[name].get("pgbouncer")),
            "dbgov_cpu_us_per_tx": _round(cpu[name].get("dbgov")),
        }
        print(
            f"{name:<17}{_fmt(direct):>10}{_fmt(pgb):>11}{_fmt(dbg):>10}{_fmt(vs_pgb, 2):>11}"
            f"{_fmt(vs_direct, 2):>11}{_fmt(cpu[name].get('pgbouncer'), 1):>11}"
            f"{_fmt(cpu[name].get('dbgov'), 1):>13}"
        )
    shares = ", ".join(f"{k} {v:.0%}" for k, v in sorted(SYSTEM_SHARE.items()))
    print(f"\nkernel share of proxy CPU: {shares}")
    print()
    print(json.dumps({"seconds": SECONDS, "scale": SCALE, "policy": policy_engine_available(), **summary}))


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    raise SystemExit(main())
