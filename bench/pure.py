"""The proxy's Python work per statement with no sockets: pgbench-like traffic through a real
``proxy.ClientConnection`` (session, policy engine, audit sealing, metrics), its transports
replaced by sinks. Prints µs per statement for each protocol; separates our code from kernel
and event-loop time, which ``bench/focus.py`` includes.

Best of PURE_REPEAT (default 7) runs of PURE_STATEMENTS (default 30000), PURE_PROFILE=simple|extended prints a
cProfile of that run, PURE_LANE=off measures without the compiled lane.
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run

from dbgov_sidecar import audit, metrics, policies, proxy
from dbgov_sidecar.pgwire import messages

# What every PostgreSQL reports at login, and the proxy requires (it reads SQL as UTF-8 with
# standard-conforming strings).
LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]


STATEMENTS = int(os.environ.get("PURE_STATEMENTS", "30000"))
REPEAT = int(os.environ.get("PURE_REPEAT", "7"))
LANE = os.environ.get("PURE_LANE", "on") != "off"
SELECT = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
FIELD = messages.Field(
    name="abalance", table_oid=16400, attnum=3, type_oid=23, type_size=4, type_modifier=-1, format=0
)
REPLY = (
    messages.row_description([FIELD])
    + messages.data_row([b"-4321"])
    + messages.command_complete("SELECT 1")
    + messages.ready_for_query("I")
)


class Sink:
    """Stands in for a transport: takes writes, reports a peer address."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol: Any) -> None:
        pass


def connection(policy: policies.PolicyHolder) -> proxy.ClientConnection:
    counters = metrics.Metrics()
    lines: list[int] = [0]

    def sink(text: str) -> bool:
        lines[0] += len(text)
        return True

    log = audit.AuditLog(sink)
    owner = proxy.Proxy(proxy.ProxyConfig(lane=LANE), policy=policy, audit=proxy.Recorder(log, counters))
    conn = proxy.ClientConnection(owner)

    async def connect() -> None:  # the shell starts its timers on the running loop
        conn.connection_made(Sink())  # type: ignore[arg-type]

    loop = asyncio.new_event_loop()
    loop.run_until_complete(connect())
    loop.close()
    assert conn.session is not None
    params = {"user": "app", "database": "shop", "application_name": "pgbench"}
    conn.session.client_data(messages.startup_message(params), time.time())
    conn.session.actions.clear()
    up = proxy.UpstreamConnection.__new__(proxy.UpstreamConnection)
    up.transport = Sink()  # type: ignore[assignment]
    up.relaying = True
    up.owner = conn
    conn.upstream = up
    conn.session.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=time.time())
    conn.pump()
    if LANE:
        conn.start_lane()
    return conn


def simple(aid: int) -> tuple[bytes, bytes]:
    """What pgbench -S -M simple sends, and the server's answer."""
    return messages.query(SELECT.format(aid)), REPLY


def extended(aid: int) -> tuple[bytes, bytes]:
    """What pgbench -S -M extended sends, and the server's answer."""
    request = (
        messages.parse("", SELECT.format("$1"))
        + messages.bind("", "", [str(aid).encode()], param_formats=[0], result_formats=[0])
        + messages.describe("P", "")
        + messages.execute("", 0)
        + messages.SYNC_MESSAGE
    )
    return request, messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE + REPLY


def drive(conn: proxy.ClientConnection, traffic: list[tuple[bytes, bytes]]) -> None:
    up = conn.upstream
    assert up is not None
    for request, answer in traffic:
        conn.data_received(request)
        up.data_received(answer)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "policy.yaml"
        path.write_text(run.BENCH_POLICY)
        holder = policies.PolicyHolder(str(path))
    rng = random.Random(1)
    for name, build in (("simple", simple), ("extended", extended)):
        conn = connection(holder)
        traffic = [build(rng.randrange(1, 1_000_000)) for _ in range(STATEMENTS)]
        drive(conn, traffic[:1000])
        profiler = cProfile.Profile() if os.environ.get("PURE_PROFILE") == name else None
        spent = float("inf")
        for _ in range(REPEAT):  # the best run: other processes only ever add time
            start = time.process_time()
            if profiler:
                profiler.enable()
            drive(conn, traffic)
            if profiler:
                profiler.disable()
            spent = min(spent, time.process_time() - start)
        print(f"{name:<9} {spent * 1e6 / STATEMENTS:6.2f} µs/statement", flush=True)
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
