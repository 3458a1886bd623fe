"""Encoders and decoders agree, and decoders are precise about what is malformed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbgov_sidecar.pgwire import ProtocolViolation, messages

texts = st.text(alphabet=st.characters(blacklist_characters="\0", codec="utf-8"), max_size=50)


@given(texts, texts, st.lists(st.integers(min_value=0, max_value=2**31 - 1), max_size=5))
def test_parse_roundtrip(name: str, sql: str, oids: list[int]) -> None:
    decoded = messages.decode_parse(messages.parse(name, sql, oids))
    assert decoded == messages.Parse(name=name, query=sql, param_types=tuple(oids))


@given(
    texts,
    texts,
    st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=5),
    st.lists(st.sampled_from([0, 1]), max_size=3),
)
def test_bind_roundtrip(portal: str, stmt: str, params: list[bytes | None], formats: list[int]) -> None:
    raw = messages.bind(portal, stmt, params, result_formats=formats)
    decoded = messages.decode_bind(raw)
    assert (decoded.portal, decoded.statement) == (portal, stmt)
    assert decoded.params == tuple(params)
    assert decoded.result_formats == tuple(formats)


@given(st.lists(st.one_of(st.none(), st.binary(max_size=30)), max_size=10))
def test_data_row_roundtrip(values: list[bytes | None]) -> None:
    assert messages.decode_data_row(messages.data_row(values)) == values


def test_row_description_roundtrip() -> None:
    fields = [
        messages.Field(
            name="email",
            table_oid=16384,
            attnum=3,
            type_oid=25,
            type_size=-1,
            type_modifier=-1,
            format=0,
        ),
        messages.Field(
            name="?column?",
            table_oid=0,
            attnum=0,
            type_oid=23,
            type_size=4,
            type_modifier=-1,
            format=1,
        ),
    ]
    assert messages.decode_row_description(messages.row_description(fields)) == fields


def test_error_response_fields() -> None:
    raw = messages.error_response(
        code="42501", message="blocked by rule no-drop: DROP is not allowed", hint="ask a DBA"
    )
    fields = messages.decode_fields(raw)
    assert fields["S"] == "ERROR" and fields["V"] == "ERROR"
    assert fields["C"] == "42501"
    assert fields["M"].startswith("blocked by rule no-drop")
    assert fields["H"] == "ask a DBA"
    assert messages.decode_fields(messages.notice_response(code="01000", message="m"))["S"] == ("NOTICE")


def test_small_messages() -> None:
    assert messages.decode_ready_for_query(messages.ready_for_query("T")) == "T"
    assert messages.decode_command_complete(messages.command_complete("SELECT 3")) == "SELECT 3"
    assert messages.decode_backend_key_data(messages.backend_key_data(7, -8)) == (7, -8)
    assert messages.decode_parameter_status(messages.parameter_status("a", "b")) == ("a", "b")
    assert messages.decode_target(messages.describe("S", "x")) == messages.Target(kind="S", name="x")
    assert messages.decode_execute(messages.execute("p", 5)) == messages.Execute(portal="p", max_rows=5)
    code, payload = messages.decode_authentication(messages.authentication_sasl(["SCRAM-SHA-256"]))
    assert code == messages.AUTH_SASL
    assert messages.decode_sasl_mechanisms(payload) == ["SCRAM-SHA-256"]
    mech, data = messages.decode_sasl_initial_response(
        messages.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc")
    )
    assert (mech, data) == ("SCRAM-SHA-256", b"n,,n=,r=abc")


@pytest.mark.parametrize(
    ("data", "complaint"),
    [
        (b"Q\0\0\0\x08abc", "Query has an unterminated string"),
        (b"Q\0\0\0\x0aab\0cd\0", "Query has 3 unexpected trailing bytes"),
        (b"Q\0\0\0\x07\xff\xfe\0", "not UTF-8"),
        (messages.parse("", "x")[:-2] + b"\xff\xff", "negative parameter type count"),
        (b"D\0\0\0\x07X\0", "target kind b'X'"),
        (b"Z\0\0\0\x05Q", "ReadyForQuery with invalid status"),
    ],
)
def test_decoders_name_the_problem(data: bytes, complaint: str) -> None:
    decoder = {
        ord("Q"): messages.decode_query,
        ord("P"): messages.decode_parse,
        ord("D"): messages.decode_target,
        ord("Z"): messages.decode_ready_for_query,
    }[data[0]]
    with pytest.raises(ProtocolViolation, match=complaint):
        decoder(data)  # type: ignore[operator]


def test_startup_requires_user_and_rejects_duplicates() -> None:
    with pytest.raises(ProtocolViolation, match="no user parameter"):
        messages.decode_startup(messages.startup_message({"database": "x"}))
    raw = messages.startup_message({"user": "a"})
    dup = raw[:-1] + b"user\0b\0\0"
    dup = len(dup).to_bytes(4, "big") + dup[4:]
    with pytest.raises(ProtocolViolation, match="repeats parameter 'user'"):
        messages.decode_startup(dup)


def test_strings_with_nul_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="NUL"):
        messages.query("a\0b")


def test_replace_field_keeps_every_other_field_byte_for_byte() -> None:
    raw = messages.error_response(code="23505", message="duplicate key", detail="Key (email)=(a@b) exists.")
    out = messages.replace_field(raw, "D", "withheld")
    assert messages.decode_fields(out) == {**messages.decode_fields(raw), "D": "withheld"}
    assert list(messages.decode_fields(out)) == list(messages.decode_fields(raw))  # same order
    assert messages.replace_field(out, "D", "Key (email)=(a@b) exists.") == raw
    plain = messages.error_response(code="23505", message="duplicate key")
    assert messages.replace_field(plain, "D", "withheld") is plain
