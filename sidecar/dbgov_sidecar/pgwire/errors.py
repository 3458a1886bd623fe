"""The one error the codec raises: the peer broke the PostgreSQL v3 protocol.

Every malformed, truncated or oversized input becomes a ``ProtocolViolation`` naming what was
wrong, so the proxy can answer with one FATAL and close instead of guessing.
"""

from __future__ import annotations

from typing import ClassVar


class ProtocolViolation(Exception):
    """Bytes from a peer that no correct PostgreSQL v3 implementation sends."""

    sqlstate: ClassVar[str] = "08P01"  # protocol_violation

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class AuthenticationFailed(Exception):
    """Authentication with a peer failed (wrong password, server proof mismatch, ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
