"""Proxy settings: one root dataclass, read from the environment here and nowhere else.

Every field has a ``DBGOV_*`` variable (the sidecar is configured by the injected pod spec) and
a ``dbgov proxy`` flag of the same name that overrides it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import yaml

from dbgov_policy import compile as policy_compile
from dbgov_policy import engine, model
from dbgov_sidecar import login, proxy, session, tokens, workload_identity
from dbgov_sidecar.pgwire import auth, framing


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything `dbgov proxy` can be told."""

    listen: str = "127.0.0.1:6432"
    """host:port clients connect to (DBGOV_LISTEN)."""
    upstream: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    """The real database as a URL; sslmode and sslrootcert as query parameters (DBGOV_UPSTREAM)."""
    upstream_password: str | None = None
    """Password for the upstream role when not in the URL (DBGOV_UPSTREAM_PASSWORD)."""
    policy: str | None = None
    """Policy file: the spec of a DatabaseAccessPolicy; without one every statement is refused (DBGOV_POLICY)."""
    tls_cert: str | None = None
    """PEM certificate for client TLS (DBGOV_TLS_CERT)."""
    tls_key: str | None = None
    """PEM key for client TLS (DBGOV_TLS_KEY)."""
    client_password: str | None = None
    """Password clients must give (SCRAM-SHA-256); none means trust (DBGOV_CLIENT_PASSWORD)."""
    client_jwt_key: str | None = None
    """Accept a signed JWT as the client password: HMAC secret or PEM public key/path (DBGOV_CLIENT_JWT_KEY)."""
    client_jwt_audience: str | None = None
    """Required `aud` of client tokens (DBGOV_CLIENT_JWT_AUDIENCE)."""
    jwt_issuers_file: str | None = None
    """YAML {issuers: [...]} of trusted JWT issuers, as a policy's authentication.jwt; clients give a token as their password (DBGOV_JWT_ISSUERS_FILE)."""
    audit: str = "stdout"
    """Where audit events go: stdout and/or file paths, comma-separated, or off (DBGOV_AUDIT)."""
    audit_redact_literals: bool = False
    """Replace literals in audited statement text with $n placeholders (DBGOV_AUDIT_REDACT_LITERALS)."""
    audit_failure: str = "best-effort"
    """best-effort (count drops) or fail-closed (refuse while the sink fails) (DBGOV_AUDIT_FAILURE)."""
    metrics: str = "127.0.0.1:9187"
    """host:port for /metrics, /healthz, /readyz; empty disables (DBGOV_METRICS)."""
    max_message_size: int = framing.DEFAULT_MAX_MESSAGE
    """Largest message in bytes, from the client or the server (DBGOV_MAX_MESSAGE_SIZE)."""
    max_statement_size: int = engine.MAX_STATEMENT_SIZE
    """Longest statement text in bytes the policy engine analyzes; longer ones are refused (DBGOV_MAX_STATEMENT_SIZE)."""
    max_session_buffer: int = proxy.MAX_SESSION_BUFFER
    """Client bytes one session may hold unread before the proxy stops reading from it (DBGOV_MAX_SESSION_BUFFER)."""
    max_total_buffer: int = proxy.MAX_TOTAL_BUFFER
    """Client bytes all sessions together may hold before each holding one stops reading (DBGOV_MAX_TOTAL_BUFFER)."""
    drain_timeout: float = 30.0
    """Seconds in-flight statements get on SIGTERM (DBGOV_DRAIN_TIMEOUT)."""
    max_connections: int = 1000
    """Authenticated sessions served at once; more get "too many clients" (53300) (DBGOV_MAX_CONNECTIONS)."""
    max_startup_connections: int = proxy.MAX_STARTUP_CONNECTIONS
    """Connections still starting up or authenticating; one more closes the oldest (DBGOV_MAX_STARTUP_CONNECTIONS)."""
    auth_timeout: float = 60.0
    """Seconds a client has to finish its startup and authentication (DBGOV_AUTH_TIMEOUT)."""
    lane: bool = True
    """Run steady-state statements through the compiled lane when it is built (DBGOV_LANE)."""
    token_file: str | None = None
    """Projected ServiceAccount token presented to the operator; with DBGOV_CREDENTIAL_URL clients wait for a verified identity (DBGOV_TOKEN_FILE)."""
    credential_url: str | None = None
    """The operator's credential endpoint, https://.../v1/credentials (DBGOV_CREDENTIAL_URL)."""
    credential_ca: str | None = None
    """CA bundle (PEM text or path) the operator's certificate must verify against (DBGOV_CREDENTIAL_CA)."""
    pod_uid: str | None = None
    """This pod's uid; the operator's verified identity must name it (DBGOV_POD_UID)."""
    bundle_key: str | None = None
    """The operator's Ed25519 public key (base64 or PEM): the policy file must carry its signature for this namespace and ServiceAccount; unset: the file is not signed (DBGOV_BUNDLE_KEY)."""
    pod_namespace: str | None = None
    """This pod's namespace, which a signed policy bundle must name (DBGOV_POD_NAMESPACE)."""
    service_account: str | None = None
    """This pod's ServiceAccount, which a signed policy bundle must name (DBGOV_SERVICE_ACCOUNT)."""


INT_FIELDS = frozenset(
    {
        "max_message_size",
        "max_statement_size",
        "max_session_buffer",
        "max_total_buffer",
        "max_connections",
        "max_startup_connections",
    }
)
"""Settings read as integers."""


def field_docs() -> dict[str, str]:
    """Each settings field's docstring (Python keeps attribute docstrings only in the source)."""
    docs: dict[str, str] = {}
    body = ast.parse(inspect.getsource(Settings)).body[0]
    assert isinstance(body, ast.ClassDef)
    for field, doc in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value, ast.Constant)
            and isinstance(doc.value.value, str)
        ):
            docs[field.target.id] = doc.value.value
    return docs


def env_name(field: str) -> str:
    """The environment variable for a settings field."""
    return "DBGOV_" + field.upper()


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings with every DBGOV_* variable applied over the defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in dataclasses.fields(Settings):
        raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        if f.name in INT_FIELDS:
            values[f.name] = int(raw)
        elif f.name in ("drain_timeout", "auth_timeout"):
            values[f.name] = float(raw)
        elif f.name in ("audit_redact_literals", "lane"):
            values[f.name] = parse_bool(raw)
        else:
            values[f.name] = raw
    return Settings(**values)  # type: ignore[arg-type]


def parse_bool(text: str) -> bool:
    """'true'/'1'/'yes'/'on' and their opposites."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def split_host_port(text: str, *, default_port: int) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') into its parts."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    return host.strip("[]") or "127.0.0.1", int(port)


SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
"""libpq's sslmode values (``allow`` is taken as ``prefer``: TLS first)."""


def upstream_config(settings: Settings) -> proxy.UpstreamConfig:
    """Parse the upstream URL."""
    url = urllib.parse.urlsplit(settings.upstream)
    if url.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"upstream must be a postgresql:// URL, not {settings.upstream!r}")
    query = dict(urllib.parse.parse_qsl(url.query))
    password = urllib.parse.unquote(url.password) if url.password else settings.upstream_password
    database = urllib.parse.unquote(url.path.lstrip("/")) or None
    sslmode = query.get("sslmode", "prefer")
    if sslmode not in SSLMODES:
        raise ValueError(f"upstream sslmode must be one of {', '.join(SSLMODES)}, not {sslmode!r}")
    if query.get("channel_binding") == "require" and sslmode == "disable":
        raise ValueError("upstream channel_binding=require needs TLS, but sslmode is disable")
    if query.get("gssencmode") == "require":  # never connect with less than the URL asks for
        raise ValueError(
            "upstream gssencmode=require: dbgov does not speak GSSAPI encryption to the database; "
            "encrypt with TLS instead (sslmode=verify-full)"
        )
    return proxy.UpstreamConfig(
        host=url.hostname or "127.0.0.1",
        port=url.port or 5432,
        user=urllib.parse.unquote(url.username or "postgres"),
        password=password,
        database=database,
        sslmode=sslmode,
        sslrootcert=query.get("sslrootcert"),
        channel_binding=_channel_binding(query.get("channel_binding", "prefer")),
        sslcert=query.get("sslcert"),
        sslkey=query.get("sslkey"),
    )


def minted_upstream(
    base: proxy.UpstreamConfig, login: Callable[[], workload_identity.Credentials]
) -> proxy.UpstreamSource:
    """Cluster mode: each new upstream connection logs in with the credentials ``login`` gives
    now (the operator's answer: host, port, dbname, sslmode, CA, user, password), the static
    upstream's host, port and dbname only where the answer has none, and never its TLS
    settings. No credentials, or expired ones, raise
    ``NoUpstreamCredentials``: the client is refused rather than logged in with static ones."""

    def current() -> proxy.UpstreamConfig:
        try:
            creds = login()
        except workload_identity.NoCredentials as err:
            raise proxy.NoUpstreamCredentials(err.reason) from err
        sslmode = creds.sslmode or base.sslmode
        if sslmode not in SSLMODES:
            raise proxy.NoUpstreamCredentials(
                f"the operator's answer has sslmode {sslmode!r}, not one of {', '.join(SSLMODES)}"
            )
        # Nothing about how to reach or trust the server comes from the app's settings (the
        # injected upstream is built from its PG* variables): its CA file, client certificate or
        # channel_binding=disable would let the app stand in for the database and take the
        # minted password. The operator's CA, or the system store; channel binding wherever the
        # server's name is not verified (require, verify-ca), so a relay cannot use the exchange.
        return dataclasses.replace(
            base,
            host=creds.host or base.host,
            port=creds.port or base.port,
            database=creds.dbname or base.database,
            sslmode=sslmode,
            sslrootcert=None,
            sslcert=None,
            sslkey=None,
            channel_binding="require" if sslmode in ("require", "verify-ca") else "prefer",
            ssl_ca_pem=creds.ca_pem,
            user=creds.user,
            password=creds.password,
            masking_views=True,
        )

    return current


def _channel_binding(value: str) -> str:
    if value not in login.CHANNEL_BINDING:
        raise ValueError(
            f"upstream channel_binding must be one of {', '.join(login.CHANNEL_BINDING)}, not {value!r}"
        )
    return value


def jwt_issuers_file(path: str) -> tuple[model.JwtIssuer, ...]:
    """Read DBGOV_JWT_ISSUERS_FILE; raise ValueError naming every problem."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"DBGOV_JWT_ISSUERS_FILE {path}: {err}") from err
    try:
        return policy_compile.compile_jwt_issuers(doc, source=f"DBGOV_JWT_ISSUERS_FILE {path}")
    except policy_compile.PolicyInvalid as err:
        raise ValueError(str(err)) from err


def token_verifier(
    settings: Settings, *, policy_issuers: Callable[[], Iterable[model.JwtIssuer]] | None = None
) -> tokens.Verifier | None:
    """The verifier of client tokens: issuers from DBGOV_JWT_ISSUERS_FILE, the legacy
    DBGOV_CLIENT_JWT_KEY, and the policy's (read anew, so a reload takes effect); None when
    no issuer is configured anywhere."""
    fixed: list[model.JwtIssuer] = []
    inline: dict[str, bytes] = {}
    if settings.jwt_issuers_file:
        fixed.extend(jwt_issuers_file(settings.jwt_issuers_file))
    if settings.client_jwt_key:
        legacy, secret = tokens.legacy_issuer(settings.client_jwt_key, audience=settings.client_jwt_audience)
        fixed.append(legacy)
        if secret is not None:
            inline[legacy.issuer] = secret
    from_policy = policy_issuers or (lambda: ())
    if not fixed and not tuple(from_policy()):
        return None

    def issuers() -> tuple[model.JwtIssuer, ...]:
        return (*fixed, *from_policy())

    verifier = tokens.Verifier(issuers, inline_secrets=inline)
    try:
        verifier.check_static()
    except (OSError, ValueError) as err:
        raise ValueError(f"a JWT issuer's static key cannot be used: {err}") from err
    return verifier


def proxy_config(
    settings: Settings,
    *,
    salt: bytes,
    policy_issuers: Callable[[], Iterable[model.JwtIssuer]] | None = None,
) -> proxy.ProxyConfig:
    """The proxy's configuration (``salt`` seeds the client SCRAM verifier; ``policy_issuers``
    reads the JWT issuers of the policy in force)."""
    host, port = split_host_port(settings.listen, default_port=6432)
    scram = None
    loopback = host in ("127.0.0.1", "localhost", "::1")
    upstream = upstream_config(settings)
    if upstream.port == port and upstream.host in ("127.0.0.1", "localhost", "::1", host):
        raise ValueError(
            f"the upstream {upstream.host}:{upstream.port} is this proxy's own listen address; "
            "set DBGOV_UPSTREAM to the real database (in Kubernetes the webhook sets it from the app's "
            "PGHOST or the URL its dbgov.io/database-url-env annotation names)"
        )
    token = token_verifier(settings, policy_issuers=policy_issuers)
    if token is not None:
        if not loopback and not settings.tls_cert:
            raise ValueError(
                "JWT client auth beyond loopback requires DBGOV_TLS_CERT (tokens travel as passwords)"
            )
    elif settings.client_password:
        scram = auth.scram_keys(settings.client_password, salt=salt)
    elif not loopback:
        raise ValueError(
            "listening beyond loopback requires DBGOV_CLIENT_PASSWORD, or JWT issuers (the policy's "
            "authentication.jwt, DBGOV_JWT_ISSUERS_FILE or DBGOV_CLIENT_JWT_KEY) (trust is loopback-only)"
        )
    return proxy.ProxyConfig(
        listen_host=host,
        listen_port=port,
        upstream=upstream,
        session=session.SessionConfig(
            client_scram=scram,
            client_token=token is not None,
            max_message_size=settings.max_message_size,
            audit=True,
            redact_literals=settings.audit_redact_literals,
            upstream_user=upstream.user,
        ),
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        drain_timeout=settings.drain_timeout,
        max_connections=settings.max_connections,
        max_startup_connections=settings.max_startup_connections,
        max_session_buffer=settings.max_session_buffer,
        max_total_buffer=settings.max_total_buffer,
        auth_timeout=settings.auth_timeout,
        lane=settings.lane,
        token_verifier=token,
    )
