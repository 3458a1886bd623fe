"""Audit events as JSON lines, hash-chained per session, written through a bounded queue.

Each event gets ``prev_hash`` (the previous event's hash in the same session, 64 zeros for the
first) and ``hash`` = SHA-256 over ``prev_hash`` and the event's compact JSON, so a gap or an
edit anywhere in a session's trail is detectable. Events are sealed on the caller's thread (so
the chain follows statement order) and written by one writer thread, so a slow stdout never
stalls the proxy. The queue is bounded: when it is full or the sink fails, ``best-effort``
counts the dropped event and ``fail-closed`` turns ``healthy`` false (the proxy then refuses
statements). Refusals and session boundaries wait until their line is written and flushed, so
the event exists before the client sees the refusal.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
from typing import Any, TextIO

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


def seal(event: dict[str, Any], prev_hash: str) -> tuple[str, str]:
    """The event as one JSON line with ``prev_hash`` and ``hash`` appended, and that hash.

    The hash covers ``prev_hash`` and the compact JSON of the event (keys in the order written)
    without the chain fields, so the line is produced with a single encoding.
    """
    body = _encode(event)
    digest = hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()
    return f'{body[:-1]},"prev_hash":"{prev_hash}","hash":"{digest}"}}', digest


def verify(events: list[dict[str, Any]]) -> bool:
    """True when ``events`` (one session, in order) form an unbroken chain."""
    prev = GENESIS
    for event in events:
        fields = {k: v for k, v in event.items() if k not in ("prev_hash", "hash")}
        if event.get("prev_hash") != prev or seal(fields, prev)[1] != event.get("hash"):
            return False
        prev = event["hash"]
    return True


def _urgent(event: dict[str, Any]) -> bool:
    """Events that must be on disk before the proxy answers (refusals, session boundaries)."""
    return event.get("type") != "statement" or event.get("enforced") not in ("allow", "mask")


class AuditLog:
    """Seals events and hands them to a writer thread through a bounded queue."""

    def __init__(
        self,
        stream: TextIO,
        *,
        failure_policy: str = "best-effort",
        max_queue: int = 10_000,
        urgent_timeout: float = 5.0,
    ) -> None:
        if failure_policy not in ("best-effort", "fail-closed"):
            raise ValueError(f"unknown audit failure policy {failure_policy!r}")
        self.failure_policy = failure_policy
        self.written = 0
        self.dropped = 0
        self.healthy = True
        self._stream = stream
        self._prev: dict[str, str] = {}
        self._max_queue = max_queue
        self._urgent_timeout = urgent_timeout
        self._queue: collections.deque[str] = collections.deque()
        self._queued = 0  # lines ever queued
        self._done = 0  # lines ever handled by the writer (written or failed)
        self._cond = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="dbgov-audit", daemon=True)
        self._writer.start()

    def write(self, event: dict[str, Any]) -> None:
        """Seal and queue one event; wait for refusals and session boundaries to be written."""
        session_id = str(event.get("session_id", ""))
        line, digest = seal(event, self._prev.get(session_id, GENESIS))
        with self._cond:
            if len(self._queue) >= self._max_queue or self._closed:
                self._fail()
                return
            self._queue.append(line + "\n")
            self._queued += 1
            ticket = self._queued
            urgent = _urgent(event)
            # Waking the writer per line would cost a thread handoff per statement: it wakes
            # for urgent events, for a full batch, or on its own every _LINGER seconds.
            if urgent or len(self._queue) >= _BATCH:
                self._cond.notify_all()
            if urgent:
                self._cond.wait_for(lambda: self._done >= ticket, timeout=self._urgent_timeout)
        if event.get("type") == "session_end":
            self._prev.pop(session_id, None)
        else:
            self._prev[session_id] = digest

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far is written."""
        with self._cond:
            ticket = self._queued
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._done >= ticket, timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued and stop the writer."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._writer.join(timeout)

    def _fail(self) -> None:
        self.dropped += 1
        if self.failure_policy == "fail-closed":
            self.healthy = False

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._queue) >= _BATCH or self._closed, timeout=_LINGER)
                if not self._queue:
                    if self._closed:
                        return
                    continue
                batch = list(self._queue)
                self._queue.clear()
            ok = True
            try:
                self._stream.write("".join(batch))
                self._stream.flush()
            except (OSError, ValueError):
                ok = False
            with self._cond:
                if ok:
                    self.written += len(batch)
                    self.healthy = True
                else:
                    for _ in batch:
                        self._fail()
                self._done += len(batch)
                self._cond.notify_all()
