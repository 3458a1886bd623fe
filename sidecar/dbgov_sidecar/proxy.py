"""The asyncio shell around ``session.Session``: sockets in, sockets out, nothing decided here.

Both sides are ``asyncio.Protocol``s (not streams): bytes from a socket go straight into the
session, and whatever it queued goes out in one write per side. Reading from one side pauses
while the other side's write buffer is full, so a slow client holds the server back instead of
growing memory. Tasks exist only while connecting (upstream login, TLS handshakes, cancels).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import ssl
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dbgov_policy import mask
from dbgov_sidecar import audit, login, metrics, policy_port, session, tokens
from dbgov_sidecar.pgwire import AuthenticationFailed, ProtocolViolation, auth, framing, messages

if typing.TYPE_CHECKING:
    from dbgov_sidecar import _lane

log = logging.getLogger("dbgov.proxy")

AuditWrite = Callable[[audit.Event], None]

MAX_SESSION_BUFFER = 1 << 20
"""Default client bytes one session may hold unread (waiting behind a guarded write, or before
its upstream is ready) before the proxy stops reading that client's socket."""
MAX_TOTAL_BUFFER = 128 << 20
"""Default client bytes all sessions together may hold: above it, every session holding any
stops reading its client until what it holds is handled."""
MAX_STARTUP_CONNECTIONS = 1000
"""Default connections that may be starting up or authenticating at once (apart from the
authenticated sessions ``max_connections`` counts): one more closes the oldest of them."""
_STARTING = frozenset({"startup", "tls", "auth", "verifying"})
"""Session states before the client has authenticated."""


try:  # the event loop's transports the lane may write past (to their socket)
    from uvloop.loop import TCPTransport as _UvTcp  # type: ignore[attr-defined]  # (not in its stubs)
    from uvloop.loop import UnixTransport as _UvUnix  # type: ignore[attr-defined]

    _PLAIN_TRANSPORTS: tuple[type, ...] = (_UvTcp, _UvUnix)
except ImportError:  # pragma: no cover - uvloop is optional
    _PLAIN_TRANSPORTS = ()


def _plain_socket(transport: Any) -> int:
    """The socket of uvloop's plain TCP or Unix transport, which the lane may write to directly
    while the transport has nothing queued; -1 for anything else (TLS, asyncio's own loop)."""
    if type(transport) not in _PLAIN_TRANSPORTS:
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


def _nowhere(data: bytes) -> None:
    raise AssertionError("the lane forwarded a statement before the upstream was ready")


class Recorder:
    """What happens to every audit event: counted in ``counters``, sealed into ``log``.

    The proxy's usual ``audit`` callable; with it, sessions also get the compiled lane, which
    counts and seals its statements into the same two objects directly."""

    def __init__(self, log: audit.AuditLog | None, counters: metrics.Metrics | None) -> None:
        self.log = log
        self.counters = counters

    def __call__(self, event: audit.Event) -> None:
        if self.counters is not None:
            self.counters.observe(event)
        if self.log is not None:
            self.log.write(event)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """How the proxy reaches and logs in to the real database."""

    host: str = "127.0.0.1"
    """Upstream host name or address."""
    port: int = 5432
    """Upstream port."""
    user: str = "postgres"
    """Role the proxy logs in as."""
    password: str | None = field(default=None, repr=False)
    """Password for that role (cleartext, md5 and SCRAM-SHA-256 are supported); never shown."""
    database: str | None = None
    """Database to use (None: the one each client asks for)."""
    sslmode: str = "prefer"
    """As libpq: disable | allow | prefer | require | verify-ca | verify-full (allow is taken as
    prefer: TLS is tried first, never after a plaintext attempt)."""
    sslrootcert: str | None = None
    """CA bundle for verify-full (None: the system store)."""
    channel_binding: str = "prefer"
    """SCRAM channel binding over TLS, as libpq's setting: disable | prefer | require."""
    sslcert: str | None = None
    """PEM client certificate offered to the server (its ``clientcert`` and ``cert`` auth)."""
    sslkey: str | None = None
    """PEM key for ``sslcert`` (None: the key is in the same file)."""
    connect_timeout: float = 10.0
    """Seconds allowed for connecting and logging in."""
    ssl_ca_pem: str | None = field(default=None, repr=False)
    """CA bundle as PEM text (minted credentials carry it), used instead of ``sslrootcert``."""
    masking_views: bool = False
    """The role is a minted one: it reads masked tables through the operator's masking views
    (``dbgov_masked``), since it may not read their masked columns; and it logs in with SCRAM
    only (its verifier is SCRAM's: a server asking for the password itself is an impostor)."""

    def tls_key(self) -> tuple[str, str | None, str | None, str | None, str | None]:
        """What the TLS context depends on (contexts are cached by it, never by the password)."""
        return (self.sslmode, self.sslrootcert, self.ssl_ca_pem, self.sslcert, self.sslkey)


class NoUpstreamCredentials(Exception):
    """Cluster mode has no usable database credentials now: new client logins get FATAL 57P03."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


UpstreamSource = Callable[[], UpstreamConfig]
"""The upstream to log in to, read when a new upstream connection is made (cluster mode: the
current minted credentials); raises ``NoUpstreamCredentials``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Everything the proxy shell needs."""

    listen_host: str = "127.0.0.1"
    """Address to listen on."""
    listen_port: int = 6432
    """Port to listen on (0: any free port)."""
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    """The real database."""
    session: session.SessionConfig = field(default_factory=session.SessionConfig)
    """Per-session settings (client auth, limits, audit)."""
    tls_cert: str | None = None
    """PEM certificate offered to clients that ask for TLS."""
    tls_key: str | None = None
    """PEM private key for ``tls_cert``."""
    drain_timeout: float = 30.0
    """Seconds in-flight sessions get to finish on shutdown."""
    max_connections: int = 1000
    """Authenticated sessions served at once; the next gets FATAL 53300 after its startup packet."""
    max_startup_connections: int = MAX_STARTUP_CONNECTIONS
    """Connections not yet authenticated, on top of ``max_connections``; when one more arrives
    the oldest of them is closed, so idle sockets cannot lock clients out."""
    max_session_buffer: int = MAX_SESSION_BUFFER
    """Client bytes one session may hold unread before reading from that client pauses."""
    max_total_buffer: int = MAX_TOTAL_BUFFER
    """Client bytes all sessions may hold together before every session holding some pauses."""
    auth_timeout: float = 60.0
    """Seconds a client has to finish startup and authentication (PostgreSQL's authentication_timeout)."""
    lane: bool = True
    """Run steady-state statements through the compiled lane when it is built (``_lane.pyx``)."""
    token_verifier: tokens.Verifier | None = None
    """Verifies the JWTs clients give as their password (with ``session.client_token``)."""
    upstream_source: UpstreamSource | None = None
    """Cluster mode: where and as whom each new upstream connection logs in, read at connect
    time (minted credentials renew); None: always ``upstream``."""


class Proxy:
    """Listens for clients and runs one ``Session`` per connection."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        policy: Callable[[], policy_port.Policy],
        audit: AuditWrite | None = None,
        audit_ok: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.audit = audit
        self.audit_ok = audit_ok
        if type(audit) is Recorder:  # the lanes audit and count in batches: flushes catch them up
            if audit.log is not None:
                audit.log.producers.append(self.drain_lanes)
            if audit.counters is not None:
                audit.counters.producers.append(self.drain_lanes)
        self.connections: set[ClientConnection] = set()
        self.starting: dict[ClientConnection, None] = {}
        """Connections not yet authenticated, oldest first."""
        self.held = 0
        """Client bytes all sessions hold unread (``Session.held_input``)."""
        self.keys: dict[tuple[int, int], ClientConnection] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {"sessions_total": 0, "upstream_errors": 0}
        self._server: asyncio.Server | None = None
        self._client_tls = _server_tls(config.tls_cert, config.tls_key)
        self._client_binding = _channel_binding(config.tls_cert) if self._client_tls is not None else None
        self._upstream_tls = _client_tls(config.upstream)
        self._tls_contexts: dict[
            tuple[str, str | None, str | None, str | None, str | None], ssl.SSLContext | None
        ] = {config.upstream.tls_key(): self._upstream_tls}
        if self._client_tls is not None:
            config = dataclasses.replace(
                config, session=dataclasses.replace(config.session, tls_available=True)
            )
            self.config = config

    def upstream_now(self) -> UpstreamConfig:
        """The upstream a new connection logs in to (raises ``NoUpstreamCredentials``)."""
        source = self.config.upstream_source
        return self.config.upstream if source is None else source()

    def upstream_tls(self, cfg: UpstreamConfig) -> ssl.SSLContext | None:
        """The TLS context for ``cfg`` (made once per TLS setting: renewals keep the CA)."""
        key = cfg.tls_key()
        if key not in self._tls_contexts:
            if len(self._tls_contexts) > 16:
                self._tls_contexts.clear()
            self._tls_contexts[key] = _client_tls(cfg)
        return self._tls_contexts[key]

    def drain_lanes(self) -> None:
        """Audit and count what every session's lane finished."""
        for conn in self.connections:
            if conn.lane is not None:
                conn.lane.drain()

    @property
    def port(self) -> int:
        """The port actually listened on."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start listening."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self),
            self.config.listen_host,
            self.config.listen_port,
            reuse_address=True,
        )

    async def stop(self, *, drain_timeout: float | None = None) -> None:
        """Stop accepting, give sessions time to finish, then close the rest."""
        if self._server is not None:
            self._server.close()
        timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        deadline = time.monotonic() + timeout
        while self.connections and time.monotonic() < deadline:
            if all(c.idle for c in self.connections):
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close("proxy shutting down")
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def spawn(self, coro: Any) -> None:
        """Run a short-lived task the proxy keeps track of (and cancels on stop)."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def new_key(self, conn: ClientConnection) -> tuple[int, int]:
        """A BackendKeyData pair of our own, mapped to the connection."""
        while True:
            key = (secrets.randbits(31), secrets.randbits(31))
            if key not in self.keys:
                self.keys[key] = conn
                return key

    async def forward_cancel(self, pid: int, secret: int) -> None:
        """Send the upstream CancelRequest for the session holding our key (pid, secret)."""
        conn = self.keys.get((pid, secret))
        if conn is None or conn.upstream_key is None or conn.upstream_cfg is None:
            return
        upstream_pid, upstream_secret = conn.upstream_key
        cfg = conn.upstream_cfg  # the server that session is on
        tls = self.upstream_tls(cfg)
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(cfg.connect_timeout):
                reader, writer = await asyncio.open_connection(cfg.host, cfg.port)
                try:
                    if tls is not None:
                        writer.write(messages.ssl_request())
                        answer = await reader.readexactly(1)
                        if answer == b"S":
                            await writer.start_tls(tls, server_hostname=cfg.host)
                    writer.write(messages.cancel_request(upstream_pid, upstream_secret))
                    await writer.drain()
                    await reader.read(1)  # the server closes when done
                finally:
                    writer.close()


class ClientConnection(asyncio.Protocol):
    """The client socket of one session."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamConnection | None = None
        self.upstream_key: tuple[int, int] | None = None
        self.upstream_cfg: UpstreamConfig | None = None
        """Where this session's upstream connection went (for its cancel requests)."""
        self.session: session.Session | None = None
        self._key: tuple[int, int] | None = None
        self.address = ""
        self._closed = False
        self._audit_prev = "0" * 64
        self._auth_timer: asyncio.TimerHandle | None = None
        self._held = 0  # this session's part of proxy.held
        self._paused_by: set[str] = set()  # why reading from the client is paused
        self.lane: _lane.Lane | None = None
        self._upstream_write: Callable[[bytes], object] = _nowhere

    @property
    def idle(self) -> bool:
        """No statement in flight (safe to close on shutdown)."""
        s = self.session
        return s is None or s.state != "ready" or s.idle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)  # uvloop's is no subclass
        peer = transport.get_extra_info("peername")
        address = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._key = self.proxy.new_key(self)
        starting = self.proxy.starting
        established = len(self.proxy.connections) - len(starting)
        over_capacity = established >= self.proxy.config.max_connections
        if len(starting) >= self.proxy.config.max_startup_connections:
            oldest = next(iter(starting))
            log.info("too many connections authenticating: closing the oldest, from %s", oldest.address)
            oldest.close("too many connections authenticating (max_startup_connections)")
        starting[self] = None
        self.address = address
        self.proxy.connections.add(self)
        self.proxy.stats["sessions_total"] += 1
        self._auth_timer = asyncio.get_running_loop().call_later(
            self.proxy.config.auth_timeout, self._auth_timed_out
        )
        self.session = session.Session(
            policy=self.proxy.policy,
            config=self.proxy.config.session,
            client=session.ClientInfo(address=address, session_id=secrets.token_hex(8)),
            backend_key=self._key,
            nonce=secrets.token_urlsafe(18),
            audit_ok=self.proxy.audit_ok,
            over_capacity=over_capacity,
        )

    def _auth_timed_out(self) -> None:
        self._auth_timer = None
        s = self.session
        if s is None or s.state in ("ready", "closed"):
            return
        log.info("client %s did not finish authenticating in time", s.client_address)
        s.auth_timed_out(self.proxy.config.auth_timeout)
        self.pump()

    def data_received(self, data: bytes) -> None:
        # Once the lane is bound (start_lane), the event loop calls lane.client_received instead.
        lane = self.lane
        now = time.time()
        if lane is not None:
            try:
                if lane.client(data, now):
                    self._upstream_write(lane.forward or data)  # (its rewrite for a masked shape)
                    return
            except Exception:
                self._internal_error()
                return
        self._client_slow(data, now)

    def _client_slow(self, data: bytes, now: float) -> None:
        """Client bytes the lane did not take: the session reads them."""
        assert self.session is not None
        try:
            self.session.adopt_lane()
            self.session.client_data(data, now)
        except Exception:  # a bug must cost one session, never the proxy or a policy check
            self._internal_error()
            return
        self.pump()
        if self.lane is not None:
            self.session.arm_lane()

    def _internal_error(self) -> None:
        log.exception("internal error; closing the session")
        if self.session is not None:  # whatever was half-built is not sent
            self.session.to_client.clear()
            self.session.to_server.clear()
            self.session.actions.clear()
        if self.transport is not None:
            self.transport.write(
                messages.error_response(
                    code="XX000", message="dbgov: internal error in the proxy", severity="FATAL"
                )
            )
        self.close("internal error")

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None and self.session.state != "closed":
            self.session.adopt_lane()
            self.session.client_eof(time.time())
            self._write_audit()
        self.close("client gone")

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    def pause_client(self, why: str) -> None:
        """Stop reading from the client (until every reason to is gone)."""
        if not self._paused_by and self.transport is not None:
            self.transport.pause_reading()
        self._paused_by.add(why)

    def resume_client(self, why: str) -> None:
        """One reason to stop reading from the client is gone."""
        if why in self._paused_by:
            self._paused_by.discard(why)
            if not self._paused_by and self.transport is not None and not self._closed:
                self.transport.resume_reading()

    def _watch(self, s: session.Session) -> None:
        """Keep what the session holds bounded: client bytes it cannot handle yet stop reading
        from the client over the limits, and reading resumes once it handled them. Also counts
        the connection as established once the client authenticated."""
        if self in self.proxy.starting and s.state not in _STARTING:
            del self.proxy.starting[self]
        held = s.held_input
        if held == self._held:
            return
        proxy, cfg = self.proxy, self.proxy.config
        proxy.held += held - self._held
        self._held = held
        if held and (held > cfg.max_session_buffer or proxy.held > cfg.max_total_buffer):
            self.pause_client("held")
        elif not held or (held <= cfg.max_session_buffer // 2 and proxy.held <= cfg.max_total_buffer):
            self.resume_client("held")

    def pump(self) -> None:
        """Write out what the session queued and carry out its actions."""
        s = self.session
        if s is None:
            return
        if s.events:
            self._write_audit()
        if s.to_server and self.upstream is not None and self.upstream.relaying:
            self.upstream.write(bytes(s.to_server))
            s.to_server.clear()
        if s.to_client and self.transport is not None:
            self.transport.write(bytes(s.to_client))
            s.to_client.clear()
        if s.actions:
            actions, s.actions = s.actions, []
            for action in actions:
                self._act(action)
        if self._held or s.held_input or self in self.proxy.starting:
            self._watch(s)

    def _act(self, action: session.Action) -> None:
        if isinstance(action, session.ConnectUpstream):
            self.proxy.spawn(self._connect(dict(action.params)))
        elif isinstance(action, session.StartClientTLS):
            self.proxy.spawn(self._start_tls())
        elif isinstance(action, session.VerifyToken):
            self.proxy.spawn(self._verify_token(action.token))
        elif isinstance(action, session.ForwardCancel):
            self.proxy.spawn(self.proxy.forward_cancel(action.pid, action.secret))
        elif isinstance(action, session.Close):
            self.close(action.reason)

    def _write_audit(self) -> None:
        s = self.session
        assert s is not None
        events, s.events = s.events, []
        if self.proxy.audit is None:
            return
        for event in events:
            self.proxy.audit(event)

    async def _verify_token(self, token: str) -> None:
        """The seam for token login: the session waits in ``verifying`` while the verifier
        (which may fetch the issuer's keys, in a thread) decides; its answer goes back in."""
        verifier = self.proxy.config.token_verifier
        assert self.session is not None
        try:
            if verifier is None:
                raise tokens.Refusal(
                    "not_configured", "dbgov has no token issuers configured", sqlstate="28000"
                )
            identity = await verifier.verify(token)
        except tokens.Refusal as refusal:
            log.info("client %s: token refused (%s): %s", self.address, refusal.code, refusal.message)
            self.session.token_refused(
                code=refusal.code, sqlstate=refusal.sqlstate, message=refusal.message, now=time.time()
            )
        except Exception:  # a bug: the client gets a FATAL at once, not a silent hang
            self._internal_error()
            return
        else:
            self.session.token_verified(identity, time.time())
        self.pump()

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None and self.session is not None
        ctx = self.proxy._client_tls
        assert ctx is not None
        try:
            new = await loop.start_tls(self.transport, self, ctx, server_side=True)
        except (OSError, ssl.SSLError, ConnectionError) as err:
            log.info("client TLS handshake failed: %s", err)
            self.close("TLS handshake failed")
            return
        if new is None:
            self.close("TLS handshake failed")
            return
        self.transport = new
        self.session.client_tls_started(time.time(), binding=self.proxy._client_binding)
        self.pump()

    async def _connect(self, params: dict[str, str]) -> None:
        assert self.session is not None
        try:
            cfg = self.proxy.upstream_now()
        except NoUpstreamCredentials as err:
            log.info("client %s refused: no database credentials (%s)", self.address, err.reason)
            message = f"the sidecar has no database credentials yet: {err.reason}"
            refusal = messages.error_response(code="57P03", message=message, severity="FATAL")
            self.session.upstream_failed(error=refusal, reason=message)
            self.pump()
            return
        except Exception:  # a bug: the client gets a FATAL at once, not a silent hang
            self._internal_error()
            return
        if cfg.database is not None and self.proxy.config.upstream_source is not None:
            params = {**params, "database": cfg.database}  # the minted role's database, not the client's
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                up = await self._login(params, cfg)
        except login.UpstreamRefused as err:
            self.proxy.stats["upstream_errors"] += 1
            self.session.upstream_failed(error=err.error, reason=str(err))
        except (
            OSError,
            TimeoutError,
            AuthenticationFailed,
            ProtocolViolation,
            ssl.SSLError,
        ) as err:
            self.proxy.stats["upstream_errors"] += 1
            reason = str(err) or type(err).__name__
            self.session.upstream_failed(error=None, reason=reason)
        except Exception:  # a bug: the client gets a FATAL at once, not a silent hang
            self._internal_error()
            return
        else:
            if self._closed:
                up.close()
                return
            self.upstream = up
            self.upstream_cfg = cfg
            try:
                self.session.upstream_ready(
                    parameter_status=up.login_state.parameter_status,
                    notices=up.login_state.notices,
                    now=time.time(),
                    masked_attrs=up.masked_attrs,
                    table_columns=up.table_columns,
                    search_path=up.login_state.search_path,
                    inherits=up.inherits,
                    ancestors=up.ancestors,
                    functions=up.login_state.functions,
                    db_user=cfg.user,
                    views=up.views if cfg.masking_views else None,
                    view_parents=up.view_parents,
                    view_masks=up.view_masks,
                )
            except Exception:
                self._internal_error()
                return
            self.upstream_key = up.login_state.backend_key
            up.start_relay()
        self.pump()
        self.start_lane()

    def start_lane(self) -> None:
        """Give the relaying session the compiled lane, when configured and the proxy's audit is
        the usual ``Recorder`` (the lane writes into its log and counters itself)."""
        recorder = self.proxy.audit
        up = self.upstream
        if (
            not self.proxy.config.lane
            or self.session is None
            or up is None
            or up.transport is None
            or not (recorder is None or type(recorder) is Recorder)
        ):
            return
        log_, counters = (None, None) if recorder is None else (recorder.log, recorder.counters)
        self._upstream_write = up.transport.write
        self.lane = lane = self.session.enable_lane(log_, counters)
        if lane is None or self.transport is None:
            return
        # The event loop calls the lane first from now on: no Python call per read in the steady
        # state. (A loop that keeps calling the protocol's own methods is just slower.)
        lane.bind(
            clock=time.time,
            client=self.transport,
            upstream=up.transport,
            client_slow=self._client_slow,
            server_slow=self._server_slow,
            fail=self._internal_error,
            client_fd=_plain_socket(self.transport),
            upstream_fd=_plain_socket(up.transport),
        )
        vars(self)["data_received"] = lane.client_received
        vars(up)["data_received"] = lane.server_received
        self.transport.set_protocol(self)
        up.transport.set_protocol(up)

    async def _login(self, params: dict[str, str], cfg: UpstreamConfig) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        state = login.UpstreamLogin(
            user=cfg.user,
            password=cfg.password,
            params=params,
            nonce=secrets.token_urlsafe(18),
            channel_binding=cfg.channel_binding,
            scram_only=cfg.masking_views,
        )
        _, up = await loop.create_connection(lambda: UpstreamConnection(self, state), cfg.host, cfg.port)
        try:
            tls = self.proxy.upstream_tls(cfg)
            if tls is not None:
                up.write(messages.ssl_request())
                answer = await up.read_ssl_answer()
                if answer == b"S":
                    assert up.transport is not None
                    new = await loop.start_tls(up.transport, up, tls, server_hostname=cfg.host)
                    if new is None:
                        raise ConnectionError("upstream TLS handshake failed")
                    up.transport = new
                    tls_object = new.get_extra_info("ssl_object")
                    if tls_object is not None:
                        state.server_certificate = tls_object.getpeercert(binary_form=True)
                elif cfg.sslmode in ("require", "verify-ca", "verify-full"):
                    raise ConnectionError(f"upstream does not support TLS (sslmode={cfg.sslmode})")
            up.write(state.startup())
            while not state.done:
                reply = state.on_message(await up.read_message())
                if reply:
                    up.write(reply)
            catalog = await self._masked_attributes(up, views=cfg.masking_views)
            up.masked_attrs, up.table_columns = catalog.attrs, catalog.columns
            up.inherits, up.ancestors = catalog.inherits, catalog.ancestors
            up.views, up.view_parents = catalog.views, catalog.view_parents
            up.view_masks = catalog.view_masks
        except BaseException:
            up.close()
            raise
        return up

    async def _masked_attributes(self, up: UpstreamConnection, *, views: bool = False) -> MaskCatalog:
        """Looked up on the new connection: (table OID, attnum) → name of every masked column
        (also as a column of the masked tables' descendants, and of their ancestors where they
        have a column of that name), (schema, table) → every column of each masked table,
        descendant and ancestor, in order, each descendant → its masked ancestors, and each
        ancestor → the masked columns below it it has by name.

        With ``views`` (a minted role) also the masking views this role may read, by the
        table each reads.

        A failed lookup fails the login: without it, the descendants (and the masked tables'
        rows read through their ancestors) would be read in clear."""
        targets = getattr(self.proxy.policy(), "mask_targets", ())
        if not targets:
            return MaskCatalog()
        queries = [
            masked_columns_query(targets),
            table_columns_query(targets),
            descendants_query(targets),
            ancestors_query(targets),
        ]
        if views:
            queries.append(MASKING_VIEWS_QUERY)
        up.write(messages.query("; ".join(queries)))
        masking_views: dict[tuple[str, str], str] = {}
        view_parents: set[tuple[str, str]] = set()
        view_masks: dict[tuple[str, str], frozenset[str]] = {}
        found: dict[tuple[int, int], str] = {}
        columns: dict[tuple[str, str], list[str]] = {}
        inherits: dict[tuple[str, str], list[tuple[str, str]]] = {}
        ancestors: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        results = 0
        error: str | None = None
        while True:
            msg = await up.read_message()
            if msg.type == messages.DATA_ROW:
                row = messages.decode_data_row(msg.data)
                if None in row:
                    continue
                if results == 0 and len(row) == 3:
                    oid, attnum, name = row
                    found[(int(oid), int(attnum))] = name.decode()  # type: ignore[union-attr, arg-type]
                elif results == 1 and len(row) == 3:
                    schema, table, column = (v.decode() for v in row)  # type: ignore[union-attr]
                    columns.setdefault((schema, table), []).append(column)
                elif results == 2 and len(row) == 4:
                    schema, table, up_schema, up_table = (v.decode() for v in row)  # type: ignore[union-attr]
                    inherits.setdefault((schema, table), []).append((up_schema, up_table))
                elif results == 3 and len(row) == 5:
                    schema, table, low_schema, low_table, column = (v.decode() for v in row)  # type: ignore[union-attr]
                    ancestors.setdefault((schema, table), []).append((low_schema, low_table, column))
                elif results == 4 and len(row) == 5:
                    view, schema, table, parent, definition = (v.decode() for v in row)  # type: ignore[union-attr]
                    view_masks[(schema, table)] = mask.view_masked_columns(definition) or frozenset()
                    # Several (one per policy binding the pod): each masks only its own policy's
                    # columns, none is known to mask all the composed policy masks ('' refuses).
                    known = masking_views.get((schema, table))
                    masking_views[(schema, table)] = view if known in (None, view) else ""
                    if parent == "t":
                        view_parents.add((schema, table))
            elif msg.type == messages.COMMAND_COMPLETE:
                results += 1
            elif msg.type == messages.ERROR_RESPONSE:
                error = messages.decode_fields(msg.data).get("M") or "error"
            elif msg.type == messages.READY_FOR_QUERY:
                if error is not None:
                    raise ConnectionError(
                        f"dbgov could not read the masked tables' columns and descendants: {error}"
                    )
                return MaskCatalog(
                    attrs=found,
                    columns={table: tuple(names) for table, names in columns.items()},
                    inherits={table: tuple(up) for table, up in inherits.items()},
                    ancestors={table: tuple(below) for table, below in ancestors.items()},
                    views=masking_views,
                    view_parents=frozenset(view_parents),
                    view_masks=view_masks,
                )

    def close(self, reason: str) -> None:
        """Close both sides (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.proxy.connections.discard(self)
        self.proxy.starting.pop(self, None)
        self.proxy.held -= self._held
        self._held = 0
        if self._key is not None:
            self.proxy.keys.pop(self._key, None)
        if self.session is not None:
            self.session.adopt_lane()
            self.lane = None  # (a read the loop already holds goes to the closed session)
            if self.session.state != "closed":
                self.session.close(reason, time.time())
            self.pump()
        if self.transport is not None:
            self.transport.close()
        if self.upstream is not None:
            if reason != "client terminated":
                with contextlib.suppress(Exception):
                    self.upstream.write(messages.TERMINATE_MESSAGE)
            self.upstream.close()

    def server_data(self, data: bytes) -> None:
        """Bytes from upstream, once relaying (the lane's server_received once it is bound)."""
        lane = self.lane
        now = time.time()
        if lane is not None and lane.kind:
            try:
                if lane.server(data, now):
                    if self.transport is not None:
                        self.transport.write(data)
                    return
            except Exception:
                self._internal_error()
                return
        self._server_slow(data, now)

    def _server_slow(self, data: bytes, now: float) -> None:
        """Server bytes the lane did not take: the session reads them."""
        assert self.session is not None
        try:
            self.session.adopt_lane()
            self.session.server_data(data, now)
        except Exception:
            self._internal_error()
            return
        self.pump()
        if self.lane is not None:
            self.session.arm_lane()

    def upstream_lost(self) -> None:
        """The upstream socket closed."""
        if self._closed or self.session is None:
            return
        self.session.adopt_lane()
        self.session.upstream_lost(time.time())
        self.pump()
        self.close("upstream lost")


class UpstreamConnection(asyncio.Protocol):
    """The upstream socket of one session: logs in, then relays."""

    def __init__(self, owner: ClientConnection, login_state: login.UpstreamLogin) -> None:
        self.owner = owner
        self.login_state = login_state
        self.transport: asyncio.Transport | None = None
        self.relaying = False
        self._framer = framing.Framer(side="backend")
        self._waiter: asyncio.Future[None] | None = None
        self._ssl_answer: bytes | None = None
        self._expect_ssl_answer = False
        self._lost: Exception | None = None
        self.masked_attrs: dict[tuple[int, int], str] = {}
        self.table_columns: dict[tuple[str, str], tuple[str, ...]] = {}
        self.inherits: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self.ancestors: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {}
        self.views: dict[tuple[str, str], str] = {}
        self.view_parents: frozenset[tuple[str, str]] = frozenset()
        self.view_masks: dict[tuple[str, str], frozenset[str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.relaying:
            self.owner.server_data(data)
            return
        if self._expect_ssl_answer:
            self._expect_ssl_answer = False
            self._ssl_answer = data[:1]
            if len(data) > 1:
                self._lost = ProtocolViolation("server sent data after its SSL answer")
            data = b""
        self._framer.feed(data)
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("upstream closed the connection")
        if self.relaying:
            self.owner.upstream_lost()
        self._wake()

    def pause_writing(self) -> None:
        self.owner.pause_client("upstream busy")

    def resume_writing(self) -> None:
        self.owner.resume_client("upstream busy")

    async def read_ssl_answer(self) -> bytes:
        self._expect_ssl_answer = True
        while self._ssl_answer is None:
            await self._wait()
        if self._lost is not None:
            raise self._lost
        if self._ssl_answer not in (b"S", b"N"):
            raise ProtocolViolation(f"server answered SSLRequest with {self._ssl_answer!r}")
        return self._ssl_answer

    async def read_message(self) -> framing.Message:
        while True:
            msg = self._framer.next_message()
            if msg is not None:
                return msg
            await self._wait()

    async def _wait(self) -> None:
        if self._lost is not None:
            raise self._lost
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._lost is not None and self._framer.buffered == 0:
            raise self._lost

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def start_relay(self) -> None:
        """Login done: everything from now on goes to the session."""
        self.relaying = True
        leftover = self._framer.take_buffer()
        if leftover:
            self.owner.server_data(leftover)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MaskCatalog:
    """What the catalog of a session's database says about the policy's masked tables."""

    attrs: dict[tuple[int, int], str] = dataclasses.field(default_factory=dict)
    """(table OID, attnum) of each masked column, in the masked table, a descendant or an
    ancestor (a column of the same name) → the policy's name of it (schema.table.column of the
    masked table)."""
    columns: dict[tuple[str, str], tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """(schema, table) of each masked table, descendant and ancestor → its columns, in order."""
    inherits: dict[tuple[str, str], tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)
    """(schema, table) of each descendant → its masked ancestors."""
    ancestors: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = dataclasses.field(
        default_factory=dict
    )
    """(schema, table) of each ancestor → (schema, table, column) of each masked column below it
    that it has by name."""
    views: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
    """(schema, table) → the name of the masking view in ``dbgov_masked`` the role may read for
    it (a minted role only); ``""`` where it may read several, one per policy binding the pod:
    each masks only its own policy's columns, so none is used (reads of that table are refused)."""
    view_parents: frozenset[tuple[str, str]] = frozenset()
    """Those of the ``views`` tables that have children (their views read the children too)."""
    view_masks: dict[tuple[str, str], frozenset[str]] = dataclasses.field(default_factory=dict)
    """(schema, table) → the columns its view masks (computes rather than passes through)."""


MASKING_VIEWS_QUERY = (
    "SELECT DISTINCT v.relname, sn.nspname, s.relname, EXISTS (SELECT FROM pg_catalog.pg_inherits i "
    "WHERE i.inhparent = s.oid), pg_catalog.pg_get_viewdef(v.oid) FROM pg_catalog.pg_class v "
    "JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace "
    "JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.oid "
    "JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass "
    "AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass "
    "JOIN pg_catalog.pg_class s ON s.oid = d.refobjid "
    "JOIN pg_catalog.pg_namespace sn ON sn.oid = s.relnamespace "
    "WHERE vn.nspname = 'dbgov_masked' AND v.relkind = 'v' AND s.oid <> v.oid "
    "AND sn.nspname <> 'dbgov_masked' AND s.relkind IN ('r', 'p', 'f') "
    "AND pg_catalog.has_table_privilege(v.oid, 'SELECT') ORDER BY 1, 2, 3"
)
"""Catalog query: each masking view the session's role may read (the operator's, in
``dbgov_masked``), the schema and table it reads (from the view rule's dependencies), and
whether that table has children (then the view reads their rows too), and the view's query
(which columns it masks)."""


def _masked_tree(targets: tuple[tuple[str, str, str], ...]) -> str:
    """Recursive CTEs ``tree(oid, nsp, rel)``: every masked table (nsp.rel) and every table that
    descends from it through pg_inherits (partitions and inheritance children, any depth), each
    with the masked table it descends from; and ``up(oid, nsp, rel)``: every table a masked
    table descends from (partitioned roots, inheritance parents, any height), each with that
    masked table (nsp.rel)."""
    lit = session.sql_literal
    rows = ", ".join(sorted({f"({lit(a)}, {lit(b)})" for a, b, _ in targets}))
    masked = (
        "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE (n.nspname, c.relname) IN (VALUES {rows})"
    )
    return (
        f"WITH RECURSIVE tree(oid, nsp, rel) AS ({masked} "
        "UNION SELECT i.inhrelid, tree.nsp, tree.rel FROM pg_catalog.pg_inherits i "
        "JOIN tree ON i.inhparent = tree.oid), "
        f"up(oid, nsp, rel) AS ({masked} "
        "UNION SELECT i.inhparent, up.nsp, up.rel FROM pg_catalog.pg_inherits i "
        "JOIN up ON i.inhrelid = up.oid) "
    )


def masked_columns_query(targets: tuple[tuple[str, str, str], ...]) -> str:
    """Catalog query: OID, attribute number and name (schema.table.column, as the policy names it)
    of each masked column, in its table, in every descendant of it and in every ancestor of it
    that has a column of that name (where it may have another number)."""
    lit = session.sql_literal
    rows = ", ".join(f"({lit(a)}, {lit(b)}, {lit(c)})" for a, b, c in targets)
    return (
        _masked_tree(targets) + "SELECT t.oid, a.attnum, t.nsp || '.' || t.rel || '.' || a.attname "
        "FROM (SELECT * FROM tree UNION SELECT * FROM up) t "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid "
        f"WHERE NOT a.attisdropped AND (t.nsp, t.rel, a.attname) IN (VALUES {rows})"
    )


def table_columns_query(targets: tuple[tuple[str, str, str], ...]) -> str:
    """Catalog query: schema, table and name of every column of the targets' tables, of their
    descendants and of their ancestors, in order."""
    return (
        _masked_tree(targets) + "SELECT n.nspname, c.relname, a.attname "
        "FROM pg_catalog.pg_attribute a "
        "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE a.attnum > 0 AND NOT a.attisdropped "
        "AND c.oid IN (SELECT oid FROM tree UNION SELECT oid FROM up) "
        "ORDER BY n.nspname, c.relname, a.attnum"
    )


def descendants_query(targets: tuple[tuple[str, str, str], ...]) -> str:
    """Catalog query: schema and table of each descendant of a masked table, with the schema
    and table of that masked ancestor (one row per ancestor)."""
    return (
        _masked_tree(targets) + "SELECT DISTINCT n.nspname, c.relname, tree.nsp, tree.rel FROM tree "
        "JOIN pg_catalog.pg_class c ON c.oid = tree.oid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE (n.nspname, c.relname) <> (tree.nsp, tree.rel) ORDER BY 1, 2, 3, 4"
    )


def ancestors_query(targets: tuple[tuple[str, str, str], ...]) -> str:
    """Catalog query: schema and table of each ancestor of a masked table, with the schema, table
    and column of each masked column of that masked table the ancestor has by name (reading the
    ancestor without ONLY returns them)."""
    lit = session.sql_literal
    rows = ", ".join(f"({lit(a)}, {lit(b)}, {lit(c)})" for a, b, c in targets)
    return (
        _masked_tree(targets) + "SELECT DISTINCT n.nspname, c.relname, up.nsp, up.rel, a.attname FROM up "
        "JOIN pg_catalog.pg_class c ON c.oid = up.oid "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_catalog.pg_attribute a ON a.attrelid = up.oid "
        "WHERE (n.nspname, c.relname) <> (up.nsp, up.rel) AND a.attnum > 0 AND NOT a.attisdropped "
        f"AND (up.nsp, up.rel, a.attname) IN (VALUES {rows}) ORDER BY 1, 2, 3, 4, 5"
    )


def _server_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


def _channel_binding(cert: str | None) -> bytes | None:
    """tls-server-end-point data of the proxy's certificate (the first in ``cert``), for
    SCRAM-SHA-256-PLUS logins; None, with a warning, when its signature has no hash to bind with."""
    if not cert:
        return None
    with open(cert, encoding="ascii") as f:
        pem = f.read()
    start = pem.find(ssl.PEM_HEADER)
    end = pem.find(ssl.PEM_FOOTER, start)
    if start < 0 or end < 0:
        raise ValueError(f"{cert}: no PEM certificate")
    try:
        return auth.tls_server_end_point(ssl.PEM_cert_to_DER_cert(pem[start : end + len(ssl.PEM_FOOTER)]))
    except AuthenticationFailed as err:
        log.warning("client logins cannot use SCRAM channel binding: %s", err.reason)
        return None


def _client_tls(cfg: UpstreamConfig) -> ssl.SSLContext | None:
    if cfg.sslmode == "disable":
        return None
    # As libpq: `require` with a root CA given verifies the chain, exactly as verify-ca.
    root = cfg.sslrootcert or cfg.ssl_ca_pem
    if cfg.sslmode in ("verify-ca", "verify-full") or (cfg.sslmode == "require" and root):
        ctx = ssl.create_default_context(cafile=cfg.sslrootcert, cadata=cfg.ssl_ca_pem)
        ctx.check_hostname = cfg.sslmode == "verify-full"  # verify-ca: the chain, not the name
    elif cfg.sslmode in ("allow", "prefer", "require"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        raise ValueError(f"unsupported sslmode {cfg.sslmode!r}")
    if cfg.sslcert:
        ctx.load_cert_chain(cfg.sslcert, cfg.sslkey)
    return ctx
