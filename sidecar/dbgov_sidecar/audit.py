"""Audit events as JSON lines, hash-chained per session.

Each event gets ``prev_hash`` (the previous event's hash in the same session, 64 zeros for the
first) and ``hash`` = SHA-256 over ``prev_hash`` and the canonical JSON of the event, so a gap
or an edit anywhere in a session's trail is detectable. Writes are synchronous and flushed for
refusals, so the event exists before the client sees the refusal. When the sink fails,
``fail-closed`` makes ``healthy`` false (the proxy then refuses statements) and
``best-effort`` counts the drop.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, TextIO

GENESIS = "0" * 64


def seal(event: dict[str, Any], prev_hash: str) -> tuple[str, str]:
    """The event as one JSON line with ``prev_hash`` and ``hash`` appended, and that hash.

    The hash covers ``prev_hash`` and the compact JSON of the event (keys in the order written)
    without the chain fields, so the line is produced with a single encoding.
    """
    body = _encode(event)
    digest = hashlib.sha256(prev_hash.encode() + body.encode()).hexdigest()
    return f'{body[:-1]},"prev_hash":"{prev_hash}","hash":"{digest}"}}', digest


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


def verify(events: list[dict[str, Any]]) -> bool:
    """True when ``events`` (one session, in order) form an unbroken chain."""
    prev = GENESIS
    for event in events:
        fields = {k: v for k, v in event.items() if k not in ("prev_hash", "hash")}
        if event.get("prev_hash") != prev or seal(fields, prev)[1] != event.get("hash"):
            return False
        prev = event["hash"]
    return True


class AuditLog:
    """Writes sealed events to a text stream."""

    def __init__(self, stream: TextIO, *, failure_policy: str = "best-effort") -> None:
        if failure_policy not in ("best-effort", "fail-closed"):
            raise ValueError(f"unknown audit failure policy {failure_policy!r}")
        self._stream = stream
        self._prev: dict[str, str] = {}
        self.failure_policy = failure_policy
        self.written = 0
        self.dropped = 0
        self.healthy = True

    def write(self, event: dict[str, Any]) -> None:
        """Seal and write one event (flushing refusals and session boundaries at once)."""
        session_id = str(event.get("session_id", ""))
        line, digest = seal(event, self._prev.get(session_id, GENESIS))
        try:
            self._stream.write(line + "\n")
            if event.get("type") != "statement" or event.get("enforced") not in ("allow", "mask"):
                self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1
            self.healthy = self.failure_policy == "best-effort"
            return
        self.written += 1
        self.healthy = True
        if event.get("type") == "session_end":
            self._prev.pop(session_id, None)
        else:
            self._prev[session_id] = digest

    def flush(self) -> None:
        """Flush buffered events."""
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1
