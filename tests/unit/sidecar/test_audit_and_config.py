"""Audit hash chains, metrics text and settings parsing."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbgov_sidecar import audit, config, metrics, policy_port, proxy, session
from dbgov_sidecar.pgwire import messages

# What every PostgreSQL reports at login, and the proxy requires (it reads SQL as UTF-8 with
# standard-conforming strings).
LOGIN_STATUS = [
    messages.parameter_status("client_encoding", "UTF8"),
    messages.parameter_status("standard_conforming_strings", "on"),
]


def _events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _sink(stream: io.StringIO) -> audit.Sink:
    return lambda text: stream.write(text) >= 0


def test_chain_per_session_detects_edits_and_gaps() -> None:
    stream = io.StringIO()
    log = audit.AuditLog(_sink(stream))
    for i in range(3):
        log.write({"type": "statement", "session_id": "a", "statement": f"SELECT {i}"})
        log.write({"type": "statement", "session_id": "b", "statement": f"SELECT {i}"})
    log.flush()
    events = _events(stream)
    a = [e for e in events if e["session_id"] == "a"]
    assert a[0]["prev_hash"] == audit.GENESIS
    assert audit.verify(a)
    assert not audit.verify([a[0], a[2]])
    edited = [dict(a[0]), *a[1:]]
    edited[0]["statement"] = "SELECT 42"
    assert not audit.verify(edited)


def _broken(text: str) -> bool:
    raise OSError("disk full")


@pytest.mark.parametrize(("policy", "healthy"), [("best-effort", True), ("fail-closed", False)])
def test_sink_failure_policy(policy: str, healthy: bool) -> None:
    log = audit.AuditLog(_broken, failure_policy=policy)
    log.write({"type": "statement", "session_id": "a", "enforced": "block"})
    assert log.dropped == 1 and log.healthy is healthy


@pytest.mark.parametrize(("policy", "healthy"), [("best-effort", True), ("fail-closed", False)])
def test_a_full_sink_drops_and_the_buffer_stays_bounded(policy: str, healthy: bool) -> None:
    accepted: list[str] = []
    open_ = [False]

    def sink(text: str) -> bool:  # a pipe nobody reads: takes nothing until opened
        if open_[0]:
            accepted.append(text)
        return open_[0]

    log = audit.AuditLog(sink, failure_policy=policy, max_buffer=5)
    for i in range(18):
        log.write({"type": "statement", "session_id": "a", "enforced": "allow", "n": i})
    # A full buffer (five) goes to the sink, which refuses it: counted, never held beyond five.
    assert log.dropped == 15 and log.healthy is healthy
    log.flush()
    assert log.dropped == 18 and log.healthy is healthy
    open_[0] = True
    log.write({"type": "statement", "session_id": "a", "enforced": "block"})
    assert log.healthy and len(accepted) == 1


def test_refusal_reaches_the_sink_when_write_returns() -> None:
    stream = io.StringIO()
    log = audit.AuditLog(_sink(stream))
    log.write({"type": "statement", "session_id": "a", "enforced": "allow"})
    assert stream.getvalue() == ""  # ordinary statements are batched
    log.write({"type": "statement", "session_id": "a", "enforced": "block", "rule": "no-drop"})
    assert '"rule":"no-drop"' in stream.getvalue() and log.written == 2


def test_metrics_from_events() -> None:
    m = metrics.Metrics()
    m.observe({"type": "session_start"})
    m.observe({"type": "statement", "classes": ["select"], "enforced": "allow", "duration_ms": 2.0})
    m.observe(
        {"type": "statement", "classes": ["ddl"], "enforced": "block", "rule": "no-drop", "duration_ms": 0}
    )
    m.observe({"type": "warning", "columns": ["shop.customers.email"]})
    text = m.render()
    assert 'dbgov_statements_total{class="select",decision="allow"} 1' in text
    assert 'dbgov_refusals_total{rule="no-drop"} 1' in text
    assert "dbgov_sessions_active 1" in text
    assert "dbgov_proxy_masked_columns_total 1" in text
    assert 'dbgov_statement_duration_seconds_bucket{le="0.0025"} 2' in text
    assert "dbgov_statement_duration_seconds_count 2" in text


def test_settings_from_env_and_upstream_url() -> None:
    settings = config.from_env(
        {
            "DBGOV_LISTEN": "127.0.0.1:7000",
            "DBGOV_UPSTREAM": "postgresql://agent:s%40cret@db.example:6543/shop?sslmode=verify-full&sslrootcert=/ca.pem",
            "DBGOV_DRAIN_TIMEOUT": "5",
        }
    )
    cfg = config.proxy_config(settings, salt=b"x" * 16)
    assert (cfg.listen_host, cfg.listen_port, cfg.drain_timeout) == ("127.0.0.1", 7000, 5.0)
    up = cfg.upstream
    assert (up.host, up.port, up.user, up.password, up.database) == (
        "db.example",
        6543,
        "agent",
        "s@cret",
        "shop",
    )
    assert (up.sslmode, up.sslrootcert) == ("verify-full", "/ca.pem")


def test_trust_is_loopback_only() -> None:
    db = "postgresql://app@db.example:5432/shop"
    with pytest.raises(ValueError, match="requires DBGOV_CLIENT_PASSWORD"):
        config.proxy_config(config.Settings(listen="0.0.0.0:5432", upstream=db), salt=b"x" * 16)
    cfg = config.proxy_config(
        config.Settings(listen="0.0.0.0:5432", upstream=db, client_password="pw"), salt=b"x" * 16
    )
    assert cfg.session.client_scram is not None


@pytest.mark.parametrize(
    ("listen", "upstream"),
    [
        ("127.0.0.1:5432", "postgresql://app@127.0.0.1:5432/shop"),
        ("127.0.0.1:6432", "postgresql://app@localhost:6432/shop"),
        ("127.0.0.1:5432", "postgresql://app@/shop"),  # the defaults of a pod that named no database
    ],
)
def test_an_upstream_that_is_the_proxy_itself_is_refused(listen: str, upstream: str) -> None:
    with pytest.raises(ValueError, match="own listen address"):
        config.proxy_config(config.Settings(listen=listen, upstream=upstream), salt=b"x" * 16)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


_text = st.text(max_size=12)
_maybe_text = st.none() | _text


@given(
    st.fixed_dictionaries(
        {
            "time": _text,
            "statement": _text,
            "enforced": _text,
            "rows_returned": st.integers(),
            "rows_affected": st.none() | st.integers(),
            "duration_ms": st.floats(),
            "sqlstate": _maybe_text,
        }
    ),
    st.dictionaries(_text, _json_values, max_size=8),
    st.dictionaries(_text, _json_values, max_size=6),
)
def test_a_statement_event_encodes_as_its_dict_would(
    values: dict[str, Any], decision: dict[str, object], identity: dict[str, object]
) -> None:
    event = audit.StatementEvent(**values, decision=audit.Segment(decision), session=audit.Segment(identity))
    reserved = {"type", "time", "statement", "enforced", "rows_returned", "rows_affected"}
    reserved |= {"duration_ms", "sqlstate"}
    if reserved & (decision.keys() | identity.keys()) or decision.keys() & identity.keys():
        return  # a dict cannot hold a key twice; segments never repeat an event's own keys
    assert event.encode() == audit._encode(event.as_dict())
    assert audit.seal(event, audit.GENESIS) == audit.seal(event.as_dict(), audit.GENESIS)


def test_the_session_writes_statement_events_with_the_documented_keys() -> None:
    s = session.Session(
        policy=policy_port.AllowAll,
        config=session.SessionConfig(),
        client=session.ClientInfo(address="127.0.0.1:1", session_id="s1"),
        backend_key=(1, 2),
        nonce="NONCE",
    )
    s.client_data(messages.startup_message({"user": "u", "database": "d"}), 0.0)
    s.upstream_ready(parameter_status=LOGIN_STATUS, notices=[], now=0.0)
    s.client_data(messages.query("SELECT 1"), 0.0)
    s.server_data(messages.command_complete("SELECT 1") + messages.ready_for_query("I"), 0.0)
    statements = [e for e in s.events if e["type"] == "statement"]
    assert [tuple(e) for e in statements] == [audit.STATEMENT_KEYS]


@pytest.mark.parametrize(
    ("query", "complaint"),
    [
        ("sslmode=verify", "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full"),
        ("channel_binding=always", "channel_binding must be one of disable, prefer, require"),
        ("sslmode=disable&channel_binding=require", "channel_binding=require needs TLS"),
        ("gssencmode=require", "does not speak GSSAPI encryption"),
    ],
)
def test_upstream_tls_settings_are_checked_when_read(query: str, complaint: str) -> None:
    settings = config.Settings(upstream=f"postgresql://app@db.example/shop?{query}")
    with pytest.raises(ValueError, match=complaint):
        config.upstream_config(settings)


def test_upstream_tls_settings_read_like_libpq() -> None:
    url = "postgresql://app@db.example/shop?sslmode=verify-ca&channel_binding=require&sslcert=/c.pem&sslkey=/k.pem"
    up = config.upstream_config(config.Settings(upstream=url))
    assert (up.sslmode, up.channel_binding, up.sslcert, up.sslkey) == (
        "verify-ca",
        "require",
        "/c.pem",
        "/k.pem",
    )


@given(st.floats(min_value=0, max_value=4_102_444_800))  # up to 2100
def test_timestamps_are_rfc3339_utc_with_microseconds(t: float) -> None:
    import datetime

    text = audit.timestamp(t)
    parsed = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    assert abs(parsed.timestamp() - t) < 2e-6  # truncated to the microsecond
    assert audit.timestamp(t) == text  # the cached date part gives the same answer


def test_an_upstream_sslkey_without_sslcert_is_ignored_like_libpq() -> None:
    # libpq uses sslkey only with a client certificate; an app's stray PGSSLKEY must not stop the sidecar
    up = config.upstream_config(config.Settings(upstream="postgresql://app@db.example/shop?sslkey=/k.pem"))
    assert (up.sslcert, up.sslkey) == (None, "/k.pem")
    proxy.Proxy(proxy.ProxyConfig(upstream=up), policy=policy_port.AllowAll)  # builds its TLS context


def test_mask_decisions_of_one_shape_share_their_audit_fields() -> None:
    """Each text of a masked shape gets its own decision object (its own rewrite); the audit
    fields, which do not include the rewrite, are encoded once for all of them, and a decision
    that differs in any audited field gets its own."""
    import dataclasses
    from pathlib import Path

    from dbgov_policy import compile as policy_compile
    from dbgov_policy import engine

    text = (Path(__file__).resolve().parents[1] / "policy" / "policy.yaml").read_text()
    decide = engine.Engine(policy_compile.load_policy_text(text, mask_key="k")).decide
    decide("SELECT ssn FROM customers WHERE id = 1")
    first, second = (
        decide("SELECT ssn FROM customers WHERE id = 2"),
        decide("SELECT ssn FROM customers WHERE id = 3"),
    )
    assert first.verdict == "mask" and first is not second and first.rewritten != second.rewritten
    segment = session._decision_segment(first)
    assert session._decision_segment(second) is segment
    assert segment.fields["decision"] == "mask" and segment.fields["masked_columns"]
    for change in ({"rule": "other-rule"}, {"reason": "another reason"}, {"verdict": "block"}):
        other = session._decision_segment(dataclasses.replace(second, **change))
        assert other is not segment and other.text != segment.text


def test_upstream_by_ipv6_address() -> None:
    """What the webhook writes for PGHOST=fd00:10::5 (the address in brackets, as in any URL)."""
    up = config.upstream_config(config.Settings(upstream="postgresql://app@[fd00:10::5]:6432/shop"))
    assert (up.host, up.port, up.user, up.database) == ("fd00:10::5", 6432, "app", "shop")
