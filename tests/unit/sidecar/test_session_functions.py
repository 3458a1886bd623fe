"""The session reads the database's function names again with search_path after DDL (sans I/O):
later statements are judged by the new names, and a probe whose answer lacks them, or holds more
than dbgov keeps, ends the session rather than judge by stale names."""

from __future__ import annotations

import pytest

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import login, policy_port, session
from dbgov_sidecar.pgwire import messages

LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]
POLICY = {
    "default": "block",
    "rules": [
        {"name": "reads", "verdict": "allow", "statements": ["select"]},
        {"name": "ddl", "verdict": "allow", "statements": ["create"]},
    ],
}
CLOSE_COMPLETE = b"3\0\0\0\4"
NONE: policy_port.FunctionNames = (frozenset(), frozenset())


def _session(functions: policy_port.FunctionNames | None) -> session.Session:
    policy = policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(POLICY)))
    s = session.Session(
        policy=lambda: policy,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="127.0.0.1:1", session_id="s1"),
        backend_key=(11, 22),
        nonce="NONCE",
    )
    s.client_data(messages.startup_message({"user": "agent", "database": "shop"}), 0.0)
    s.upstream_ready(
        parameter_status=LOGIN_STATUS, notices=[], now=0.0, search_path=("public",), functions=functions
    )
    s.to_client.clear()
    return s


def _after_ddl(s: session.Session) -> None:
    s.client_data(
        messages.query("CREATE FUNCTION public.lower(n int) RETURNS int LANGUAGE sql AS 'SELECT 1'"), 0.0
    )
    s.to_server.clear()
    s.server_data(messages.command_complete("CREATE FUNCTION") + messages.ready_for_query("I"), 0.0)


def _probe_answer(*, facts: list[tuple[str, str, str]] | None) -> bytes:
    out = (
        messages.PARSE_COMPLETE_MESSAGE
        + messages.BIND_COMPLETE_MESSAGE
        + messages.data_row([b"public"])
        + messages.command_complete("SELECT 1")
        + CLOSE_COMPLETE * 2
    )
    if facts is not None:
        out += messages.PARSE_COMPLETE_MESSAGE + messages.BIND_COMPLETE_MESSAGE
        out += b"".join(messages.data_row([v.encode() for v in row]) for row in facts)
        out += messages.command_complete(f"SELECT {len(facts)}") + CLOSE_COMPLETE * 2
    return out + messages.ready_for_query("I")


def _verdict(s: session.Session, sql: str) -> str:
    decision = s._policy().decide(sql, s._context)
    return str(decision.verdict)


def test_ddl_reads_the_function_names_again() -> None:
    s = _session(NONE)
    assert _verdict(s, "SELECT lower(42)") == "allow"
    _after_ddl(s)
    assert login.FUNCTIONS_QUERY.encode() in bytes(s.to_server)  # (with the search_path probe)
    s.to_server.clear()
    s.server_data(_probe_answer(facts=[("", "", "lower")]), 0.0)
    assert s.state == "ready"
    assert _verdict(s, "SELECT lower(42)") == "block"
    assert _verdict(s, "SELECT pg_catalog.lower('A')") == "allow"


def test_without_known_names_the_probe_reads_only_search_path() -> None:
    s = _session(None)  # (a shell that read no names: nothing to keep up to date)
    _after_ddl(s)
    assert b"current_schemas" in bytes(s.to_server)
    assert login.FUNCTIONS_QUERY.encode() not in bytes(s.to_server)


@pytest.mark.parametrize("facts", [None, [("", "", f"f{i}") for i in range(login.MAX_FUNCTION_FACTS + 1)]])
def test_names_not_read_end_the_session(facts: list[tuple[str, str, str]] | None) -> None:
    s = _session(NONE)
    _after_ddl(s)
    s.to_server.clear()
    s.server_data(_probe_answer(facts=facts), 0.0)
    assert s.state == "closed"
    assert b"function names" in bytes(s.to_client)


def test_too_many_names_refuse_the_login() -> None:
    rows = [("", "", f"f{i}") for i in range(login.MAX_FUNCTION_FACTS + 1)]
    with pytest.raises(login.TooManyFunctions, match="more than 50000 function names"):
        login.function_facts(rows)
    names, columns = login.function_facts([("", "", "lower"), ("shop", "orders", "lower")])
    assert names == {"lower"} and columns == {("shop", "orders", "lower")}
