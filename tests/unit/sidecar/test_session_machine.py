"""The session state machine, driven with bytes alone (no sockets, no event loop)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dbgov_policy import model
from dbgov_sidecar import policy_port, session
from dbgov_sidecar.pgwire import auth, framing, messages

# What every PostgreSQL reports at login, and the proxy requires (it reads SQL as UTF-8 with
# standard-conforming strings).
LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]


SIDECAR = Path(__file__).resolve().parents[3] / "sidecar" / "dbgov_sidecar"
PURE = [
    *sorted((SIDECAR / "pgwire").glob("*.py")),
    SIDECAR / "session.py",
    SIDECAR / "login.py",
    SIDECAR / "policy_port.py",
]


@pytest.mark.parametrize("path", PURE, ids=lambda p: p.name)
def test_pure_modules_import_no_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "ssl", "selectors", "kopf", "time", "uvloop"}


class Blocker:
    """Blocks DROP, allows the rest."""

    mode = "enforce"
    max_rows_returned: int | None = None

    def new_context(
        self, *, search_path: tuple[str, ...] | None = None, columns: object = None, **_: object
    ) -> object:
        return None

    def decide(self, sql: str, context: object) -> policy_port.Decision:
        if sql.lower().startswith("drop"):
            return policy_port.SimpleDecision(
                verdict="block", rule="no-drop", reason="no DROP", sqlstate="42501"
            )
        return policy_port.SimpleDecision(verdict="allow", rule="ok", reason="fine")


def _session(**config: object) -> session.Session:
    return session.Session(
        policy=Blocker,
        config=session.SessionConfig(**config),  # type: ignore[arg-type]
        client=session.ClientInfo(address="127.0.0.1:1", session_id="s1"),
        backend_key=(11, 22),
        nonce="NONCE",
    )


def _ready(**config: object) -> session.Session:
    s = _session(**config)
    s.client_data(
        messages.startup_message({"user": "agent", "database": "shop", "application_name": "t"}), 0.0
    )
    assert [type(a) for a in s.actions] == [session.ConnectUpstream]
    s.actions.clear()
    s.upstream_ready(
        parameter_status=[*LOGIN_STATUS, messages.parameter_status("server_version", "16")],
        notices=[],
        now=0.0,
    )
    s.to_client.clear()
    return s


def _types(data: bytes | bytearray) -> str:
    framer = framing.Framer(side="backend")
    framer.feed(bytes(data))
    return "".join(chr(m.type) for m in framer.drain()[1])


def test_startup_forwards_parameters_and_issues_own_key() -> None:
    s = _session()
    s.client_data(
        messages.startup_message({"user": "agent", "database": "shop", "application_name": "t"}), 0.0
    )
    (action,) = s.actions
    assert isinstance(action, session.ConnectUpstream)
    assert dict(action.params) == {
        "database": "shop",
        "application_name": "t",
        "client_encoding": "UTF8",
        "standard_conforming_strings": "on",
    }
    s.upstream_ready(
        parameter_status=[*LOGIN_STATUS, messages.parameter_status("a", "b")], notices=[], now=0.0
    )
    assert _types(s.to_client) == "RSSSKZ"
    assert bytes(s.to_client).find(messages.backend_key_data(11, 22)) > 0
    assert s.events[0]["type"] == "session_start" and s.events[0]["application_name"] == "t"


def test_ssl_request_answered_n_or_s() -> None:
    s = _session()
    s.client_data(messages.ssl_request(), 0.0)
    assert bytes(s.to_client) == b"N" and s.state == "startup"
    tls = _session(tls_available=True)
    tls.client_data(messages.ssl_request(), 0.0)
    assert bytes(tls.to_client) == b"S" and isinstance(tls.actions[0], session.StartClientTLS)


def test_cancel_request_is_forwarded_and_closes() -> None:
    s = _session()
    s.client_data(messages.cancel_request(5, 6), 0.0)
    assert s.actions == [session.ForwardCancel(pid=5, secret=6), session.Close(reason="cancel request")]


@pytest.mark.parametrize("options", ["-B 10", "-c", "-c search_path", "--x=1 \\"])
def test_options_other_than_settings_get_fatal(options: str) -> None:
    s = _session()
    s.client_data(messages.startup_message({"user": "a", "options": options}), 0.0)
    fields = messages.decode_fields(bytes(s.to_client))
    assert fields["S"] == "FATAL" and "options" in fields["M"]
    assert isinstance(s.actions[-1], session.Close)


def test_settings_in_options_are_judged_and_forwarded_as_judged() -> None:
    s = _session()
    options = r"-c statement_timeout=5s --application-name=a\ b -cDateStyle=ISO"
    s.client_data(messages.startup_message({"user": "a", "options": options}), 0.0)
    (action,) = s.actions
    assert isinstance(action, session.ConnectUpstream)
    assert action.params["options"] == r"-c statement_timeout=5s -c application_name=a\ b -c datestyle=ISO"
    assert session.startup_options(action.params["options"]) == session.startup_options(options)
    s = _session()
    s.client_data(messages.startup_message({"user": "a", "options": "-c statement_timeout=1 -c x=drop"}), 0.0)
    assert isinstance(s.actions[-1], session.ConnectUpstream)  # Blocker judges "SET x = 'drop'": fine


def test_client_scram_login() -> None:
    keys = auth.scram_keys("pw", salt=b"s" * 16)
    s = _session(client_scram=keys)
    s.client_data(messages.startup_message({"user": "agent"}), 0.0)
    assert _types(s.to_client) == "R"
    s.to_client.clear()
    client = auth.ScramClient(password="pw", nonce="C")
    s.client_data(messages.sasl_initial_response(auth.SCRAM_SHA_256, client.client_first()), 0.0)
    code, server_first = messages.decode_authentication(bytes(s.to_client))
    assert code == messages.AUTH_SASL_CONTINUE
    s.to_client.clear()
    s.client_data(messages.password_message(client.client_final(server_first)), 0.0)
    code, final = messages.decode_authentication(bytes(s.to_client))
    client.verify_server_final(final)
    assert isinstance(s.actions[-1], session.ConnectUpstream)


def test_refused_query_sends_a_marker_and_swaps_its_error() -> None:
    s = _ready()
    s.client_data(messages.query("DROP TABLE t"), 1.0)
    marker = messages.decode_query(bytes(s.to_server))
    assert marker.startswith("dbgov_refused_")
    assert s.events[-1]["rule"] == "no-drop" and s.events[-1]["enforced"] == "block"
    server_error = messages.error_response(code="42601", message=f'syntax error at or near "{marker}"')
    s.server_data(server_error + messages.ready_for_query("E"), 1.0)
    fields = messages.decode_fields(bytes(s.to_client)[: len(bytes(s.to_client)) - 6])
    assert fields["C"] == "42501" and 'rule "no-drop"' in fields["M"]
    assert s.txn_status == "E"


def test_refused_parse_skips_until_sync() -> None:
    s = _ready()
    s.client_data(
        messages.parse("", "DROP TABLE t")
        + messages.bind("", "")
        + messages.execute()
        + messages.SYNC_MESSAGE,
        1.0,
    )
    assert _types_frontend(bytes(s.to_server)) == "PS"
    assert messages.decode_parse(bytes(s.to_server)[:-5]).query.startswith("dbgov_refused_")


def test_an_earlier_server_error_is_not_replaced() -> None:
    s = _ready()
    s.client_data(messages.query("SELECT nope"), 1.0)
    s.client_data(messages.query("DROP TABLE t"), 1.0)
    real = messages.error_response(code="42703", message='column "nope" does not exist')
    s.server_data(real + messages.ready_for_query("I"), 1.0)
    assert messages.decode_fields(bytes(s.to_client)[:-6])["C"] == "42703"


def test_statement_event_counts_rows_and_affected() -> None:
    s = _ready()
    s.client_data(messages.query("UPDATE t SET a = 1"), 1.0)
    s.server_data(messages.command_complete("UPDATE 7") + messages.ready_for_query("I"), 1.5)
    event = s.events[-1]
    assert event["rows_affected"] == 7 and event["duration_ms"] == 500.0
    assert event["user"] == "agent" and event["client_addr"] == "127.0.0.1:1"


def test_passthrough_bytes_are_forwarded_unchanged() -> None:
    s = _ready()
    batch = (
        messages.parse("", "SELECT 1") + messages.bind("", "") + messages.execute() + messages.SYNC_MESSAGE
    )
    s.client_data(batch, 1.0)
    assert bytes(s.to_server) == batch
    reply = (
        messages.PARSE_COMPLETE_MESSAGE
        + messages.BIND_COMPLETE_MESSAGE
        + messages.data_row([b"1"])
        + messages.notice_response(code="01000", message="hi")
        + messages.command_complete("SELECT 1")
        + messages.ready_for_query("I")
    )
    s.server_data(reply[:7], 1.0)
    s.server_data(reply[7:], 1.0)
    assert bytes(s.to_client) == reply


def test_terminate_closes() -> None:
    s = _ready()
    s.client_data(messages.TERMINATE_MESSAGE, 1.0)
    assert bytes(s.to_server) == messages.TERMINATE_MESSAGE
    assert s.events[-1]["type"] == "session_end"
    assert isinstance(s.actions[-1], session.Close)


def _types_frontend(data: bytes) -> str:
    framer = framing.Framer(side="frontend")
    framer.feed(data)
    return "".join(chr(m.type) for m in framer.drain()[1])


def test_fail_closed_audit_refuses_statements() -> None:
    healthy = [False]
    s = session.Session(
        policy=Blocker,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="a", session_id="s"),
        backend_key=(1, 2),
        nonce="n",
        audit_ok=lambda: healthy[0],
    )
    s.client_data(messages.startup_message({"user": "u"}), 0.0)
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0)
    s.client_data(messages.query("SELECT 1"), 1.0)
    assert messages.decode_query(bytes(s.to_server)).startswith("dbgov_refused_")
    assert s.events[-1]["rule"] == "audit:fail-closed"
    s.to_server.clear()
    healthy[0] = True
    s.client_data(messages.query("SELECT 1"), 1.0)
    assert messages.decode_query(bytes(s.to_server)) == "SELECT 1"


def test_audit_can_redact_literals() -> None:
    s = _ready(redact_literals=True)
    s.client_data(messages.query("SELECT * FROM t WHERE ssn = '123-45-6789'"), 1.0)
    s.server_data(messages.command_complete("SELECT 0") + messages.ready_for_query("I"), 1.0)
    assert s.events[-1]["statement"] == "SELECT * FROM t WHERE ssn = $1"
    s.client_data(messages.query("SELEC 'secret'"), 1.0)
    s.server_data(messages.command_complete("SELECT 0") + messages.ready_for_query("I"), 1.0)
    assert "secret" not in s.events[-1]["statement"]


class _Info:
    cls = "update"
    reads = ()
    writes = ("t",)


class Limited(Blocker):
    max_rows_affected = 3

    def decide(self, sql: str, context: object) -> policy_port.Decision:
        if sql.upper().startswith("UPDATE"):
            return policy_port.SimpleDecision(verdict="allow", rule="w", reason="ok", statements=(_Info(),))
        return super().decide(sql, context)


def _limited() -> session.Session:
    s = session.Session(
        policy=Limited,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="a", session_id="s"),
        backend_key=(1, 2),
        nonce="n",
    )
    s.client_data(messages.startup_message({"user": "u"}), 0.0)
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0)
    s.to_client.clear()
    return s


def _queries(data: bytearray) -> list[str]:
    framer = framing.Framer(side="frontend")
    framer.feed(bytes(data))
    out = [messages.decode_query(m.data) for m in framer.drain()[1]]
    data.clear()
    return out


OK = messages.command_complete
Z = messages.ready_for_query


@pytest.mark.parametrize(("count", "closer", "client_sees"), [(2, "COMMIT", "CZ"), (5, "ROLLBACK", "EZ")])
def test_guarded_write_holds_pipelined_queries(count: int, closer: str, client_sees: str) -> None:
    s = _limited()
    s.client_data(messages.query("UPDATE t SET a = 1") + messages.query("SELECT 1"), 1.0)
    assert _queries(s.to_server) == ["BEGIN", "UPDATE t SET a = 1"]  # SELECT 1 waits
    s.server_data(OK("BEGIN") + Z("T") + OK(f"UPDATE {count}") + Z("T"), 1.0)
    assert _queries(s.to_server) == [closer] and not s.to_client
    s.server_data(OK(closer) + Z("I"), 1.0)
    assert _types(s.to_client) == client_sees
    if client_sees[0] == "E":
        assert "more than maxRowsAffected (3)" in messages.decode_fields(bytes(s.to_client)[:-6])["M"]
    assert _queries(s.to_server) == ["SELECT 1"]  # released after the write settled
    assert s.txn_status == "I"


UPDATE_BATCH = (
    messages.parse("", "UPDATE t SET a = 1")
    + messages.bind("", "")
    + messages.execute()
    + messages.SYNC_MESSAGE
)
"""An extended-protocol write, as drivers send it."""


def test_extended_guard_fails_the_batch_before_sync_reaches_the_server() -> None:
    s = _limited()
    s.client_data(UPDATE_BATCH, 1.0)
    assert _types_frontend(bytes(s.to_server)) == "PBEH"  # Sync held until the count is known
    s.to_server.clear()
    s.server_data(messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE + OK("UPDATE 5"), 1.0)
    assert _types(s.to_client) == "12E"
    assert "changed 5 rows" in messages.decode_fields(bytes(s.to_client)[10:])["M"]
    sent = bytes(s.to_server)
    assert _types_frontend(sent) == "PS"  # a failing marker, then the client's Sync
    marker = messages.decode_parse(sent[:-5]).query
    s.to_client.clear()
    s.server_data(messages.error_response(code="42601", message=f'syntax error at "{marker}"') + Z("I"), 1.0)
    assert _types(s.to_client) == "Z"
    assert s.idle


def test_extended_guard_lets_small_writes_through() -> None:
    s = _limited()
    s.client_data(UPDATE_BATCH, 1.0)
    s.to_server.clear()
    s.server_data(messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE + OK("UPDATE 2"), 1.0)
    assert _types(s.to_client) == "12C"
    assert bytes(s.to_server) == messages.SYNC_MESSAGE


class NoSearchPath(Blocker):
    def decide(self, sql: str, context: object) -> policy_port.Decision:
        if sql.startswith("SET search_path"):
            return policy_port.SimpleDecision(
                verdict="block", rule="guarded-setting", reason="search_path is guarded", sqlstate="42501"
            )
        return super().decide(sql, context)


def test_startup_settings_are_judged_like_set_statements() -> None:
    seen: list[str] = []

    class Recording(NoSearchPath):
        def decide(self, sql: str, context: object) -> policy_port.Decision:
            seen.append(sql)
            return super().decide(sql, context)

    s = session.Session(
        policy=Recording,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="a", session_id="s"),
        backend_key=(1, 2),
        nonce="n",
    )
    s.client_data(messages.startup_message({"user": "u", "DateStyle": "ISO", "search_path": "it's"}), 0.0)
    assert seen == ["SET DateStyle = E'ISO'", "SET search_path = E'it''s'"]
    fields = messages.decode_fields(bytes(s.to_client))
    assert fields["S"] == "FATAL" and fields["C"] == "42501"
    assert 'startup parameter "search_path" refused by rule "guarded-setting"' in fields["M"]
    assert not any(isinstance(a, session.ConnectUpstream) for a in s.actions)


def test_client_token_login_records_the_identity() -> None:
    """The session asks the shell to verify the token (VerifyToken) and waits; the answer
    decides: an identity connects upstream, a refusal is audited and a FATAL."""
    s = _session(client_token=True)
    s.client_data(messages.startup_message({"user": "agent", "database": "shop"}), 0.0)
    code, _ = messages.decode_authentication(bytes(s.to_client))
    assert code == messages.AUTH_CLEARTEXT
    s.client_data(messages.password_message(b"good-token\0"), 0.0)
    assert s.state == "verifying" and s.actions[-1] == session.VerifyToken(token="good-token")
    agent = model.Identity(issuer="https://idp", subject="agent-7", claims={"groups": ["ops"]})
    s.token_verified(agent, 0.0)
    assert isinstance(s.actions[-1], session.ConnectUpstream)
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0)
    assert s.events[-1]["identity"] == {
        "issuer": "https://idp",
        "subject": "agent-7",
        "claims": {"groups": ["ops"]},
    }

    bad = _session(client_token=True)
    bad.client_data(messages.startup_message({"user": "agent"}), 0.0)
    bad.to_client.clear()
    bad.client_data(messages.password_message(b"forged\0"), 0.0)
    bad.token_refused(
        code="bad_signature", sqlstate="28P01", message="Signature verification failed", now=0.0
    )
    fields = messages.decode_fields(bytes(bad.to_client))
    assert fields["C"] == "28P01" and "Signature verification failed" in fields["M"]
    assert bad.events[-1]["type"] == "login_refused" and bad.events[-1]["reason"] == "bad_signature"
    assert "forged" not in str(bad.events)


def test_every_established_session_ends_in_the_audit_trail_once() -> None:
    s = _ready()
    s.client_data(messages.query("DELETE FROM t WHERE id = 1"), 1.0)  # sent, never answered
    s.client_eof(2.0)
    s.client_eof(3.0)  # a second close changes nothing
    statement, end = s.events[-2:]
    assert statement["statement"] == "DELETE FROM t WHERE id = 1" and statement["sqlstate"] == "08006"
    assert end["type"] == "session_end" and end["reason"] == "client disconnected"
    assert sum(e["type"] == "session_end" for e in s.events) == 1

    before_login = _session()
    before_login.client_data(messages.startup_message({"user": "agent"}), 0.0)
    before_login.client_eof(1.0)
    assert not [e for e in before_login.events if e["type"] == "session_end"]  # it never started


def _pipeline(*sqls: str) -> bytes:
    """What psycopg's pipeline mode sends: Parse/Bind/Describe/Execute per statement, one Sync."""
    out = b""
    for sql in sqls:
        out += messages.parse("", sql) + messages.bind("", "", []) + messages.describe("P", "")
        out += messages.execute("", 0)
    return out + messages.SYNC_MESSAGE


def _answer(rows: int, tag: str) -> bytes:
    field = messages.Field(
        name="a", table_oid=0, attnum=0, type_oid=23, type_size=4, type_modifier=-1, format=0
    )
    out = messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE
    out += messages.row_description([field]) if tag.startswith("SELECT") else b"n\0\0\0\4"
    return out + b"".join(messages.data_row([b"1"]) for _ in range(rows)) + messages.command_complete(tag)


@pytest.mark.parametrize("lean", [True, False])
def test_each_statement_of_a_pipeline_is_audited_with_its_own_rows(lean: bool) -> None:
    s = _ready()
    s.lean = lean
    s.client_data(
        _pipeline("SELECT a FROM t", "UPDATE t SET a = 1", "SELECT b FROM t", "INSERT INTO t VALUES (1)"), 1.0
    )
    answer = (
        _answer(2, "SELECT 2") + _answer(0, "UPDATE 3") + _answer(5, "SELECT 5") + _answer(0, "INSERT 0 1")
    )
    s.server_data(answer + messages.ready_for_query("I"), 2.0)
    got = [
        (e["statement"], e["rows_returned"], e["rows_affected"]) for e in s.events if e["type"] == "statement"
    ]
    assert got == [
        ("SELECT a FROM t", 2, 0),
        ("UPDATE t SET a = 1", 0, 3),
        ("SELECT b FROM t", 5, 0),
        ("INSERT INTO t VALUES (1)", 0, 1),
    ]


def test_statements_after_a_pipeline_error_never_ran() -> None:
    s = _ready()
    s.client_data(_pipeline("SELECT a FROM t", "SELECT 1/0", "UPDATE t SET a = 1"), 1.0)
    error = messages.error_response(code="22012", message="division by zero")
    answer = _answer(2, "SELECT 2") + messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE + error
    s.server_data(answer + messages.ready_for_query("I"), 2.0)
    got = [
        (e["statement"], e["rows_returned"], e["rows_affected"], e["sqlstate"])
        for e in s.events
        if e["type"] == "statement"
    ]
    assert got == [
        ("SELECT a FROM t", 2, 0, "22012"),
        ("SELECT 1/0", 0, None, "22012"),
        ("UPDATE t SET a = 1", 0, None, "22012"),
    ]


def test_long_texts_are_redacted_token_by_token_like_the_normalizer() -> None:
    from dbgov_sidecar import redact

    body = ", ".join(f"'secret{i}', {i}, {i}.5, x'ff', E'\\\\n'" for i in range(600))
    sql = f"SELECT $1, {body} FROM t WHERE a = 'é''x'"
    assert len(sql) > redact.NORMALIZE_MAX_SIZE
    out = redact.redact_literals(sql)
    assert "secret" not in out and "é" not in out and "x'ff'" not in out
    assert out.startswith("SELECT $1, $2, $3, $4, $5, $6, $7, ")
    assert out.endswith("FROM t WHERE a = $3002")
    short = "SELECT 'secret', 1 FROM t"
    assert redact.redact_literals(short) == "SELECT $1, $2 FROM t"


def test_nothing_interleaves_with_the_search_path_probe() -> None:
    """Client input that arrives while the proxy reads search_path back waits for the answer:
    a Sync forwarded in between would be answered among the probe's replies."""
    from dbgov_policy import compile as policy_compile
    from dbgov_policy import engine

    policy = policy_port.EnginePolicy(
        engine.Engine(
            policy_compile.compile_policy(
                {"default": "allow", "rules": [], "guardrails": {"allowedSettings": {"search_path": ["app"]}}}
            )
        )
    )
    s = session.Session(
        policy=lambda: policy,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="127.0.0.1:1", session_id="s1"),
        backend_key=(11, 22),
        nonce="NONCE",
    )
    s.client_data(messages.startup_message({"user": "agent", "database": "shop"}), 0.0)
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0, search_path=("public",))
    s.to_client.clear()
    s.client_data(messages.query("SET search_path = app"), 0.0)
    s.to_server.clear()
    s.server_data(messages.command_complete("SET") + messages.ready_for_query("I"), 0.0)
    assert b"current_schemas" in bytes(s.to_server)  # the probe
    s.to_server.clear()
    s.client_data(messages.SYNC_MESSAGE + messages.query("SELECT 1"), 0.0)
    assert bytes(s.to_server) == b""  # held behind the probe
    probe_answer = (
        messages.PARSE_COMPLETE_MESSAGE
        + messages.BIND_COMPLETE_MESSAGE
        + messages.data_row([b"app"])
        + messages.command_complete("SELECT 1")
        + b"3\0\0\0\4" * 2
        + messages.ready_for_query("I")
    )
    s.server_data(probe_answer, 0.0)
    assert bytes(s.to_server) == messages.SYNC_MESSAGE + messages.query("SELECT 1")
    assert s._context.search_path == ("app",)  # type: ignore[attr-defined]
    assert _types(s.to_client) == "CZ"  # the probe's replies are the proxy's own
