"""A quick focused benchmark: pgbench through dbgov only, reporting the proxy's CPU µs per transaction.

For measuring one change at a time without the full comparison of ``bench/run.py``.
Arguments: workload names from ``run.WORKLOADS`` (default: select-simple select-extended tpcb).
Environment: BENCH_SECONDS (default 10), BENCH_SCALE (default 10), BENCH_REPEAT (default 1),
BENCH_PROFILE=path to run the proxy under cProfile and write its stats there (one file per
workload, ``path.<workload>``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

REPEAT = int(os.environ.get("BENCH_REPEAT", "1"))
PROFILE = os.environ.get("BENCH_PROFILE", "")


def main(names: list[str]) -> int:
    names = names or ["select-simple", "select-extended", "tpcb"]
    with run.pg.running_server(max_connections=100) as server:
        run.pg.init_pgbench(server, scale=run.SCALE)
        run.pg.run_psql(server.dsn(user="postgres"), "VACUUM ANALYZE; CHECKPOINT;")
        for name in names:
            args = run.WORKLOADS[name]
            command = None
            if PROFILE:
                command = ["-m", "cProfile", "-o", f"{PROFILE}.{name}", "-m", "dbgov_sidecar.proxy_cli"]
            with run.dbgov_running(server, command=command) as (port, pid):
                for _ in range(REPEAT):
                    tps, us = run.measured(pid, port, args, label=name)
                    share = run.SYSTEM_SHARE.get(name, 0.0)
                    print(f"{name:<17} {tps:8.0f} tps  {us:6.1f} µs/tx  kernel {share:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
