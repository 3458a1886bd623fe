"""The credential endpoint: a sidecar presents its projected ServiceAccount token, the operator
checks it with TokenReview and the Pod it is bound to, and answers who the workload is (and,
once an issuer mints them, its database credentials).

It is the one way identity (and later a database password) reaches a sidecar, so it runs over
HTTPS with the webhook's serving certificate (sidecars verify it against the CA injection gives
them), limits request sizes and rates per client address, and refuses with a reason code only:
the detail of why goes to the operator's log, never to the caller. Every answer is logged as an
audit-style JSON line on stdout. The decisions themselves are :mod:`identity`'s (pure).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import json
import logging
import pathlib
import ssl
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import kubernetes
from aiohttp import web
from kubernetes.client.exceptions import ApiException

from dbgov_operator import identity, injection, settings, webhook

logger = logging.getLogger(__name__)

PATH = "/v1/credentials"
_STATUS: Mapping[identity.ReasonCode, int] = {
    "missing_token": 401,
    "token_invalid": 401,
    "token_expired": 401,
    "wrong_audience": 401,
    "audience_not_exclusive": 401,
    "not_a_service_account": 403,
    "not_pod_bound": 403,
    "pod_not_found": 403,
    "pod_uid_mismatch": 403,
    "pod_terminating": 403,
    "service_account_mismatch": 403,
    "node_mismatch": 403,
}
_MAX_TRACKED_CLIENTS = 4096  # rate-limit buckets kept; the least recently seen go first


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedCredentials:
    """Database credentials minted for one workload: everything the sidecar needs to log in
    upstream (docs/credentials.md, "The credential endpoint's answer")."""

    user: str
    password: str = field(repr=False)
    valid_until: datetime.datetime
    renew_at: datetime.datetime | None = None
    """When the sidecar should present again (``valid_until`` - the policy's renewBefore)."""
    database: str = ""
    """The ``Database`` resource (same namespace) the role is for."""
    host: str = ""
    port: int = 5432
    dbname: str = ""
    sslmode: str = "verify-full"
    ca_pem: str | None = field(default=None, repr=False)
    """The CA bundle of the Database's ``caSecretRef`` (None: the system trust store)."""
    policies: tuple[str, ...] = ()
    """The policies whose group roles the login role is a member of."""

    def as_json(self) -> dict[str, Any]:
        """The ``credentials`` object of the endpoint's answer."""
        return {
            "database": self.database,
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "sslmode": self.sslmode,
            "caPem": self.ca_pem,
            "user": self.user,
            "password": self.password,
            "validUntil": _iso(self.valid_until),
            "renewAt": _iso(self.renew_at) if self.renew_at is not None else None,
            "policies": list(self.policies),
        }


class IssueRefused(Exception):
    """The issuer will not give this workload credentials: an HTTP status, a machine-readable
    code, a message the caller may read, and detail for the operator's log only."""

    def __init__(self, *, status: int, code: str, message: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail or message}")
        self.status, self.code, self.message, self.detail = status, code, message, detail or message


class Issuer(Protocol):
    """Mints (or renews) database credentials for a verified workload; ``None``: none to give;
    raises :class:`IssueRefused` to refuse with a reason."""

    def issue(self, workload: identity.Identity) -> IssuedCredentials | None: ...


class IdentityOnly:
    """The default issuer: identity only, no credentials (until minting is plugged in)."""

    def issue(self, workload: identity.Identity) -> IssuedCredentials | None:
        return None


class TokenBuckets:
    """A token bucket per client address, least recently seen forgotten first (bounded memory)."""

    def __init__(self, *, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate, self._burst, self._clock = rate, float(burst), clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str) -> bool:
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > _MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed


def endpoint_url(config: settings.Settings, *, port: int) -> str:
    """The URL sidecars use: through the webhook Service in a cluster, else the URL host."""
    hook = config.webhook
    if hook.service_name:
        host = f"{hook.service_name}.{config.namespace}.svc"
        port = config.credentials.service_port
    else:
        host = f"[{hook.url_host}]" if ":" in hook.url_host else hook.url_host
    return f"https://{host}:{port}{PATH}"


class CredentialServer:
    """The HTTPS endpoint; ``start`` binds it, ``stop`` closes it."""

    def __init__(
        self,
        config: settings.Settings,
        *,
        client: Any,
        issuer: Issuer | None = None,
        audit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self._config = config
        self._client = client
        self._issuer: Issuer = issuer if issuer is not None else IdentityOnly()
        self._audit = audit if audit is not None else _print_line
        limits = config.credentials
        self._buckets = TokenBuckets(rate=limits.rate_per_second, burst=limits.burst)
        self._reviews = asyncio.Semaphore(limits.max_concurrent_reviews)
        self._runner: web.AppRunner | None = None
        self._reload: asyncio.Task[None] | None = None
        self._files: tuple[bytes, bytes] = (b"", b"")
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
        self.port = 0

    @property
    def endpoint(self) -> injection.CredentialEndpoint:
        """What injection gives sidecars: the URL and the CA bundle to verify the server."""
        ca = pathlib.Path(self._config.webhook.cert_dir) / webhook.CA_FILE
        return injection.CredentialEndpoint(
            url=endpoint_url(self._config, port=self.port), ca_pem=ca.read_text()
        )

    async def start(self) -> None:
        self._load_certificate()
        app = web.Application(client_max_size=self._config.credentials.max_body_bytes)
        app.router.add_post(PATH, self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        limits = self._config.credentials
        site = web.TCPSite(runner, limits.listen_addr, limits.port, ssl_context=self._tls)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self._reload = asyncio.create_task(self._reload_certificates(), name="dbgov credential TLS")
        logger.info(
            "Credential endpoint listening on %s (%s)", self.port, endpoint_url(self._config, port=self.port)
        )

    async def stop(self) -> None:
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload
            self._reload = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- TLS -------------------------------------------------------------------------------

    def _load_certificate(self) -> bool:
        """(Re)load the webhook's serving certificate when its files changed; new handshakes
        use the new one."""
        directory = pathlib.Path(self._config.webhook.cert_dir)
        cert, key = directory / webhook.CERT_FILE, directory / webhook.KEY_FILE
        files = (cert.read_bytes(), key.read_bytes())
        if files == self._files:
            return False
        self._tls.load_cert_chain(str(cert), str(key))
        self._files = files
        return True

    async def _reload_certificates(self) -> None:
        interval = min(10.0, self._config.webhook.rotation_check_seconds)
        while True:
            await asyncio.sleep(interval)
            try:
                if self._load_certificate():
                    logger.info("Credential endpoint: serving the renewed certificate")
            except (OSError, ssl.SSLError):
                logger.exception("Credential endpoint: cannot reload the certificate; keeping the old one")

    # ---- requests --------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        client = request.remote or "unknown"
        if not self._buckets.allow(client):
            return self._error(client, status=429, code="rate_limited", detail="rate limit")
        if (request.content_length or 0) > self._config.credentials.max_body_bytes:
            return self._error(client, status=413, code="request_too_large", detail="body too large")
        try:
            await request.read()  # the body is unused; reading enforces client_max_size
        except web.HTTPRequestEntityTooLarge:
            return self._error(client, status=413, code="request_too_large", detail="body too large")
        token = identity.bearer_token(request.headers.get("Authorization"))
        if isinstance(token, identity.Refusal):
            return self._refused(client, token)
        try:
            async with self._reviews:
                verdict, bound = await asyncio.to_thread(self._verify, token)
        except (ApiException, OSError, kubernetes.client.exceptions.OpenApiException) as err:
            logger.warning("Credential endpoint: TokenReview or pod lookup failed: %s", err)
            return self._error(client, status=503, code="review_unavailable", detail=str(err))
        if isinstance(verdict, identity.Refusal):
            return self._refused(client, verdict, bound=bound)
        return await self._issue(client, verdict, token=token, bound=bound)

    def _verify(self, token: str) -> tuple[identity.Identity | identity.Refusal, identity.BoundToken | None]:
        """TokenReview, then the bound pod (blocking client calls: run in a thread)."""
        status = self._review(token)
        bound = identity.read_review(status, audience=self._config.sidecar.token_audience)
        if isinstance(bound, identity.Refusal):
            return bound, None
        broad = identity.exclusive_audience(token, audience=self._config.sidecar.token_audience)
        if broad is not None:
            return broad, None
        return identity.check_pod(bound, self._read_pod(bound.namespace, bound.pod)), bound

    def _review(self, token: str) -> Mapping[str, Any]:
        api: Any = kubernetes.client.AuthenticationV1Api(self._client)
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self._config.sidecar.token_audience]},
        }
        review = self._client.sanitize_for_serialization(api.create_token_review(body))
        return dict(review.get("status") or {})

    def _read_pod(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        core: Any = kubernetes.client.CoreV1Api(self._client)
        try:
            pod = core.read_namespaced_pod(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        found: dict[str, Any] = self._client.sanitize_for_serialization(pod)
        return found

    async def _issue(
        self,
        client: str,
        workload: identity.Identity,
        *,
        token: str,
        bound: identity.BoundToken | None,
    ) -> web.Response:
        try:
            issued = await asyncio.to_thread(self._issuer.issue, workload)
        except IssueRefused as err:
            return self._error(
                client,
                status=err.status,
                code=err.code,
                detail=err.detail,
                message=err.message,
                workload=workload.as_json(),
            )
        expires = token_expiry(token)
        if issued is not None:
            expires = min(expires, issued.valid_until) if expires is not None else issued.valid_until
        credentials = issued.as_json() if issued is not None else None
        self._audit(
            {
                "type": "credential_issue",
                "time": _iso(datetime.datetime.now(datetime.UTC)),
                "client_addr": client,
                "workload": workload.as_json(),
                "credential_id": bound.credential_id if bound is not None else "",
                "db_user": issued.user if issued is not None else None,
                "database": issued.database if issued is not None else None,
                "valid_until": _iso(issued.valid_until) if issued is not None else None,
            }
        )
        body = {
            "identity": workload.as_json(),
            "expiresAt": _iso(expires) if expires is not None else None,
            "credentials": credentials,
        }
        return web.json_response(body, headers={"Cache-Control": "no-store"})

    def _refused(
        self, client: str, refusal: identity.Refusal, *, bound: identity.BoundToken | None = None
    ) -> web.Response:
        workload = None
        if bound is not None:
            workload = {
                "namespace": bound.namespace,
                "serviceAccount": bound.service_account,
                "pod": bound.pod,
            }
        return self._error(
            client,
            status=_STATUS[refusal.code],
            code=refusal.code,
            detail=refusal.detail,
            message=refusal.message,
            workload=workload,
        )

    def _error(
        self,
        client: str,
        *,
        status: int,
        code: str,
        detail: str,
        message: str = "",
        workload: Mapping[str, str] | None = None,
    ) -> web.Response:
        message = message or {
            "rate_limited": "too many requests from this address; retry later",
            "request_too_large": "the request is too large",
            "review_unavailable": "the operator cannot reach the Kubernetes API; retry later",
        }.get(code, code)
        self._audit(
            {
                "type": "credential_refusal",
                "time": _iso(datetime.datetime.now(datetime.UTC)),
                "client_addr": client,
                "code": code,
                "detail": detail,
                "workload": workload,
            }
        )
        headers = {"Cache-Control": "no-store"}
        if status == 429:
            headers["Retry-After"] = "1"
        return web.json_response(
            {"error": {"code": code, "message": message}}, status=status, headers=headers
        )


def token_expiry(token: str) -> datetime.datetime | None:
    """The ``exp`` of a JWT the apiserver already authenticated (read, not verified, here)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.datetime.fromtimestamp(int(claims["exp"]), datetime.UTC)
    except (IndexError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _print_line(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, separators=(",", ":")) + "\n")
    sys.stdout.flush()
