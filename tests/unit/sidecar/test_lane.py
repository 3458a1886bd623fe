"""The compiled lane (``_lane.pyx``) behaves exactly like the Python session it shortcuts.

Two proxy connections, one with the lane and one without, get the same random traffic (pgbench's
statements, refusals, errors, notices, answers split across reads or run together, pipelining,
prepared statements, search_path changes); both must send the same bytes each way, write the
same audit lines (hash chain included) and count the same metrics. Then the properties the lane
must never break: a policy reload or a failing fail-closed audit sink takes effect on the very
next statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbgov_sidecar import audit, embedded_pg, metrics, policies, proxy, session
from dbgov_sidecar.pgwire import messages

# What every PostgreSQL reports at login, and the proxy requires (it reads SQL as UTF-8 with
# standard-conforming strings).
LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]


def test_the_lane_is_built() -> None:
    """`make setup` compiles it (setup.py); a build without it would quietly lose the speed."""
    assert session._lane is not None


POLICY = embedded_pg.PGBENCH_POLICY.replace("rollback]", "rollback, set]")
BLOCK_SELECTS = POLICY.replace("statements: [select, ", "statements: [")
LIMITED = POLICY + "guardrails:\n  maxRowsReturned: 2\n  maxRowsAffected: 5\n"
MASKING = POLICY + "masks:\n  - {table: public.pgbench_accounts, column: filler, strategy: redact}\n"
"""Reads of pgbench_accounts are rewritten (mask verdicts, which the lane never takes)."""

FIELD = messages.Field(
    name="abalance", table_oid=16400, attnum=3, type_oid=23, type_size=4, type_modifier=-1, format=0
)
ROWS = (
    messages.row_description([FIELD]) + messages.data_row([b"-4321"]) + messages.command_complete("SELECT 1")
)
Z = {s: messages.ready_for_query(s) for s in "ITE"}
SECRET = messages.Field(
    name="filler", table_oid=16400, attnum=4, type_oid=25, type_size=-1, type_modifier=-1, format=0
)
MASKED = {(16400, 4): "public.pgbench_accounts.filler"}


def select(aid: int) -> str:
    return f"SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"


def extended(
    sql: str, *params: bytes, name: str = "", parse: bool = True, describe: str | None = "P"
) -> bytes:
    head = messages.parse(name, sql) if parse else b""
    return (
        head
        + messages.bind("", name, list(params), param_formats=[0], result_formats=[0])
        + (messages.describe(describe, "" if describe == "P" else name) if describe else b"")
        + messages.execute("", 0)
        + messages.SYNC_MESSAGE
    )


# Client requests and the server's answers to them, by name; a step picks one of each.
def _client(name: str, n: int) -> bytes:
    if name == "select":
        return messages.query(select(n))
    if name == "filler":  # its answer shows a column masked sessions mask
        return messages.query(f"SELECT aid, filler FROM pgbench_accounts WHERE aid = {n};")
    if name == "range":  # its answer may run over maxRowsReturned
        return messages.query(f"SELECT abalance FROM pgbench_accounts WHERE aid < {n};")
    if name == "update":
        return messages.query(f"UPDATE pgbench_accounts SET abalance = abalance + {n} WHERE aid = {n % 97};")
    if name == "begin":
        return messages.query("BEGIN;")
    if name == "end":
        return messages.query("END;")
    if name == "drop":
        return messages.query("DROP TABLE pgbench_accounts")
    if name == "new-shape":
        return messages.query(f"SELECT bid FROM pgbench_branches WHERE bid = {n} AND bbalance > {n}")
    if name == "set":
        return messages.query("SET search_path TO public")
    if name == "extended":
        return extended("SELECT abalance FROM pgbench_accounts WHERE aid = $1", str(n).encode())
    if name == "unicode":  # every kind of character the audit line escapes
        return messages.query(
            f'SELECT abalance FROM pgbench_accounts WHERE aid = {n} /* é 😀 \x7f \x01 \t " \\ */;'
        )
    if name == "extended2":
        return extended("SELECT bid FROM pgbench_branches WHERE bid = $1", str(n).encode())
    if name == "rebind":  # the unnamed statement parsed last, bound again
        return extended("", str(n).encode(), parse=False)
    if name == "prepare":
        return (
            messages.parse("P0_1", "SELECT abalance FROM pgbench_accounts WHERE aid = $1")
            + messages.SYNC_MESSAGE
        )
    if name == "prepared":
        return extended("", str(n).encode(), name="P0_1", parse=False)
    if name == "undescribed":  # no Describe: rows without a RowDescription
        return extended(
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1", str(n).encode(), describe=None
        )
    if name == "prepare-secret":  # described as a statement: its second column is a masked one
        return (
            messages.parse("P0_2", "SELECT aid, filler FROM pgbench_accounts WHERE aid = $1")
            + messages.describe("S", "P0_2")
            + messages.SYNC_MESSAGE
        )
    if name == "prepared-secret":  # executed without a Describe: the rows need masking all the same
        return extended("", str(n).encode(), name="P0_2", parse=False, describe=None)
    if name == "unprepared":
        return extended("", b"1", name="nope", parse=False)
    if name == "pipelined":
        return messages.query(select(n)) + messages.query(select(n + 1))
    if name == "bad":
        return b"Q\0\0\0\7ab"
    if name == "not-utf8":
        return b"Q\0\0\0\x08\xff\xfe1\0"
    raise AssertionError(name)


def _server(name: str) -> bytes:
    return {
        "rows": ROWS + Z["I"],
        "many": messages.row_description([FIELD])
        + messages.data_row([b"1"]) * 3
        + messages.command_complete("SELECT 3")
        + Z["I"],
        "secret": messages.row_description([FIELD, SECRET])
        + messages.data_row([b"1", b"hunter2"])
        + messages.command_complete("SELECT 1")
        + Z["I"],
        "rows-in-block": ROWS + Z["T"],
        "update": messages.command_complete("UPDATE 1") + Z["T"],
        "begin": messages.command_complete("BEGIN") + Z["T"],
        "commit": messages.command_complete("COMMIT") + Z["I"],
        "extended": messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE + ROWS + Z["I"],
        "bound": messages.BIND_COMPLETE_MESSAGE + ROWS + Z["I"],
        "parsed": messages.PARSE_COMPLETE_MESSAGE + Z["I"],
        "parsed-secret": messages.PARSE_COMPLETE_MESSAGE
        + b"t\0\0\0\x0a\0\x01\0\0\0\x17"  # ParameterDescription: one int4
        + messages.row_description([FIELD, SECRET])
        + Z["I"],
        "bound-secret": messages.BIND_COMPLETE_MESSAGE
        + messages.data_row([b"1", b"hunter2"])
        + messages.command_complete("SELECT 1")
        + Z["I"],
        "undescribed": messages.PARSE_COMPLETE_MESSAGE
        + messages.BIND_COMPLETE_MESSAGE
        + messages.data_row([b"-4321"])
        + messages.command_complete("SELECT 1")
        + Z["I"],
        "error": messages.error_response(code="22012", message="division by zero") + Z["E"],
        "notice": messages.notice_response(code="01000", message="hi") + ROWS + Z["I"],
        "status": ROWS + messages.parameter_status("TimeZone", "UTC") + Z["I"],
        "set": messages.command_complete("SET") + Z["I"],
        "two": ROWS + Z["I"] + ROWS + Z["I"],
        "partial": ROWS,
        "suspended": messages.BIND_COMPLETE_MESSAGE + b"s\0\0\0\4" + Z["I"],
        "empty": b"",
        "bad-Z": b"Z\0\0\0\5X",
    }[name]


CLIENT_NAMES = [
    *("select", "update", "begin", "end", "drop", "new-shape", "set", "extended", "prepare"),
    *("prepared", "unprepared", "pipelined", "bad", "not-utf8", "extended2", "rebind", "unicode", "filler"),
    *("range", "undescribed", "prepare-secret", "prepared-secret"),
]
SERVER_NAMES = [
    *("rows", "rows-in-block", "update", "begin", "commit", "extended", "bound", "parsed", "error", "secret"),
    *("many", "parsed-secret", "bound-secret", "undescribed"),
    *("notice", "status", "set", "two", "partial", "suspended", "empty", "bad-Z"),
]
# The usual answer to each request (most steps), so the lane sees real steady states.
USUAL = {
    "select": "rows",
    "update": "update",
    "begin": "begin",
    "end": "commit",
    "drop": "error",
    "new-shape": "rows",
    "set": "set",
    "extended": "extended",
    "extended2": "extended",
    "unicode": "rows",
    "filler": "secret",
    "range": "many",
    "rebind": "bound",
    "prepare": "parsed",
    "prepared": "bound",
    "undescribed": "undescribed",
    "prepare-secret": "parsed-secret",
    "prepared-secret": "bound-secret",
    "unprepared": "error",
    "pipelined": "two",
    "bad": "empty",
    "not-utf8": "empty",
}


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else None

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.t = 1_790_000_000.0

    def time(self) -> float:
        self.t += 0.000137
        return self.t


class Harness:
    """One proxy connection logged in, its transports and audit sinks captured."""

    def __init__(
        self, holder: policies.PolicyHolder, *, lane: bool, audit_ok: Any = None, masked: bool = False
    ) -> None:
        self.lines: list[str] = []
        self.healthy = True
        self.log = audit.AuditLog(self._sink, failure_policy="fail-closed", max_buffer=10_000)
        self.counters = metrics.Metrics()
        if audit_ok == "log":  # what dbgov proxy passes for a fail-closed log
            audit_ok = audit.Healthy(self.log)
        owner = proxy.Proxy(
            proxy.ProxyConfig(lane=lane),
            policy=holder,
            audit=proxy.Recorder(self.log, self.counters),
            audit_ok=audit_ok,
        )
        self.conn = proxy.ClientConnection(owner)
        self.client = Sink()
        self.upstream_sink = Sink()

        async def connect() -> None:  # the shell starts its timers on the running loop
            self.conn.connection_made(self.client)  # type: ignore[arg-type]

        loop = asyncio.new_event_loop()
        loop.run_until_complete(connect())
        loop.close()
        assert self.conn.session is not None
        self.session = self.conn.session
        self.session.client_data(messages.startup_message({"user": "app", "database": "shop"}), 0.0)
        self.session.actions.clear()
        up = proxy.UpstreamConnection.__new__(proxy.UpstreamConnection)
        up.transport = self.upstream_sink  # type: ignore[assignment]
        up.relaying = True
        up.owner = self.conn
        self.conn.upstream = up
        self.session.upstream_ready(
            parameter_status=LOGIN_STATUS,
            notices=[],
            now=proxy.time.time(),
            masked_attrs=MASKED if masked else None,
        )
        self.conn.pump()
        if lane:
            self.conn.start_lane()
            assert self.conn.lane is not None
        self.client.data.clear()
        self.upstream_sink.data.clear()

    def _sink(self, text: str) -> bool:
        if not self.healthy:
            return False
        self.lines.extend(text.splitlines())
        return True

    def observe(self) -> dict[str, Any]:
        s = self.session
        s.adopt_lane()  # a statement the lane holds is the session's own once adopted
        self.log.flush()
        return {
            "to_client": bytes(self.client.data),
            "to_server": bytes(self.upstream_sink.data),
            "lines": list(self.lines),
            "metrics": [line for line in self.counters.render().splitlines() if "dbgov_lane_" not in line],
            "state": s.state,
            "closed": self.client.closed,
            "in_flight": s._syncs_sent - s._syncs_done,
            "units": [[st.sql for st in u.statements] for u in s._units],
            "txn": s.txn_status,
            "prepared": {name: (st.sql, st.verdict) for name, st in s._prepared.items()},
            "portals": dict(s._portal_statements),
            "origins": _origins(s),
            "idle": s.idle,
        }


@pytest.fixture
def fixed_ids(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The same session id, nonce and clock for every connection, so two runs can be compared."""
    monkeypatch.setattr(proxy.secrets, "token_hex", lambda n: "ab" * n)
    monkeypatch.setattr(proxy.secrets, "token_urlsafe", lambda n: "N" * n)
    yield


def _holder(tmp: Path, text: str = POLICY) -> policies.PolicyHolder:
    path = tmp / "policy.yaml"
    path.write_text(text)
    return policies.PolicyHolder(str(path))


def _origins(s: session.Session) -> dict[str, Any]:
    """The session's column-origin tracking, comparable (hit positions, not their maskers)."""
    o = s._origins

    def shape(x: Any) -> Any:
        return None if x is None else (x.hits is None, [i for i, _ in x.resolve()])

    return {
        "statements": {k: shape(v) for k, v in o.statements.items()},
        "portals": {k: shape(v) for k, v in o.portals.items()},
        # Sync numbers relative to the answers done (the lane counts neither for what it runs).
        "describes": [(shape(x), n - s._syncs_done) for x, n in o.describes],
        "executes": [(shape(x), n - s._syncs_done) for x, n in o.executes],
        "simple": [i for i, _ in o.simple],
    }


def _run(
    holder: policies.PolicyHolder, lane: bool, steps: list[tuple[str, int, str, int]], *, masked: bool = False
) -> dict[str, Any]:
    clock = Clock()
    saved = proxy.time
    proxy.time = clock  # type: ignore[assignment]
    try:
        h = Harness(holder, lane=lane, masked=masked)
        for client, n, server, cut in steps:
            if h.session.state == "closed":
                break
            h.conn.data_received(_client(client, n))
            answer = _server(server)
            for chunk in (answer[:cut], answer[cut:]) if 0 < cut < len(answer) else (answer,):
                if chunk and h.session.state != "closed":
                    h.conn.upstream.data_received(chunk)
        return h.observe()
    finally:
        proxy.time = saved  # type: ignore[assignment]


_step = st.tuples(
    st.sampled_from(CLIENT_NAMES),
    st.integers(min_value=1, max_value=100_000),
    st.one_of(st.none(), st.sampled_from(SERVER_NAMES)),
    st.one_of(st.just(0), st.integers(min_value=1, max_value=80)),
).map(lambda t: (t[0], t[1], USUAL[t[0]] if t[2] is None else t[2], t[3]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_step, max_size=30), st.booleans(), st.sampled_from([POLICY, LIMITED, MASKING]))
def test_the_lane_changes_nothing_but_speed(
    fixed_ids: None,
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, int, str, int]],
    masked: bool,
    policy: str,
) -> None:
    """``masked``: the session knows masked columns (the lane then takes simple queries whose
    results show none of them, and leaves the rest to the session). ``policy``: with row limits,
    the lane takes reads, and leaves writes (guarded) and answers over the limit to the session."""
    holder = _holder(tmp_path_factory.mktemp("policy"), policy)
    # A shape is learned on its second sight (the first is decided from scratch), so the steady
    # state starts after each kind of statement was seen twice.
    warm = [("select", 1, "rows", 0), ("extended", 1, "extended", 0), ("extended2", 1, "extended", 0)] * 2
    warm += [("filler", 1, "rows", 0), ("range", 1, "rows", 0)] * 2
    warm += [("prepare", 0, "parsed", 0)]
    steps = warm + steps  # most runs then start in the steady state
    assert _run(holder, True, steps, masked=masked) == _run(holder, False, steps, masked=masked)


def _steady(fixed_ids: None, tmp: Path) -> tuple[Harness, policies.PolicyHolder]:
    holder = _holder(tmp)
    h = Harness(holder, lane=True)
    for step in range(2):  # first sight decides in Python and teaches the lane
        h.conn.data_received(_client("select", step))
        h.conn.upstream.data_received(_server("rows"))
    return h, holder


def test_templates_beyond_the_cache_are_forgotten_never_confused(fixed_ids: None, tmp_path: Path) -> None:
    """The lane's template table holds at most its cache size; past that it starts over. A text
    finds the entry of its own template or none, never another's, and relearning replaces."""
    h, _ = _steady(fixed_ids, tmp_path)
    lane = h.conn.lane
    assert lane is not None
    entries = [session._lane.Entry(object(), None, ',"x":1', ("select", "allow"), 0) for _ in range(5000)]
    for i, entry in enumerate(entries):
        lane.learn(f"SELECT c{i} FROM t WHERE a = $1", entry, False, f"SELECT c{i} FROM t WHERE a = {i}")
    found = [lane.template_entry(f"SELECT c{i} FROM t WHERE a = 7") for i in range(5000)]
    assert all(f is None or f is entries[i] for i, f in enumerate(found))
    assert found[4999] is entries[4999] and found[4096] is entries[4096]
    assert found[0] is None  # learned before the table started over
    assert lane.template_entry("SELECT c1 FROM u WHERE a = 7") is None
    again = session._lane.Entry(object(), None, ',"x":2', ("select", "allow"), 0)
    lane.learn("SELECT c4999 FROM t WHERE a = $1", again, False, "SELECT c4999 FROM t WHERE a = 1")
    assert lane.template_entry("SELECT c4999 FROM t WHERE a = 2") is again


def test_the_lane_takes_the_steady_state(
    fixed_ids: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, _ = _steady(fixed_ids, tmp_path)
    h.conn.data_received(_client("extended", 1))
    h.conn.upstream.data_received(_server("extended"))
    h.conn.data_received(_client("prepare", 0))
    h.conn.upstream.data_received(_server("parsed"))
    calls: list[str] = []
    monkeypatch.setattr(h.session, "client_data", lambda *a: calls.append("client"))
    monkeypatch.setattr(h.session, "server_data", lambda *a: calls.append("server"))
    for aid, (client, server) in zip(
        range(100), itertools.cycle([("select", "rows"), ("extended", "extended"), ("prepared", "bound")])
    ):
        h.conn.data_received(_client(client, aid))
        h.conn.upstream.data_received(_server(server))
    assert calls == []
    h.log.flush()  # the lane audits and counts in batches; a flush catches it up
    assert h.counters.lane_statements == 100
    events = [json.loads(line) for line in h.lines]
    statements = [e for e in events if e["type"] == "statement"]
    assert len(statements) == 2 + 1 + 1 + 100  # the Parse of P0_1 is audited too
    assert statements[-1]["statement"] == select(99)
    assert (
        statements[-2]["statement"]
        == statements[-3]["statement"]
        == "SELECT abalance FROM pgbench_accounts WHERE aid = $1"
    )
    assert all(e["decision"] == "allow" for e in statements)
    assert all(e["rows_returned"] == 1 for e in statements[-100:])
    assert audit.verify([e for e in events if e.get("session_id") == h.session._client_info.session_id])


def test_a_policy_reload_applies_to_the_next_statement(fixed_ids: None, tmp_path: Path) -> None:
    h, holder = _steady(fixed_ids, tmp_path)
    (tmp_path / "policy.yaml").write_text(BLOCK_SELECTS)
    assert holder.reload() == []
    h.upstream_sink.data.clear()
    h.conn.data_received(_client("select", 42))
    assert select(42).encode() not in h.upstream_sink.data  # refused: only a marker went upstream
    assert h.session._refusals


@pytest.mark.parametrize("check", ["callable", "log"])
def test_a_failing_fail_closed_audit_sink_refuses_the_next_statement(
    fixed_ids: None, tmp_path: Path, check: str
) -> None:
    """Whether audit_ok is any callable or the proxy's own ``audit.Healthy`` (which the lane
    reads without a call)."""
    holder = _holder(tmp_path)
    healthy = [True]
    h = Harness(holder, lane=True, audit_ok=(lambda: healthy[0]) if check == "callable" else "log")
    for step in range(2):
        h.conn.data_received(_client("select", step))
        h.conn.upstream.data_received(_server("rows"))
    assert h.conn.lane is not None and h.conn.lane.armed
    healthy[0] = False
    h.log.healthy = False
    h.upstream_sink.data.clear()
    h.conn.data_received(_client("select", 7))
    assert select(7).encode() not in h.upstream_sink.data
    assert h.session._refusals


def test_a_statement_in_flight_is_audited_when_the_client_goes(fixed_ids: None, tmp_path: Path) -> None:
    h, _ = _steady(fixed_ids, tmp_path)
    h.conn.data_received(_client("select", 5))
    assert h.conn.lane is not None and h.conn.lane.kind  # the lane holds it
    assert not h.conn.idle
    h.conn.connection_lost(None)
    h.log.flush()
    events = [json.loads(line) for line in h.lines]
    assert [e["type"] for e in events][-2:] == ["statement", "session_end"]
    assert events[-2]["statement"] == select(5) and events[-2]["sqlstate"] == "08006"


def test_random_pgbench_traffic_matches(fixed_ids: None, tmp_path: Path) -> None:
    """A long steady-state run (beyond hypothesis' short lists): audit lines identical."""
    rng = random.Random(7)
    steps = [("select", 1, "rows", 0)]
    for _ in range(600):
        name = rng.choice(["select", "update", "begin", "end", "extended", "unicode"])
        steps.append((name, rng.randrange(1, 10**6), USUAL[name], 0))
    holder = _holder(tmp_path)
    with_lane, without = _run(holder, True, steps), _run(holder, False, steps)
    assert with_lane == without
    assert len(with_lane["lines"]) > 600


# --- templates: texts of a learned shape recognised without the normalizer ------------------

_CONSTANTS = [
    *("5", "-5", "42", "007", "'abc'", "''", "'é'", "5.5", "TRUE", "NULL", "'a''b'", "E'x'"),
    "B'1'",
]
_CONSTANTS += ["0x1F", "1_000", "-1.5", "5e3", ".5", "5.", "- 5", "+5", "'--'", "'/*'", "'$1'", "'a\\b'"]
_IDENTS = ["a", "t1", "abalance", "interval", "int", "text", "x", "date", "pg_catalog.int4", "ARRAY", "NOT"]
_OPS = [
    "+",
    "-",
    "*",
    "/",
    "%",
    "^",
    "=",
    "<>",
    "<",
    ">=",
    "||",
    "@-",
    "AND",
    "OR",
    "LIKE",
    "=-",
    "+-",
    "- -",
]
_OPS += ["IS DISTINCT FROM", "AT TIME ZONE", "COLLATE", "BETWEEN 1 AND", "IN", "::"]
_SPACES = [" ", "", "  ", "\n", "\t", " --c\n", "/*c*/"]
# What a constant of the learned text is swapped for: plain ones, and ones that must not pass.
_SWAPS = [*_CONSTANTS, "7", "-7", "0", "123456789012345678901234567890", "'z'", "' OR 1=1 --'", "'x'' OR'"]
_SWAPS += ["-", "'", "$1", "5::int", "'\x01'"]


def _expression(rng: random.Random, depth: int = 0) -> str:
    pick, space = rng.random(), rng.choice(_SPACES)
    if depth > 3 or pick < 0.35:
        return rng.choice(_CONSTANTS)
    if pick < 0.5:
        return rng.choice(_IDENTS)
    if pick < 0.72:
        return f"{_expression(rng, depth + 1)}{space}{rng.choice(_OPS)}{space}{_expression(rng, depth + 1)}"
    if pick < 0.8:
        return f"({space}{_expression(rng, depth + 1)}{space})"
    if pick < 0.86:
        return f"{rng.choice(_IDENTS)}{rng.choice([' ', ''])}{rng.choice(_CONSTANTS)}"
    if pick < 0.91:
        return f"{_expression(rng, depth + 1)}{rng.choice(['::', ' :: ', '['])}{rng.choice(_IDENTS)}"
    if pick < 0.95:
        return f"ARRAY[{_expression(rng, depth + 1)},{space}{_expression(rng, depth + 1)}]"
    return f"f({_expression(rng, depth + 1)},{space}{_expression(rng, depth + 1)})"


def _statement(rng: random.Random) -> str:
    e, space = lambda: _expression(rng), rng.choice(_SPACES)
    return rng.choice(
        [
            lambda: f"SELECT {e()}{space},{space}{e()} FROM t WHERE {e()}",
            lambda: f"UPDATE t SET a = {e()} WHERE b = {e()};",
            lambda: f"INSERT INTO t VALUES ({e()},{space}{e()})",
            lambda: f"SELECT a FROM t ORDER BY {e()} LIMIT {e()} OFFSET {e()}",
            lambda: f"SELECT CASE WHEN {e()} THEN {e()} ELSE {e()} END",
        ]
    )()


def _replace_spans(sql: str, spans: list[tuple[int, int]], values: list[str]) -> str:
    raw, out, last = sql.encode(), [], 0
    for (start, end), value in zip(spans, values, strict=False):
        out += [raw[last:start], value.encode()]
        last = end
    return b"".join([*out, raw[last:]]).decode()


@settings(max_examples=3000, deadline=None)
@given(st.randoms(use_true_random=False))
def test_a_template_match_means_the_same_normalized_shape(rng: random.Random) -> None:
    """If the lane would take T' by the template it learned from T, libpg_query normalizes T'
    to exactly what it normalized T to (what the engine's cache is keyed by). Random statements
    mix constants of every kind, casts, subscripts, operators that absorb a minus, comments."""
    from pglast import parser as pg_parser

    assert session._lane is not None
    text = _statement(rng)
    try:
        normalized = pg_parser.normalize(text)
    except pg_parser.ParseError:
        return
    if not session._lane.same_shape(text, normalized):
        return  # never learned as a template
    found = session._lane.template(text)
    assert found is not None
    key, spans = found
    other = _replace_spans(text, spans, [rng.choice(_SWAPS) for _ in spans])
    other_found = session._lane.template(other)
    if other_found is None or other_found[0] != key:
        return  # the lane would not take it by this template
    assert pg_parser.normalize(other) == normalized, (text, other)


def test_templates_read_pgbench_statements() -> None:
    """The statements of pgbench's TPC-B all have templates, negative deltas included."""
    from pglast import parser as pg_parser

    assert session._lane is not None
    for sql in [
        "UPDATE pgbench_accounts SET abalance = abalance + -4321 WHERE aid = 7654;",
        "UPDATE pgbench_tellers SET tbalance = tbalance + 12 WHERE tid = 3;",
        "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (3, 1, 7654, -4321, CURRENT_TIMESTAMP);",
        select(42),
        "BEGIN;",
    ]:
        assert session._lane.same_shape(sql, pg_parser.normalize(sql)), sql
    positive = session._lane.template("UPDATE t SET a = a + 5 WHERE b = 1;")
    negative = session._lane.template("UPDATE t SET a = a + -5 WHERE b = 1;")
    assert positive is not None and negative is not None and positive[0] == negative[0]
    assert session._lane.template("SELECT E'\\x'") is None
    assert session._lane.template("SELECT 1 -- 2") is None


def test_with_masked_columns_the_lane_takes_only_what_shows_none(fixed_ids: None, tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    h = Harness(holder, lane=True, masked=True)
    for step in range(2):
        h.conn.data_received(_client("select", step))
        h.conn.upstream.data_received(_server("rows"))
    assert h.conn.lane is not None and h.conn.lane.armed
    h.conn.data_received(_client("select", 3))
    h.conn.upstream.data_received(_server("rows"))
    h.counters.render()
    assert h.counters.lane_statements == 1
    h.client.data.clear()
    h.conn.data_received(_client("select", 4))
    h.conn.upstream.data_received(_server("secret"))  # a masked column's values arrive unmasked
    assert b"hunter2" not in h.client.data  # the session masked them
    h.counters.render()
    assert h.counters.lane_statements == 1
    h.log.flush()
    assert any('"warning":"masked column arrived unmasked"' in line for line in h.lines)
    for step in range(3):  # an extended batch, learned on its second sight, taken on its third
        h.conn.data_received(_client("extended", 5 + step))
        h.conn.upstream.data_received(_server("extended"))
    h.counters.render()
    assert h.counters.lane_statements == 2
    # A prepared statement whose Describe showed a masked column: its rows need masking even
    # without a RowDescription, so the session runs every execution of it.
    h.conn.data_received(_client("prepare-secret", 0))
    h.conn.upstream.data_received(_server("parsed-secret"))
    h.client.data.clear()
    for step in range(3):
        h.conn.data_received(_client("prepared-secret", step))
        h.conn.upstream.data_received(_server("bound-secret"))
    assert b"hunter2" not in h.client.data and h.client.data.count(b"D\0") == 3
    h.counters.render()
    assert h.counters.lane_statements == 2


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.text(max_size=30),
        st.builds(
            lambda word, middle, count: f"{word}{middle}{count}",
            st.sampled_from(["INSERT", "UPDATE", "DELETE", "MERGE", "COPY", "SELECT", "FETCH", "insert", ""]),
            st.sampled_from([" ", " 0 ", "  ", "", " x "]),
            st.one_of(
                st.integers(min_value=0, max_value=10**25).map(str),
                st.sampled_from(["", "²", "1²", "-1", "٣"]),
            ),
        ),
    )
)
def test_command_tags_are_read_as_the_session_reads_them(tag: str) -> None:
    assert session._lane is not None
    raw = tag.encode()
    if b"\0" in raw:
        return
    count = session._lane.tag_count(raw)
    if count < 0:  # the session's own reading decides
        assert not tag.isascii() or len(tag.rpartition(" ")[2]) > 18
        return
    try:
        expected = session._affected(tag)
    except ValueError:
        raise AssertionError(f"the lane read {tag!r} where the session fails") from None
    assert count == expected


@settings(max_examples=3000, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=-1e13, max_value=1e13, allow_nan=False),
        st.floats(min_value=0, max_value=100),  # durations as they come
        st.integers(min_value=-(10**9), max_value=10**9).map(lambda n: n / 2000),  # ties at 4 decimals
        st.sampled_from([0.0, -0.0, 0.0005, 0.0015, 0.0625, 1e-300, 999999999999.9996, 1e12, -1e12, 5e15]),
    )
)
def test_durations_are_spelled_as_repr_of_round(elapsed: float) -> None:
    """The drain spells duration_ms and sums latency without Python floats: the same text and
    the same value as ``repr(round(elapsed, 3))``, sign of zero included."""
    assert session._lane is not None
    text, rounded = session._lane.milliseconds(elapsed)
    expected = round(elapsed, 3)
    assert text == repr(expected)
    assert struct.pack("<d", rounded) == struct.pack("<d", expected)


def test_with_row_limits_the_lane_takes_reads_and_leaves_the_rest(fixed_ids: None, tmp_path: Path) -> None:
    holder = _holder(tmp_path, LIMITED)
    h = Harness(holder, lane=True)
    for step in range(3):
        h.conn.data_received(_client("select", step))
        h.conn.upstream.data_received(_server("rows"))
    h.counters.render()
    assert h.counters.lane_statements == 1
    h.client.data.clear()
    h.conn.data_received(_client("select", 9))
    h.conn.upstream.data_received(_server("many"))  # three rows, over maxRowsReturned: 2
    assert b"54000" in h.client.data and h.client.data.count(b"D\0") == 2
    h.upstream_sink.data.clear()
    h.conn.data_received(_client("update", 3))  # a write: guarded by the session
    assert b"SAVEPOINT" in h.upstream_sink.data or b"BEGIN" in h.upstream_sink.data
    h.counters.render()
    assert h.counters.lane_statements == 1


def test_a_write_seen_in_an_aborted_transaction_is_not_taught(fixed_ids: None, tmp_path: Path) -> None:
    """Inside a failed transaction block the session runs writes unguarded (they fail anyway);
    that must not teach the lane to run the same write unguarded once the block is gone."""
    h = Harness(_holder(tmp_path, LIMITED), lane=True)
    h.conn.data_received(_client("begin", 0))
    h.conn.upstream.data_received(_server("begin"))
    h.conn.data_received(_client("select", 1))
    h.conn.upstream.data_received(messages.error_response(code="22012", message="boom") + Z["E"])
    for _ in range(2):  # seen twice in the failed block: a shape the lane would learn
        h.conn.data_received(_client("update", 3))
        h.conn.upstream.data_received(messages.error_response(code="25P02", message="aborted") + Z["E"])
    h.conn.data_received(messages.query("ROLLBACK"))
    h.conn.upstream.data_received(messages.command_complete("ROLLBACK") + Z["I"])
    h.upstream_sink.data.clear()
    h.conn.data_received(_client("update", 3))
    assert b"SAVEPOINT" in h.upstream_sink.data or b"BEGIN" in h.upstream_sink.data


def _writer_pair() -> tuple[Any, Any, socket.socket, Any]:
    """A uvloop Unix transport over one end of a socketpair with a small send buffer (the lane
    writes past such transports), and the other end, not read yet."""
    uvloop = pytest.importorskip("uvloop")
    loop = uvloop.new_event_loop()
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport, _ = loop.run_until_complete(loop.create_unix_connection(asyncio.Protocol, sock=ours))
    assert proxy._plain_socket(transport) >= 0
    return loop, transport, theirs, uvloop


def test_the_lane_writes_past_the_transport_and_hands_it_what_the_socket_refuses() -> None:
    """Straight to the socket while the transport has nothing queued; a partial send or EAGAIN
    leaves the rest to the transport, and everything after it goes through the transport too
    until its queue is empty: the peer reads every byte, in order."""
    assert session._lane is not None
    loop, transport, theirs, _ = _writer_pair()
    try:
        writer = session._lane._Writer(transport, proxy._plain_socket(transport))
        chunks = [bytes([i]) * 10_000 for i in range(40)]
        for chunk in chunks:
            writer.send(chunk)
        assert transport.get_write_buffer_size() > 0  # the socket refused some: queued in order
        received = bytearray()
        theirs.setblocking(False)
        received += theirs.recv(1 << 20)  # room in the socket again, the transport's queue not sent yet
        last = b"\xff" * 100
        writer.send(last)  # must queue behind, not overtake
        chunks.append(last)
        while len(received) < 400_100:
            loop.run_until_complete(asyncio.sleep(0.001))
            with contextlib.suppress(BlockingIOError):
                received += theirs.recv(1 << 20)
        assert bytes(received) == b"".join(chunks)
        writer.send(b"after")  # queue empty again: straight to the socket
        assert transport.get_write_buffer_size() == 0
        loop.run_until_complete(asyncio.sleep(0.01))
        assert theirs.recv(100) == b"after"
    finally:
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        theirs.close()


def test_the_lane_never_writes_to_the_socket_of_a_closed_transport() -> None:
    """Once the transport is closing its descriptor may be closed and reused by another socket:
    the lane's bytes go to the transport (which refuses them, as it always did), never to that
    descriptor."""
    assert session._lane is not None
    loop, transport, theirs, _ = _writer_pair()
    fd = proxy._plain_socket(transport)
    writer = session._lane._Writer(transport, fd)
    transport.close()
    loop.run_until_complete(asyncio.sleep(0.01))
    reused, other = socket.socketpair()  # likely the very descriptor number just closed
    try:
        with pytest.raises(RuntimeError, match="closed"):
            writer.send(b"stray")
        other.setblocking(False)
        with pytest.raises(BlockingIOError):
            other.recv(100)
        if reused.fileno() == fd:
            with pytest.raises(BlockingIOError):
                reused.setblocking(False)
                reused.recv(100)
    finally:
        loop.close()
        theirs.close()
        reused.close()
        other.close()


@pytest.mark.parametrize("lane", [False, True])
def test_masked_rows_of_a_guarded_write_are_masked_and_count_toward_the_limits(
    fixed_ids: None, tmp_path: Path, lane: bool
) -> None:
    """A write under maxRowsAffected runs guarded; rows whose origin is a masked column reach the
    client masked, in order, and counted against maxRowsReturned like any other (they used to
    bypass the guard: all forwarded, uncounted, ahead of its verdict)."""
    h = Harness(_holder(tmp_path, LIMITED), lane=lane, masked=True)
    h.conn.data_received(
        messages.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid < 9 RETURNING filler;")
    )
    assert h.upstream_sink.data.startswith(messages.query("BEGIN"))
    h.conn.upstream.data_received(messages.command_complete("BEGIN") + Z["T"])
    rows = messages.data_row([b"hunter2"]) * 7
    h.conn.upstream.data_received(
        messages.row_description([SECRET]) + rows + messages.command_complete("UPDATE 7") + Z["T"]
    )
    assert h.upstream_sink.data.endswith(messages.query("ROLLBACK"))
    h.conn.upstream.data_received(messages.command_complete("ROLLBACK") + Z["I"])
    sent = bytes(h.client.data)
    assert b"hunter2" not in sent
    assert sent.count(messages.data_row([None])) == 2 and b"maxRowsReturned" in sent
    assert sent.endswith(Z["I"])


def test_a_masked_shape_goes_upstream_rewritten_through_the_lane(fixed_ids: None, tmp_path: Path) -> None:
    """A Query of a masked shape: the lane sends the policy's rewrite of each text (the same
    bytes the session sends), audits it as enforced "mask" and counts it as such."""
    sent: dict[bool, list[bytes]] = {}
    audited: dict[bool, list[dict[str, Any]]] = {}
    for lane in (True, False):
        h = Harness(_holder(tmp_path, MASKING), lane=lane)
        sent[lane] = []
        for aid in (1, 22, 333, 4444):
            h.upstream_sink.data.clear()
            h.conn.data_received(_client("select", aid))
            sent[lane].append(bytes(h.upstream_sink.data))
            h.conn.upstream.data_received(_server("rows"))
        h.counters.render()
        assert h.counters.lane_statements == (3 if lane else 0)
        h.log.flush()
        audited[lane] = [json.loads(line) for line in h.lines if '"type":"statement"' in line]
    assert sent[True] == sent[False]
    assert all(b"__dbgov_src" in request and b"4444" in sent[True][3] for request in sent[True])
    assert [e["enforced"] for e in audited[True]] == ["mask"] * 4
    # The shell's own data_received (a loop that kept calling it) sends the lane's rewrite too.
    h = Harness(_holder(tmp_path, MASKING), lane=True)
    for aid in (1, 2):
        h.conn.data_received(_client("select", aid))
        h.conn.upstream.data_received(_server("rows"))
    h.upstream_sink.data.clear()
    proxy.ClientConnection.data_received(h.conn, _client("select", 3))
    assert h.conn.lane is not None and h.conn.lane.kind  # the lane took it
    assert bytes(h.upstream_sink.data) == sent[False][0].replace(b"= 1;", b"= 3;")
    assert [e["statement"] for e in audited[True]] == [select(aid) for aid in (1, 22, 333, 4444)]
    strip = ("time", "duration_ms", "hash", "prev_hash")
    assert [{k: v for k, v in e.items() if k not in strip} for e in audited[True]] == [
        {k: v for k, v in e.items() if k not in strip} for e in audited[False]
    ]
