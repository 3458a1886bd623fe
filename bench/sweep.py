"""pgbench -S through pgbouncer and dbgov at 1 to 1,000 clients; prints a table, then one JSON line.

What grows with the number of connections (per-connection work on shared paths, buffers, a
crash under load) shows up here and not in ``run.py``'s 8 clients. Per client count, each target
is started fresh (pgbouncer in transaction mode with a pool as large as the clients; dbgov with
its default connection limit, auditing to a file) and gets ``pgbench -S -M simple`` with a
per-transaction log, for BENCH_SWEEP_SECONDS (default 3) of steady state plus time to log in
every client (pgbench's -T counts it, and 1,000 logins through a proxy take seconds).

The figures are taken over the steady state: from the moment every client has finished a
transaction to the moment the first one finished its last, so every client is active throughout
and logging in is left out (it is no per-transaction work). Per target:

- tps: transactions completed in that span, over its length;
- p99: the 99th percentile latency of those transactions (pgbench's log, µs resolution);
- peak RSS: the process's VmHWM (each process lives for one client count only);
- CPU µs per transaction: the process's utime + stime (/proc/PID/stat, sampled every 50 ms)
  between the first and last sample inside the span, over the transactions completed between
  those two samples (and the kernel's share of it, stime, in the JSON).

For dbgov, also whether the proxy survived (its exit status after SIGTERM: 0, or -11 for
SIGSEGV), every audited pgbench statement of the run against every transaction pgbench completed
(``lost`` is how many transactions have no audit line; a transaction in flight when pgbench stops
is audited too, so the audit may count a few more), ``dbgov_audit_dropped_total`` and whether every
session's hash chain verifies. Results are printed, never asserted. Everything started here is
stopped by PID.

Environment: BENCH_SWEEP_SECONDS (default 3), BENCH_SWEEP_CLIENTS (default 1,8,64,256,512,1000),
BENCH_SCALE (default 10).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

from dbgov_sidecar import audit

pg = run.pg

SECONDS = int(os.environ.get("BENCH_SWEEP_SECONDS", "3"))
CLIENTS = tuple(int(n) for n in os.environ.get("BENCH_SWEEP_CLIENTS", "1,8,64,256,512,1000").split(","))
SCRIPT = "SELECT abalance FROM pgbench_accounts WHERE aid = "
"""How the audit log spells the one statement of pgbench's select-only transaction."""


@dataclasses.dataclass(kw_only=True)
class Measured:
    """One pgbench run against one target."""

    tps: float | None = None
    transactions: int = 0
    p99_ms: float | None = None
    rss_mb: float | None = None
    cpu_us: float | None = None
    kernel_share: float | None = None
    error: str | None = None


@dataclasses.dataclass(kw_only=True)
class Audited:
    """What dbgov's audit log and metrics say about one run."""

    statements: int = 0
    lost: int = 0
    dropped: float | None = None
    chains_ok: bool = False
    exit_status: int | None = None


def main() -> int:
    pgbouncer = run.ensure_pgbouncer()
    rows: dict[int, tuple[Measured | None, Measured, Audited]] = {}
    started = time.monotonic()
    with pg.running_server(max_connections=max(CLIENTS) + 60) as server:
        print(f"initializing pgbench scale {run.SCALE} ...", flush=True)
        pg.init_pgbench(server, scale=run.SCALE)
        pg.run_psql(server.dsn(user="postgres"), "VACUUM ANALYZE; CHECKPOINT;")
        for clients in CLIENTS:
            bouncer = None
            if pgbouncer is not None:
                target = run.pgbouncer_running(
                    pgbouncer, server, mode="transaction", pool_size=clients, max_clients=clients + 10
                )
                bouncer = measure(target, clients)
            dbgov, audited = measure_dbgov(server, clients)
            rows[clients] = (bouncer, dbgov, audited)
            print(f"  {clients:>4} clients: pgbouncer {_tps(bouncer)}, dbgov {_tps(dbgov)}", flush=True)
    report(rows, time.monotonic() - started)
    return 0


def measure(target: AbstractContextManager[tuple[int, int]], clients: int) -> Measured:
    with target as (port, pid):
        return pgbench(port, pid, clients)


def measure_dbgov(server: pg.PgServer, clients: int) -> tuple[Measured, Audited]:
    workdir = Path(tempfile.mkdtemp(prefix="dbgov-sweep-"))
    metrics_port = pg.free_port()
    exited: list[int] = []
    audited = Audited()
    try:
        with run.dbgov_running(
            server, workdir=workdir, exited=exited, DBGOV_METRICS=f"127.0.0.1:{metrics_port}"
        ) as (port, pid):
            measured = pgbench(port, pid, clients)
            audited.dropped = _metric(metrics_port, "dbgov_audit_dropped_total")
        audited.exit_status = exited[0] if exited else None
        count_audited(workdir / "audit.jsonl", measured, audited)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return measured, audited


def pgbench(port: int, pid: int, clients: int) -> Measured:
    logs = Path(tempfile.mkdtemp(prefix="dbgov-sweep-log-"))
    sampler = Sampler(lambda: run.cpu_seconds(pid))
    threads = "1" if clients == 1 else "2"
    duration = SECONDS + 1 + clients // 150  # the steady state, and time for the logins
    try:
        with sampler:
            proc = subprocess.run(
                [
                    *(str(pg.BIN / "pgbench"), "-n", "-S", "-M", "simple", "-c", str(clients), "-j", threads),
                    *("-T", str(duration), "--log", f"--log-prefix={logs}/tx", *run.target(port)),
                ],
                env={**os.environ, "PGPASSWORD": pg.APP_PASSWORD},
                capture_output=True,
                text=True,
                check=False,
                timeout=duration + 180,
            )
        measured = Measured(rss_mb=peak_rss_mb(pid))
        if proc.returncode != 0:
            tail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            measured.error = f"pgbench exit {proc.returncode}: " + " | ".join(tail)
        finished = read_log(logs)
        measured.transactions = len(finished)
        steady(finished, sampler.samples, clients=clients, measured=measured)
        return measured
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def read_log(directory: Path) -> list[tuple[int, float, int]]:
    """Every completed transaction in pgbench's per-transaction logs: (client, end time, latency
    µs). Lines: client_id transaction_no latency_us script_no epoch_s epoch_us."""
    finished = []
    for path in directory.iterdir():
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[2].isdigit():  # (skipped or failed transactions are not)
                finished.append((int(fields[0]), int(fields[4]) + int(fields[5]) / 1e6, int(fields[2])))
    return finished


def steady(
    finished: list[tuple[int, float, int]],
    samples: list[tuple[float, tuple[float, float]]],
    *,
    clients: int,
    measured: Measured,
) -> None:
    """tps, p99 and CPU per transaction while every client is active (see the module docstring)."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    for client, end, _ in finished:
        first[client] = min(end, first.get(client, end))
        last[client] = max(end, last.get(client, end))
    if len(first) < clients:
        measured.error = (measured.error or "") + f" only {len(first)} of {clients} clients got going"
        return
    start, stop = max(first.values()), min(last.values())
    inside = [(t, cpu) for t, cpu in samples if start <= t <= stop]
    if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.5:
        measured.error = (measured.error or "") + " no steady state of 0.5 s to measure"
        return
    (t0, (user0, sys0)), (t1, (user1, sys1)) = inside[0], inside[-1]
    latencies = sorted(latency for _, end, latency in finished if t0 < end <= t1)
    if not latencies:
        return
    measured.tps = len(latencies) / (t1 - t0)
    measured.p99_ms = latencies[math.ceil(0.99 * len(latencies)) - 1] / 1000
    spent = (user1 - user0) + (sys1 - sys0)
    measured.cpu_us = spent * 1e6 / len(latencies)
    measured.kernel_share = (sys1 - sys0) / spent if spent else None


class Sampler:
    """Samples (wall-clock time, value) every 50 ms in a thread while entered."""

    def __init__(self, read: Callable[[], tuple[float, float]]) -> None:
        self.read = read
        self.samples: list[tuple[float, tuple[float, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.read()))
            except OSError:  # the process is gone
                return
            self._stop.wait(0.05)


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def count_audited(path: Path, measured: Measured, audited: Audited) -> None:
    """Audited pgbench statements against pgbench's completed transactions, and the chains.

    A transaction in flight when pgbench stops is audited too (with the disconnect's SQLSTATE),
    so there may be more audited statements than completed transactions, never fewer."""
    sessions: dict[str, list[dict[str, object]]] = {}
    for event in _events(path):
        sessions.setdefault(str(event.get("session_id")), []).append(event)
        if event.get("type") == "statement" and str(event.get("statement", "")).startswith(SCRIPT):
            audited.statements += 1
    audited.lost = max(0, measured.transactions - audited.statements)
    audited.chains_ok = bool(sessions) and all(audit.verify(trail) for trail in sessions.values())


def _events(path: Path) -> Iterator[dict[str, object]]:
    if not path.exists():
        return
    with path.open() as lines:
        for line in lines:
            try:
                yield json.loads(line)
            except ValueError:  # a line cut short by a crash
                continue


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            body = response.read().decode()
    except OSError:
        return None
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def report(rows: dict[int, tuple[Measured | None, Measured, Audited]], elapsed: float) -> None:
    columns = (
        *("clients", "pgb tps", "dbgov tps", "tps ×", "pgb p99", "dbgov p99", "p99 ×"),
        *("pgb MB", "dbgov MB", "RSS ×", "pgb µs/tx", "dbgov µs/tx", "cpu ×"),
        *("audited", "lost", "dropped", "chains", "exit"),
    )
    widths = [8, 9, 10, 7, 9, 10, 7, 8, 9, 7, 10, 12, 7, 9, 7, 8, 7, 6]
    header = "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    print(f"\npgbench -S -M simple, {SECONDS} s per run; p99 in ms; × is dbgov / pgbouncer")
    print(header)
    print("-" * len(header))
    summary: dict[str, dict[str, object]] = {}
    for clients, (pgb, dbg, aud) in rows.items():
        b = pgb or Measured()
        cells = (
            *(clients, _fmt(b.tps), _fmt(dbg.tps), _ratio(dbg.tps, b.tps)),
            *(_fmt(b.p99_ms, 2), _fmt(dbg.p99_ms, 2), _ratio(dbg.p99_ms, b.p99_ms)),
            *(_fmt(b.rss_mb, 1), _fmt(dbg.rss_mb, 1), _ratio(dbg.rss_mb, b.rss_mb)),
            *(_fmt(b.cpu_us, 1), _fmt(dbg.cpu_us, 1), _ratio(dbg.cpu_us, b.cpu_us)),
            *(aud.statements, aud.lost, _fmt(aud.dropped), "ok" if aud.chains_ok else "BROKEN"),
            aud.exit_status,
        )
        print("".join(f"{c!s:>{w}}" for c, w in zip(cells, widths, strict=True)))
        summary[str(clients)] = {
            "pgbouncer": dataclasses.asdict(b),
            "dbgov": dataclasses.asdict(dbg),
            "audit": dataclasses.asdict(aud),
        }
    shares = ", ".join(f"{clients}: {_share(pgb)} / {_share(dbg)}" for clients, (pgb, dbg, _) in rows.items())
    print(f"\nkernel share of CPU (pgbouncer / dbgov) by clients: {shares}")
    for clients, (pgb, dbg, _) in rows.items():
        for name, measured in (("pgbouncer", pgb), ("dbgov", dbg)):
            if measured is not None and measured.error:
                print(f"  {clients} clients, {name}: {measured.error}")
    print(f"\nsweep took {elapsed:.0f} s")
    print(json.dumps({"seconds": SECONDS, "scale": run.SCALE, "sweep": summary}))


def _tps(measured: Measured | None) -> str:
    return "-" if measured is None or measured.tps is None else f"{measured.tps:.0f} tps"


def _share(measured: Measured | None) -> str:
    return "-" if measured is None or measured.kernel_share is None else f"{measured.kernel_share:.0%}"


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> str:
    return "-" if not ours or not theirs else f"{ours / theirs:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
