"""Split a PostgreSQL v3 byte stream into messages, sans I/O.

A ``Framer`` is fed whatever bytes arrived and hands back complete messages, each as the raw
bytes of the whole message (type byte, length, body) so the proxy can forward it untouched or
decode only what policy needs. Startup-phase messages (SSLRequest, GSSENCRequest,
CancelRequest, StartupMessage) have no type byte; a frontend framer reads them until the
StartupMessage and typed messages after it, as the server does.

Validation is strict: a length below 4, a type byte the peer may not send, a fixed-size
message of the wrong size or a truncated startup packet raises ``ProtocolViolation``; a message
over the configured limit raises ``MessageTooLarge`` as soon as its length word arrives, before
any of it is buffered: a framer never holds more than one limit's worth of bytes (plus the
complete messages of the last read). Both sides have a limit (the server's too: a single
DataRow of a 1 GB value would otherwise be assembled whole in the proxy's memory).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from dbgov_sidecar.pgwire.errors import ProtocolViolation

_LEN = struct.Struct("!i")
_STARTUP_HEAD = struct.Struct("!ii")

STARTUP = 0
"""The type of an untyped startup-phase message (its ``data`` starts with the length)."""

MAX_STARTUP_PACKET = 10_000
"""PostgreSQL's own limit on a startup packet (MAX_STARTUP_PACKET_LENGTH)."""

DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
"""Default largest message accepted, in bytes (PostgreSQL allows up to 1 GB)."""

_KINDS = {
    ord("D"): "a row",
    ord("d"): "COPY data",
    ord("Q"): "a query",
    ord("P"): "a Parse",
    ord("B"): "a Bind",
}


class MessageTooLarge(ProtocolViolation):
    """A message longer than the framer's limit: the proxy would have to buffer all of it."""

    def __init__(self, *, side: str, mtype: int, length: int, limit: int) -> None:
        who = "client" if side == "frontend" else "server"
        kind = _KINDS.get(mtype)
        super().__init__(
            f"{who} message {chr(mtype)!r}{f' ({kind})' if kind else ''} of {length} bytes exceeds "
            f"the limit of {limit}"
        )
        self.side = side
        self.mtype = mtype
        self.length = length
        self.limit = limit


SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
PROTOCOL_3 = 3 << 16

FRONTEND_TYPES = frozenset(b"QPBEDCSHFdcfpX")
"""Message types a client may send after the StartupMessage."""

BACKEND_TYPES = frozenset(b"RKSZTDCENAI123nstGHWcdVv")
"""Message types a server may send."""

# Frontend messages whose body is empty by definition: Sync, Flush, Terminate, CopyDone.
_EMPTY_FRONTEND = frozenset(b"SHXc")
_FIXED_FRONTEND = dict.fromkeys(_EMPTY_FRONTEND, 4)
# Backend messages that are always exactly this long (body length + 4).
_FIXED_BACKEND = {
    ord("Z"): 5,
    ord("K"): 12,
    ord("1"): 4,
    ord("2"): 4,
    ord("3"): 4,
    ord("n"): 4,
    ord("s"): 4,
    ord("I"): 4,
    ord("c"): 4,
}


class Message(NamedTuple):
    """One complete message: its type byte (``STARTUP`` for untyped) and its raw bytes."""

    type: int
    data: bytes

    @property
    def body(self) -> bytes:
        """The payload after the type byte and length."""
        return self.data[4:] if self.type == STARTUP else self.data[5:]


class Framer:
    """Accumulate bytes and cut them into messages (one direction of one connection)."""

    __slots__ = ("_buf", "_fixed", "_head", "_max", "_startup", "_types", "side")

    def __init__(
        self, *, side: str, max_message_size: int = DEFAULT_MAX_MESSAGE, startup: bool = False
    ) -> None:
        if side not in ("frontend", "backend"):
            raise ValueError(f"side must be 'frontend' or 'backend', not {side!r}")
        self.side = side
        self._buf = bytearray()
        # Bytes fed while ``_buf`` was empty, kept as they came (not copied) until drained.
        self._head = b""
        self._max = max_message_size
        self._startup = startup and side == "frontend"
        self._types = FRONTEND_TYPES if side == "frontend" else BACKEND_TYPES
        self._fixed = _FIXED_FRONTEND if side == "frontend" else _FIXED_BACKEND

    @property
    def in_startup(self) -> bool:
        """True while untyped startup-phase messages are expected."""
        return self._startup

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buf) + len(self._head)

    def feed(self, data: bytes | bytearray) -> None:
        """Add bytes received from the peer."""
        if self._buf or self._head or type(data) is not bytes:
            self._spill()
            self._buf += data
        else:  # the usual case: whole messages in one read, drained without copying
            self._head = data

    def _spill(self) -> None:
        """Move ``_head`` into ``_buf``, where every path but ``drain``'s fast one reads."""
        if self._head:
            self._buf += self._head
            self._head = b""

    def unread(self, data: bytes) -> None:
        """Put bytes already drained back in front of the buffer, to be read again later."""
        self._spill()
        self._buf[:0] = data

    def take_buffer(self) -> bytes:
        """Remove and return whatever is buffered (e.g. bytes after an SSLRequest)."""
        self._spill()
        out = bytes(self._buf)
        self._buf.clear()
        return out

    def check_eof(self) -> None:
        """Call when the peer closed: leftover bytes mean it stopped inside a message."""
        self._spill()
        if self._buf:
            what = "startup packet" if self._startup else "message"
            raise ProtocolViolation(
                f"connection closed inside a truncated {what} ({len(self._buf)} bytes buffered)"
            )

    def next_message(self) -> Message | None:
        """Return the next complete message, or None when more bytes are needed."""
        self._spill()
        end = self._next_end(0)
        if end == 0:
            return None
        data = bytes(self._buf[:end])
        del self._buf[:end]
        if not self._startup:
            return Message(data[0], data)
        (code,) = _LEN.unpack_from(data, 4)
        if code >> 16 == 3:
            self._startup = False  # typed messages follow the StartupMessage
        return Message(STARTUP, data)

    def drain(self) -> tuple[bytes, list[Message]]:
        """Return every complete message, plus their bytes joined (to forward in one write).

        This is the proxy's hot path, so the loop is written out here rather than calling
        ``_next_end`` per message; ``_check_length`` still produces the precise complaint.
        """
        if self._startup:
            msg = self.next_message()
            return (b"", []) if msg is None else (msg.data, [msg])
        if self._head and not self._buf:
            return self._drain_head()
        self._spill()
        buf = self._buf
        size = len(buf)
        types, limit, fixed = self._types, self._max, self._fixed
        unpack = _LEN.unpack_from
        spans: list[tuple[int, int, int]] = []
        pos = 0
        while size - pos >= 5:
            mtype = buf[pos]
            if mtype not in types:
                raise self._bad_type(mtype)
            (length,) = unpack(buf, pos + 1)
            if length < 4 or length > limit or fixed.get(mtype, length) != length:
                self._check_length(mtype, length)
            end = pos + 1 + length
            if end > size:
                break
            spans.append((mtype, pos, end))
            pos = end
        if pos < size and size - pos < 5 and buf[pos] not in types:
            raise self._bad_type(buf[pos])
        if not spans:
            return b"", []
        chunk = bytes(buf[:pos])
        del buf[:pos]
        new = tuple.__new__
        if len(spans) == 1:
            return chunk, [new(Message, (spans[0][0], chunk))]
        return chunk, [new(Message, (t, chunk[a:b])) for t, a, b in spans]

    def _drain_head(self) -> tuple[bytes, list[Message]]:
        """``drain`` over bytes fed into an empty buffer: messages are slices of them, no copies."""
        data = self._head
        size = len(data)
        types, limit, fixed = self._types, self._max, self._fixed
        unpack = _LEN.unpack_from
        new = tuple.__new__
        msgs: list[Message] = []
        pos = 0
        while size - pos >= 5:
            mtype = data[pos]
            if mtype not in types:
                raise self._bad_type(mtype)
            (length,) = unpack(data, pos + 1)
            if length < 4 or length > limit or fixed.get(mtype, length) != length:
                self._check_length(mtype, length)
            end = pos + 1 + length
            if end > size:
                break
            msgs.append(new(Message, (mtype, data if end == size and pos == 0 else data[pos:end])))
            pos = end
        if pos < size and size - pos < 5 and data[pos] not in types:
            raise self._bad_type(data[pos])
        if pos == size:
            self._head = b""
            return data, msgs
        self._head = b""
        self._buf += data[pos:] if pos else data
        return (data[:pos], msgs) if msgs else (b"", msgs)

    def _next_end(self, pos: int) -> int:
        """End offset of the complete message starting at ``pos``, or 0 if incomplete."""
        buf = self._buf
        avail = len(buf) - pos
        if self._startup:
            return self._startup_end(buf, pos, avail)
        if avail < 5:
            if avail >= 1 and buf[pos] not in self._types:
                raise self._bad_type(buf[pos])
            return 0
        mtype = buf[pos]
        if mtype not in self._types:
            raise self._bad_type(mtype)
        (length,) = _LEN.unpack_from(buf, pos + 1)
        self._check_length(mtype, length)
        if avail < length + 1:
            return 0
        return pos + int(length) + 1

    def _startup_end(self, buf: bytearray, pos: int, avail: int) -> int:
        if avail < 4:
            return 0
        (length,) = _LEN.unpack_from(buf, pos)
        if length < 8:
            raise ProtocolViolation(f"startup packet length {length} is below the minimum of 8")
        if length > MAX_STARTUP_PACKET:
            raise ProtocolViolation(
                f"startup packet length {length} exceeds the limit of {MAX_STARTUP_PACKET}"
            )
        if avail < 8:
            return 0
        (code,) = _LEN.unpack_from(buf, pos + 4)
        if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE) and length != 8:
            raise ProtocolViolation(f"SSL/GSSENC request with length {length} instead of 8")
        if code == CANCEL_REQUEST_CODE and length != 16:
            raise ProtocolViolation(f"CancelRequest with length {length} instead of 16")
        if code >> 16 != 3 and code not in (
            SSL_REQUEST_CODE,
            GSSENC_REQUEST_CODE,
            CANCEL_REQUEST_CODE,
        ):
            raise ProtocolViolation(
                f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF} or request code {code}"
            )
        if avail < length:
            return 0
        return pos + int(length)

    def _check_length(self, mtype: int, length: int) -> None:
        if length < 4:
            raise ProtocolViolation(f"message {chr(mtype)!r} has length {length}, below the minimum of 4")
        if length > self._max:
            raise MessageTooLarge(side=self.side, mtype=mtype, length=length, limit=self._max)
        if self.side == "frontend":
            if mtype in _EMPTY_FRONTEND and length != 4:
                raise ProtocolViolation(f"message {chr(mtype)!r} has length {length} instead of 4")
        else:
            fixed = _FIXED_BACKEND.get(mtype)
            if fixed is not None and length != fixed:
                raise ProtocolViolation(f"message {chr(mtype)!r} has length {length} instead of {fixed}")

    def _bad_type(self, mtype: int) -> ProtocolViolation:
        who = "client" if self.side == "frontend" else "server"
        return ProtocolViolation(f"unknown {who} message type {bytes([mtype])!r}")
