"""Framing: message boundaries under any chunking, and strict rejection of bad streams."""

from __future__ import annotations

import contextlib
import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dbgov_sidecar.pgwire import ProtocolViolation, framing, messages

FRONTEND_STREAM = b"".join(
    [
        messages.query("SELECT 1"),
        messages.parse("s1", "SELECT $1::int", [23]),
        messages.bind("", "s1", [b"42"], result_formats=[1]),
        messages.describe("P", ""),
        messages.execute("", 0),
        messages.SYNC_MESSAGE,
        messages.TERMINATE_MESSAGE,
    ]
)


def _feed_all(framer: framing.Framer, chunks: list[bytes]) -> list[framing.Message]:
    out = []
    for chunk in chunks:
        framer.feed(chunk)
        while (msg := framer.next_message()) is not None:
            out.append(msg)
    return out


@given(st.lists(st.integers(min_value=0, max_value=len(FRONTEND_STREAM)), max_size=8))
def test_any_chunking_yields_the_same_messages(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(FRONTEND_STREAM)]
    chunks = [FRONTEND_STREAM[a:b] for a, b in itertools.pairwise(points)]
    msgs = _feed_all(framing.Framer(side="frontend"), chunks)
    assert [chr(m.type) for m in msgs] == list("QPBDESX")
    assert b"".join(m.data for m in msgs) == FRONTEND_STREAM


@given(
    st.lists(st.integers(min_value=0, max_value=len(FRONTEND_STREAM)), max_size=8),
    st.lists(st.booleans(), min_size=9, max_size=9),
)
def test_drain_under_any_chunking_and_any_buffer_type(cuts: list[int], mutable: list[bool]) -> None:
    # drain() reads bytes fed into an empty buffer in place; a bytearray is always copied
    points = [0, *sorted(cuts), len(FRONTEND_STREAM)]
    framer = framing.Framer(side="frontend")
    chunks: list[bytes] = []
    msgs: list[framing.Message] = []
    for (a, b), copy in zip(itertools.pairwise(points), mutable, strict=False):
        piece = bytearray(FRONTEND_STREAM[a:b]) if copy else FRONTEND_STREAM[a:b]
        framer.feed(piece)
        if isinstance(piece, bytearray):
            piece[:] = b"\xff" * len(piece)  # the caller reusing its buffer changes nothing
        chunk, got = framer.drain()
        assert chunk == b"".join(m.data for m in got)
        chunks.append(chunk)
        msgs.extend(got)
    assert [chr(m.type) for m in msgs] == list("QPBDESX")
    assert b"".join(chunks) == FRONTEND_STREAM
    assert framer.buffered == 0


def test_unread_after_a_drain_in_place_puts_bytes_in_front() -> None:
    framer = framing.Framer(side="frontend")
    framer.feed(messages.query("SELECT 1") + messages.SYNC_MESSAGE[:2])
    _, msgs = framer.drain()
    framer.unread(msgs[0].data)
    assert framer.buffered == len(msgs[0].data) + 2
    framer.feed(messages.SYNC_MESSAGE[2:])
    assert [chr(m.type) for m in framer.drain()[1]] == ["Q", "S"]
    framer.feed(messages.SYNC_MESSAGE)
    framer.unread(messages.query("SELECT 2"))
    assert [chr(m.type) for m in framer.drain()[1]] == ["Q", "S"]
    framer.feed(messages.SYNC_MESSAGE[:3])
    with pytest.raises(ProtocolViolation, match="truncated"):
        framer.check_eof()


def test_drain_returns_joined_bytes_and_keeps_the_partial_tail() -> None:
    framer = framing.Framer(side="frontend")
    framer.feed(FRONTEND_STREAM[:-3])
    chunk, msgs = framer.drain()
    assert [chr(m.type) for m in msgs] == list("QPBDES")
    assert chunk == FRONTEND_STREAM[: len(FRONTEND_STREAM) - 5]
    assert framer.buffered == 2
    framer.feed(FRONTEND_STREAM[-3:])
    chunk, msgs = framer.drain()
    assert chunk == messages.TERMINATE_MESSAGE
    assert msgs[0].body == b""


def test_startup_phase_then_typed_messages() -> None:
    framer = framing.Framer(side="frontend", startup=True)
    framer.feed(messages.ssl_request())
    framer.feed(messages.startup_message({"user": "alice", "database": "shop"}))
    framer.feed(messages.query("SELECT 1"))
    first = framer.next_message()
    assert first is not None and first.type == framing.STARTUP
    assert isinstance(messages.decode_startup(first.data), messages.SSLRequest)
    assert framer.in_startup
    second = framer.next_message()
    assert second is not None
    startup = messages.decode_startup(second.data)
    assert isinstance(startup, messages.StartupMessage)
    assert startup.params == {"user": "alice", "database": "shop"}
    assert not framer.in_startup
    third = framer.next_message()
    assert third is not None and messages.decode_query(third.data) == "SELECT 1"


def test_cancel_and_gssenc_requests_decode() -> None:
    cancel = messages.decode_startup(messages.cancel_request(1234, -99))
    assert cancel == messages.CancelRequest(pid=1234, secret=-99)
    assert isinstance(messages.decode_startup(messages.gssenc_request()), messages.GSSENCRequest)


@pytest.mark.parametrize(
    ("side", "startup", "data", "complaint"),
    [
        ("frontend", False, b"Z\0\0\0\5I", "unknown client message type b'Z'"),
        ("frontend", False, b"Q\0\0\0\3", "length 3, below the minimum of 4"),
        ("frontend", False, b"S\0\0\0\5x", "'S' has length 5 instead of 4"),
        ("frontend", False, b"Q\x7f\0\0\0", "exceeds the limit"),
        ("backend", False, b"q\0\0\0\4", "unknown server message type b'q'"),
        ("backend", False, b"Z\0\0\0\4", "'Z' has length 4 instead of 5"),
        ("frontend", True, struct.pack("!i", 4), "below the minimum of 8"),
        ("frontend", True, struct.pack("!i", 20000), "exceeds the limit of 10000"),
        ("frontend", True, struct.pack("!ii", 9, 80877103) + b"x", "instead of 8"),
        ("frontend", True, struct.pack("!ii", 8, 2 << 16), "unsupported frontend protocol 2.0"),
    ],
)
def test_violations_name_what_was_wrong(side: str, startup: bool, data: bytes, complaint: str) -> None:
    framer = framing.Framer(side=side, startup=startup, max_message_size=1 << 20)
    framer.feed(data)
    with pytest.raises(ProtocolViolation, match=complaint.replace("(", r"\(")):
        framer.next_message()


def test_truncated_startup_is_reported_at_eof() -> None:
    framer = framing.Framer(side="frontend", startup=True)
    framer.feed(messages.startup_message({"user": "bob"})[:-2])
    assert framer.next_message() is None
    with pytest.raises(ProtocolViolation, match="truncated startup packet"):
        framer.check_eof()


@given(st.binary(max_size=300), st.booleans(), st.sampled_from(["frontend", "backend"]))
def test_garbage_raises_only_protocol_violation(data: bytes, startup: bool, side: str) -> None:
    framer = framing.Framer(side=side, startup=startup, max_message_size=4096)
    framer.feed(data)
    try:
        while (msg := framer.next_message()) is not None:
            _decode_everything(msg)
        framer.check_eof()
    except ProtocolViolation as err:
        assert err.what


@given(st.binary(max_size=200))
def test_every_decoder_rejects_garbage_with_protocol_violation(body: bytes) -> None:
    for mtype in b"QPBDECpRKSZTDCEN":
        data = bytes([mtype]) + struct.pack("!i", len(body) + 4) + body
        with contextlib.suppress(ProtocolViolation):
            _decode_everything(framing.Message(mtype, data))
    with contextlib.suppress(ProtocolViolation):
        messages.decode_startup(struct.pack("!i", len(body) + 4) + body)


def _decode_everything(msg: framing.Message) -> None:
    if msg.type == framing.STARTUP:
        messages.decode_startup(msg.data)
        return
    decoders = {
        ord("Q"): [messages.decode_query],
        ord("P"): [messages.decode_parse],
        ord("B"): [messages.decode_bind],
        ord("D"): [messages.decode_target, messages.decode_data_row],
        ord("C"): [messages.decode_target, messages.decode_command_complete],
        ord("E"): [messages.decode_execute, messages.decode_fields],
        ord("p"): [messages.decode_cleartext_password, messages.decode_sasl_initial_response],
        ord("R"): [messages.decode_authentication],
        ord("K"): [messages.decode_backend_key_data],
        ord("S"): [messages.decode_parameter_status],
        ord("Z"): [messages.decode_ready_for_query],
        ord("T"): [messages.decode_row_description],
        ord("N"): [messages.decode_fields],
    }
    for decode in decoders.get(msg.type, []):
        with contextlib.suppress(ProtocolViolation):
            decode(msg.data)  # type: ignore[operator]


def _careful_or_error(decode: object, data: bytes) -> object:
    try:
        return decode(data)  # type: ignore[operator]
    except ProtocolViolation:
        return ProtocolViolation


_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=4)
_binds = st.builds(
    messages.bind,
    _names,
    _names,
    st.lists(st.none() | st.binary(max_size=6), max_size=4),
    param_formats=st.lists(st.sampled_from([0, 1]), max_size=1),
    result_formats=st.lists(st.sampled_from([0, 1]), max_size=3),
)


@given(_binds, st.binary(max_size=6), st.integers(min_value=0, max_value=40))
def test_the_fast_bind_and_execute_decoders_agree_with_the_careful_reader(
    bind: bytes, noise: bytes, cut: int
) -> None:
    # well-formed, and damaged by overwriting or truncating the body
    body = bind[5:]
    damaged = body[:cut] + noise + body[cut + len(noise) :]
    for candidate in (body, damaged, body[:cut]):
        data = b"B" + struct.pack("!i", len(candidate) + 4) + candidate
        fast = messages._decode_bind_fast(data)
        careful = _careful_or_error(messages._decode_bind_careful, data)
        if fast is not None:
            assert fast == careful
        assert _careful_or_error(messages.decode_bind, data) == careful
        execute = b"E" + struct.pack("!i", len(candidate) + 4) + candidate
        assert _careful_or_error(messages.decode_execute, execute) == _careful_or_error(
            _decode_execute_with_reader, execute
        )


def _decode_execute_with_reader(data: bytes) -> messages.Execute:
    reader = messages._Reader(data, 5, "Execute")
    portal = reader.cstring()
    max_rows = reader.int32()
    reader.end()
    return messages.Execute(portal=portal, max_rows=max_rows)
