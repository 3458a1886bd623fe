"""Differential fuzzing of the proxy against what PostgreSQL actually did (issue 14).

Hypothesis draws random protocol sequences (simple queries, multi-statement strings, extended
batches with named and unnamed statements, Flush without Sync, pipelined writes, SQL
PREPARE/EXECUTE, SET/RESET/DISCARD of search_path, transaction control, errors mid-batch) and
drives them through the real proxy to a real PostgreSQL. Two schemas hold a `customers` table
each; every row says which schema it came from (`src`), so the client's answer shows where the
*server* resolved the name. Checked against that:

1. no row (no byte the client gets) shows a masked value in clear;
2. every execution the client got rows from is audited once, in order, with its own row count,
   by an event that allowed or masked it after judging the schema the server read (the masked
   one: masked);
3. an event that refused a statement returned no rows, and no statement is audited more often
   than it was sent;
4. the session still answers, and ends with nothing left behind in the proxy.

Set DBGOV_FUZZ_EXAMPLES to run more examples than CI does.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from test_proxy_protocol import RawClient
from test_proxy_session_truth import _engine

import pg
from conftest import RunningProxy
from dbgov_sidecar.pgwire import framing, messages

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("DBGOV_FUZZ_EXAMPLES", "60"))
TIMEOUT = 3.0  # seconds without a ReadyForQuery owed: a hang


@dataclass(frozen=True)
class World:
    home: str  # the role's default search_path; its customers.email is masked
    stage: str  # unmasked
    user: str
    password: str
    canary: str  # in every email of home's customers

    def schema(self, src: bytes) -> str:
        return {b"H": self.home, b"S": self.stage}[src]


@pytest.fixture(scope="module")
def world(pg_server: pg.PgServer) -> Iterator[World]:
    suffix = uuid.uuid4().hex[:8]
    w = World(f"dfh_{suffix}", f"dfs_{suffix}", f"dfr_{suffix}", "diff-pw", f"canary{suffix}")
    pg_server.psql(
        f"CREATE ROLE {w.user} LOGIN PASSWORD '{w.password}';"
        f"ALTER ROLE {w.user} SET search_path = {w.home};"
        f"CREATE SCHEMA {w.home}; CREATE SCHEMA {w.stage};"
        f"CREATE TABLE {w.home}.customers (id int, src text, email text);"
        f"INSERT INTO {w.home}.customers VALUES"
        f" (1, 'H', '{w.canary}-1@home.example'), (2, 'H', '{w.canary}-2@home.example');"
        f"CREATE TABLE {w.stage}.customers (id int, src text, email text);"
        f"INSERT INTO {w.stage}.customers VALUES (1, 'S', 'staged@stage.example');"
        f"GRANT USAGE ON SCHEMA {w.home}, {w.stage} TO {w.user};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {w.home} TO {w.user};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {w.stage} TO {w.user};",
        dbname="shop",
    )
    yield w
    pg_server.psql(
        f"DROP SCHEMA {w.home} CASCADE; DROP SCHEMA {w.stage} CASCADE;"
        f"DROP OWNED BY {w.user}; DROP ROLE {w.user};",
        dbname="shop",
    )


@pytest.fixture
def fuzz_proxy(make_proxy: Callable[..., RunningProxy], world: World) -> RunningProxy:
    policy = _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "reads",
                    "verdict": "allow",
                    "statements": ["select"],
                    "tables": [f"{world.home}.*", f"{world.stage}.*"],
                }
            ],
            "masks": [{"table": f"{world.home}.customers", "column": "email", "strategy": "redact"}],
            "guardrails": {"allowedSettings": {"search_path": [world.stage, world.home]}},
        }
    )
    return make_proxy(policy=policy, upstream={"user": world.user, "password": world.password})


# --- the vocabulary ----------------------------------------------------------------------------

ROWS = ("read", "execute")  # kinds whose answer has rows (three columns: tag, src, e)
KINDS = (
    "read",
    "set_stage",
    "set_home",
    "begin",
    "commit",
    "rollback",
    "error",
    "prepare",
    "execute",
    "reset",
    "reset_all",
    "discard_all",
    "set_default",
    "set_local_stage",
    "set_config_stage",
    "savepoint",
    "rollback_to",
)
# reads (and what decides where they read) weighted up, so most examples get rows back
_kind = st.sampled_from(KINDS + ("read",) * 4 + ("set_stage", "prepare", "execute", "execute"))
_query = st.tuples(st.just("query"), st.lists(_kind, min_size=1, max_size=3))
_item = st.one_of(
    st.tuples(st.just("stmt"), _kind, st.booleans(), st.booleans()),  # kind, named, executed
    st.tuples(st.just("rebind"), st.integers(min_value=0, max_value=7)),  # an earlier named one
)
_extended = st.tuples(
    st.just("extended"), st.lists(_item, min_size=1, max_size=4), st.sampled_from(["sync", "flush"])
)
_step = st.one_of(_query, _extended)
_plan = st.lists(st.lists(_step, min_size=1, max_size=4), min_size=1, max_size=6)  # writes of steps


@dataclass
class Script:
    """A plan made concrete: the bytes of each socket write, what they are, and what to expect."""

    world: World
    prefix: str
    writes: list[tuple[bytes, int]] = field(default_factory=list)  # (bytes, ReadyForQuery owed)
    lines: list[str] = field(default_factory=list)
    sends: Counter[str] = field(default_factory=Counter)  # tag → statements sent carrying it
    executes: dict[str, str] = field(default_factory=dict)  # tag of an EXECUTE → its PREPARE's name
    prepared: list[str] = field(default_factory=list)
    named: list[tuple[str, str | None, int]] = field(default_factory=list)  # (name, tag, batch)
    batch: int = 0  # Sync-delimited batches (a Query after a Flush ends one too)
    flush_open: bool = False
    count: int = 0

    def _tag(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:03d}"

    def sql(self, kind: str) -> tuple[str, str | None]:
        w = self.world
        if kind == "read":
            tag = self._tag()
            return f"SELECT '{tag}' AS tag, src, email || '' AS e FROM customers", tag
        if kind == "prepare":
            name = f"p{len(self.prepared)}"
            self.prepared.append(name)
            return f"PREPARE {name}(text) AS SELECT $1 AS tag, src, email || '' AS e FROM customers", None
        if kind == "execute":
            tag = self._tag()
            name = self.prepared[-1] if self.prepared else "p_never"
            self.executes[tag] = name
            return f"EXECUTE {name}('{tag}')", tag
        return {
            "set_stage": f"SET search_path = {w.stage}",
            "set_home": f"SET search_path TO {w.home}",
            "set_local_stage": f"SET LOCAL search_path = {w.stage}",
            "set_config_stage": f"SELECT set_config('search_path', '{w.stage}', false)",
            "reset": "RESET search_path",
            "reset_all": "RESET ALL",
            "discard_all": "DISCARD ALL",
            "set_default": "SET search_path TO DEFAULT",
            "begin": "BEGIN",
            "commit": "COMMIT",
            "rollback": "ROLLBACK",
            "savepoint": "SAVEPOINT a",
            "rollback_to": "ROLLBACK TO SAVEPOINT a",
            "error": "SELECT 1/0",
        }[kind], None

    def add_write(self, steps: list[Any]) -> None:
        data, owed, shown = b"", 0, []
        for step in steps:
            if step[0] == "query":
                kinds = list(step[1])
                if len(kinds) > 1:  # one answer with rows per string; set_config's row stays alone
                    rows = [k for k in kinds if k in ROWS][:1]
                    kinds = [k for k in kinds if k not in ROWS and k != "set_config_stage"] + rows
                    kinds = kinds or ["begin"]
                parts = [self.sql(k) for k in kinds]
                text = "; ".join(sql for sql, _ in parts)
                for _, tag in parts:
                    if tag is not None:
                        self.sends[tag] += 1
                data += messages.query(text)
                owed += 1
                self.batch += 1
                shown.append(f"Q {text!r}")
                continue
            _, items, end = step
            for item in items:
                if item[0] == "stmt":
                    _, kind, is_named, executed = item
                    is_named = is_named and kind != "prepare"  # each PREPARE runs at most once
                    name = f"s{len(self.named)}" if is_named else ""
                    sql, tag = self.sql(kind)
                    if tag is not None:
                        self.sends[tag] += 1
                    data += messages.parse(name, sql)
                    shown.append(f"P {name!r} {sql!r}")
                    if is_named:
                        self.named.append((name, tag, self.batch))
                    if executed:
                        data += messages.bind("", name) + messages.execute("")
                        shown.append("B E")
                else:
                    earlier = [n for n in self.named if n[2] != self.batch]
                    if not earlier:
                        continue
                    name, tag, _ = earlier[item[1] % len(earlier)]
                    if tag is not None:
                        self.sends[tag] += 1
                    data += messages.bind("", name) + messages.execute("")
                    shown.append(f"B {name!r} E")
            if end == "sync":
                data += messages.SYNC_MESSAGE
                owed += 1
                self.batch += 1
                self.flush_open = False
                shown.append("S")
            else:
                data += messages.FLUSH_MESSAGE
                self.flush_open = True
                shown.append("H")
        if data:
            self.writes.append((data, owed))
            self.lines.append("write: " + " | ".join(shown))

    def finish(self) -> None:
        if self.flush_open:
            self.writes.append((messages.SYNC_MESSAGE, 1))
            self.lines.append("write: S")


# --- driving it --------------------------------------------------------------------------------


def _drive(proxy: RunningProxy, script: Script) -> tuple[list[framing.Message], str]:
    """Every write of the script, each answered up to the ReadyForQuery messages it is owed; then
    the session must still answer. The messages after login, and the client's address."""
    client = RawClient(proxy.port)
    client.sock.settimeout(TIMEOUT)
    stream: list[framing.Message] = []
    try:
        login = client.login()
        assert login and login[-1].type == messages.READY_FOR_QUERY, login
        address = f"127.0.0.1:{client.sock.getsockname()[1]}"
        owed = 0
        for number, (data, answers) in enumerate(script.writes):
            client.send(data)
            owed += answers
            while owed:
                try:
                    reply = client.read_until(b"Z")
                except TimeoutError:
                    raise AssertionError(
                        f"no ReadyForQuery within {TIMEOUT}s after write {number + 1}"
                        f" ({owed} still owed); got {[chr(m.type) for m in stream]}"
                    ) from None
                stream.extend(reply)
                assert reply and reply[-1].type == messages.READY_FOR_QUERY, (
                    f"the session ended after write {number + 1}: {[chr(m.type) for m in reply]}"
                )
                owed -= 1
        client.send(messages.query("ROLLBACK") + messages.query("SELECT 1"))
        client.read_until(b"Z")
        last = client.read_until(b"Z")
        rows = [messages.decode_data_row(m.data) for m in last if m.type == messages.DATA_ROW]
        assert rows == [[b"1"]], [chr(m.type) for m in last]
        assert messages.decode_ready_for_query(last[-1].data) == "I", [chr(m.type) for m in last]
        client.send(messages.TERMINATE_MESSAGE)
    finally:
        client.close()
    return stream, address


@dataclass
class Execution:
    tag: str
    rows: int
    src: bytes
    ended: str  # the message that ended it: C (complete), E (error)


def _executions(stream: list[framing.Message]) -> dict[str, list[Execution]]:
    """The answers that carried rows, by tag, in order."""
    found: dict[str, list[Execution]] = defaultdict(list)
    rows: list[list[bytes | None]] = []
    for msg in stream:
        if msg.type == messages.DATA_ROW:
            values = messages.decode_data_row(msg.data)
            if len(values) == 3:
                rows.append(values)
        elif rows and msg.type in (
            messages.COMMAND_COMPLETE,
            messages.ERROR_RESPONSE,
            messages.PORTAL_SUSPENDED,
            messages.READY_FOR_QUERY,
        ):
            tags = {r[0] for r in rows}
            sources = {r[1] for r in rows}
            assert len(tags) == 1 and len(sources) == 1, (tags, sources)
            (tag,), (src,) = tags, sources
            assert tag is not None and src is not None
            found[tag.decode()].append(Execution(tag.decode(), len(rows), src, chr(msg.type)))
            rows = []
    return found


def _session_events(proxy: RunningProxy, address: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = [e for e in proxy.events if e.get("client_addr") == address]
        if any(e.get("type") == "session_end" for e in events):
            return [e for e in events if e.get("type") == "statement"]
        time.sleep(0.02)
    raise AssertionError(f"no session_end for {address}")


def _check(script: Script, stream: list[framing.Message], events: list[dict[str, Any]]) -> None:
    world = script.world
    # (1) nothing masked reaches the client in clear
    for msg in stream:
        assert world.canary.encode() not in msg.data, f"masked value in clear: {msg.data!r}"
    executions = _executions(stream)
    shown = "\n".join(f"{e['decision']} rows={e['rows_returned']} {e['statement']!r}" for e in events)
    note(f"audit:\n{shown}")
    # (2) each execution with rows is audited once, with its rows, judged where the server read
    for tag, runs in executions.items():
        audited = [e for e in events if tag in e["statement"]]
        with_rows = [e for e in audited if e["rows_returned"]]
        assert [r.rows for r in runs] == [e["rows_returned"] for e in with_rows], (
            f"{tag}: the client got {[r.rows for r in runs]} rows, the audit says"
            f" {[(e['statement'], e['rows_returned']) for e in audited]}"
        )
        for run, event in zip(runs, with_rows, strict=True):
            assert event["decision"] in ("allow", "mask"), (tag, event)
            judged = event
            if tag in script.executes:  # an EXECUTE: judged when it was PREPAREd
                name = script.executes[tag]
                (judged,) = [e for e in events if f"PREPARE {name}(" in e["statement"]]
                assert judged["decision"] in ("allow", "mask"), (tag, judged)
            schema = world.schema(run.src)
            assert f"{schema}.customers" in judged["tables_read"], (
                f"{tag}: the server read {schema}.customers, the proxy judged {judged['tables_read']}"
                f" ({judged['statement']!r})"
            )
            if schema == world.home:
                assert judged["decision"] == "mask", (tag, judged)
                assert f"{world.home}.customers.email" in judged["masked_columns"], (tag, judged)
    # (3) refusals return nothing, and nothing is audited more often than it was sent
    for event in events:
        if event["decision"] not in ("allow", "mask"):
            assert event["rows_returned"] == 0, event
    for tag, sent in script.sends.items():
        audited = [e["statement"] for e in events if tag in e["statement"]]
        assert len(audited) <= sent, f"{tag} sent {sent} times, audited as {audited}"


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(plan=_plan)
def test_random_protocol_sequences_run_as_judged_and_audited(
    fuzz_proxy: RunningProxy, world: World, plan: list[list[Any]]
) -> None:
    fuzz_proxy.events.clear()
    script = Script(world, prefix=f"t{uuid.uuid4().hex[:6]}_")
    for write in plan:
        script.add_write(write)
    script.finish()
    note("\n".join(script.lines))
    stream, address = _drive(fuzz_proxy, script)
    events = _session_events(fuzz_proxy, address)
    _check(script, stream, events)
    fuzz_proxy.assert_clean()  # (4) nothing left behind
