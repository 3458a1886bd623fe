"""The session's shortcuts for the steady state (whole Query messages, plain responses) behave
exactly like the general path: the same bytes out, the same audit events, the same state."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from dbgov_sidecar import policy_port, session
from dbgov_sidecar.pgwire import messages

# What every PostgreSQL reports at login, and the proxy requires (it reads SQL as UTF-8 with
# standard-conforming strings).
LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]


class Policy:
    """Blocks DROP, limits results to three rows, allows the rest."""

    mode = "enforce"
    max_rows_returned: int | None = 3
    max_rows_affected: int | None = None

    def new_context(
        self, *, search_path: tuple[str, ...] | None = None, columns: object = None, **_: object
    ) -> object:
        return None

    def decide(self, sql: str, context: object) -> policy_port.Decision:
        if sql.lower().startswith("drop"):
            return policy_port.SimpleDecision(verdict="block", rule="no-drop", reason="no", sqlstate="42501")
        return policy_port.SimpleDecision(verdict="allow", rule="ok", reason="fine")


FIELD = messages.Field(name="a", table_oid=0, attnum=0, type_oid=23, type_size=4, type_modifier=-1, format=0)
SERVER = {
    "T": messages.row_description([FIELD]),
    "D": messages.data_row([b"1"]),
    "C": messages.command_complete("SELECT 1"),
    "U": messages.command_complete("UPDATE 7"),
    "Z": messages.ready_for_query("I"),
    "ZT": messages.ready_for_query("T"),
    "E": messages.error_response(code="22012", message="division by zero"),
    "N": messages.notice_response(code="01000", message="hello"),
    "S": messages.parameter_status("TimeZone", "UTC"),
    "1": messages.PARSE_COMPLETE_MESSAGE,
    "2": messages.BIND_COMPLETE_MESSAGE,
    "I": b"I\0\0\0\4",
    "s": b"s\0\0\0\4",  # PortalSuspended
    "bad-Z": b"Z\0\0\0\5X",
    "bad-C": b"C\0\0\0\6\xff\0",
}
CLIENT = {
    "select": messages.query("SELECT 1"),
    "two": messages.query("SELECT 1; SELECT 2"),
    "drop": messages.query("DROP TABLE t"),
    "extended": messages.parse("", "SELECT $1")
    + messages.bind("", "", [b"1"])
    + messages.describe("P", "")
    + messages.execute("", 0)
    + messages.SYNC_MESSAGE,
    "partial": messages.bind("", "", [b"1"])
    + messages.execute("", 2)
    + messages.execute("", 2)
    + messages.SYNC_MESSAGE,
    "bad": b"Q\0\0\0\7ab",  # claims more than it holds
}


def _ready(lean: bool) -> session.Session:
    s = session.Session(
        policy=Policy,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="127.0.0.1:1", session_id="s1"),
        backend_key=(11, 22),
        nonce="NONCE",
    )
    s.lean = lean
    s.client_data(messages.startup_message({"user": "agent", "database": "shop"}), 0.0)
    s.actions.clear()
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0)
    return s


def _observe(s: session.Session) -> dict[str, Any]:
    seen = {
        "to_client": bytes(s.to_client),
        "to_server": bytes(s.to_server),
        "events": [dict(e) for e in s.events],
        "state": s.state,
        "txn": s.txn_status,
        "idle": s.idle,
        "actions": list(s.actions),
    }
    s.to_client.clear()
    s.to_server.clear()
    s.events.clear()
    s.actions.clear()
    return seen


_steps = st.lists(
    st.one_of(
        st.tuples(st.just("client"), st.lists(st.sampled_from(sorted(CLIENT)), min_size=1, max_size=3)),
        st.tuples(st.just("server"), st.lists(st.sampled_from(sorted(SERVER)), min_size=1, max_size=8)),
    ),
    max_size=12,
)


@settings(max_examples=300)
@given(_steps, st.integers(min_value=0, max_value=40))
def test_shortcuts_change_nothing_but_speed(steps: list[tuple[str, list[str]]], cut: int) -> None:
    lean, general = _ready(True), _ready(False)
    for now, (side, names) in enumerate(steps, start=1):
        data = b"".join((CLIENT if side == "client" else SERVER)[n] for n in names)
        chunks = [data] if cut == 0 or cut >= len(data) else [data[:cut], data[cut:]]
        for s in (lean, general):
            for chunk in chunks:
                if s.state == "closed":
                    break
                (s.client_data if side == "client" else s.server_data)(chunk, float(now))
        assert _observe(lean) == _observe(general)


def test_the_shortcuts_are_taken_for_the_steady_state() -> None:
    s = _ready(True)
    s.client_data(CLIENT["select"], 1.0)
    assert not s._client.buffered and bytes(s.to_server) == CLIENT["select"]
    s.server_data(SERVER["T"] + SERVER["D"] + SERVER["C"] + SERVER["Z"], 2.0)
    assert not s._server.buffered
    (event,) = [e for e in s.events if e["type"] == "statement"]
    assert event["rows_returned"] == 1 and event["duration_ms"] == 1000.0
