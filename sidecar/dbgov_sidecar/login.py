"""Log in to the upstream database: the client half of PostgreSQL's startup exchange, pure.

The proxy authenticates upstream with its own configured credentials (cleartext, md5 or
SCRAM-SHA-256; over TLS SCRAM-SHA-256-PLUS with channel binding, as libpq's
``channel_binding`` setting: ``disable``, ``prefer`` or ``require``), then collects the ParameterStatus messages and BackendKeyData the client must
see. Fed one server message at a time; returns what to send back.

Once logged in it asks the server for the session's effective search_path (only schemas that
exist, as PostgreSQL resolves names), because the policy engine must resolve unqualified
names exactly as the server will: a guess would let `orders` be judged as public.orders while
the server reads another schema's table. In the same round trip it reads which function names
exist outside pg_catalog (``FUNCTIONS_QUERY``): `lower(42)` calls a user's `public.lower(int)`
when one exists, and `t.f` a user's `f(t)`, so those names cannot be judged as built-ins.
"""

from __future__ import annotations

from collections.abc import Mapping

from dbgov_policy import _pgcatalog
from dbgov_sidecar.pgwire import AuthenticationFailed, ProtocolViolation, auth, framing, messages

SEARCH_PATH_QUERY = "SELECT s FROM unnest(pg_catalog.current_schemas(false)) AS s"

MAX_FUNCTION_FACTS = 50_000
"""Most rows of ``FUNCTIONS_QUERY`` dbgov keeps (function names, and columns named like one). A
database with more is refused (the login fails, a session that reads them after DDL ends), since
judging its calls without knowing them all could take a user's function for a built-in."""

_SUPERUSER_EXTENSION = (
    "EXISTS (SELECT FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid "
    "JOIN pg_catalog.pg_roles r ON r.oid = e.extowner "
    "WHERE d.classid = 'pg_catalog.{catalog}'::pg_catalog.regclass AND d.objid = {oid} "
    "AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.deptype = 'e' "
    "AND r.rolsuper)"
)
"""A member of an extension a superuser owns (installed by the platform team: pgvector's
``sum(vector)`` and ``=``, citext's ``max(citext)``): its code is the extension's, which no
database user can change or add to (ALTER EXTENSION ... ADD takes owning the extension), so its
names are judged as built-ins are. A trusted extension a user created is that user's: its members
count as the user's functions."""

FUNCTIONS_QUERY = (
    "WITH f AS (SELECT DISTINCT p.proname::pg_catalog.text AS name FROM pg_catalog.pg_proc p "
    "JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
    "WHERE n.nspname <> 'information_schema' AND n.nspname OPERATOR(pg_catalog.!~) '^pg_' "
    f"AND NOT {_SUPERUSER_EXTENSION.format(catalog='pg_proc', oid='p.oid')} "
    "UNION SELECT 'operator ' OPERATOR(pg_catalog.||) o.oprname FROM pg_catalog.pg_operator o "
    "JOIN pg_catalog.pg_namespace n ON n.oid = o.oprnamespace "
    "WHERE n.nspname <> 'information_schema' AND n.nspname OPERATOR(pg_catalog.!~) '^pg_' "
    f"AND NOT {_SUPERUSER_EXTENSION.format(catalog='pg_operator', oid='o.oid')}) "
    "(SELECT '', '', name FROM f UNION ALL "
    "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text, a.attname::pg_catalog.text "
    "FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid "
    "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    "WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
    "AND (a.attname::pg_catalog.text IN (SELECT name FROM f) "
    f"OR a.attname::pg_catalog.text = ANY ('{{{','.join(sorted(_pgcatalog.WHOLE_ROW_FUNCTIONS))}}}'"
    f"::pg_catalog.text[]))) LIMIT {MAX_FUNCTION_FACTS + 1}"
)
"""Catalog query: rows ('', '', name) of every function, aggregate and procedure name (and
``operator <name>`` of every operator) outside pg_catalog, information_schema and the system's
schemas (``pg_*``: pg_toast, pg_temp_N, whose functions no unqualified name reaches), and rows (schema, relation, column) of every column named like one of
them or like a whole-row built-in (there `t.f` is the column, not `f(t)`)."""


class TooManyFunctions(ConnectionError):
    """The catalog lists more function facts than ``MAX_FUNCTION_FACTS``."""


def function_facts(
    rows: list[tuple[str, str, str]],
) -> tuple[frozenset[str], frozenset[tuple[str, str, str]]]:
    """``FUNCTIONS_QUERY``'s rows as (function names, columns named like a function); raises
    ``TooManyFunctions`` (fail closed) when the catalog has more than dbgov keeps."""
    if len(rows) > MAX_FUNCTION_FACTS:
        raise TooManyFunctions(
            f"the database has more than {MAX_FUNCTION_FACTS} function names outside pg_catalog "
            "(and columns named like them); dbgov cannot tell its calls of built-ins from calls of "
            "those, so it refuses the session (drop unused functions, or ask for a higher limit)"
        )
    names = frozenset(name for schema, _, name in rows if not schema)
    columns = frozenset(row for row in rows if row[0])
    return names, columns


CHANNEL_BINDING = ("disable", "prefer", "require")


class UpstreamRefused(Exception):
    """The upstream server sent an ErrorResponse during login (its raw bytes are kept)."""

    def __init__(self, error: bytes) -> None:
        fields = messages.decode_fields(error)
        super().__init__(f"{fields.get('C', '?????')}: {fields.get('M', 'login refused')}")
        self.error = error
        self.fields = fields


class UpstreamLogin:
    """One login attempt: ``startup()`` first, then ``on_message()`` until ``done``."""

    def __init__(
        self,
        *,
        user: str,
        password: str | None,
        params: Mapping[str, str],
        nonce: str,
        channel_binding: str = "prefer",
        scram_only: bool = False,
    ):
        if channel_binding not in CHANNEL_BINDING:
            raise ValueError(f"channel_binding must be one of {', '.join(CHANNEL_BINDING)}")
        self._user = user
        self._password = password
        self._channel_binding = channel_binding
        self._scram_only = scram_only
        """Minted credentials: the role has a SCRAM verifier, so a server that asks for the
        password itself (cleartext, MD5) is not the database the operator named; the password
        is never sent to it."""
        self.server_certificate: bytes | None = None
        """The upstream's TLS certificate (DER) once TLS is up; None without TLS."""
        self._params = {**params, "user": user}
        self._scram: auth.ScramClient | None = None
        self._scram_plus = False
        self._nonce = nonce
        self.done = False
        self.parameter_status: list[bytes] = []
        """Raw ParameterStatus messages, forwarded to the client as they are."""
        self.notices: list[bytes] = []
        self.backend_key: tuple[int, int] | None = None
        self.search_path: tuple[str, ...] | None = None
        """The schemas unqualified names resolve in, once ``done``."""
        self.functions: tuple[frozenset[str], frozenset[tuple[str, str, str]]] | None = None
        """Function names outside pg_catalog and the columns named like one (``function_facts``),
        once ``done``."""
        self._schemas: list[str] | None = None
        self._facts: list[tuple[str, str, str]] = []
        self._results = 0

    def startup(self) -> bytes:
        """The StartupMessage to send first."""
        if self._channel_binding == "require" and self.server_certificate is None:
            raise AuthenticationFailed("channel_binding=require, but the upstream connection is not TLS")
        return messages.startup_message(self._params)

    def on_message(self, msg: framing.Message) -> bytes:
        """Handle one server message; return the bytes to answer with (often none)."""
        if self.done:
            raise ProtocolViolation(f"server sent {chr(msg.type)!r} after ReadyForQuery")
        if self._schemas is not None:
            return self._on_probe(msg)
        if msg.type == messages.AUTHENTICATION:
            return self._on_auth(msg.data)
        if msg.type == messages.ERROR_RESPONSE:
            raise UpstreamRefused(msg.data)
        if msg.type == messages.PARAMETER_STATUS:
            messages.decode_parameter_status(msg.data)
            self.parameter_status.append(msg.data)
        elif msg.type == messages.BACKEND_KEY_DATA:
            self.backend_key = messages.decode_backend_key_data(msg.data)
        elif msg.type == messages.NOTICE_RESPONSE:
            self.notices.append(msg.data)
        elif msg.type == messages.READY_FOR_QUERY:
            messages.decode_ready_for_query(msg.data)
            self._schemas = []
            return messages.query(f"{SEARCH_PATH_QUERY}; {FUNCTIONS_QUERY}")
        elif msg.type != messages.NEGOTIATE_PROTOCOL_VERSION:
            raise ProtocolViolation(f"unexpected server message {chr(msg.type)!r} during login")
        return b""

    def _on_probe(self, msg: framing.Message) -> bytes:
        assert self._schemas is not None
        if msg.type == messages.DATA_ROW:
            row = messages.decode_data_row(msg.data)
            if self._results == 0 and len(row) == 1 and row[0] is not None:
                self._schemas.append(row[0].decode())
            elif self._results == 1 and len(row) == 3 and None not in row:
                self._facts.append(tuple(v.decode() for v in row))  # type: ignore[arg-type, union-attr]
                if len(self._facts) > MAX_FUNCTION_FACTS:
                    function_facts(self._facts)  # (raises)
        elif msg.type == messages.COMMAND_COMPLETE:
            self._results += 1
        elif msg.type == messages.ERROR_RESPONSE:
            raise UpstreamRefused(msg.data)
        elif msg.type == messages.READY_FOR_QUERY:
            if self._results < 2:
                raise ProtocolViolation("the server did not answer the catalog queries after login")
            self.search_path = tuple(self._schemas)
            self.functions = function_facts(self._facts)
            self.done = True
        elif msg.type not in (messages.ROW_DESCRIPTION, messages.NOTICE_RESPONSE):
            raise ProtocolViolation(f"unexpected server message {chr(msg.type)!r} reading search_path")
        return b""

    def _on_auth(self, data: bytes) -> bytes:
        code, payload = messages.decode_authentication(data)
        if code == messages.AUTH_OK:
            if self._scram_only and self._scram is None:
                raise AuthenticationFailed(
                    "the upstream logged the minted role in without asking for its password: this is "
                    "not the database the operator named (or its pg_hba.conf trusts the connection)"
                )
            if self._channel_binding == "require" and (self._scram is None or not self._scram_plus):
                raise AuthenticationFailed(
                    "channel_binding=require, but the server logged us in without SCRAM-SHA-256-PLUS"
                )
            return b""
        if self._channel_binding == "require" and code != messages.AUTH_SASL and self._scram is None:
            raise AuthenticationFailed(
                f"channel_binding=require, but the server asks for authentication method {code}, "
                "not SCRAM-SHA-256-PLUS"
            )
        if self._scram_only and code in (messages.AUTH_CLEARTEXT, messages.AUTH_MD5):
            raise AuthenticationFailed(
                f"the upstream asks for the password {'in cleartext' if code == messages.AUTH_CLEARTEXT else 'as MD5'}, "
                "but the role the operator minted has a SCRAM-SHA-256 verifier: this is not the database "
                "the operator named (or its pg_hba.conf does not use scram-sha-256); the minted password "
                "is not sent"
            )
        if code == messages.AUTH_CLEARTEXT:
            return messages.password_message(self._need_password().encode() + b"\0")
        if code == messages.AUTH_MD5:
            if len(payload) != 4:
                raise ProtocolViolation("AuthenticationMD5Password without a 4-byte salt")
            hashed = auth.md5_password(user=self._user, password=self._need_password(), salt=payload)
            return messages.password_message(hashed)
        if code == messages.AUTH_SASL:
            self._scram = self._scram_client(messages.decode_sasl_mechanisms(payload))
            return messages.sasl_initial_response(self._scram.mechanism, self._scram.client_first())
        if code == messages.AUTH_SASL_CONTINUE and self._scram is not None:
            return messages.password_message(self._scram.client_final(payload))
        if code == messages.AUTH_SASL_FINAL and self._scram is not None:
            self._scram.verify_server_final(payload)
            return b""
        raise AuthenticationFailed(f"unsupported authentication request {code}")

    def _scram_client(self, mechanisms: list[str]) -> auth.ScramClient:
        tls = self.server_certificate is not None and self._channel_binding != "disable"
        if tls and auth.SCRAM_SHA_256_PLUS in mechanisms:
            assert self.server_certificate is not None
            binding = auth.tls_server_end_point(self.server_certificate)
            self._scram_plus = True
            return auth.ScramClient(password=self._need_password(), nonce=self._nonce, binding=binding)
        if self._channel_binding == "require":
            raise AuthenticationFailed(
                f"channel_binding=require, but the server offers only {', '.join(mechanisms) or 'nothing'}"
            )
        if auth.SCRAM_SHA_256 not in mechanisms:
            raise AuthenticationFailed(f"server offers no supported SASL mechanism: {mechanisms}")
        return auth.ScramClient(password=self._need_password(), nonce=self._nonce, could_bind=tls)

    def _need_password(self) -> str:
        if self._password is None:
            raise AuthenticationFailed("upstream asks for a password and none is configured")
        return self._password
