"""Audit events as JSON lines, hash-chained per session, buffered with a bounded size.

Each event gets ``prev_hash`` (the previous event's hash in the same session, 64 zeros for the
first) and ``hash`` = SHA-256 over ``prev_hash`` and the event's compact JSON, so a gap or an
edit anywhere in a session's trail is detectable. Lines collect in a buffer that goes to a sink
in batches: when the batch is full, at once for refusals and session boundaries (so those exist
before the client sees the answer), and on the proxy's short timer, whose ``flush`` first has
every producer (the compiled lanes, which audit in batches of their own) hand over what it
holds. A sink never blocks the proxy: when it cannot take more (a full pipe) or fails,
``best-effort`` counts the dropped events and ``fail-closed`` turns ``healthy`` false, which
makes the proxy refuse statements until a write succeeds again. No line is lost uncounted.

Only the timer's flush (and the proxy's last one) asks the producers, and never from inside
itself: a full batch, while lanes hand lines over or an event is written, only goes to the
sink. So the work per line does not depend on how many sessions (lanes) there are, and a flush
cannot nest however many lanes hold lines.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

GENESIS = "0" * 64
_BATCH = 256  # lines that make the writer wake up at once
_LINGER = 0.05  # seconds an ordinary line may wait before the writer picks it up

# Keys stay in the order the event was built (deterministic, and what verify() re-reads);
# the C encoder is made once because json.dumps builds a new one per call.
_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_ITER: Callable[[Any, int], Iterable[str]] | None = (
    None
    if _C_ENCODER is None
    else _C_ENCODER(None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
)
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # interpreters without the C one


def _encode(event: Any) -> str:
    return "".join(_ITER(event, 0)) if _ITER is not None else _ENCODER.encode(event)


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
_isfinite = math.isfinite

STATEMENT_KEYS = (
    *("type", "time", "statement"),
    *("fingerprint", "classes", "tables_read", "tables_written", "decision", "rule", "reason"),
    *("masked_columns", "enforced", "rows_returned", "rows_affected", "duration_ms", "sqlstate"),
    *("session_id", "identity", "user", "application_name", "client_addr", "database"),
    *("workload", "db_user"),
)
"""The fields of a statement event, in the order they are written."""


_second = -1
_prefix = ""


def timestamp(t: float) -> str:
    """``t`` (seconds since the epoch) as RFC 3339 in UTC with microseconds, as auditors and log
    pipelines read time: 2026-11-26T15:24:27.123456Z (the date part is made once per second)."""
    global _second, _prefix  # noqa: PLW0603 - a one-entry cache on the per-statement path
    second = math.floor(t)
    if second != _second:
        _prefix = datetime.datetime.fromtimestamp(second, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second = second
    return f"{_prefix}.{min(int((t - second) * 1_000_000), 999_999):06d}Z"


class Segment:
    """Fields many events share (one decision's, one session's) with their JSON encoded once.

    ``text`` is ``,"key":value...`` with a leading comma, ready to splice into an event. The
    fields must not change after the segment is made (events are immutable once written).
    """

    __slots__ = ("fields", "text")

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.text = "".join(f",{_ESCAPE(k)}:{_value(v)}" for k, v in fields.items())


class StatementEvent(Mapping[str, Any]):
    """A statement's audit event, as the session produces one per statement.

    It reads like the dict ``as_dict()`` returns (keys in ``STATEMENT_KEYS`` order) but holds the
    decision's and the session's fields as shared, pre-encoded segments, so sealing it encodes
    only the handful of values that differ per statement. ``encode()`` writes exactly what the
    JSON encoder writes for ``as_dict()``: an audit trail reads and verifies the same either way.
    """

    __slots__ = (
        "decision",
        "duration_ms",
        "enforced",
        "rows_affected",
        "rows_returned",
        "session",
        "sqlstate",
        "statement",
        "time",
    )

    def __init__(
        self,
        *,
        time: str,
        statement: str,
        decision: Segment,
        enforced: str,
        rows_returned: int,
        rows_affected: int | None,
        duration_ms: float,
        sqlstate: str | None,
        session: Segment,
    ) -> None:
        self.time = time
        self.statement = statement
        self.decision = decision
        self.enforced = enforced
        self.rows_returned = rows_returned
        self.rows_affected = rows_affected
        self.duration_ms = duration_ms
        self.sqlstate = sqlstate
        self.session = session

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "statement",
            "time": self.time,
            "statement": self.statement,
            **self.decision.fields,
            "enforced": self.enforced,
            "rows_returned": self.rows_returned,
            "rows_affected": self.rows_affected,
            "duration_ms": self.duration_ms,
            "sqlstate": self.sqlstate,
            **self.session.fields,
        }

    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.as_dict())

    def __len__(self) -> int:
        return len(self.as_dict())

    def __repr__(self) -> str:
        return f"StatementEvent({self.as_dict()!r})"

    def encode(self) -> str:
        """Compact JSON, identical to ``_encode(self.as_dict())``."""
        t, d, n, a, q = self.time, self.duration_ms, self.rows_returned, self.rows_affected, self.sqlstate
        if (
            type(t) is str
            and type(d) is float
            and type(n) is int
            and _isfinite(d)
            and (a is None or type(a) is int)
            and (q is None or type(q) is str)
        ):  # what every statement has: formatted inline (this runs once per statement)
            return (
                f'{{"type":"statement","time":{_ESCAPE(t)},"statement":{_ESCAPE(self.statement)}{self.decision.text},'
                f'"enforced":{_ESCAPE(self.enforced)},"rows_returned":{n},'
                f'"rows_affected":{"null" if a is None else a},"duration_ms":{d!r},'
                f'"sqlstate":{"null" if q is None else _ESCAPE(q)}{self.session.text}}}'
            )
        v = _value
        return (
            f'{{"type":"statement","time":{v(self.time)},"statement":{v(self.statement)}{self.decision.text},'
            f'"enforced":{v(self.enforced)},"rows_returned":{v(self.rows_returned)},'
            f'"rows_affected":{v(self.rows_affected)},"duration_ms":{v(self.duration_ms)},'
            f'"sqlstate":{v(self.sqlstate)}{self.session.text}}}'
        )


Event = Mapping[str, Any]
"""An audit event: a dict, or a ``StatementEvent`` that reads like one."""


def seal(event: Event, prev_hash: str) -> tuple[str, str]:
    """The event as one JSON line with ``prev_hash`` and ``hash`` appended, and that hash.

    The hash covers ``prev_hash`` and the compact JSON of the event (keys in the order written)
    without the chain fields, so the line is produced with a single encoding.
    """
    body = event.encode() if type(event) is StatementEvent else _encode(dict(event))
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


def urgent(event: Event) -> bool:
    """Events that must reach the sink before the proxy answers (refusals, session boundaries)."""
    return event.get("type") != "statement" or event.get("enforced") not in _ROUTINE


Sink = Callable[[str], bool]
"""Takes a batch of lines; returns False when it could not accept them (they are dropped)."""

BATCH = 256
"""Buffered lines that trigger a flush without waiting for the timer."""


class Healthy:
    """The proxy's ``audit_ok`` for a fail-closed log: whether it can write. (The compiled lane
    reads ``log.healthy`` itself instead of calling this once per statement.)"""

    __slots__ = ("log",)

    def __init__(self, log: AuditLog) -> None:
        self.log = log

    def __call__(self) -> bool:
        return self.log.healthy


class AuditLog:
    """Seals events into a bounded buffer and hands it to a sink in batches.

    The buffer holds at most ``max_buffer`` lines (and ``BATCH``): when it is full, it goes to
    the sink. Lines are dropped (and counted) only when the sink does not take them.
    """

    def __init__(self, sink: Sink, *, failure_policy: str = "best-effort", max_buffer: int = 10_000) -> None:
        if failure_policy not in ("best-effort", "fail-closed"):
            raise ValueError(f"unknown audit failure policy {failure_policy!r}")
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        self.failure_policy = failure_policy
        self.written = 0
        self.dropped = 0
        self.healthy = True
        self._sink = sink
        self._prev: dict[str, str] = {}
        self._buffer: list[str] = []
        self._max_buffer = max_buffer
        self._batch = min(BATCH, max_buffer)
        """Buffered lines that go to the sink at once (the compiled lanes read it too)."""
        self._flushing = False
        self.producers: list[Callable[[], None]] = []
        """Called first by ``flush``: whoever holds events back (the compiled lanes) hands them
        over. A producer only appends (through ``write``, or to the buffer as the lanes do,
        handing a full batch to ``write_out``); it never flushes."""

    def write(self, event: Event) -> None:
        """Seal one event and buffer it; refusals and session boundaries go to the sink at once."""
        if type(event) is StatementEvent:
            session_id = event.session.fields.get("session_id", "")
            kind: Any = "statement"
            routine = event.enforced in _ROUTINE
        else:
            session_id = event.get("session_id", "")
            kind = event.get("type")
            routine = kind == "statement" and event.get("enforced") in _ROUTINE
        if type(session_id) is not str:
            session_id = str(session_id)
        line, digest = seal(event, self._prev.get(session_id, GENESIS))
        if kind == "session_end":
            self._prev.pop(session_id, None)
        else:
            self._prev[session_id] = digest
        buffer = self._buffer
        buffer.append(line)
        if not routine or len(buffer) >= self._batch:  # urgent(event), without a second look
            self.write_out()

    def flush(self) -> None:
        """Have every producer hand over what it holds, then hand everything buffered to the sink.

        Called from inside itself (a producer that flushes), it only writes out what is buffered:
        the producers are asked once per flush, never again while they are being asked."""
        if self._flushing:
            self.write_out()
            return
        self._flushing = True
        try:
            for produce in self.producers:
                produce()
        finally:
            self._flushing = False
            self.write_out()

    def write_out(self) -> None:
        """Hand the buffered lines to the sink (the producers are not asked for more)."""
        if not self._buffer:
            return
        lines, self._buffer = self._buffer, []
        try:
            accepted = self._sink("\n".join(lines) + "\n")
        except Exception:  # whatever the sink raises, its lines are counted as dropped
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
