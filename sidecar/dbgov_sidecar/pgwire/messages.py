"""Encode and decode the PostgreSQL v3 messages the proxy reads or writes.

Decoders take the raw bytes of a whole message (as ``framing.Message.data``) and raise
``ProtocolViolation`` on anything malformed; encoders return the raw bytes of a whole message.
Only the messages policy needs are decoded: everything else is forwarded as bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from dbgov_sidecar.pgwire import framing
from dbgov_sidecar.pgwire.errors import ProtocolViolation

_I32 = struct.Struct("!i")
_I16 = struct.Struct("!h")
_HEAD = struct.Struct("!ci")

# Frontend message types.
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
EXECUTE = ord("E")
DESCRIBE = ord("D")
CLOSE = ord("C")
SYNC = ord("S")
FLUSH = ord("H")
FUNCTION_CALL = ord("F")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")
PASSWORD = ord("p")
TERMINATE = ord("X")

# Backend message types.
AUTHENTICATION = ord("R")
BACKEND_KEY_DATA = ord("K")
PARAMETER_STATUS = ord("S")
READY_FOR_QUERY = ord("Z")
ROW_DESCRIPTION = ord("T")
DATA_ROW = ord("D")
COMMAND_COMPLETE = ord("C")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
NOTIFICATION = ord("A")
EMPTY_QUERY = ord("I")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
NO_DATA = ord("n")
PORTAL_SUSPENDED = ord("s")
PARAMETER_DESCRIPTION = ord("t")
COPY_IN_RESPONSE = ord("G")
COPY_OUT_RESPONSE = ord("H")
COPY_BOTH_RESPONSE = ord("W")
NEGOTIATE_PROTOCOL_VERSION = ord("v")

# Authentication request codes.
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


# --- startup phase -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SSLRequest:
    """The client asks for TLS before anything else."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GSSENCRequest:
    """The client asks for GSSAPI encryption."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest:
    """Out-of-band request to cancel the query running in another session."""

    pid: int
    secret: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StartupMessage:
    """The first real message of a session: protocol version and parameters."""

    protocol: int
    params: Mapping[str, str]


StartupPacket = SSLRequest | GSSENCRequest | CancelRequest | StartupMessage


def decode_startup(data: bytes) -> StartupPacket:
    """Decode an untyped startup-phase message (``data`` begins with the length)."""
    length, code = _unpack2(data, 0, "startup packet")
    if length != len(data):
        raise ProtocolViolation(f"startup packet length {length} does not match {len(data)} bytes")
    if code == framing.SSL_REQUEST_CODE:
        return SSLRequest()
    if code == framing.GSSENC_REQUEST_CODE:
        return GSSENCRequest()
    if code == framing.CANCEL_REQUEST_CODE:
        if len(data) != 16:
            raise ProtocolViolation("CancelRequest must be 16 bytes")
        pid, secret = struct.unpack_from("!ii", data, 8)
        return CancelRequest(pid=pid, secret=secret)
    if code >> 16 != 3:
        raise ProtocolViolation(f"unsupported protocol version {code >> 16}.{code & 0xFFFF}")
    reader = _Reader(data, 8, "StartupMessage")
    params: dict[str, str] = {}
    while True:
        key = reader.cstring()
        if not key:
            break
        if key in params:
            raise ProtocolViolation(f"StartupMessage repeats parameter {key!r}")
        params[key] = reader.cstring()
    reader.end()
    if "user" not in params:
        raise ProtocolViolation("StartupMessage has no user parameter")
    return StartupMessage(protocol=code, params=params)


def startup_message(params: Mapping[str, str], *, protocol: int = framing.PROTOCOL_3) -> bytes:
    """Encode a StartupMessage."""
    body = b"".join(_cstr(k) + _cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 8) + _I32.pack(protocol) + body


def ssl_request() -> bytes:
    """Encode an SSLRequest."""
    return struct.pack("!ii", 8, framing.SSL_REQUEST_CODE)


def gssenc_request() -> bytes:
    """Encode a GSSENCRequest."""
    return struct.pack("!ii", 8, framing.GSSENC_REQUEST_CODE)


def cancel_request(pid: int, secret: int) -> bytes:
    """Encode a CancelRequest."""
    return struct.pack("!iiii", 16, framing.CANCEL_REQUEST_CODE, pid, secret)


# --- frontend messages ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Parse:
    """Extended protocol: prepare ``query`` as statement ``name`` ('' is unnamed)."""

    name: str
    query: str
    param_types: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Bind:
    """Extended protocol: bind parameters to a statement, creating a portal."""

    portal: str
    statement: str
    param_formats: tuple[int, ...]
    params: tuple[bytes | None, ...]
    result_formats: tuple[int, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    """Describe / Close target: kind 'S' (statement) or 'P' (portal) and its name."""

    kind: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Execute:
    """Extended protocol: run a portal, returning at most ``max_rows`` rows (0 = all)."""

    portal: str
    max_rows: int


def decode_query(data: bytes) -> str:
    """The SQL text of a Query message."""
    return _single_string(data, "Query")


def _single_string(data: bytes, what: str) -> str:
    """The one NUL-terminated string a message body holds (fast path, precise errors)."""
    if data.find(b"\0", 5) == len(data) - 1:
        try:
            return data[5:-1].decode()
        except UnicodeDecodeError as err:
            raise ProtocolViolation(f"{what} has a string that is not UTF-8") from err
    reader = _Reader(data, 5, what)
    text = reader.cstring()
    reader.end()
    return text


def decode_parse(data: bytes) -> Parse:
    """Decode a Parse message."""
    # Fast path (one per extended-protocol statement): a well-formed message in a few slices.
    name_end = data.find(b"\0", 5)
    query_end = data.find(b"\0", name_end + 1) if name_end > 0 else -1
    if query_end > 0 and len(data) >= query_end + 3:
        (count,) = _I16.unpack_from(data, query_end + 1)
        if count >= 0 and len(data) == query_end + 3 + 4 * count:
            try:
                name, query = data[5:name_end].decode(), data[name_end + 1 : query_end].decode()
            except UnicodeDecodeError:
                pass  # the reader below names the problem
            else:
                types = struct.unpack_from(f"!{count}i", data, query_end + 3) if count else ()
                return Parse(name=name, query=query, param_types=types)
    reader = _Reader(data, 5, "Parse")
    name = reader.cstring()
    query = reader.cstring()
    count = reader.int16()
    if count < 0:
        raise ProtocolViolation(f"Parse has a negative parameter type count {count}")
    types = tuple(reader.int32() for _ in range(count))
    reader.end()
    return Parse(name=name, query=query, param_types=types)


def decode_bind(data: bytes) -> Bind:
    """Decode a Bind message."""
    fast = _decode_bind_fast(data)
    return fast if fast is not None else _decode_bind_careful(data)


def _decode_bind_careful(data: bytes) -> Bind:
    reader = _Reader(data, 5, "Bind")
    portal = reader.cstring()
    statement = reader.cstring()
    param_formats = reader.formats()
    count = reader.int16()
    if count < 0:
        raise ProtocolViolation(f"Bind has a negative parameter count {count}")
    params: list[bytes | None] = []
    for _ in range(count):
        size = reader.int32()
        if size < -1:
            raise ProtocolViolation(f"Bind parameter has invalid length {size}")
        params.append(None if size == -1 else reader.take(size))
    if len(param_formats) not in (0, 1, count):
        raise ProtocolViolation(f"Bind has {len(param_formats)} parameter formats for {count} parameters")
    result_formats = reader.formats()
    reader.end()
    return Bind(
        portal=portal,
        statement=statement,
        param_formats=param_formats,
        params=tuple(params),
        result_formats=result_formats,
    )


def _decode_bind_fast(data: bytes) -> Bind | None:
    """``decode_bind`` for a well-formed message in one pass (one per extended-protocol statement);
    None for anything the careful reader must look at, which then names the problem."""
    portal_end = data.find(b"\0", 5)
    statement_end = data.find(b"\0", portal_end + 1) if portal_end > 0 else -1
    if statement_end < 0:
        return None
    size = len(data)
    unpack16, unpack32 = _I16.unpack_from, _I32.unpack_from
    pos = statement_end + 1
    try:
        (nformats,) = unpack16(data, pos)
        param_formats = struct.unpack_from(f"!{nformats}h", data, pos + 2) if nformats > 0 else ()
        pos += 2 + 2 * nformats
        (count,) = unpack16(data, pos)
        pos += 2
        params: list[bytes | None] = []
        for _ in range(count):
            (length,) = unpack32(data, pos)
            pos += 4
            if length == -1:
                params.append(None)
                continue
            if length < 0 or pos + length > size:
                return None
            params.append(data[pos : pos + length])
            pos += length
        (nresults,) = unpack16(data, pos)
        result_formats = struct.unpack_from(f"!{nresults}h", data, pos + 2) if nresults > 0 else ()
        pos += 2 + 2 * nresults
    except struct.error:
        return None
    if (
        pos != size
        or nformats < 0
        or count < 0
        or nresults < 0
        or len(param_formats) not in (0, 1, count)
        or any(f not in (0, 1) for f in param_formats)
        or any(f not in (0, 1) for f in result_formats)
    ):
        return None
    try:
        portal, statement = data[5:portal_end].decode(), data[portal_end + 1 : statement_end].decode()
    except UnicodeDecodeError:
        return None
    return Bind(
        portal=portal,
        statement=statement,
        param_formats=param_formats,
        params=tuple(params),
        result_formats=result_formats,
    )


def decode_target(data: bytes) -> Target:
    """Decode a Describe or Close message."""
    what = "Describe" if data[0] == DESCRIBE else "Close"
    reader = _Reader(data, 5, what)
    kind = reader.take(1)
    if kind not in (b"S", b"P"):
        raise ProtocolViolation(f"{what} target kind {kind!r} is neither 'S' nor 'P'")
    name = reader.cstring()
    reader.end()
    return Target(kind=kind.decode(), name=name)


def decode_execute(data: bytes) -> Execute:
    """Decode an Execute message."""
    end = data.find(b"\0", 5)
    if end == len(data) - 5:
        try:
            portal = data[5:end].decode()
        except UnicodeDecodeError:
            pass  # the reader below names the problem
        else:
            return Execute(portal=portal, max_rows=_I32.unpack_from(data, end + 1)[0])
    reader = _Reader(data, 5, "Execute")
    portal = reader.cstring()
    max_rows = reader.int32()
    reader.end()
    return Execute(portal=portal, max_rows=max_rows)


def decode_password(data: bytes) -> bytes:
    """The payload of a PasswordMessage / SASL response (interpretation depends on context)."""
    return data[5:]


def decode_cleartext_password(data: bytes) -> str:
    """The password in a cleartext PasswordMessage."""
    reader = _Reader(data, 5, "PasswordMessage")
    password = reader.cstring()
    reader.end()
    return password


def query(sql: str) -> bytes:
    """Encode a Query message."""
    return _msg(b"Q", _cstr(sql))


def parse(name: str, sql: str, param_types: Sequence[int] = ()) -> bytes:
    """Encode a Parse message."""
    types = b"".join(_I32.pack(t) for t in param_types)
    return _msg(b"P", _cstr(name) + _cstr(sql) + _I16.pack(len(param_types)) + types)


def bind(
    portal: str,
    statement: str,
    params: Sequence[bytes | None] = (),
    *,
    param_formats: Sequence[int] = (),
    result_formats: Sequence[int] = (),
) -> bytes:
    """Encode a Bind message."""
    parts = [_cstr(portal), _cstr(statement), _formats(param_formats), _I16.pack(len(params))]
    for value in params:
        parts.append(_I32.pack(-1) if value is None else _I32.pack(len(value)) + value)
    parts.append(_formats(result_formats))
    return _msg(b"B", b"".join(parts))


def describe(kind: str, name: str) -> bytes:
    """Encode a Describe message (kind 'S' or 'P')."""
    return _msg(b"D", kind.encode() + _cstr(name))


def close(kind: str, name: str) -> bytes:
    """Encode a Close message (kind 'S' or 'P')."""
    return _msg(b"C", kind.encode() + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    """Encode an Execute message."""
    return _msg(b"E", _cstr(portal) + _I32.pack(max_rows))


SYNC_MESSAGE = b"S\0\0\0\4"
FLUSH_MESSAGE = b"H\0\0\0\4"
TERMINATE_MESSAGE = b"X\0\0\0\4"
COPY_DONE_MESSAGE = b"c\0\0\0\4"


def copy_data(data: bytes) -> bytes:
    """Encode a CopyData message."""
    return _msg(b"d", data)


def copy_fail(reason: str) -> bytes:
    """Encode a CopyFail message."""
    return _msg(b"f", _cstr(reason))


def password_message(password: bytes) -> bytes:
    """Encode a PasswordMessage (``password`` already NUL-terminated where the method needs)."""
    return _msg(b"p", password)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    """Encode a SASLInitialResponse."""
    return _msg(b"p", _cstr(mechanism) + _I32.pack(len(data)) + data)


def decode_sasl_initial_response(data: bytes) -> tuple[str, bytes]:
    """Decode a SASLInitialResponse into mechanism and client-first-message."""
    reader = _Reader(data, 5, "SASLInitialResponse")
    mechanism = reader.cstring()
    size = reader.int32()
    payload = b"" if size == -1 else reader.take(size)
    reader.end()
    return mechanism, payload


# --- backend messages ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Field:
    """One column of a RowDescription."""

    name: str
    table_oid: int
    attnum: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


def decode_authentication(data: bytes) -> tuple[int, bytes]:
    """An Authentication message's request code and the data after it."""
    reader = _Reader(data, 5, "Authentication")
    code = reader.int32()
    return code, reader.rest()


def decode_sasl_mechanisms(payload: bytes) -> list[str]:
    """The mechanism names of an AuthenticationSASL payload."""
    reader = _Reader(payload, 0, "AuthenticationSASL")
    names = []
    while name := reader.cstring():
        names.append(name)
    reader.end()
    return names


def decode_backend_key_data(data: bytes) -> tuple[int, int]:
    """Process id and secret key of a BackendKeyData message."""
    if len(data) != 13:
        raise ProtocolViolation(f"BackendKeyData must be 13 bytes, not {len(data)}")
    pid, secret = struct.unpack_from("!ii", data, 5)
    return pid, secret


def decode_parameter_status(data: bytes) -> tuple[str, str]:
    """Name and value of a ParameterStatus message."""
    reader = _Reader(data, 5, "ParameterStatus")
    name, value = reader.cstring(), reader.cstring()
    reader.end()
    return name, value


def decode_ready_for_query(data: bytes) -> str:
    """Transaction status of a ReadyForQuery: 'I' idle, 'T' in a block, 'E' failed block."""
    if len(data) != 6 or data[5] not in b"ITE":
        raise ProtocolViolation(f"ReadyForQuery with invalid status {data[5:]!r}")
    return chr(data[5])


def decode_row_description(data: bytes) -> list[Field]:
    """The columns of a RowDescription."""
    reader = _Reader(data, 5, "RowDescription")
    count = reader.int16()
    fields = []
    for _ in range(count):
        name = reader.cstring()
        table_oid, attnum, type_oid, size, modifier, fmt = reader.unpack("!IhIhih")
        fields.append(
            Field(
                name=name,
                table_oid=table_oid,
                attnum=attnum,
                type_oid=type_oid,
                type_size=size,
                type_modifier=modifier,
                format=fmt,
            )
        )
    reader.end()
    return fields


def decode_data_row(data: bytes) -> list[bytes | None]:
    """The column values of a DataRow (None for NULL)."""
    reader = _Reader(data, 5, "DataRow")
    count = reader.int16()
    values: list[bytes | None] = []
    for _ in range(count):
        size = reader.int32()
        if size < -1:
            raise ProtocolViolation(f"DataRow column has invalid length {size}")
        values.append(None if size == -1 else reader.take(size))
    reader.end()
    return values


def decode_command_complete(data: bytes) -> str:
    """The command tag of a CommandComplete, e.g. 'SELECT 3' or 'INSERT 0 1'."""
    return _single_string(data, "CommandComplete")


def decode_fields(data: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse or NoticeResponse, keyed by field code ('C', 'M', ...)."""
    reader = _Reader(data, 5, "ErrorResponse" if data[:1] == b"E" else "NoticeResponse")
    fields: dict[str, str] = {}
    while True:
        code = reader.take(1)
        if code == b"\0":
            break
        fields[code.decode("latin-1")] = reader.cstring()
    reader.end()
    return fields


def replace_field(data: bytes, code: str, value: str) -> bytes:
    """An ErrorResponse or NoticeResponse with field ``code``'s value replaced (the other fields
    byte for byte, in their order); ``data`` itself when it has no such field."""
    decode_fields(data)  # well-formed, or ProtocolViolation
    key = code.encode("latin-1")
    parts: list[bytes] = []
    found = False
    pos = 5
    while data[pos] != 0:
        end = data.index(b"\0", pos + 1)
        if data[pos : pos + 1] == key:
            found = True
            parts.append(key + value.encode() + b"\0")
        else:
            parts.append(data[pos : end + 1])
        pos = end + 1
    return _msg(data[:1], b"".join(parts) + b"\0") if found else data


def authentication(code: int, payload: bytes = b"") -> bytes:
    """Encode an Authentication request (AUTH_OK, AUTH_MD5 with salt, AUTH_SASL, ...)."""
    return _msg(b"R", _I32.pack(code) + payload)


def authentication_sasl(mechanisms: Iterable[str]) -> bytes:
    """Encode an AuthenticationSASL listing mechanisms."""
    return authentication(AUTH_SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")


def backend_key_data(pid: int, secret: int) -> bytes:
    """Encode a BackendKeyData message."""
    return _msg(b"K", struct.pack("!ii", pid, secret))


def parameter_status(name: str, value: str) -> bytes:
    """Encode a ParameterStatus message."""
    return _msg(b"S", _cstr(name) + _cstr(value))


def ready_for_query(status: str) -> bytes:
    """Encode a ReadyForQuery message."""
    return _msg(b"Z", status.encode())


def row_description(fields: Sequence[Field]) -> bytes:
    """Encode a RowDescription."""
    parts = [_I16.pack(len(fields))]
    for f in fields:
        parts.append(_cstr(f.name))
        parts.append(
            struct.pack(
                "!IhIhih",
                f.table_oid,
                f.attnum,
                f.type_oid,
                f.type_size,
                f.type_modifier,
                f.format,
            )
        )
    return _msg(b"T", b"".join(parts))


def data_row(values: Sequence[bytes | None]) -> bytes:
    """Encode a DataRow."""
    parts = [_I16.pack(len(values))]
    for value in values:
        parts.append(_I32.pack(-1) if value is None else _I32.pack(len(value)) + value)
    return _msg(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    """Encode a CommandComplete."""
    return _msg(b"C", _cstr(tag))


def error_response(
    *,
    code: str,
    message: str,
    severity: str = "ERROR",
    detail: str | None = None,
    hint: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """Encode an ErrorResponse (severity ERROR or FATAL) with SQLSTATE ``code``."""
    return _msg(
        b"E",
        _fields(code=code, message=message, severity=severity, detail=detail, hint=hint, extra=extra),
    )


def notice_response(
    *,
    code: str,
    message: str,
    severity: str = "NOTICE",
    detail: str | None = None,
    hint: str | None = None,
) -> bytes:
    """Encode a NoticeResponse."""
    return _msg(
        b"N",
        _fields(code=code, message=message, severity=severity, detail=detail, hint=hint, extra=None),
    )


PARSE_COMPLETE_MESSAGE = b"1\0\0\0\4"
BIND_COMPLETE_MESSAGE = b"2\0\0\0\4"
EMPTY_QUERY_MESSAGE = b"I\0\0\0\4"


# --- helpers -------------------------------------------------------------------------------


def _fields(
    *,
    code: str,
    message: str,
    severity: str,
    detail: str | None,
    hint: str | None,
    extra: Mapping[str, str] | None,
) -> bytes:
    items = [("S", severity), ("V", severity), ("C", code), ("M", message)]
    if detail is not None:
        items.append(("D", detail))
    if hint is not None:
        items.append(("H", hint))
    items.extend((extra or {}).items())
    return b"".join(k.encode() + _cstr(v) for k, v in items) + b"\0"


def _msg(mtype: bytes, body: bytes) -> bytes:
    return _HEAD.pack(mtype, len(body) + 4) + body


def _cstr(text: str) -> bytes:
    raw = text.encode()
    if b"\0" in raw:
        raise ValueError("protocol strings cannot contain NUL")
    return raw + b"\0"


def _formats(formats: Sequence[int]) -> bytes:
    return _I16.pack(len(formats)) + b"".join(_I16.pack(f) for f in formats)


def _unpack2(data: bytes, offset: int, what: str) -> tuple[int, int]:
    if len(data) < offset + 8:
        raise ProtocolViolation(f"{what} is truncated")
    a, b = struct.unpack_from("!ii", data, offset)
    return a, b


class _Reader:
    """Cursor over a message body that turns every overrun into ProtocolViolation."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, pos: int, what: str) -> None:
        self._data = data
        self._pos = pos
        self._what = what
        if len(data) < pos:
            raise ProtocolViolation(f"{what} is truncated")

    def cstring(self) -> str:
        end = self._data.find(b"\0", self._pos)
        if end < 0:
            raise ProtocolViolation(f"{self._what} has an unterminated string")
        raw = self._data[self._pos : end]
        self._pos = end + 1
        try:
            return raw.decode()
        except UnicodeDecodeError as err:
            raise ProtocolViolation(f"{self._what} has a string that is not UTF-8") from err

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if size < 0 or end > len(self._data):
            raise ProtocolViolation(f"{self._what} is truncated")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        return tuple(struct.unpack(fmt, self.take(size)))

    def int16(self) -> int:
        (value,) = _I16.unpack(self.take(2))
        return int(value)

    def int32(self) -> int:
        (value,) = _I32.unpack(self.take(4))
        return int(value)

    def formats(self) -> tuple[int, ...]:
        count = self.int16()
        if count < 0:
            raise ProtocolViolation(f"{self._what} has a negative format count {count}")
        formats = tuple(self.int16() for _ in range(count))
        if any(f not in (0, 1) for f in formats):
            raise ProtocolViolation(f"{self._what} has a format code other than 0 or 1")
        return formats

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def end(self) -> None:
        if self._pos != len(self._data):
            raise ProtocolViolation(
                f"{self._what} has {len(self._data) - self._pos} unexpected trailing bytes"
            )
