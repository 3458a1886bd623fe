"""The audit flush with hundreds of sessions whose compiled lanes hold lines (issue 14, item 9).

A flush has every lane hand over its lines, then writes them; a full buffer meanwhile goes to
the sink, never back into the flush. Before, each lane's first line found the buffer full and
flushed again, draining every lane from inside the drain: the nesting grew with the number of
sessions until the C stack overflowed (SIGSEGV) or Python's recursion limit hit, and the lines
the drains had taken out vanished without being counted. These sessions run the real proxy
shell, session and lane without sockets (as ``test_lane.py`` does).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dbgov_sidecar import audit, embedded_pg, metrics, policies, proxy, session
from dbgov_sidecar.pgwire import messages

pytestmark = pytest.mark.skipif(session._lane is None, reason="the compiled lane is not built")

FIELD = messages.Field(
    name="abalance", table_oid=16400, attnum=3, type_oid=23, type_size=4, type_modifier=-1, format=0
)
ANSWER = (
    messages.row_description([FIELD])
    + messages.data_row([b"-4321"])
    + messages.command_complete("SELECT 1")
    + messages.ready_for_query("I")
)

SERVER_SETTINGS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]
"""What PostgreSQL reports at login (the settings the session reads SQL by)."""


def select(aid: int) -> str:
    return f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"


class Transport:
    """What the shell writes to, kept (the client's answers are not looked at here)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass


class Sink:
    """The audit sink: keeps every batch it takes; ``refuse(n)`` says whether to refuse the n-th."""

    def __init__(self, refuse: Callable[[int], bool] = lambda n: False) -> None:
        self.lines: list[str] = []
        self.calls = 0
        self.refuse = refuse

    def __call__(self, text: str) -> bool:
        self.calls += 1
        if self.refuse(self.calls):
            return False
        self.lines.extend(text.splitlines())
        return True


class Fleet:
    """``n`` logged-in sessions of one proxy, each with its lane, sharing one audit log."""

    def __init__(self, tmp: Path, n: int, *, sink: Sink, max_buffer: int, failure_policy: str) -> None:
        path = tmp / "policy.yaml"
        path.write_text(embedded_pg.PGBENCH_POLICY)
        self.log = audit.AuditLog(sink, failure_policy=failure_policy, max_buffer=max_buffer)
        self.counters = metrics.Metrics()
        self.proxy = proxy.Proxy(
            proxy.ProxyConfig(lane=True),
            policy=policies.PolicyHolder(str(path)),
            audit=proxy.Recorder(self.log, self.counters),
        )
        self.conns: list[proxy.ClientConnection] = []
        loop = asyncio.new_event_loop()
        try:
            for _ in range(n):
                self.conns.append(loop.run_until_complete(self._connect()))
        finally:
            loop.close()
        self.sent: dict[str, list[str]] = {self.session_id(c): [] for c in self.conns}
        self.depth = 0
        self.max_depth = 0
        self.drains = 0
        self.log.producers[:] = [self._counted(p) for p in self.log.producers]

    async def _connect(self) -> proxy.ClientConnection:
        conn = proxy.ClientConnection(self.proxy)
        conn.connection_made(Transport())  # type: ignore[arg-type]
        s = conn.session
        assert s is not None
        s.client_data(messages.startup_message({"user": "app", "database": "shop"}), 0.0)
        s.actions.clear()
        up = proxy.UpstreamConnection.__new__(proxy.UpstreamConnection)
        up.transport = Transport()  # type: ignore[assignment]
        up.relaying = True
        up.owner = conn
        conn.upstream = up
        s.upstream_ready(
            parameter_status=SERVER_SETTINGS, notices=[], now=proxy.time.time(), masked_attrs=None
        )
        conn.pump()
        conn.start_lane()
        assert conn.lane is not None
        return conn

    def _counted(self, produce: Callable[[], None]) -> Callable[[], None]:
        """The producer, counting its calls and how deeply they nest."""

        def counted() -> None:
            self.drains += 1
            self.depth += 1
            self.max_depth = max(self.max_depth, self.depth)
            try:
                produce()
            finally:
                self.depth -= 1

        return counted

    @staticmethod
    def session_id(conn: proxy.ClientConnection) -> str:
        assert conn.session is not None
        return str(conn.session._client_info.session_id)

    def statement(self, conn: proxy.ClientConnection, aid: int) -> None:
        conn.data_received(messages.query(select(aid)))
        assert conn.upstream is not None
        conn.upstream.data_received(ANSWER)
        self.sent[self.session_id(conn)].append(select(aid))

    def trails(self, lines: list[str]) -> dict[str, list[dict[str, Any]]]:
        trails: dict[str, list[dict[str, Any]]] = {}
        for line in lines:
            event = json.loads(line)
            trails.setdefault(str(event["session_id"]), []).append(event)
        return trails


def _warm(fleet: Fleet) -> None:
    """Two statements per session: the first is decided in Python, the second teaches the lane
    (the engine's cache made its decision); from then on the lane runs the shape."""
    for aid in (1, 2):
        for conn in fleet.conns:
            fleet.statement(conn, aid)


@pytest.mark.parametrize("max_buffer", [10_000, 50])
def test_a_flush_drains_every_lane_once_without_nesting(tmp_path: Path, max_buffer: int) -> None:
    """400 sessions, each lane holding 6 lines: one flush writes every line once, in order, every
    chain unbroken, and asks the producers once (no flush inside the flush). With a buffer
    smaller than a batch (50), a full buffer goes to the sink rather than dropping lines."""
    sink = Sink()
    fleet = Fleet(tmp_path, 400, sink=sink, max_buffer=max_buffer, failure_policy="best-effort")
    _warm(fleet)
    fleet.log.flush()
    for aid in range(10, 16):
        for conn in fleet.conns:
            fleet.statement(conn, aid)
    assert all(c.lane is not None and c.lane.kind == 0 for c in fleet.conns)
    through_lane = fleet.counters.lane_statements
    fleet.drains = fleet.max_depth = 0
    fleet.log.flush()
    assert (fleet.drains, fleet.max_depth) == (1, 1)
    assert fleet.counters.lane_statements - through_lane == 400 * 6  # every lane held its 6
    assert fleet.log.dropped == 0
    assert len(sink.lines) == len(set(sink.lines)) == fleet.log.written
    trails = fleet.trails(sink.lines)
    assert set(trails) == set(fleet.sent)
    for session_id, trail in trails.items():
        assert audit.verify(trail)
        assert trail[0]["type"] == "session_start"
        assert [e["statement"] for e in trail if e["type"] == "statement"] == fleet.sent[session_id]


def test_statements_never_drain_other_sessions_lanes(tmp_path: Path) -> None:
    """The work per statement does not depend on the number of sessions: a lane whose batch is
    full hands it to the log, and a full log buffer goes to the sink, without visiting the other
    sessions' lanes (before, every 256 lines drained all of them, nested)."""
    sink = Sink()
    fleet = Fleet(tmp_path, 200, sink=sink, max_buffer=10_000, failure_policy="best-effort")
    _warm(fleet)
    fleet.log.flush()
    fleet.drains = 0
    for aid in range(100, 300):  # 200 statements per session: each lane fills its batch thrice
        for conn in fleet.conns:
            fleet.statement(conn, aid)
    assert fleet.drains == 0
    assert fleet.log.written > 200 * 150  # full batches went to the sink meanwhile
    fleet.log.flush()
    assert fleet.log.dropped == 0 and fleet.drains == 1
    for session_id, trail in fleet.trails(sink.lines).items():
        assert audit.verify(trail)
        assert [e["statement"] for e in trail if e["type"] == "statement"] == fleet.sent[session_id]


@pytest.mark.parametrize("failure_policy", ["best-effort", "fail-closed"])
def test_every_line_is_written_or_counted_as_dropped(tmp_path: Path, failure_policy: str) -> None:
    """A sink that refuses every third batch: each line the sessions produced is either in the
    sink or in ``dropped`` (dbgov_audit_dropped_total), and fail-closed turns unhealthy."""
    sink = Sink(refuse=lambda n: n % 3 == 0)
    fleet = Fleet(tmp_path, 300, sink=sink, max_buffer=100, failure_policy=failure_policy)
    _warm(fleet)
    for aid in range(10, 20):
        for conn in fleet.conns:
            fleet.statement(conn, aid)
    fleet.log.flush()
    produced = 300 * (1 + 2 + 10)  # session_start, the two warm-up statements, ten through the lanes
    assert fleet.log.dropped > 0
    assert fleet.log.written + fleet.log.dropped == produced
    assert len(sink.lines) == fleet.log.written
    last_refused = sink.calls % 3 == 0
    assert fleet.log.healthy is (failure_policy == "best-effort" or not last_refused)


class Broken(Exception):
    pass


def test_a_sink_that_raises_loses_no_line_uncounted() -> None:
    """Whatever a sink raises, the batch counts as dropped and the flush goes on."""
    calls = [0]

    def sink(text: str) -> bool:
        calls[0] += 1
        if calls[0] % 2:
            raise Broken("sink bug")
        return True

    log = audit.AuditLog(sink, max_buffer=10)
    for i in range(95):
        log.write({"type": "statement", "session_id": "a", "enforced": "allow", "n": i})
    log.flush()
    assert log.written + log.dropped == 95 and log.dropped > 0


def test_a_producer_that_flushes_does_not_nest() -> None:
    """A producer calling ``flush`` (as the lanes did) gets its lines written, and the producers
    are not asked again from inside the flush."""
    sink = Sink()
    log = audit.AuditLog(sink, max_buffer=10_000)
    asked = [0]

    def produce() -> None:
        asked[0] += 1
        for i in range(300):
            log.write({"type": "statement", "session_id": "p", "enforced": "allow", "n": i})
            log.flush()

    log.producers.append(produce)
    log.flush()
    assert asked[0] == 1 and log.written == 300 and len(sink.lines) == 300
