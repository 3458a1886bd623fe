"""Sans-I/O PostgreSQL v3 wire protocol: framing, messages, authentication exchanges.

No sockets, no event loop, no clock: bytes in, messages out, and back (like h11).
"""

from dbgov_sidecar.pgwire import auth, framing, messages
from dbgov_sidecar.pgwire.errors import AuthenticationFailed, ProtocolViolation

__all__ = ["AuthenticationFailed", "ProtocolViolation", "auth", "framing", "messages"]
