"""Audit events as JSON lines, hash-chained per session, buffered with a bounded size.

Each event gets ``prev_hash`` (the previous event's hash in the same session, 64 zeros for the
first) and ``hash`` = SHA-256 over ``prev_hash`` and the event's compact JSON, so a gap or an
edit anywhere in a session's trail is detectable. Lines collect in a buffer that the proxy
flushes to a sink in batches (on a short timer, when the batch is large, and at once for
refusals and session boundaries, so those exist before the client sees the answer). A sink
never blocks the proxy: when it cannot take more (a full pipe) or fails, ``best-effort``
counts the dropped events and ``fail-closed`` turns ``healthy`` false, which makes the proxy
refuse statements until a write succeeds again.
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from collections.abc import Callable
from typing import Any

GENESIS = "0" * 64
_BATCH = 256  # lines that make the writer wake up at once
_LINGER = 0.05  # seconds an ordinary line may wait before the writer picks it up

# Keys stay in the order the event was built (deterministic, and what verify() re-reads);
# the C encoder is made once because json.dumps builds a new one per call.
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
if _C_ENCODER is not None:
    _ITER = _C_ENCODER(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)

    def _encode(event: dict[str, Any]) -> str:
        return "".join(_ITER(event, 0))

else:  # pragma: no cover - interpreters without the C accelerator
    _ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)

    def _encode(event: dict[str, Any]) -> str:
        return _ENCODER.encode(event)


def _value(value: Any) -> str:
    """One value exactly as ``_encode`` writes it."""
    kind = type(value)
    if kind is str:
        return _ESCAPE(value)
    if value is None:
        return "null"
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _encode(value)


_ESCAPE: Callable[[str], str] = json.encoder.encode_basestring_ascii

STATEMENT_KEYS = (
    *("type", "time", "statement"),
    *("fingerprint", "classes", "tables_read", "tables_written", "decision", "rule", "reason"),
    *("masked_columns", "enforced", "rows_returned", "rows_affected", "duration_ms", "sqlstate"),
    *("session_id", "identity", "user", "application_name", "client_addr", "database"),
)
"""The fields of a statement event in the order the session writes them: the shape that
``_encode_statement`` takes a shortcut for (any other shape is encoded whole)."""

_KEYS = [_ESCAPE(key) + ":" for key in STATEMENT_KEYS]
_DECISION = (3, 11)  # the decision's fields: the same objects for every statement it decides
_IDENTITY = (16, 22)  # the session's fields: the same objects for every statement of a session
_SEGMENTS: dict[tuple[int, str], tuple[tuple[Any, ...], str]] = {}
_is = operator.is_


def _segment(values: tuple[Any, ...], span: tuple[int, int]) -> str:
    """``"key":value,...`` for ``values[start:end]``, reused while they are the very same objects.

    Sound because an event is never changed once written (the session already shares these
    values between the events of a decision and of a session), and because the cache holds the
    objects, so their identities cannot be reused by others.
    """
    start, end = span
    part = values[start:end]
    key = (start, values[start])
    cached = _SEGMENTS.get(key)
    if cached is not None and all(map(_is, part, cached[0])):
        return cached[1]
    text = ",".join(k + _value(v) for k, v in zip(_KEYS[start:end], part, strict=True))
    if len(_SEGMENTS) >= 4096:
        _SEGMENTS.clear()
    _SEGMENTS[key] = (part, text)  # holding the objects keeps their identity meaningful
    return text


def _encode_statement(event: dict[str, Any]) -> str:
    """``_encode(event)``, with the decision's and the session's fields encoded once, not per event."""
    if tuple(event) != STATEMENT_KEYS:
        return _encode(event)
    v = tuple(event.values())
    if type(v[3]) is not str or type(v[16]) is not str:  # the segments are cached by these
        return _encode(event)
    k = _KEYS
    return (
        f"{{{k[0]}{_value(v[0])},{k[1]}{_value(v[1])},{k[2]}{_value(v[2])},{_segment(v, _DECISION)},"
        f"{k[11]}{_value(v[11])},{k[12]}{_value(v[12])},{k[13]}{_value(v[13])},{k[14]}{_value(v[14])},"
        f"{k[15]}{_value(v[15])},{_segment(v, _IDENTITY)}}}"
    )


def seal(event: dict[str, Any], prev_hash: str) -> tuple[str, str]:
    """The event as one JSON line with ``prev_hash`` and ``hash`` appended, and that hash.

    The hash covers ``prev_hash`` and the compact JSON of the event (keys in the order written)
    without the chain fields, so the line is produced with a single encoding.
    """
    body = _encode_statement(event)
    digest = _sha256((prev_hash + body).encode()).hexdigest()
    return f'{body[:-1]},"prev_hash":"{prev_hash}","hash":"{digest}"}}', digest


_sha256 = hashlib.sha256


def verify(events: list[dict[str, Any]]) -> bool:
    """True when ``events`` (one session, in order) form an unbroken chain."""
    prev = GENESIS
    for event in events:
        fields = {k: v for k, v in event.items() if k not in ("prev_hash", "hash")}
        if event.get("prev_hash") != prev or seal(fields, prev)[1] != event.get("hash"):
            return False
        prev = event["hash"]
    return True


_ROUTINE = ("allow", "mask")
"""Statement outcomes that may wait in the buffer; anything else is flushed before the answer."""


def urgent(event: dict[str, Any]) -> bool:
    """Events that must reach the sink before the proxy answers (refusals, session boundaries)."""
    return event.get("type") != "statement" or event.get("enforced") not in _ROUTINE


Sink = Callable[[str], bool]
"""Takes a batch of lines; returns False when it could not accept them (they are dropped)."""

BATCH = 256
"""Buffered lines that trigger a flush without waiting for the timer."""


class AuditLog:
    """Seals events into a bounded buffer and flushes it to a sink."""

    def __init__(self, sink: Sink, *, failure_policy: str = "best-effort", max_buffer: int = 10_000) -> None:
        if failure_policy not in ("best-effort", "fail-closed"):
            raise ValueError(f"unknown audit failure policy {failure_policy!r}")
        self.failure_policy = failure_policy
        self.written = 0
        self.dropped = 0
        self.healthy = True
        self._sink = sink
        self._prev: dict[str, str] = {}
        self._buffer: list[str] = []
        self._max_buffer = max_buffer

    def write(self, event: dict[str, Any]) -> None:
        """Seal one event and buffer it; refusals and session boundaries are flushed at once."""
        session_id = event.get("session_id", "")
        if type(session_id) is not str:
            session_id = str(session_id)
        line, digest = seal(event, self._prev.get(session_id, GENESIS))
        kind = event.get("type")
        if kind == "session_end":
            self._prev.pop(session_id, None)
        else:
            self._prev[session_id] = digest
        buffer = self._buffer
        if len(buffer) >= self._max_buffer:
            self._fail(1)
            return
        buffer.append(line)
        # urgent(event), spelled out: this runs once per statement
        if kind != "statement" or event.get("enforced") not in _ROUTINE or len(buffer) >= BATCH:
            self.flush()

    def flush(self) -> None:
        """Hand everything buffered to the sink."""
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            accepted = self._sink("\n".join(lines) + "\n")
        except (OSError, ValueError):
            accepted = False
        if accepted:
            self.written += len(lines)
            self.healthy = True
        else:
            self._fail(len(lines))

    def _fail(self, count: int) -> None:
        self.dropped += count
        if self.failure_policy == "fail-closed":
            self.healthy = False
