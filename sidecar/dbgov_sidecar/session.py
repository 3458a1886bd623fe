"""One client session through the proxy, as a pure state machine: bytes + decisions → actions.

The asyncio shell (``proxy.py``) feeds client and server bytes in and writes out what collects
in ``to_client`` / ``to_server``; anything that is not bytes (start TLS, connect upstream,
forward a cancel, close) is queued in ``actions``, and audit events in ``events``. Nothing here
touches a socket or the clock: the shell passes the time in.

Refusing a statement keeps the session exactly as PostgreSQL would leave it. Instead of the
refused statement the proxy sends the server a *marker* that fails to parse (a bare unique
identifier), so the server itself aborts the transaction block, skips to Sync in the extended
protocol, and answers with the right ReadyForQuery status, in order with everything pipelined
around it. The marker's syntax error is then replaced by the policy's ErrorResponse.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from dbgov_policy import model
from dbgov_sidecar import audit, login, metrics, policy_port, redact
from dbgov_sidecar.pgwire import AuthenticationFailed, ProtocolViolation, auth, framing, messages

try:  # the compiled steady-state lane (setup.py); without it every statement takes the Python path
    from dbgov_sidecar import _lane
except ImportError:  # pragma: no cover - a build without a C compiler
    _lane = None  # type: ignore[assignment]

_LANE_PARSED = 2
"""``Lane.kind`` of a Parse + Bind + Execute + Sync batch in flight."""

SQLSTATE_POLICY = "42501"
SQLSTATE_UNPARSEABLE = "42601"
SQLSTATE_LIMIT = "54000"

# Startup parameters that would change how SQL is read or bypass the proxy.
# Startup parameters that bypass the proxy or change who is acting: refused outright.
_FORBIDDEN_PARAMS = frozenset({"replication", "role", "session_authorization"})
# Parameters that are not settings to judge (identity, encoding the codec enforces anyway).
_PLAIN_PARAMS = frozenset({"user", "database", "application_name", "client_encoding", "options"})
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")

# How the server must read the SQL the proxy judged: bytes as UTF-8 (the proxy decodes every
# statement as UTF-8, and in client-only encodings such as SJIS, GBK, BIG5 or GB18030 an ASCII
# byte such as a backslash or a quote can be the second half of a character, so the server would
# tokenize other statements than the proxy judged) and quotes with standard_conforming_strings
# on (as libpg_query reads them). The proxy sets both in its upstream startup packet, which
# overrides role and database defaults, and ends any session whose server reports otherwise.
_READ_AS_JUDGED = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}
# Client encodings whose bytes the proxy reads as it judges them: UTF8 itself, and SQL_ASCII
# (no conversion at all; the server gets UTF8 bytes and says so in its ParameterStatus).
_CLIENT_ENCODINGS = frozenset({"utf8", "unicode", "sqlascii"})
_ASYNC_SERVER = frozenset((messages.NOTICE_RESPONSE, messages.PARAMETER_STATUS, messages.NOTIFICATION))
# Client messages whose statement PostgreSQL resolves by search_path at that point: a Query and
# a Parse are analyzed, a Bind re-analyzes a prepared statement whose search_path changed, an
# Execute of a utility statement (EXECUTE, DECLARE, CALL …) resolves names as it runs.
_NAMED_BY_PATH = frozenset((messages.QUERY, messages.PARSE, messages.BIND, messages.EXECUTE))
# The search_path probe: a named statement and portal (a Query, an unnamed Parse or Bind would
# destroy the client's unnamed statement or portal), the schemas names resolve in, as at login.
_EXTENDED = frozenset((messages.PARSE, messages.BIND, messages.DESCRIBE, messages.EXECUTE, messages.CLOSE))
"""Messages that open a batch, whose failure makes the server skip to Sync (a Flush does not)."""
_CONFIRMS = frozenset(
    (messages.PARSE_COMPLETE, messages.CLOSE_COMPLETE, messages.ERROR_RESPONSE, messages.READY_FOR_QUERY)
)


def _probe(name: str, *, functions: bool = False) -> bytes:
    """The probe's messages, under a statement and portal name of the session's own; with
    ``functions``, the function names outside pg_catalog are read again too (after DDL)."""
    out = (
        messages.parse(name, "SELECT s FROM unnest(pg_catalog.current_schemas(false)) AS s")
        + messages.bind(name, name)
        + messages.execute(name)
        + messages.close("P", name)
        + messages.close("S", name)
    )
    if functions:
        out += (
            messages.parse(name, login.FUNCTIONS_QUERY)
            + messages.bind(name, name)
            + messages.execute(name)
            + messages.close("P", name)
            + messages.close("S", name)
        )
    return out + messages.SYNC_MESSAGE


_PROBE_REPLIES = frozenset(
    (
        messages.PARSE_COMPLETE,
        messages.BIND_COMPLETE,
        messages.CLOSE_COMPLETE,
        messages.DATA_ROW,
        messages.COMMAND_COMPLETE,
    )
)
_PATH_UNKNOWN = policy_port.SimpleDecision(
    verdict="block",
    rule="builtin:search-path-pending",
    reason=(
        "an earlier statement in this batch may change search_path, so how this statement's names "
        "resolve is not known until the server has answered it"
    ),
    hint="Send Sync after SET/RESET search_path, DISCARD ALL or DDL and wait for its answer first.",
    sqlstate=SQLSTATE_POLICY,
)
_PATH_NOT_LAST = policy_port.SimpleDecision(
    verdict="block",
    rule="builtin:search-path-pending",
    reason=(
        "a statement in this query string may change search_path (or end the transaction that "
        "changed it), so later statements in it would resolve names otherwise than they are judged"
    ),
    hint="Send it as its own query, then the statements that rely on it.",
    sqlstate=SQLSTATE_POLICY,
)
_PATH_REPREPARE = policy_port.SimpleDecision(
    verdict="block",
    rule="builtin:search-path-changed",
    reason=(
        "search_path changed since this statement was prepared, and PostgreSQL would now resolve "
        "its names to relations it was not judged (or masked) for"
    ),
    hint="Prepare the statement again under the current search_path.",
    sqlstate=SQLSTATE_POLICY,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionConfig:
    """What a session needs to know about the proxy's configuration."""

    tls_available: bool = False
    """A certificate is configured: answer SSLRequest with 'S'."""
    client_scram: auth.ScramKeys | None = None
    """Ask clients for this password with SCRAM-SHA-256 (None: trust)."""
    client_token: bool = False
    """Ask for a password and have the shell verify it as a signed JWT (``VerifyToken``)."""
    upstream_database: str | None = None
    """Database to connect to upstream (None: the one the client asks for)."""
    max_message_size: int = framing.DEFAULT_MAX_MESSAGE
    """Largest message accepted from the client or the server."""
    audit: bool = True
    """Produce audit events."""
    redact_literals: bool = False
    """Audit statement text with literals replaced by placeholders."""
    upstream_user: str | None = None
    """Role the proxy logs in upstream as (audited as ``db_user``)."""
    workload: Callable[[], Mapping[str, str] | None] | None = None
    """Cluster mode: the pod's identity as the operator verified it (audited as ``workload``);
    while it returns None clients get FATAL 57P03, as from a server starting up."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientInfo:
    """Who is on the other end of the client socket."""

    address: str
    session_id: str


# --- actions for the shell -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StartClientTLS:
    """Wrap the client connection in TLS ('S' has been queued in to_client)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectUpstream:
    """Open the upstream connection and log in with these startup parameters."""

    params: Mapping[str, str]


@dataclass(frozen=True, slots=True, kw_only=True)
class VerifyToken:
    """Verify the token the client gave as its password (it may need the issuer's keys from the
    network), then call ``token_verified`` or ``token_refused``."""

    token: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardCancel:
    """Cancel whatever the session owning this proxy-issued key is running."""

    pid: int
    secret: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Close:
    """Flush what is queued, then close both connections."""

    reason: str


Action = StartClientTLS | ConnectUpstream | VerifyToken | ForwardCancel | Close


@dataclass(slots=True, kw_only=True)
class _Statement:
    sql: str
    decision: policy_port.Decision
    verdict: str  # what happened (dry-run may differ from decision.verdict)
    path: tuple[str, ...] | None = None
    """The search_path it was judged under (PostgreSQL re-resolves a prepared statement's names
    when search_path changes, so an execution under another path is judged again)."""
    sql_prepared: bool = False
    """A statement PREPAREd in SQL and run by a protocol Bind: judged as its EXECUTE each time."""


@dataclass(slots=True, kw_only=True)
class _Unit:
    """Statements answered by one ReadyForQuery (one Query, or messages up to a Sync)."""

    started: float
    statements: list[_Statement]
    rows: int = 0
    tags: list[str] | None = None
    sqlstate: str | None = None
    executions: list[int | None] = field(default_factory=list)
    """Per Execute sent, the index in ``statements`` of the statement it runs (None: unknown)."""
    ends: list[tuple[int, str | None]] = field(default_factory=list)
    """Per Execute answered (CommandComplete, PortalSuspended, EmptyQueryResponse, or the
    error that ends the batch): the unit's rows so far and the command tag."""
    silent: bool = False
    """Ended by the proxy's own Sync: its ReadyForQuery is not the client's."""


@dataclass(slots=True, kw_only=True)
class _Guard:
    """A write running under maxRowsAffected."""

    limit: int
    savepoint: bool  # inside the client's transaction block (else our own BEGIN)
    stage: str = "open"  # open → statement → close
    count: int = 0
    over: bool = False
    rows_over: bool = False  # RETURNING rows past maxRowsReturned: rolled back like a big write
    failed: bool = False
    close_failed: bool = False
    pending: int = 1  # ReadyForQuery messages the closing commands still owe
    held: list[bytes] = field(default_factory=list)


# Server messages ``_plain_response`` passes through untouched → their fixed length (0: any):
# RowDescription, notices, notifications, Parse/Bind/CloseComplete, NoData (a ParameterStatus
# goes to ``_on_parameter_status``).
_PLAIN_SERVER = {ord("T"): 0, ord("N"): 0, ord("A"): 0}
_PLAIN_SERVER |= {ord("1"): 4, ord("2"): 4, ord("3"): 4, ord("n"): 4}

_UNLIMITED = 1 << 62
"""The guard's affected-rows limit when only maxRowsReturned applies to a write."""

_COPY_CLIENT = frozenset((messages.COPY_DATA, messages.COPY_DONE, messages.COPY_FAIL))

_EXECUTE_DONE = frozenset(
    (messages.COMMAND_COMPLETE, messages.PORTAL_SUSPENDED, messages.EMPTY_QUERY, messages.ERROR_RESPONSE)
)
_TRACKED_CLIENT = frozenset((messages.DESCRIBE, messages.BIND, messages.EXECUTE, messages.CLOSE))
_TRACKED_SERVER = frozenset(
    (
        messages.ROW_DESCRIPTION,
        messages.NO_DATA,
        messages.DATA_ROW,
        messages.COMMAND_COMPLETE,
        messages.PORTAL_SUSPENDED,
        messages.EMPTY_QUERY,
        messages.ERROR_RESPONSE,
        messages.READY_FOR_QUERY,
    )
)


_Hit = tuple[int, Callable[[bytes], bytes | None]]
"""A result column that arrived unmasked: its position, and what makes its value masked."""

# Types whose values (text and binary format alike) are the string itself: text, varchar,
# char(n) (space-padded), name. Masks apply to these; any other type's value becomes NULL,
# as in the rewrite.
_TEXT_OIDS = frozenset((25, 1043, 1042, 19))
_BPCHAR_OID = 1042


def _to_null(raw: bytes) -> bytes | None:
    return None


class _Shape:
    """Masked result positions of a statement or portal, known once its description arrives."""

    __slots__ = ("hits", "source")

    def __init__(self, source: _Shape | None = None) -> None:
        self.hits: tuple[_Hit, ...] | None = None
        self.source = source

    def resolve(self) -> tuple[_Hit, ...]:
        if self.hits is not None:
            return self.hits
        return self.source.resolve() if self.source is not None else ()


def _split(batch: bytes) -> list[framing.Message]:
    """The messages of a whole client batch the lane checked (every one complete and framed)."""
    framer = framing.Framer(side="frontend", max_message_size=len(batch))
    framer.feed(batch)
    return framer.drain()[1]


class _Origins:
    """Which result columns come straight from masked columns, per statement and portal.

    A RowDescription answers the oldest pending Describe (extended protocol) or starts a simple
    query's result; DataRows belong to the oldest pending Execute, or to that simple result.
    Shapes are objects captured when the client sends the message, so pipelined rebinding of
    the unnamed portal cannot confuse them. Entries carry the Sync they belong to, so an error
    (after which the server skips to Sync) drops them.
    """

    def __init__(self) -> None:
        self.statements: dict[str, _Shape] = {}
        self.portals: dict[str, _Shape] = {}
        self.describes: deque[tuple[_Shape, int]] = deque()
        self.executes: deque[tuple[_Shape, int]] = deque()
        self.simple: tuple[_Hit, ...] = ()

    def parsed(self, name: str) -> None:
        self.statements[name] = _Shape()

    def client(self, msg: framing.Message, sync: int) -> None:
        if msg.type == messages.DESCRIBE:
            target = messages.decode_target(msg.data)
            table = self.statements if target.kind == "S" else self.portals
            self.describes.append((table.setdefault(target.name, _Shape()), sync))
        elif msg.type == messages.BIND:
            bind = messages.decode_bind(msg.data)
            self.portals[bind.portal] = _Shape(self.statements.get(bind.statement))
        elif msg.type == messages.EXECUTE:
            portal = messages.decode_execute(msg.data).portal
            self.executes.append((self.portals.setdefault(portal, _Shape()), sync))
        else:
            target = messages.decode_target(msg.data)
            (self.statements if target.kind == "S" else self.portals).pop(target.name, None)

    def described(self, hits: tuple[_Hit, ...], sync: int) -> None:
        if self.describes and self.describes[0][1] == sync:
            self.describes.popleft()[0].hits = hits
        else:
            self.simple = hits

    def row_mask(self, sync: int) -> tuple[_Hit, ...]:
        if self.executes and self.executes[0][1] == sync:
            return self.executes[0][0].resolve()
        return self.simple

    def finished(self, sync: int) -> None:
        if self.executes and self.executes[0][1] == sync:
            self.executes.popleft()
        else:
            self.simple = ()

    def failed(self, sync: int) -> None:
        self.simple = ()
        self.describes = deque(d for d in self.describes if d[1] != sync)
        self.executes = deque(e for e in self.executes if e[1] != sync)

    def synced(self, sync: int) -> None:
        self.simple = ()
        while self.describes and self.describes[0][1] <= sync:
            self.describes.popleft()
        while self.executes and self.executes[0][1] <= sync:
            self.executes.popleft()


@dataclass(slots=True, kw_only=True)
class _Refusal:
    token: str
    error: bytes
    sync_id: int


class Session:
    """Client ⇄ proxy ⇄ server for one connection. Feed bytes; read outboxes."""

    def __init__(
        self,
        *,
        policy: Callable[[], policy_port.Policy],
        config: SessionConfig,
        client: ClientInfo,
        backend_key: tuple[int, int],
        nonce: str,
        audit_ok: Callable[[], bool] | None = None,
        over_capacity: bool = False,
    ) -> None:
        self._all_policy = policy
        self._scope: tuple[policy_port.Policy, policy_port.Policy] | None = None
        self._over_capacity = over_capacity
        self._clock = 0.0  # the latest time the shell passed in
        self._started = False  # session_start was audited: session_end must follow, once
        self._ended = False
        self._audit_ok = audit_ok
        self._config = config
        self._client_info = client
        self.lean = True
        """Take the shortcuts for the steady state (whole Query messages, plain responses);
        False runs every byte through the framers (the tests compare both)."""
        self._backend_key = backend_key
        self._nonce = nonce
        # Markers carry a per-session secret suffix: an error message a client provokes on purpose
        # can never be mistaken for a marker's, so no refusal is matched to the wrong error.
        self._marker_tag = "".join(c for c in nonce if c.isalnum()).lower()[:16]
        self._client = framing.Framer(side="frontend", startup=True, max_message_size=config.max_message_size)
        self._server = framing.Framer(side="backend", max_message_size=config.max_message_size)
        self.state = "startup"
        self.to_client = bytearray()
        self.to_server = bytearray()
        self.actions: list[Action] = []
        self.events: list[audit.Event] = []
        self.params: dict[str, str] = {}
        self.identity: model.Identity | None = None  # who a verified token says the client is
        self.txn_status = "I"
        self._context: object = None
        self._context_kind: type | None = None
        """The kind of policy ``_context`` was made by: another kind (the policy file arrived
        while every statement was refused) needs a context of its own."""
        self._search_path: tuple[str, ...] | None = None
        self._table_columns: dict[tuple[str, str], tuple[str, ...]] = {}
        self._inherits: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}
        self._ancestors: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {}
        self._functions: policy_port.FunctionNames | None = None
        """Function names outside pg_catalog and columns named like one, from the catalog (at login,
        and again whenever search_path is read back); None: not known (never read again)."""
        self._functions_epoch = 0
        """How often ``_functions`` changed after login (the lane forgets what it learned)."""
        self._writable_at_login = False
        """The server reported default_transaction_read_only off at login."""
        self._masking_views: dict[tuple[str, str], str] | None = None
        """A minted role: masked tables are read through these views (see ``upstream_ready``)."""
        self._view_parents: frozenset[tuple[str, str]] = frozenset()
        self._view_masks: dict[tuple[str, str], frozenset[str]] = {}
        self._db_user = config.upstream_user
        """The role this session's upstream connection logged in as (audited as ``db_user``)."""
        self._identity_fields: audit.Segment | None = None
        self._scram: auth.ScramServer | None = None
        self._binding: bytes | None = None
        self._skipping = False  # drop client messages until Sync (after a refused Parse)
        self._syncs_sent = 0
        self._syncs_done = 0
        self._refusals: deque[_Refusal] = deque()
        self._marker_count = 0
        self._units: deque[_Unit] = deque()
        self._pending: _Unit | None = None
        self._prepared: dict[str, _Statement] = {}
        """Allowed named (and the unnamed) prepared statements, for auditing each execution."""
        self._portal_statements: dict[str, str] = {}
        """Portal → the prepared statement bound to it."""
        self._batch_open = False
        """Extended-protocol messages went upstream since the last Sync."""
        self._silent = 0
        """Units ended by the proxy's own Sync still waiting for their ReadyForQuery."""
        self._statement_log: deque[tuple[int, str, _Statement | None, bool]] = deque()
        """(Sync, name, statement before, wrote before) per Parse or Close the server has not yet
        confirmed (``_log_statement_change``)."""
        self._touching_portals: set[str] = set()
        """Portals bound to a statement that may change search_path: their Execute does."""
        self._portal_bound: dict[str, _Statement] = {}
        """Portal → the statement it was bound to (a name may mean another statement by the
        time the portal runs)."""
        self._cursor_reads: dict[str, _Statement] = {}
        """SQL cursors read by protocol Execute, as the FETCH each Execute is audited as."""
        self._parsed_in_unit: dict[str, int] = {}
        """Statements parsed since the last Sync, and where the pending unit lists them."""
        self._rows = 0  # DataRows of the statement now streaming
        self._unit_rows = 0  # DataRows since the last ReadyForQuery
        self._over_limit = False
        self._row_limit: int | None = None
        self._abort_marker: str | None = None
        self._affected_limit: int | None = None
        self._masked_attrs: dict[tuple[int, int], str] = {}
        self._origins = _Origins()
        self._guard: _Guard | None = None
        self._write_statements: set[str] = set()  # prepared statements that write (extended guard)
        self._write_portals: set[str] = set()
        self._executes: deque[tuple[bool, int]] = deque()  # (guarded, sync) per Execute in flight
        self._fetches: deque[tuple[str, int]] = deque()
        """(portal, sync) per Execute in flight while maxRowsReturned applies."""
        self._portal_rows: dict[str, int] = {}
        """Rows a suspended portal already returned: an Execute with a row count (a driver's fetch
        size) continues one statement, held to the limit as a whole."""
        self._defer = False  # the Query being handled must wait until the session is idle
        self.lane: _lane.Lane | None = None
        """The compiled lane for the steady state (``enable_lane``); None: every byte comes here."""
        self._paused = False  # client input waits (a guarded write is in progress)
        self._resume = False
        self._path_pending = False
        """A statement that may change search_path (SET, RESET, DISCARD ALL, DDL; transaction
        end while ``_path_volatile``) went upstream: names cannot be judged until the server has
        answered it and the proxy has read the session's search_path back (``_probe``)."""
        self._path_batch_open = False
        """That statement is in the extended-protocol batch still open (no Sync yet)."""
        self._path_volatile = False
        """search_path changed inside the open transaction block: its end may undo the change."""
        self._probe: list[str] | None = None
        """Schemas read so far while the search_path probe is in flight."""
        self._probe_facts: list[tuple[str, str, str]] | None = None
        """Rows of ``login.FUNCTIONS_QUERY`` read so far by that probe (None: not asked)."""
        self._probe_results = 0

    @property
    def held_input(self) -> int:
        """What the client's input costs the session now, in bytes: what it read but has not
        handled (waiting behind a guarded write, or sent before the session is ready; a partial
        message of a session that reads on does not count), plus ~512 bytes of state for each
        statement sent upstream and not yet answered (a pipelined Sync is 5 bytes on the wire)."""
        held = self._client.buffered if self._paused or self.state != "ready" else 0
        return held + 512 * len(self._units)

    @property
    def idle(self) -> bool:
        """Nothing sent upstream is still waiting for its ReadyForQuery."""
        return (
            self._syncs_done == self._syncs_sent
            and self._pending is None
            and self._guard is None
            and not self._executes
            and self._probe is None
            and (self.lane is None or not self.lane.kind)
        )

    # --- the compiled lane (``_lane.pyx``) -------------------------------------------------

    def enable_lane(self, log: audit.AuditLog | None, counters: metrics.Metrics | None) -> _lane.Lane | None:
        """Give an established session the compiled lane, which audits into ``log`` and counts
        into ``counters`` exactly as the shell's recorder would; None when
        the lane is not built or the session takes no shortcuts (``lean`` off, redacted text)."""
        if _lane is None or not self.lean or self.state != "ready" or self._config.redact_literals:
            return None
        audited = self._config.audit
        self.lane = _lane.Lane(
            self,
            policy_call=self._policy,
            audit_ok=self._audit_ok,
            log=log if audited else None,
            counters=counters if audited else None,
            timestamp=audit.timestamp,
            session_id=str(self._client_info.session_id),
            identity=self._identity_segment().text,
            prepared=self._prepared,
            portals=self._portal_statements,
            max_message=self._config.max_message_size,
            buckets=metrics.BUCKETS,
            masked=self._masked_attrs,
            masked_plain=self._lane_masked_plain,
            masked_batch=self._lane_masked_batch,
        )
        self.arm_lane()
        return self.lane

    def arm_lane(self) -> None:
        """Arm the lane when the session is in the steady state it handles (the shell calls this
        after every byte the session itself read); disarm it otherwise."""
        lane = self.lane
        if lane is None:
            return
        origins = self._origins
        if not (
            (not self._masked_attrs or not (origins.describes or origins.executes or origins.simple))
            and self.state == "ready"
            and self.idle
            and not self._units  # (a server that sent a ReadyForQuery too many leaves units behind)
            and self._unit_rows == 0
            and self._rows == 0
            and not self._parsed_in_unit
            and not self._paused
            and not self._resume
            and not self._path_pending
            and not self._path_volatile
            and not self._statement_log
            and not self._skipping
            and not self._refusals
            and not self._over_limit
            and self._abort_marker is None
            and not self._portal_rows
            and not self._write_statements
            and not self._write_portals
            and not self._fetches
            and not self._client.buffered
            and not self._server.buffered
            and not self.to_client
            and not self.to_server
            and not self.actions
            and not self.events
        ):
            lane.arm(False)
            return
        policy = self._policy()
        shape_key = getattr(policy, "shape_key", None)
        ready = (
            shape_key is not None
            and type(policy) is self._context_kind
            and policy.mode == "enforce"
            # the limits the session's last decision set are the policy's (what the lane holds to)
            and self._row_limit == policy.max_rows_returned
            and self._affected_limit == getattr(policy, "max_rows_affected", None)
        )
        search_path = getattr(self._context, "search_path", None)
        if self._functions_epoch and search_path is not None:
            # (other function names: what the lane learnt under the old ones is forgotten too)
            search_path = (*search_path, f"\0functions {self._functions_epoch}")
        if ready:
            self._portal_bound.pop("", None)  # the lane binds the unnamed portal without telling
        lane.arm(ready, policy, search_path, shape_key, -1 if self._row_limit is None else self._row_limit)

    def adopt_lane(self) -> None:
        """Take over the lane's statement in flight (before reading any byte here): the session's
        state becomes exactly what reading the client's messages itself would have made it."""
        lane = self.lane
        if lane is None:
            return
        if not lane.kind:
            lane.drain()  # what it finished is audited before anything the session audits
            return
        messages_in_flight = lane.batch
        parsed = lane.kind == _LANE_PARSED
        started, sql, decision, statement = lane.take()
        batch = statement is not None  # Parse/Bind … Execute, Sync rather than a Query
        if parsed and statement is not None:  # its Parse, as ``_on_parse`` keeps it until confirmed
            self._log_statement_change("")
            self._prepared[""] = statement
            self._write_statements.discard("")
        if statement is None:  # a Query: allowed as sent, or a masked shape's rewrite sent
            statement = _Statement(
                sql=sql, decision=decision, verdict="mask" if decision.verdict == "mask" else "allow"
            )
        self._syncs_sent += 1
        if messages_in_flight is not None:  # masked columns: track the batch's origins as read
            for msg in _split(messages_in_flight):
                if msg.type == messages.PARSE:
                    self._origins.parsed(messages.decode_parse(msg.data).name)
                elif msg.type in _TRACKED_CLIENT:
                    self._origins.client(msg, self._syncs_sent)
        self._units.append(_Unit(started=started, statements=[statement]))
        if batch and (self._row_limit is not None or self._affected_limit is not None):
            if self._row_limit is not None:  # as _note_execution and _on_execute track an Execute
                self._fetches.append(("", self._syncs_sent))
            self._executes.append((False, self._syncs_sent))

    def _lane_masked_plain(self, name: str) -> bool:
        """Whether rows of prepared statement ``name`` need no masking (as far as a Describe of
        it showed), so the lane may run it in a session with masked columns."""
        shape = self._origins.statements.get(name)
        return shape is None or not shape.resolve()

    def _lane_masked_batch(self, parsed: bool, name: str, described: int, described_name: str | None) -> None:
        """The lane ran [Parse] + Bind + [Describe] + Execute + Sync (unnamed portal; ``name``
        the statement) and its answer showed no masked column: the column origins become what
        reading those messages and that answer would have made them."""
        origins = self._origins
        if parsed:
            origins.parsed("")
        origins.portals[""] = _Shape(origins.statements.get(name))
        if described and described_name is not None:
            table = origins.statements if described == ord("S") else origins.portals
            table.setdefault(described_name, _Shape()).hits = ()

    def _teach_lane_rewrite(self, sql: str, decision: policy_port.Decision) -> None:
        """A masked Query shape the lane may run next time, sending the policy's rewrite of each
        text upstream, when the policy's cache decides the shape (and this text) alike."""
        lane = self.lane
        assert lane is not None
        cached_rewrite = getattr(self._policy(), "cached_rewrite", None)
        found = None if cached_rewrite is None else cached_rewrite(sql, self._context)
        if found is None:
            return
        key, base, rewrite = found
        if base.statements is not decision.statements or rewrite(sql) != decision.rewritten:
            return  # not the decision the cache makes for this text
        segment = _decision_segment(base)
        classes = segment.fields.get("classes") or ("unknown",)
        entry = _lane.Entry(
            base,
            None,
            segment.text,
            (str(classes[0]), "mask"),
            len(segment.fields.get("masked_columns") or ()),
            rewrite,
        )
        lane.learn(key, entry, False, sql)

    def _teach_lane(self, sql: str, statement: _Statement, *, exact: bool) -> None:
        """An allowed statement the lane may take next time: its shape (``exact``: its text) when
        the policy's cache decides it, and its decision's audit fields for later executions."""
        lane = self.lane
        assert lane is not None
        decision = statement.decision
        entry = lane.known(decision)
        if entry is None:
            segment = _decision_segment(decision)
            classes = segment.fields.get("classes") or ("unknown",)
            entry = _lane.Entry(
                decision,
                statement if exact else None,
                segment.text,
                (str(classes[0]), "allow"),
                len(segment.fields.get("masked_columns") or ()),
            )
            lane.remember(entry)
        policy = self._policy()
        cached = getattr(policy, "cached_shape", None)
        shape = None if cached is None else cached(sql, self._context)
        if shape is not None and shape[1] is decision:
            if exact and entry.statement is not statement:
                entry = _lane.Entry(decision, statement, entry.segment, entry.metric, entry.masked)
            lane.learn(sql if exact else shape[0], entry, exact, sql)

    # --- entry points ---------------------------------------------------------------------

    def client_data(self, data: bytes, now: float) -> None:
        """Bytes arrived from the client."""
        self._clock = now
        if (
            self.lean
            and self.state == "ready"
            and data[:1] == b"Q"
            and not self._paused
            and not self._client.buffered
            and 5 <= len(data) <= self._config.max_message_size
            and int.from_bytes(data[1:5], signed=True) == len(data) - 1
        ):  # the common case, one whole Query: exactly what draining the framer would hand over
            try:
                self._on_ready(data, [framing.Message(data[0], data)], now)
            except ProtocolViolation as err:
                self._fatal(err.sqlstate, f"protocol violation: {err.what}")
            return
        self._client.feed(data)
        try:
            self._drain_client(now)
        except ProtocolViolation as err:
            self._fatal(err.sqlstate, f"protocol violation: {err.what}")

    def client_eof(self, now: float | None = None) -> None:
        """The client closed its side."""
        if now is not None:
            self._clock = now
        try:
            self._client.check_eof()
        except ProtocolViolation as err:
            self._close(f"client protocol violation: {err.what}")
            return
        self._close("client disconnected")

    def server_data(self, data: bytes, now: float) -> None:
        """Bytes arrived from the upstream server (after login)."""
        self._clock = now
        if (
            self.lean
            and not self._masked_attrs
            and self._guard is None
            and not self._executes
            and not self._fetches
            and not self._refusals
            and not self._over_limit
            and self._abort_marker is None
            and not self._paused
            and not self._resume
            and not self._path_pending
            and self._probe is None
            and not self._silent
            and not self._server.buffered
            and self._plain_response(data, now)
        ):
            return
        self._server.feed(data)
        try:
            chunk, msgs = self._server.drain()
            if msgs:
                self._on_server(chunk, msgs, now)
        except framing.MessageTooLarge as err:  # (the proxy would have to hold all of it)
            self._fatal("54000", f"dbgov: {err.what} (DBGOV_MAX_MESSAGE_SIZE); the session ends")
        except ProtocolViolation as err:
            self._fatal("08P01", f"upstream server broke the protocol: {err.what}")

    def client_tls_started(self, now: float, *, binding: bytes | None = None) -> None:
        """The shell finished the TLS handshake with the client; ``binding``: the channel-binding
        data of the proxy's certificate (``auth.tls_server_end_point``), which lets password
        logins use SCRAM-SHA-256-PLUS."""
        self._binding = binding
        self.state = "startup"
        self._drain_client(now)

    def upstream_ready(
        self,
        *,
        parameter_status: list[bytes],
        notices: list[bytes],
        now: float,
        masked_attrs: Mapping[tuple[int, int], str] | None = None,
        search_path: tuple[str, ...] | None = None,
        table_columns: policy_port.TableColumns | None = None,
        inherits: policy_port.Inherits | None = None,
        ancestors: policy_port.Ancestors | None = None,
        functions: policy_port.FunctionNames | None = None,
        db_user: str | None = None,
        views: Mapping[tuple[str, str], str] | None = None,
        view_parents: frozenset[tuple[str, str]] = frozenset(),
        view_masks: Mapping[tuple[str, str], frozenset[str]] | None = None,
    ) -> None:
        """Upstream login succeeded: finish the client's startup and start relaying.

        ``masked_attrs`` maps (table OID, attribute number) of every masked column to its name:
        a result column with that origin must never reach the client unmasked. ``search_path``
        is the session's effective search_path, which the policy resolves unqualified names with.
        ``table_columns``: the columns of the masked tables, which lets masking rewrites name
        them (and PostgreSQL use the tables' indexes). ``inherits``: the descendants of masked
        tables (partitions, inheritance children), which the policy masks as the tables they
        descend from; ``ancestors``: the ancestors of masked tables (partitioned roots,
        inheritance parents), whose reads include the masked tables' rows, with the masked
        columns they have by name. ``functions``: function names outside pg_catalog and columns
        named like one (``login.function_facts``), read again with search_path after DDL; None:
        not known. ``db_user``: the role the connection logged in as (minted
        credentials change at renewal; each session audits its own). ``views``: with minted
        credentials, (schema, table) → the operator's masking view of it the role may read;
        masked tables are then read through them (the role may not read masked columns);
        ``view_parents``: those tables that have children (ONLY of one cannot be read so);
        ``view_masks``: the columns each view masks (the policy's must all be among them).
        """
        reported = dict(messages.decode_parameter_status(raw) for raw in parameter_status)
        for name, expected in _READ_AS_JUDGED.items():
            if _unreadable(name, reported.get(name, "")):
                self._fatal(
                    "08004",
                    f'dbgov: the upstream server runs this session with {name} "{reported.get(name, "")}" '
                    f'although dbgov asked for "{expected}"; SQL would not be read as it is judged',
                )
                return
        # PostgreSQL 14+ reports it; unknown (older servers) counts as read-only: READ WRITE
        # stays refused rather than undo what a role's default may have set.
        self._writable_at_login = reported.get("default_transaction_read_only") == "off"
        self._masked_attrs = dict(masked_attrs or {})
        self._table_columns = dict(table_columns or {})
        self._inherits = dict(inherits or {})
        self._ancestors = dict(ancestors or {})
        self._functions = functions
        self._masking_views = None if views is None else dict(views)
        self._view_parents = view_parents
        self._view_masks = dict(view_masks or {})
        if db_user is not None:
            self._db_user = db_user
        pid, secret = self._backend_key
        self.to_client += messages.authentication(messages.AUTH_OK)
        for raw in parameter_status:
            self.to_client += raw
        for raw in notices:
            self.to_client += raw
        self.to_client += messages.backend_key_data(pid, secret)
        self.to_client += messages.ready_for_query("I")
        self.state = "ready"
        self._clock = now
        self._started = True
        # A fresh context: startup settings are already in effect in the probed search_path.
        self._search_path = search_path
        self._new_context(self._policy())
        self._event(now, {"type": "session_start"})
        self._drain_client(now)

    def upstream_failed(self, *, error: bytes | None, reason: str) -> None:
        """Upstream login failed: pass its ErrorResponse on (or our own) and close."""
        if error is not None:
            self.to_client += error
            self._close(reason)
        else:
            self._fatal("08006", f"could not connect to the upstream database: {reason}")

    def upstream_lost(self, now: float) -> None:
        """The upstream connection dropped while the session was relaying."""
        if self.state == "closed":
            return
        self._clock = now
        self._end("upstream lost")
        self._fatal("08006", "the upstream database closed the connection")

    def close(self, reason: str, now: float) -> None:
        """The shell closes the session (shutdown, internal error): audit how it ended."""
        self._clock = now
        self._close(reason)

    # --- client side ----------------------------------------------------------------------

    def _drain_client(self, now: float) -> None:
        while self.state in ("startup", "auth", "ready"):
            if self.state == "ready":
                if self._paused:
                    return
                chunk, msgs = self._client.drain()
                if msgs:
                    self._on_ready(chunk, msgs, now)
                return
            msg = self._client.next_message()
            if msg is None:
                return
            if self.state == "startup":
                self._on_startup(msg)
            else:
                self._on_auth(msg)

    def _on_startup(self, msg: framing.Message) -> None:
        packet = messages.decode_startup(msg.data)
        if isinstance(packet, messages.SSLRequest):
            if self._client.buffered:
                raise ProtocolViolation("client sent data after SSLRequest before the answer")
            if self._config.tls_available:
                self.to_client += b"S"
                self.state = "tls"
                self.actions.append(StartClientTLS())
            else:
                self.to_client += b"N"
        elif isinstance(packet, messages.GSSENCRequest):
            self.to_client += b"N"
        elif isinstance(packet, messages.CancelRequest):
            self.actions.append(ForwardCancel(pid=packet.pid, secret=packet.secret))
            self._close("cancel request")
        else:
            self._on_startup_message(packet)

    @property
    def client_address(self) -> str:
        """Where the client connects from."""
        return self._client_info.address

    def auth_timed_out(self, seconds: float) -> None:
        """The client did not finish startup and authentication in time (the shell's timer)."""
        if self.state in ("auth", "verifying", "connecting"):
            self._fatal("08006", f"dbgov: authentication timed out after {seconds:g} s")
        elif self.state != "closed":
            self._close("startup timed out")  # no startup packet yet: nothing it could read

    def _on_startup_message(self, packet: messages.StartupMessage) -> None:
        if self._over_capacity:
            self._fatal("53300", "sorry, too many clients already (dbgov max_connections)")
            return
        if self._config.workload is not None and self._config.workload() is None:
            self._fatal(
                "57P03",
                "dbgov: the sidecar has not verified its workload identity with the operator yet; "
                "retry shortly (the sidecar's log says why)",
            )
            return
        params = dict(packet.params)
        if packet.protocol != framing.PROTOCOL_3:
            # We speak 3.0; protocol extensions (_pq_.*) are not forwarded.
            params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
        problem = _forbidden_parameter(params)
        if problem is not None:
            self._fatal("08004", problem)
            return
        self.params = params
        if self._config.client_token:
            self.state = "auth"
            self.to_client += messages.authentication(messages.AUTH_CLEARTEXT)
            return
        if self._config.client_scram is not None:
            self.state = "auth"
            # As PostgreSQL: over TLS with a certificate to bind to, -PLUS first.
            offered = (
                [auth.SCRAM_SHA_256]
                if self._binding is None
                else [auth.SCRAM_SHA_256_PLUS, auth.SCRAM_SHA_256]
            )
            self.to_client += messages.authentication_sasl(offered)
            return
        self._connect()

    def _on_auth(self, msg: framing.Message) -> None:
        if self._config.client_token:
            self._on_token(msg)
            return
        keys = self._config.client_scram
        if msg.type != messages.PASSWORD or keys is None:
            raise ProtocolViolation(f"expected a password message, got {chr(msg.type)!r}")
        try:
            if self._scram is None:
                mechanism, first = messages.decode_sasl_initial_response(msg.data)
                if mechanism not in (auth.SCRAM_SHA_256, auth.SCRAM_SHA_256_PLUS):
                    raise AuthenticationFailed(f"unsupported SASL mechanism {mechanism!r}")
                self._scram = auth.ScramServer(keys=keys, nonce=self._nonce, binding=self._binding)
                server_first = self._scram.server_first(first, mechanism)
                self.to_client += messages.authentication(messages.AUTH_SASL_CONTINUE, server_first)
                return
            final = self._scram.server_final(messages.decode_password(msg.data))
        except AuthenticationFailed:
            user = self.params.get("user", "")
            self._fatal("28P01", f'password authentication failed for user "{user}"')
            return
        self.to_client += messages.authentication(messages.AUTH_SASL_FINAL, final)
        self._connect()

    def _on_token(self, msg: framing.Message) -> None:
        if msg.type != messages.PASSWORD:
            raise ProtocolViolation(f"expected a password message, got {chr(msg.type)!r}")
        self.state = "verifying"  # (client bytes wait in the framer until the answer)
        self.actions.append(VerifyToken(token=messages.decode_cleartext_password(msg.data)))

    def token_verified(self, identity: model.Identity, now: float) -> None:
        """The shell verified the client's token: this is who the session acts for."""
        if self.state != "verifying":
            return
        self._clock = now
        self.identity = identity
        self._connect()

    def token_refused(self, *, code: str, sqlstate: str, message: str, now: float) -> None:
        """The client's token does not authenticate: audit why (never the token) and refuse."""
        if self.state != "verifying":
            return
        self._clock = now
        user = self.params.get("user", "")
        self._event(now, {"type": "login_refused", "reason": code, "detail": message})
        self._fatal(sqlstate, f'token authentication failed for user "{user}": {message}')

    def _policy(self) -> policy_port.Policy:
        """The policy in force as it applies to this session's identity (rules scoped to other
        end users dropped), found again only when the policy is reloaded."""
        current = self._all_policy()
        scope = self._scope
        if scope is not None and scope[0] is current:
            return scope[1]
        scoped = policy_port.for_identity(current, self.identity)
        self._scope = (current, scoped)
        return scoped

    def _settings_refused(self) -> bool:
        """Every other startup parameter is a setting: the policy judges it as a SET would be."""
        policy = self._policy()
        if self._context_kind is not type(policy):
            self._new_context(policy)
        options = startup_options(self.params.get("options", ""))
        settings = [(k, v, f'"{k}"') for k, v in self.params.items() if k not in _PLAIN_PARAMS]
        for key, value, label in [*settings, *((k, v, f'"options" (-c {k})') for k, v in options)]:
            if not _SETTING_NAME.fullmatch(key):
                self._fatal("08004", f'invalid startup parameter name "{key}"')
                return True
            sql = f"SET {key} = {sql_literal(value)}"
            decision, verdict = self._decide(sql)
            if verdict not in ("allow", "mask"):
                rule = f'rule "{decision.rule}"' if decision.rule else "dbgov"
                self._fatal(
                    decision.sqlstate or SQLSTATE_POLICY,
                    f"dbgov: startup parameter {label} refused by {rule}: {decision.reason}",
                )
                return True
        return False

    def _connect(self) -> None:
        if self._settings_refused():
            return
        upstream = {k: v for k, v in self.params.items() if k not in ("user", "database", "options")}
        options = startup_options(self.params.get("options", ""))
        if options:  # (the server applies the packet's own parameters after these)
            upstream["options"] = _option_text(options)
        upstream.update(_READ_AS_JUDGED)
        database = self._config.upstream_database or self.params.get("database")
        if database:
            upstream["database"] = database
        self.state = "connecting"
        self.actions.append(ConnectUpstream(params=upstream))

    def _on_ready(self, chunk: bytes, msgs: list[framing.Message], now: float) -> None:
        out: list[bytes] | None = None  # None while every message is forwarded untouched
        terminate = False
        for index, msg in enumerate(msgs):
            mtype = msg.type
            if self._guard is not None and mtype not in _COPY_CLIENT:
                # Client input flows during a guarded write only as the rows of its COPY FROM
                # STDIN; anything after them waits for the write's count, as before the copy.
                self._paused = True
                self._client.unread(b"".join(m.data for m in msgs[index:]))
                self.to_server += b"".join(out if out is not None else [m.data for m in msgs[:index]])
                return
            if self._path_pending and not self._path_batch_open and mtype != messages.TERMINATE:
                # Whatever comes next waits until the server has answered and the probe has
                # read search_path back (nothing may interleave with the probe's messages).
                self._paused = True
                self._client.unread(b"".join(m.data for m in msgs[index:]))
                self.to_server += b"".join(out if out is not None else [m.data for m in msgs[:index]])
                return
            if mtype in _EXTENDED:
                self._batch_open = True
            if mtype == messages.QUERY and self._batch_open:
                # PostgreSQL runs a Query sent before the batch's Sync (asyncpg does: Parse,
                # Describe, Flush, then a COPY), or drops it unanswered if the batch failed
                # first; only the server would know which. A Sync of the proxy's own ends the
                # batch first (its ReadyForQuery is not passed on), so every Query is answered
                # and judged like any other, whether or not the batch failed or was refused.
                self._end_batch(now, silent=True)
                if out is None:
                    out = [m.data for m in msgs[:index]]
                out.append(messages.SYNC_MESSAGE)
                if self._path_pending:  # the batch may have changed search_path: wait for it
                    self._paused = True
                    self._client.unread(b"".join(m.data for m in msgs[index:]))
                    self.to_server += b"".join(out)
                    return
            held = self._path_pending and mtype in _NAMED_BY_PATH and not self._skipping
            if (
                not held
                and mtype == messages.EXECUTE
                and self._touching_portals
                and not self._skipping
                and messages.decode_execute(msg.data).portal in self._touching_portals
            ):
                self._path_pending = self._path_batch_open = True  # it runs now
            if held:  # (in the batch of the statement that may change search_path)
                replacement: bytes | None = self._refuse_path_unknown(msg, now)
            elif self._skipping and mtype not in (messages.SYNC, messages.TERMINATE):
                replacement = b""
            elif mtype == messages.QUERY:
                replacement = self._on_query(msg, now)
                if self._defer or self._guard is not None:
                    # A guarded write runs alone: hold back what the client sent after it.
                    self._paused = True
                    rest = msgs[index:] if self._defer else msgs[index + 1 :]
                    self._client.unread(b"".join(m.data for m in rest))
                    self._defer = False
                    if out is None:
                        out = [m.data for m in msgs[:index]]
                    if replacement is not None:
                        out.append(replacement)
                    self.to_server += b"".join(out)
                    return
            elif mtype == messages.PARSE:
                replacement = self._on_parse(msg, now)
            elif mtype == messages.SYNC:
                self._end_batch(now)
                replacement = None
            elif mtype == messages.EXECUTE and (refused := self._on_cursor_execute(msg, now)) is not None:
                replacement = refused
            elif (
                mtype == messages.EXECUTE
                and self._write_portals
                and (suspended := self._refuse_partial_write(msg, now)) is not None
            ):
                replacement = suspended
            elif mtype == messages.EXECUTE and (
                self._affected_limit is not None or self._row_limit is not None
            ):
                self._note_execution(msg, now)
                if self._masked_attrs:  # its rows are checked for masked origins like any other
                    self._origins.client(msg, self._syncs_sent + 1)
                replacement = self._on_execute(msg)
                if replacement is not None:  # a guarded write: the rest waits for its count
                    self._paused = True
                    self._client.unread(b"".join(m.data for m in msgs[index + 1 :]))
                    if out is None:
                        out = [m.data for m in msgs[:index]]
                    out.append(replacement)
                    self.to_server += b"".join(out)
                    return
            elif mtype == messages.BIND:
                bind = messages.decode_bind(msg.data)
                refused = self._on_bind(bind.statement, bind.portal, now)
                if refused is not None:
                    if out is None:
                        out = [m.data for m in msgs[:index]]
                    out.append(refused)
                    continue
                self._portal_statements[bind.portal] = bind.statement
                bound_statement = self._prepared.get(bind.statement)
                if bound_statement is None:
                    self._portal_bound.pop(bind.portal, None)
                else:
                    self._portal_bound[bind.portal] = bound_statement
                self._portal_rows.pop(bind.portal, None)
                if self._write_statements:
                    if bind.statement in self._write_statements:
                        self._write_portals.add(bind.portal)
                    else:
                        self._write_portals.discard(bind.portal)
                if self._masked_attrs:
                    self._origins.client(msg, self._syncs_sent + 1)
                replacement = None
            elif mtype in (messages.EXECUTE, messages.CLOSE):
                self._track_portals(msg, now)
                if self._masked_attrs:
                    self._origins.client(msg, self._syncs_sent + 1)
                replacement = None
            elif mtype == messages.FUNCTION_CALL:
                replacement = self._refuse_function_call(now)
            elif mtype == messages.TERMINATE:
                terminate = True
                replacement = None
            elif mtype == messages.PASSWORD:
                raise ProtocolViolation("unexpected password message after authentication")
            else:
                replacement = None
                if self._masked_attrs and mtype in _TRACKED_CLIENT:
                    self._origins.client(msg, self._syncs_sent + 1)
            if replacement is not None and out is None:
                out = [m.data for m in msgs[:index]]
            if out is not None:
                out.append(msg.data if replacement is None else replacement)
            if terminate:
                if out is None:
                    out = [m.data for m in msgs[: index + 1]]
                break
        self.to_server += chunk if out is None else b"".join(out)
        if terminate:
            self._close("client terminated")

    def _end_batch(self, now: float, *, silent: bool = False) -> None:
        """A Sync goes upstream: the batch's statements are answered by its ReadyForQuery
        (``silent``: the proxy's own Sync, whose ReadyForQuery the client does not get)."""
        self._skipping = False
        self._path_batch_open = self._batch_open = False
        self._syncs_sent += 1
        unit = self._pending or _Unit(started=now, statements=[])
        unit.silent = silent
        self._silent += silent
        self._units.append(unit)
        self._pending = None
        self._parsed_in_unit.clear()

    def _on_query(self, msg: framing.Message, now: float) -> bytes | None:
        if self._portal_rows:
            self._portal_rows.pop("", None)  # a simple query replaces the unnamed portal
        sql = messages.decode_query(msg.data)
        decision, verdict = self._decide(sql)
        if verdict in ("allow", "mask") and self._path_changes_midway(decision):
            decision, verdict = _PATH_NOT_LAST, "block"
        if (
            verdict in ("allow", "mask")
            and self._guard_limit(decision) is not None
            and _ends_transactions(decision)
        ):
            decision, verdict = _GUARD_WITH_TCL, "block"
        statement = _Statement(sql=sql, decision=decision, verdict=verdict, path=self._current_path())
        if verdict in ("allow", "mask"):
            limit = self._guard_limit(decision)
            if limit is not None and not self.idle:
                self._defer = True
                return None
            self._syncs_sent += 1
            self._units.append(_Unit(started=now, statements=[statement]))
            self._forget_statement_names(decision)
            if self._touches_path(decision):
                self._path_pending = True
                self._path_batch_open = False
            if self.lane is not None and limit is None:
                if verdict == "allow" and self._unguarded(decision):
                    self._teach_lane(sql, statement, exact=False)
                elif verdict == "mask" and decision.rewritten is not None and self._never_guarded(decision):
                    self._teach_lane_rewrite(sql, decision)
            text = decision.rewritten if verdict == "mask" and decision.rewritten is not None else None
            if limit is not None:
                return self._start_guard(limit, messages.query(text) if text is not None else msg.data)
            return None if text is None else messages.query(text)
        self._syncs_sent += 1
        self._units.append(_Unit(started=now, statements=[]))
        token = self._refuse(statement, now)
        return messages.query(token)

    def _on_parse(self, msg: framing.Message, now: float) -> bytes | None:
        parse = messages.decode_parse(msg.data)
        if self._masked_attrs:
            self._origins.parsed(parse.name)
        decision, verdict = self._decide(parse.query)
        statement = _Statement(sql=parse.query, decision=decision, verdict=verdict, path=self._current_path())
        self._log_statement_change(parse.name)
        if verdict in ("allow", "mask"):
            self._forget_statement_names(decision)
            if self._pending is None:
                self._pending = _Unit(started=now, statements=[])
            self._pending.statements.append(statement)
            self._prepared[parse.name] = statement
            self._parsed_in_unit[parse.name] = len(self._pending.statements) - 1
            if self._guard_limit(decision) is not None:
                self._write_statements.add(parse.name)
            else:
                self._write_statements.discard(parse.name)
                if self.lane is not None and verdict == "allow" and self._unguarded(decision):
                    self._teach_lane(parse.query, statement, exact=True)
            if verdict == "mask" and decision.rewritten is not None:
                return messages.parse(parse.name, decision.rewritten, parse.param_types)
            return None
        if not parse.name:  # PostgreSQL drops the unnamed statement before parsing; a named one stays
            self._prepared.pop(parse.name, None)
        token = self._refuse(statement, now, sync_id=self._syncs_sent + 1)
        self._skipping = True
        return messages.parse(parse.name, token, ())

    def _log_statement_change(self, name: str) -> None:
        """A Parse or Close of statement ``name`` goes upstream: its effect on what the proxy knows
        is kept only once the server confirms it (ParseComplete, CloseComplete). After an error
        the server skips the rest of the batch, and what it skipped is undone here too."""
        self._statement_log.append(
            (self._syncs_sent + 1, name, self._prepared.get(name), name in self._write_statements)
        )

    def _on_statement_log(self, mtype: int) -> None:
        log = self._statement_log
        current = self._syncs_done + 1
        if mtype in (messages.PARSE_COMPLETE, messages.CLOSE_COMPLETE):
            if log[0][0] == current:
                log.popleft()
            return
        if mtype == messages.ERROR_RESPONSE:
            while log and log[-1][0] == current:
                _, name, before, wrote = log.pop()
                if before is None:
                    self._prepared.pop(name, None)
                else:
                    self._prepared[name] = before
                if wrote:
                    self._write_statements.add(name)
                else:
                    self._write_statements.discard(name)
            return
        while log and log[0][0] <= current:  # ReadyForQuery: whatever is left was answered
            log.popleft()

    def _track_portals(self, msg: framing.Message, now: float) -> None:
        if msg.type == messages.EXECUTE:
            self._note_execution(msg, now)
            return
        target = messages.decode_target(msg.data)
        if target.kind == "S":
            self._log_statement_change(target.name)
            self._prepared.pop(target.name, None)
        else:
            self._portal_statements.pop(target.name, None)
            self._portal_bound.pop(target.name, None)
            self._portal_rows.pop(target.name, None)

    def _note_execution(self, msg: framing.Message, now: float) -> None:
        """An Execute of a statement prepared in an earlier batch is audited as a statement too."""
        portal = messages.decode_execute(msg.data).portal
        if self._row_limit is not None:
            self._fetches.append((portal, self._syncs_sent + 1))
        name = self._portal_statements.get(portal)
        if self._pending is None:
            self._pending = _Unit(started=now, statements=[])
        pending = self._pending
        bound = self._portal_bound.get(portal)  # what the portal runs, whatever the name means now
        index = None if name is None else self._parsed_in_unit.get(name)
        if index is not None and bound is not None and pending.statements[index] is not bound:
            index = None
        if index is None:  # prepared in an earlier batch, or an SQL cursor
            statement = bound
            if statement is None:
                statement = self._prepared.get(name) if name is not None else self._cursor_reads.get(portal)
            if statement is not None:
                pending.statements.append(statement)
                index = len(pending.statements) - 1
        pending.executions.append(index)

    def _refuse_function_call(self, now: float) -> bytes:
        decision = policy_port.SimpleDecision(
            verdict="block",
            rule="function-call-message",
            reason="the FunctionCall protocol message is not allowed through dbgov",
            hint="Call the function with a SELECT statement instead.",
            sqlstate=SQLSTATE_POLICY,
        )
        self._syncs_sent += 1
        self._units.append(_Unit(started=now, statements=[]))
        statement = _Statement(sql="<FunctionCall message>", decision=decision, verdict="block")
        return messages.query(self._refuse(statement, now))

    def _forget_statement_names(self, decision: policy_port.Decision) -> None:
        """SQL PREPARE, DEALLOCATE and DISCARD ALL work on the namespace protocol statements live
        in: a name they define or drop no longer means the statement a Parse judged (a Bind of
        it is judged as the EXECUTE it has become; one the server dropped fails there)."""
        for info in decision.statements:
            names = getattr(info, "statement_names", ())
            if "*" in names:  # (DISCARD ALL, DEALLOCATE ALL)
                self._prepared.clear()
                self._write_statements.clear()
                return
            for name in names:
                self._prepared.pop(name, None)
                self._write_statements.discard(name)

    def _current_path(self) -> tuple[str, ...] | None:
        path = getattr(self._context, "search_path", None)
        return tuple(path) if path is not None else None

    def _touches_path(self, decision: policy_port.Decision) -> bool:
        """The statement may change how names resolve: search_path itself (SET, RESET, RESET
        ALL, DISCARD ALL, set_config), schemas existing or not (DDL), or, in a transaction block
        that changed search_path, the block's end (which may undo that change)."""
        volatile = self._path_volatile
        return any(_changes_path(info, volatile=volatile, schemas=True) for info in decision.statements)

    def _path_changes_midway(self, decision: policy_port.Decision) -> bool:
        """A statement that may change search_path comes before another in one query string
        (DDL may too, but what follows it is judged against the same schemas either way)."""
        top = [info for info in decision.statements if not getattr(info, "nested", False)]
        volatile = self._path_volatile
        return any(_changes_path(info, volatile=volatile, schemas=False) for info in top[:-1])

    def _portal_text(self, portal: str) -> str:
        """The text of the statement a portal runs, for the audit of a refusal."""
        known = self._portal_bound.get(portal) or self._prepared.get(
            self._portal_statements.get(portal, "\0")
        )
        return known.sql if known is not None else f"<Execute of portal {portal!r}>"

    def _refuse_path_unknown(self, msg: framing.Message, now: float) -> bytes:
        """Refuse a Query, Parse, Bind or Execute sent in the batch of a statement that may change
        search_path, before the server has answered it: the server fails the marker and skips
        to Sync, as for any refusal."""
        if msg.type == messages.QUERY:
            sql = messages.decode_query(msg.data)
        elif msg.type == messages.PARSE:
            sql = messages.decode_parse(msg.data).query
        elif msg.type == messages.BIND:
            name = messages.decode_bind(msg.data).statement
            known = self._prepared.get(name)
            sql = known.sql if known is not None else f"<Bind of prepared statement {name!r}>"
        else:
            sql = self._portal_text(messages.decode_execute(msg.data).portal)
        statement = _Statement(sql=sql, decision=_PATH_UNKNOWN, verdict="block")
        if msg.type == messages.QUERY:
            self._syncs_sent += 1
            self._units.append(_Unit(started=now, statements=[]))
            return messages.query(self._refuse(statement, now))
        return self._refuse_in_batch(statement, now)

    def _refuse_partial_write(self, msg: framing.Message, now: float) -> bytes | None:
        """A write held to a row limit, executed with a row count: PostgreSQL runs the whole write
        at the first Execute and suspends only the RETURNING rows, so its count would come after
        the client's Sync has committed it. Refused before it runs."""
        execute = messages.decode_execute(msg.data)
        if not execute.max_rows or execute.portal not in self._write_portals:
            return None
        statement = _Statement(
            sql=self._portal_text(execute.portal), decision=_PARTIAL_WRITE, verdict="block"
        )
        return self._refuse_in_batch(statement, now)

    def _refuse_in_batch(self, statement: _Statement, now: float) -> bytes:
        """Refuse an extended-protocol message in place: a Parse of the marker (a statement name
        of the proxy's, so the client's unnamed statement stays) fails, and the server skips to
        the batch's Sync, as the proxy does."""
        token = self._refuse(statement, now, sync_id=self._syncs_sent + 1)
        self._skipping = True
        return messages.parse("dbgov_refused", token, ())

    def _on_cursor_execute(self, msg: framing.Message, now: float) -> bytes | None:
        """An Execute of a portal no Bind made reads an SQL cursor (DECLAREd portals share the
        protocol's namespace): judged as the FETCH it is and audited as one; refused (the marker
        makes the server skip to Sync) when the policy refuses that FETCH."""
        portal = messages.decode_execute(msg.data).portal
        if not portal or portal in self._portal_statements:
            return None
        sql = f"FETCH FORWARD ALL FROM {_quote_ident(portal)}"
        decision, verdict = self._decide(sql)
        statement = _Statement(sql=sql, decision=decision, verdict=verdict)
        if verdict in ("allow", "mask"):
            self._cursor_reads[portal] = statement
            return None
        return self._refuse_in_batch(statement, now)

    def _on_bind(self, name: str, portal: str, now: float) -> bytes | None:
        """A Bind runs a prepared statement as PostgreSQL resolves it now: one judged under
        another search_path is judged again (refused when that changes what it reads or how it
        is masked). One that may change search_path makes names unknown until the server says."""
        statement = self._prepared.get(name)
        if statement is None or statement.sql_prepared:
            if not name:
                return None  # no unnamed statement: the server fails the Bind itself
            # Not prepared by a Parse: a statement PREPAREd in SQL (they share one namespace),
            # or one whose Close the server skipped. Judged as the EXECUTE it is, as a write.
            sql = f"EXECUTE {_quote_ident(name)}"
            decision, verdict = self._decide(sql)
            if verdict not in ("allow", "mask"):
                return self._refuse_in_batch(_Statement(sql=sql, decision=decision, verdict=verdict), now)
            self._prepared[name] = _Statement(sql=sql, decision=decision, verdict=verdict, sql_prepared=True)
            if self._guard_limit(decision) is not None:
                self._write_statements.add(name)
            self._touching_portals.discard(portal)
            return None
        path = self._current_path()
        if statement.path != path and statement.verdict in ("allow", "mask"):
            decision, verdict = self._decide(statement.sql)
            same = verdict == statement.verdict and decision.rewritten == statement.decision.rewritten
            if not same:
                refused = _Statement(sql=statement.sql, decision=_PATH_REPREPARE, verdict="block")
                return self._refuse_in_batch(refused, now)
            statement.decision, statement.path = decision, path
            if self.lane is not None and verdict == "allow" and self._unguarded(decision):
                self._teach_lane(statement.sql, statement, exact=True)
        if self._touches_path(statement.decision):
            self._touching_portals.add(portal)
        else:
            self._touching_portals.discard(portal)
        return None

    def _probe_path(self) -> None:
        """Ask the server, once it has answered everything, which schemas names now resolve in."""
        if self.txn_status == "E":
            # Nothing but the block's end runs in a failed block; that end is probed again.
            self._path_pending = False
            self._path_volatile = True
            return
        self._probe = []
        self._probe_facts = [] if self._functions is not None else None
        self._probe_results = 0
        self.to_server += _probe(
            f"dbgov_search_path_{self._marker_tag}", functions=self._probe_facts is not None
        )

    def _on_probe(self, msgs: list[framing.Message], now: float) -> None:
        probe = self._probe
        assert probe is not None
        for msg in msgs:
            mtype = msg.type
            if mtype == messages.DATA_ROW:
                row = messages.decode_data_row(msg.data)
                if len(row) == 1 and row[0] is not None:
                    probe.append(row[0].decode())
                elif len(row) == 3 and self._probe_facts is not None and None not in row:
                    self._probe_facts.append(tuple(v.decode() for v in row))  # type: ignore[arg-type, union-attr]
            elif mtype == messages.COMMAND_COMPLETE:
                self._probe_results += 1
            elif mtype == messages.READY_FOR_QUERY:
                status = messages.decode_ready_for_query(msg.data)
                self._probe = None
                self._path_pending = False
                self._path_volatile = status != "I"
                self.txn_status = status
                self._learn_path(tuple(probe))
                if self._probe_facts is not None and not self._learn_functions(self._probe_facts):
                    return
            elif mtype == messages.ERROR_RESPONSE:
                fields = messages.decode_fields(msg.data)
                self._fatal(
                    "08P01",
                    "dbgov: could not read the session's search_path back from the server after a "
                    f"statement that may have changed it ({fields.get('C')}: {fields.get('M')}); "
                    "the session was closed",
                )
                return
            elif mtype in _ASYNC_SERVER:
                if mtype == messages.PARAMETER_STATUS and self._on_parameter_status(msg):
                    return
                self.to_client += msg.data
            elif mtype not in _PROBE_REPLIES:
                raise ProtocolViolation(f"unexpected server message {chr(mtype)!r} reading search_path")

    def _learn_functions(self, rows: list[tuple[str, str, str]]) -> bool:
        """The function names the server's catalog has now (read back with search_path): later
        statements are judged by them. False (the session ended) when they could not be read."""
        self._probe_facts = None
        try:
            if self._probe_results < 2:
                raise login.TooManyFunctions("the server did not answer the function names query")
            facts = login.function_facts(rows)
        except login.TooManyFunctions as err:
            self._fatal("08P01", f"dbgov: could not read the database's function names again: {err}")
            return False
        if facts != self._functions:
            self._functions = facts
            self._functions_epoch += 1
            policy_port.learn_functions(self._context, facts)
        return True

    def _learn_path(self, path: tuple[str, ...]) -> None:
        """The server's search_path: later statements are judged in it; statements prepared under
        another are judged again when they run (``_on_bind``)."""
        context = self._context
        changed = path != self._search_path
        self._search_path = path
        if context is None or not hasattr(context, "search_path"):
            return
        context.search_path = path  # (the engine's own guess, made when it judged the SET, is dropped)
        names = getattr(context, "names", None)
        if changed and names is not None:
            # SQL PREPAREd statements are re-resolved by the server too: EXECUTE of one prepared
            # under the old path is refused as unknown (PREPARE it again).
            names.prepared.clear()

    def _decide(self, sql: str) -> tuple[policy_port.Decision, str]:
        if self._audit_ok is not None and not self._audit_ok():
            return _AUDIT_DOWN, "block"
        policy = self._policy()
        if type(policy) is not self._context_kind:
            self._new_context(policy)
        if policy.mode == "dry-run":  # forward everything; limits are the policy's to report
            self._row_limit = self._affected_limit = None
        else:
            self._row_limit = policy.max_rows_returned
            self._affected_limit = getattr(policy, "max_rows_affected", None)
        known_path = getattr(self._context, "search_path", None)
        try:
            decision = policy.decide(sql, self._context)
        except Exception as err:  # fail closed: an engine failure refuses the statement
            decision = policy_port.SimpleDecision(
                verdict="block",
                rule=None,
                reason=f"the policy engine failed on this statement ({type(err).__name__})",
                hint="This is a dbgov bug; the statement was not run.",
                sqlstate=SQLSTATE_POLICY,
            )
            return decision, "block"
        finally:
            if known_path is not None and getattr(self._context, "search_path", None) != known_path:
                # The engine's guess of what a SET it judged will do is not what the server did:
                # the path changes only when the server is asked (``_learn_path``).
                self._context.search_path = known_path  # type: ignore[attr-defined]
        verdict = decision.verdict
        if policy.mode == "dry-run" and verdict != "allow":
            return decision, "allow"
        return decision, verdict

    def _new_context(self, policy: policy_port.Policy) -> None:
        """A fresh context for ``policy``: at login, or when a policy of another kind takes over
        (a reload of the same kind keeps the context, and with it the session's names)."""
        tree: dict[str, Any] = {}  # (only when known: policies written before trees were known still fit)
        if self._inherits:
            tree["inherits"] = self._inherits
        if self._ancestors:
            tree["ancestors"] = self._ancestors
        if self._writable_at_login:
            tree["writable_at_login"] = True
        if self._functions is not None:
            tree["functions"] = self._functions
        self._context = policy.new_context(search_path=self._search_path, columns=self._table_columns, **tree)
        self._context_kind = type(policy)
        use_views = getattr(self._context, "use_views", None)
        if self._masking_views is not None and use_views is not None:
            use_views(self._masking_views, parents=self._view_parents, masked=self._view_masks)

    def _refuse(self, statement: _Statement, now: float, *, sync_id: int | None = None) -> str:
        """Audit the refusal, queue its error, and return the marker to send upstream.

        ``sync_id`` is the ReadyForQuery the marker's error comes before: the Query itself
        (already counted) or, for a Parse, the Sync still to come.
        """
        decision = statement.decision
        self._marker_count += 1
        token = f"dbgov_refused_{self._marker_count}_{self._marker_tag}"
        error = refusal_error(decision)
        if sync_id is None:
            sync_id = self._syncs_sent
        self._refusals.append(_Refusal(token=token, error=error, sync_id=sync_id))
        if self._config.audit:
            self.events.append(
                self._statement_event(
                    statement,
                    now=now,
                    duration=0.0,
                    rows=0,
                    tags=None,
                    sqlstate=decision.sqlstate or SQLSTATE_POLICY,
                )
            )
        return token

    # --- server side ----------------------------------------------------------------------

    def _on_server(self, chunk: bytes, msgs: list[framing.Message], now: float) -> None:
        if self._probe is not None:
            self._on_probe(msgs, now)
            self._after_server(now)
            return
        if any(m.type == messages.ERROR_RESPONSE for m in msgs):
            msgs = [self._withhold_row_values(m) for m in msgs]
            chunk = b"".join(m.data for m in msgs)
        out: list[bytes] | None = None
        for index, msg in enumerate(msgs):
            mtype = msg.type
            replacement: bytes | None = None
            if self._statement_log and mtype in _CONFIRMS:
                self._on_statement_log(mtype)
            if mtype == messages.COPY_IN_RESPONSE and self._paused:
                replacement = self._on_held_copy_in()
                if replacement is not None:
                    if out is None:
                        out = [m.data for m in msgs[:index]]
                    out.append(replacement)
                    continue
            if mtype == messages.PARAMETER_STATUS and self._on_parameter_status(msg):
                return
            if self._masked_attrs and mtype in _TRACKED_SERVER:
                replacement = self._check_origins(msg, now)
            if self._fetches and mtype in _EXECUTE_DONE and self._fetches[0][1] == self._syncs_done + 1:
                self._fetch_done(mtype)
            if self._executes and mtype in _EXECUTE_DONE and self._guard is None:
                replacement = self._on_execute_done(msg)
                if replacement is not None:
                    if out is None:
                        out = [m.data for m in msgs[:index]]
                    out.append(replacement)
                    continue
            if self._guard is not None:
                masked_row = replacement  # a row masked above: counted and held like the rest
                replacement = self._on_guarded(
                    msg if masked_row is None else framing.Message(mtype, masked_row), now
                )
                if replacement is None:
                    replacement = masked_row
            elif mtype in (messages.DATA_ROW, messages.COPY_DATA):
                # A server's CopyData is a row of COPY ... TO STDOUT: held to the same limit.
                dropped = self._on_data_row()
                replacement = dropped if dropped is not None else replacement
            elif mtype == messages.READY_FOR_QUERY:
                replacement = self._on_ready_for_query(msg, now)
            elif mtype == messages.COMMAND_COMPLETE:
                replacement = self._on_command_complete(msg)
            elif mtype == messages.ERROR_RESPONSE:
                replacement = self._on_error(msg)
            elif mtype in (messages.PORTAL_SUSPENDED, messages.EMPTY_QUERY):
                replacement = self._on_statement_end(msg)
            elif self._over_limit and mtype not in _ASYNC_SERVER:
                replacement = b""
            if replacement is not None and out is None:
                out = [m.data for m in msgs[:index]]
            if out is not None:
                out.append(msg.data if replacement is None else replacement)
        self.to_client += chunk if out is None else b"".join(out)
        self._after_server(now)

    def _after_server(self, now: float) -> None:
        """Once the server has answered everything: read search_path back if a statement may
        have changed it, then let held client input go on."""
        if self.state != "ready":
            return
        if self._path_pending and self._probe is None and self.idle and not self._batch_open:
            self._probe_path()
        if self._probe is not None:
            return
        if self._resume or (self._paused and self.idle):
            self._resume = False
            self._paused = False
            self._drain_client(now)

    def _withhold_row_values(self, msg: framing.Message) -> framing.Message:
        """An integrity error's DETAIL quotes row values ("Failing row contains (…)", "Key
        (email)=(…) already exists", an exclusion constraint's conflicting key), read from the
        table itself, past every masking rewrite: under a policy that masks, it is withheld, as
        PostgreSQL withholds it from a role that may not read every column."""
        data = msg.data
        if msg.type != messages.ERROR_RESPONSE or b"C23" not in data:
            return msg
        if not getattr(self._policy(), "mask_targets", ()):
            return msg
        if not messages.decode_fields(data).get("C", "").startswith("23"):
            return msg
        withheld = "dbgov: the detail is withheld because it may show values of masked columns"
        return framing.Message(msg.type, messages.replace_field(data, "D", withheld))

    def _on_parameter_status(self, msg: framing.Message) -> bool:
        """A setting the server reports changed. True when the session had to end: the server
        would now read the client's SQL otherwise than dbgov judges it (the policy refuses such
        changes; this holds whatever path the change took)."""
        name, value = messages.decode_parameter_status(msg.data)
        if not _unreadable(name, value):
            return False
        self._event(self._clock, {"type": "warning", "warning": f"server reported {name} {value}"})
        self._fatal(
            "08P01",
            f'dbgov: the server now reads this session\'s SQL with {name} "{value}", which dbgov '
            "cannot judge it by; the session was closed",
        )
        return True

    def _plain_response(self, data: bytes, now: float) -> bool:
        """Handle whole messages that need nothing but counting (the steady state); False, having
        changed nothing, when ``data`` holds anything else (the general path then reads it).

        The same as ``_on_server`` for these messages, read in one pass: rows, command tags and
        ReadyForQuery, with the framer's checks on lengths and types.
        """
        size = len(data)
        pos = 0
        rows = self._rows
        limit = self._row_limit
        marks: list[tuple[int, int, str]] = []  # (type, DataRows before it, tag or status)
        count = 0
        while pos < size:
            if size - pos < 5:
                return False
            mtype = data[pos]
            length = int.from_bytes(data[pos + 1 : pos + 5], signed=True)
            end = pos + 1 + length
            if length < 4 or end > size:
                return False
            if mtype == 68:  # DataRow
                rows += 1
                count += 1
                if limit is not None and rows > limit:
                    return False
            elif mtype == 67:  # CommandComplete
                if data.find(b"\0", pos + 5) != end - 1:
                    return False
                try:
                    tag = data[pos + 5 : end - 1].decode()
                except UnicodeDecodeError:
                    return False
                marks.append((67, count, tag))
                rows = 0
            elif mtype == 90:  # ReadyForQuery
                if length != 5 or data[pos + 5] not in b"ITE":
                    return False
                marks.append((90, count, chr(data[pos + 5])))
                rows = 0
            elif mtype not in _PLAIN_SERVER or _PLAIN_SERVER[mtype] not in (0, length):
                return False
            pos = end
        done = 0
        for mtype, before, text in marks:
            self._unit_rows += before - done
            done = before
            self._rows = 0
            if mtype == 67:
                unit = self._current_unit()
                if unit is not None and self._config.audit:
                    if unit.tags is None:
                        unit.tags = []
                    unit.tags.append(text)
                    unit.ends.append((self._unit_rows, text))
                continue
            if self._statement_log:  # (a plain answer holds no error: every Parse and Close held)
                self._on_statement_log(messages.READY_FOR_QUERY)
            self._syncs_done += 1
            if self._units:
                unit = self._units.popleft()
                unit.rows = self._unit_rows
                self._finish_unit(unit, now)
            self._unit_rows = 0
            self.txn_status = text
        self._unit_rows += count - done
        self._rows = rows
        self.to_client += data
        return True

    def _on_held_copy_in(self) -> bytes | None:
        """The server waits for COPY FROM STDIN rows while client input is held for maxRowsAffected.

        A simple-protocol write (BEGIN or a savepoint around it) lets the rows flow and counts the
        COPY's tag as usual. In the extended protocol the client's Sync would flow with them, and
        its implicit transaction commit before the count is known: the copy is failed instead,
        with a reason, and the client sees the server's error (fail closed, never a hang).
        """
        if self._guard is not None:
            self._resume = True
            return None
        if self._executes and self._executes[0][0]:
            self.to_server += messages.copy_fail(
                "dbgov: COPY FROM STDIN through the extended protocol cannot be held to "
                "maxRowsAffected; send it as a simple query"
            )
            return b""  # the client never enters copy mode; the server's error answers it
        return None

    def _current_unit(self) -> _Unit | None:
        return self._units[0] if self._units else self._pending

    def _on_data_row(self) -> bytes | None:
        self._rows += 1
        self._unit_rows += 1
        limit = self._row_limit
        if self._over_limit or (limit is not None and self._rows + self._fetched_before() > limit):
            self._over_limit = True
            return b""
        return None

    def _fetched_before(self) -> int:
        """Rows the portal now streaming returned in earlier Executes (0 for a fresh one)."""
        if self._fetches and self._portal_rows and self._fetches[0][1] == self._syncs_done + 1:
            return self._portal_rows.get(self._fetches[0][0], 0)
        return 0

    def _fetch_done(self, mtype: int) -> None:
        """The front Execute ended: remember a suspended portal's rows, forget a finished one."""
        portal, sync = self._fetches.popleft()
        if mtype == messages.PORTAL_SUSPENDED:
            self._portal_rows[portal] = self._portal_rows.get(portal, 0) + self._rows
            return
        self._portal_rows.pop(portal, None)
        if mtype == messages.ERROR_RESPONSE:  # the server skips the rest of this batch
            self._fetches = deque(f for f in self._fetches if f[1] != sync)

    def _on_statement_end(self, msg: framing.Message) -> bytes | None:
        self._rows = 0
        unit = self._current_unit()
        if unit is not None and self._config.audit:
            unit.ends.append((self._unit_rows, None))
        if self._over_limit:
            # A suspended portal over the limit: the client gets the error, not more rows later.
            return self._limit_error() if msg.type == messages.PORTAL_SUSPENDED else b""
        return None

    def _limit_error(self, *, mark_unit: bool = True) -> bytes:
        unit = self._current_unit() if mark_unit else None
        if unit is not None:
            unit.sqlstate = SQLSTATE_LIMIT
        return messages.error_response(
            code=SQLSTATE_LIMIT,
            message=f"dbgov: the result has more than {self._row_limit} rows (maxRowsReturned)",
            hint="Add a WHERE clause or LIMIT, or ask for a higher maxRowsReturned.",
        )

    def _on_command_complete(self, msg: framing.Message) -> bytes | None:
        self._rows = 0
        if self._over_limit:
            return self._limit_error()
        unit = self._current_unit()
        if unit is not None and self._config.audit:
            if unit.tags is None:
                unit.tags = []
            tag = messages.decode_command_complete(msg.data)
            unit.tags.append(tag)
            unit.ends.append((self._unit_rows, tag))
        return None

    def _on_error(self, msg: framing.Message) -> bytes | None:
        self._rows = 0
        if self._abort_marker is not None:
            return b""  # the error we provoked to abort the transaction
        if self._over_limit:
            return b""
        unit = self._current_unit()
        if self._refusals and self._refusals[0].sync_id == self._syncs_done + 1:
            fields = messages.decode_fields(msg.data)
            if self._refusals[0].token in fields.get("M", ""):
                # (a marker answers no Execute of the unit: the refused statement is audited alone)
                refusal = self._refusals.popleft()
                if unit is not None and refusal.error:
                    unit.sqlstate = messages.decode_fields(refusal.error).get("C")
                return refusal.error
        if unit is not None and self._config.audit:
            unit.ends.append((self._unit_rows, None))  # nothing more runs until Sync
        if unit is not None and unit.sqlstate is None:
            unit.sqlstate = messages.decode_fields(msg.data).get("C")
        return None

    def _on_ready_for_query(self, msg: framing.Message, now: float) -> bytes | None:
        status = messages.decode_ready_for_query(msg.data)
        self._syncs_done += 1
        while self._executes and self._executes[0][1] <= self._syncs_done:
            self._executes.popleft()
        while self._fetches and self._fetches[0][1] <= self._syncs_done:
            self._fetches.popleft()
        while self._refusals and self._refusals[0].sync_id <= self._syncs_done:
            self._refusals.popleft()  # the server failed earlier; its error went through
        self._rows = 0
        if self._abort_marker is not None:
            self._abort_marker = None
            self.txn_status = status
            return None
        silent = False
        if self._units:
            unit = self._units.popleft()
            unit.rows = self._unit_rows
            self._finish_unit(unit, now)
            if unit.silent:
                silent = True
                self._silent -= 1
        self._unit_rows = 0
        if silent:
            self.txn_status = status
            return b""
        if self._over_limit:
            self._over_limit = False
            if status == "T" and self._syncs_done == self._syncs_sent:
                # PostgreSQL would have aborted the block: make the server's block fail too.
                self._marker_count += 1
                self._abort_marker = f"dbgov_abort_{self._marker_count}_{self._marker_tag}"
                self._syncs_sent += 1
                self.to_server += messages.query(self._abort_marker)
                return b""
        self.txn_status = status
        return None

    # --- defense in depth: result columns that come straight from a masked column ----------

    def _check_origins(self, msg: framing.Message, now: float) -> bytes | None:
        origins = self._origins
        mtype = msg.type
        current = self._syncs_done + 1
        if mtype == messages.ROW_DESCRIPTION:
            fields = messages.decode_row_description(msg.data)
            found = [i for i, f in enumerate(fields) if (f.table_oid, f.attnum) in self._masked_attrs]
            if found and self._policy().mode == "dry-run":
                found = []
            origins.described(tuple((i, self._masker(fields[i])) for i in found), current)
            if found:
                names = sorted({self._masked_attrs[(fields[i].table_oid, fields[i].attnum)] for i in found})
                self._event(
                    now, {"type": "warning", "warning": "masked column arrived unmasked", "columns": names}
                )
            return None
        if mtype == messages.NO_DATA:
            origins.described((), current)
        elif mtype == messages.DATA_ROW:
            hits = origins.row_mask(current)
            if hits:
                values = messages.decode_data_row(msg.data)
                for i, masked in hits:
                    if i < len(values):
                        value = values[i]
                        values[i] = None if value is None else masked(value)
                return messages.data_row(values)
        elif mtype in (messages.COMMAND_COMPLETE, messages.PORTAL_SUSPENDED, messages.EMPTY_QUERY):
            origins.finished(current)
        elif mtype == messages.ERROR_RESPONSE:
            origins.failed(current)
        elif mtype == messages.READY_FOR_QUERY:
            origins.synced(current)
        return None

    def _masker(self, field: messages.Field) -> Callable[[bytes], bytes | None]:
        """How a value of this result column gets masked: the policy's strategy for the column it
        comes from (computed as the rewrite would have), or NULL when that cannot be done."""
        column = self._masked_attrs[(field.table_oid, field.attnum)]
        mask_value = getattr(self._policy(), "mask_value", None)
        if mask_value is None or field.type_oid not in _TEXT_OIDS:
            return _to_null
        strip = field.type_oid == _BPCHAR_OID  # read as text, char(n) loses its padding

        def masked(raw: bytes) -> bytes | None:
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                return None
            out = mask_value(column, text.rstrip(" ") if strip else text)
            return None if out is None else str(out).encode()

        return masked

    # --- maxRowsAffected: run a write inside BEGIN or a savepoint, keep it only if small ---

    def _unguarded(self, decision: policy_port.Decision) -> bool:
        """Nothing to rewrite, and no row limit would ever guard it (the lane may take it): no
        limit is set, or it does not write. (Not ``_guard_limit``, which also waives the guard
        inside an aborted transaction.)"""
        return decision.rewritten is None and self._never_guarded(decision)

    def _never_guarded(self, decision: policy_port.Decision) -> bool:
        """No row limit would ever guard it: no limit is set, or it does not write."""
        return (self._affected_limit is None and self._row_limit is None) or not _may_write(decision)

    def _guard_limit(self, decision: policy_port.Decision) -> int | None:
        """maxRowsAffected for a statement that writes, or no limit at all when only
        maxRowsReturned applies: a write whose RETURNING rows run over that must be undone too,
        or the client would see an error for a change that stayed."""
        limit = self._affected_limit
        if limit is None and self._row_limit is None:
            return None
        if self.txn_status == "E" and self.idle:
            return None  # (known, not predicted: a ROLLBACK in flight would end the failed block)
        if not _may_write(decision):
            return None
        return _UNLIMITED if limit is None else limit

    def _start_guard(self, limit: int, statement: bytes) -> bytes:
        savepoint = self.txn_status == "T"
        self._guard = _Guard(limit=limit, savepoint=savepoint)
        self._syncs_sent += 1  # the opener's ReadyForQuery comes first
        opener = "SAVEPOINT dbgov_guard" if savepoint else "BEGIN"
        return messages.query(opener) + statement

    def _on_execute(self, msg: framing.Message) -> bytes | None:
        """Track an Execute; a write's Execute gets a Flush and holds back what follows it."""
        portal = messages.decode_execute(msg.data).portal
        guarded = portal in self._write_portals  # (in a failed block the server answers at once)
        self._executes.append((guarded, self._syncs_sent + 1))
        return msg.data + messages.FLUSH_MESSAGE if guarded else None

    def _on_execute_done(self, msg: framing.Message) -> bytes | None:
        """An Execute finished (or failed). For a guarded write over the limit, refuse it and make
        the server fail the transaction before the client's Sync reaches it."""
        guarded, sync = self._executes.popleft()
        if msg.type == messages.ERROR_RESPONSE:
            # The server skips the rest of this batch: those Executes will never finish.
            self._executes = deque(e for e in self._executes if e[1] != sync)
        if not guarded:
            return None
        self._paused = False
        self._resume = True
        if msg.type != messages.COMMAND_COMPLETE:
            return None
        tag = messages.decode_command_complete(msg.data)
        if self._over_limit:  # its RETURNING ran past maxRowsReturned: undo the write as well
            self._fail_before_sync(sync, tag)
            self._rows = 0
            return self._limit_error()
        limit = self._affected_limit
        count = _affected(tag)
        if limit is None or count <= limit:
            return None
        self._fail_before_sync(sync, tag)
        return _affected_error(_Guard(limit=limit, savepoint=False, count=count))

    def _fail_before_sync(self, sync: int, tag: str) -> None:
        """Make the server fail the transaction before the client's held Sync reaches it."""
        self._marker_count += 1
        token = f"dbgov_refused_{self._marker_count}_{self._marker_tag}"
        self._refusals.append(_Refusal(token=token, error=b"", sync_id=sync))
        self.to_server += messages.parse("dbgov_guard", token, ())
        self._skipping = True  # like the server, drop the client's messages until Sync
        unit = self._current_unit()
        if unit is not None:
            unit.sqlstate = SQLSTATE_LIMIT
            unit.tags = [*(unit.tags or []), tag]

    def _guard_send(self, *sql: str) -> None:
        for text in sql:
            self._syncs_sent += 1
            self.to_server += messages.query(text)

    def _on_guarded(self, msg: framing.Message, now: float) -> bytes | None:
        guard = self._guard
        assert guard is not None
        mtype = msg.type
        if mtype in _ASYNC_SERVER:
            return None
        if mtype == messages.READY_FOR_QUERY:
            self._syncs_done += 1
        if guard.stage == "open":
            if mtype == messages.READY_FOR_QUERY:
                guard.stage = "statement"
            return b""
        if guard.stage == "statement":
            return self._guarded_statement(guard, msg, now)
        if mtype != messages.READY_FOR_QUERY:
            if mtype == messages.ERROR_RESPONSE and guard.stage == "close" and not guard.over:
                guard.close_failed = True  # COMMIT / RELEASE failed: the client must see why
                return None
            return b""
        guard.pending -= 1
        if guard.pending:
            return b""
        self._guard = None
        self._resume = True
        self.txn_status = messages.decode_ready_for_query(msg.data)
        if guard.over:
            # (the guarded statement's unit is already audited with 54000)
            error = self._limit_error(mark_unit=False) if guard.rows_over else _affected_error(guard)
            return error + msg.data
        return (b"" if guard.close_failed else b"".join(guard.held)) + msg.data

    def _guarded_statement(self, guard: _Guard, msg: framing.Message, now: float) -> bytes | None:
        mtype = msg.type
        unit = self._current_unit()
        if mtype == messages.DATA_ROW:
            self._unit_rows += 1
            self._rows += 1
            limit = self._row_limit
            if guard.rows_over or (limit is not None and self._rows > limit):
                guard.rows_over = guard.over = True
                return b""  # no row past the limit reaches the client
            return None
        if mtype == messages.COMMAND_COMPLETE:
            self._rows = 0
            tag = messages.decode_command_complete(msg.data)
            guard.count += _affected(tag)
            guard.over = guard.rows_over or guard.count > guard.limit
            if unit is not None:
                unit.tags = [*(unit.tags or []), tag]
            guard.held.append(msg.data)
            return b""
        if mtype == messages.ERROR_RESPONSE:
            guard.failed = True
            if unit is not None and unit.sqlstate is None:
                unit.sqlstate = messages.decode_fields(msg.data).get("C")
            return None
        if mtype != messages.READY_FOR_QUERY:
            return b"" if guard.held else None  # nothing may follow a held CommandComplete
        status = messages.decode_ready_for_query(msg.data)
        if self._units:
            unit = self._units.popleft()
            unit.rows = self._unit_rows
            if guard.over:
                unit.sqlstate = SQLSTATE_LIMIT
            self._finish_unit(unit, now)
        self._unit_rows = 0
        guard.stage = "close"
        if guard.failed and guard.savepoint:
            self._guard = None  # the block is aborted, as PostgreSQL leaves it
            self._resume = True
            self.txn_status = status
            return None
        if guard.over and guard.savepoint:
            self._marker_count += 1
            self._guard_send(
                "ROLLBACK TO SAVEPOINT dbgov_guard", f"dbgov_abort_{self._marker_count}_{self._marker_tag}"
            )
            guard.pending = 2
        elif guard.failed or guard.over:
            self._guard_send("ROLLBACK")
        else:
            self._guard_send("RELEASE SAVEPOINT dbgov_guard" if guard.savepoint else "COMMIT")
        return b""

    def _finish_unit(self, unit: _Unit, now: float) -> None:
        if not self._config.audit:
            return
        shares = _shares(unit) if len(unit.statements) > 1 else None
        for index, statement in enumerate(unit.statements):
            rows, tags = (unit.rows, unit.tags) if shares is None else shares[index]
            self.events.append(
                self._statement_event(
                    statement,
                    now=now,
                    duration=now - unit.started,
                    rows=rows,
                    tags=tags,
                    sqlstate=unit.sqlstate,
                )
            )

    # --- helpers --------------------------------------------------------------------------

    def _statement_event(
        self,
        statement: _Statement,
        *,
        now: float,
        duration: float,
        rows: int,
        tags: list[str] | None,
        sqlstate: str | None,
    ) -> audit.StatementEvent:
        return audit.StatementEvent(
            time=audit.timestamp(now),
            statement=redact.redact_literals(statement.sql)
            if self._config.redact_literals
            else statement.sql,
            decision=_decision_segment(statement.decision),
            enforced=statement.verdict,
            rows_returned=rows,
            rows_affected=_rows_affected(tags),
            duration_ms=round(duration * 1000, 3),
            sqlstate=sqlstate,
            session=self._identity_segment(),
        )

    def _identity(self) -> dict[str, Any]:
        return {
            "session_id": self._client_info.session_id,
            "identity": None if self.identity is None else self.identity.audit_fields(),
            "user": self.params.get("user"),
            "application_name": self.params.get("application_name"),
            "client_addr": self._client_info.address,
            "database": self._config.upstream_database or self.params.get("database"),
            "workload": None if self._config.workload is None else self._config.workload(),
            "db_user": self._db_user,
        }

    def _identity_segment(self) -> audit.Segment:
        """The session's audit fields, encoded once it is established (they no longer change)."""
        if self._identity_fields is not None:
            return self._identity_fields
        segment = audit.Segment(self._identity())
        if self.state == "ready":
            self._identity_fields = segment
        return segment

    def _event(self, now: float, fields: dict[str, Any]) -> None:
        if self._config.audit:
            self.events.append({**fields, "time": audit.timestamp(now), **self._identity_segment().fields})

    def _fatal(self, sqlstate: str, message: str) -> None:
        if self.state == "closed":
            return
        self.to_client += messages.error_response(code=sqlstate, message=message, severity="FATAL")
        self._close(message)

    def _close(self, reason: str) -> None:
        if self.state != "closed":
            self.state = "closed"
            self._end(reason)
            self.actions.append(Close(reason=reason))

    def _end(self, reason: str) -> None:
        """Audit the end of an established session, once: statements sent upstream whose answer
        never came get their event (08006: the outcome is unknown), then session_end."""
        if not self._started or self._ended:
            return
        self._ended = True
        unfinished = [*self._units, *([self._pending] if self._pending is not None else [])]
        if self._units:
            self._units[0].rows = self._unit_rows
        elif self._pending is not None:
            self._pending.rows = self._unit_rows
        for unit in unfinished:
            # (a batch flushed but never synced: its rows are counted, and its implicit
            # transaction never committed, so its outcome is the connection's: 08006)
            if unit.sqlstate is None:
                unit.sqlstate = "08006"
            self._finish_unit(unit, self._clock)
        self._units.clear()
        self._pending = None
        self._event(self._clock, {"type": "session_end", "reason": reason})


def _affected_error(guard: _Guard) -> bytes:
    return messages.error_response(
        code=SQLSTATE_LIMIT,
        message=(
            f"dbgov: the statement changed {guard.count} rows, more than maxRowsAffected "
            f"({guard.limit}); it was rolled back"
        ),
        hint="Narrow the WHERE clause or change fewer rows at a time.",
    )


_AUDIT_DOWN = policy_port.SimpleDecision(
    verdict="block",
    rule="audit:fail-closed",
    reason="the audit log cannot be written and the policy is fail-closed",
    hint="Retry when the audit sink recovers; nothing was run.",
    sqlstate=SQLSTATE_POLICY,
)


def refusal_error(decision: policy_port.Decision) -> bytes:
    """The ErrorResponse a client gets for a refused statement."""
    rule = f'rule "{decision.rule}"' if decision.rule else "dbgov"
    if decision.verdict == "approve":
        message = f"dbgov: statement requires approval ({rule}): {decision.reason}"
        hint = decision.hint or (
            "Approval is not available in local mode; run it in the cluster to request it."
        )
    else:
        message = f"dbgov: statement refused by {rule}: {decision.reason}"
        hint = decision.hint or "Change the statement or ask the policy owner for access."
    return messages.error_response(code=decision.sqlstate or SQLSTATE_POLICY, message=message, hint=hint)


_DECISION_SEGMENTS: dict[int, tuple[policy_port.Decision, audit.Segment]] = {}
_REWRITE_SEGMENTS: dict[int, tuple[policy_port.Decision, audit.Segment]] = {}


def _decision_segment(decision: policy_port.Decision) -> audit.Segment:
    """The audit fields a decision contributes; memoized because the engine reuses decisions
    (the entry holds the decision, so its id cannot be reused while cached)."""
    cached = _DECISION_SEGMENTS.get(id(decision))
    if cached is not None and cached[0] is decision:
        return cached[1]
    infos = decision.statements
    # A mask decision is a new object per text (the cached decision with that text's rewrite),
    # whose audit fields are the cached decision's: memoized by the analysis it shares.
    shared = decision.rewritten is not None and bool(infos)
    if shared:
        cached = _REWRITE_SEGMENTS.get(id(infos))
        if cached is not None and _same_audit_fields(cached[0], decision):
            return cached[1]
    segment = audit.Segment(
        {
            "fingerprint": decision.fingerprint,
            "classes": sorted({str(getattr(s, "cls", "")) for s in infos} - {""}),
            "tables_read": sorted({str(t) for s in infos for t in getattr(s, "reads", ())}),
            "tables_written": sorted({str(t) for s in infos for t in getattr(s, "writes", ())}),
            "decision": decision.verdict,
            "rule": decision.rule,
            "reason": decision.reason,
            "masked_columns": list(decision.masked_columns),
        }
    )
    memo = _REWRITE_SEGMENTS if shared else _DECISION_SEGMENTS
    if len(memo) >= 4096:
        memo.clear()
    memo[id(infos) if shared else id(decision)] = (decision, segment)
    return segment


def _same_audit_fields(a: policy_port.Decision, b: policy_port.Decision) -> bool:
    return (
        a.statements is b.statements
        and a.verdict == b.verdict
        and a.rule == b.rule
        and a.reason == b.reason
        and a.fingerprint == b.fingerprint
        and a.masked_columns == b.masked_columns
    )


def sql_literal(text: str) -> str:
    """``text`` as an E'' string literal, read the same whatever standard_conforming_strings is."""
    return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


def _encoding_key(name: str) -> str:
    """An encoding name as PostgreSQL compares them (``clean_encoding_name``): "UTF-8" is utf8."""
    return "".join(c for c in name.lower() if c.isalnum())


def _unreadable(name: str, value: str) -> bool:
    """A reported setting under which the server would read SQL otherwise than it was judged."""
    if name == "client_encoding":
        return _encoding_key(value) not in ("utf8", "unicode")
    if name == "standard_conforming_strings":
        return value.lower() != "on"
    return False


def _forbidden_parameter(params: Mapping[str, str]) -> str | None:
    encoding = params.get("client_encoding")
    if encoding is not None and _encoding_key(encoding) not in _CLIENT_ENCODINGS:
        return (
            f'dbgov: client_encoding "{encoding}" is not supported: dbgov reads SQL as UTF-8, and in '
            f"{encoding} the server could read other statements from the same bytes; connect with "
            "client_encoding=UTF8 (PGCLIENTENCODING=UTF8)"
        )
    for key, value in params.items():
        if key in _FORBIDDEN_PARAMS:
            if key == "replication" and value.lower() in ("false", "off", "no", "0"):
                continue
            return f'dbgov does not allow the startup parameter "{key}"'
        if key == "options":
            try:
                startup_options(value)
            except ValueError as err:
                return f'dbgov: the startup parameter "options" {err}'
    return None


def startup_options(value: str) -> list[tuple[str, str]]:
    """The settings in a startup packet's ``options`` (libpq's PGOPTIONS: ``-c name=value`` or
    ``--name=value``, separated by whitespace, a backslash escaping the next character, as the
    server splits them); ValueError for anything else (other server switches are refused)."""
    words: list[str] = []
    word: list[str] = []
    escaped = started = False
    for char in value:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped = started = True
        elif char.isspace():
            if started:
                words.append("".join(word))
                word, started = [], False
        else:
            word.append(char)
            started = True
    if escaped:
        raise ValueError("ends in a lone backslash")
    if started:
        words.append("".join(word))
    settings: list[tuple[str, str]] = []
    index = 0
    while index < len(words):
        switch = words[index]
        if switch == "-c":
            index += 1
            if index == len(words):
                raise ValueError("has -c without a setting")
            switch = words[index]
        elif switch.startswith(("-c", "--")):
            switch = switch[2:]
        else:
            raise ValueError(f"has {switch!r}: only settings (-c name=value, --name=value) are allowed")
        name, equals, setting = switch.partition("=")
        name = name.replace("-", "_").lower()  # (as the server reads --name=value)
        if not equals or not _SETTING_NAME.fullmatch(name):
            raise ValueError(f"has {switch!r}, which is not name=value")
        settings.append((name, setting))
        index += 1
    return settings


def _option_text(settings: list[tuple[str, str]]) -> str:
    """``options`` for the upstream startup packet: exactly the settings that were judged."""

    def escaped(text: str) -> str:
        return "".join("\\" + c if c.isspace() or c == "\\" else c for c in text)

    return " ".join(f"-c {escaped(name)}={escaped(value)}" for name, value in settings)


def _changes_path(info: Any, *, volatile: bool, schemas: bool) -> bool:
    """A statement (one of a decision's infos) may change how names resolve: search_path itself
    (SET, RESET, RESET ALL, DISCARD ALL, set_config); with ``schemas``, which schemas exist or
    may be used (DDL, DCL); with ``volatile`` (a block changed search_path), the end of the block,
    which may undo it."""
    settings = getattr(info, "settings", ())
    cls, fine = getattr(info, "cls", ""), getattr(info, "fine", "")
    if "search_path" in settings or "*" in settings or fine == "discard":
        return True
    if schemas and cls in ("ddl", "dcl"):
        return True
    return volatile and cls == "tcl" and fine not in ("begin", "savepoint", "set-constraints")


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


_PARTIAL_WRITE = policy_port.SimpleDecision(
    verdict="block",
    rule="guardrail:max-rows-affected",
    reason=(
        "a write held to maxRowsAffected or maxRowsReturned must be executed whole: an Execute "
        "with a row count suspends it after the server has changed every row, before its count"
    ),
    hint="Execute the write without a row limit (fetch its RETURNING rows at once), or use a cursor for reads only.",
    sqlstate=SQLSTATE_LIMIT,
)


def _ends_transactions(decision: policy_port.Decision) -> bool:
    """The query string holds transaction control, which would commit (or undo) the guard's own
    transaction or savepoint before the rows it changed are counted."""
    return any(getattr(info, "cls", "") == "tcl" for info in decision.statements)


_GUARD_WITH_TCL = policy_port.SimpleDecision(
    verdict="block",
    rule="guardrail:max-rows-affected",
    reason=(
        "a write held to maxRowsAffected cannot share its query string with transaction control: "
        "a COMMIT in it would keep the change before its rows are counted"
    ),
    hint="Send the write on its own, then COMMIT (or ROLLBACK) as its own statement.",
    sqlstate=SQLSTATE_LIMIT,
)


def _may_write(decision: policy_port.Decision) -> bool:
    """The statement writes, or is an EXECUTE of a prepared statement that may (its tag tells)."""
    return any(
        getattr(info, "writes", ()) or getattr(info, "fine", "") == "execute" for info in decision.statements
    )


def _shares(unit: _Unit) -> list[tuple[int, list[str] | None]] | None:
    """Rows and command tags of each statement of a batch of several (a pipeline): each Execute's
    answer goes to the statement it ran. None (the batch's totals for each) when the answers
    cannot be matched to the Executes: more answers than Executes, or fewer without an error."""
    executions, ends = unit.executions, unit.ends
    if not executions or len(ends) > len(executions):
        return None
    if len(ends) < len(executions) and unit.sqlstate is None:
        return None
    shares: list[tuple[int, list[str] | None]] = [(0, None)] * len(unit.statements)
    before = 0
    for index, (rows, tag) in zip(executions, ends, strict=False):
        if index is not None:
            count, tags = shares[index]
            shares[index] = (count + rows - before, tags if tag is None else [*(tags or ()), tag])
        before = rows
    return shares


def _rows_affected(tags: list[str] | None) -> int | None:
    if not tags:
        return None
    return sum(_affected(tag) for tag in tags)


_WRITE_TAGS = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY"))


def _affected(tag: str) -> int:
    """Rows a command tag says were changed ("UPDATE 3" → 3); 0 for tags of reads ("SELECT 5")."""
    head, _, count = tag.rpartition(" ")
    return int(count) if count.isdigit() and head.split(" ", 1)[0] in _WRITE_TAGS else 0
