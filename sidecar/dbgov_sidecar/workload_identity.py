"""The sidecar's workload identity: who the operator says this pod is, from its projected token.

In a cluster the sidecar must not serve a client before it knows, verified by the operator,
which pod it runs in: every audit event carries that identity, and the operator's answer is
also where minted database credentials arrive. So at start the proxy presents the projected
ServiceAccount token (re-read each time: the kubelet rotates it) to the operator's credential
endpoint over HTTPS, verifying the operator's certificate against the CA injection gave it,
and refuses clients until an answer arrives; it retries with backoff and logs why. Credentials,
when the operator sends them, stay in memory only.

Minted credentials expire (the role's VALID UNTIL), so the sidecar presents again at the
answer's ``renewAt`` (or a margin before ``validUntil``) and swaps the new credentials in as one
object: a new upstream connection reads them when it connects (:meth:`WorkloadIdentity.login`),
while open sessions keep the connections they logged in with (VALID UNTIL only stops new
logins). A failed renewal retries with backoff; once ``validUntil`` passes with no renewal, new
logins are refused (fail closed). Each step is an audit event without secrets.

The request is one blocking ``urllib`` call in a thread (stdlib only); the answer's parsing is
pure (:func:`parse_answer`).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import pathlib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dbgov.identity")

TIMEOUT = 10.0
"""Seconds one request to the operator may take."""
MAX_ANSWER = 64 * 1024
"""Largest answer read from the operator."""
FIRST_RETRY, MAX_RETRY = 1.0, 30.0
"""Backoff between failed attempts, doubling from the first to the last."""
REFRESH = 300.0
"""Seconds between presentations once verified (sooner when the answer expires sooner)."""
RENEW_MARGIN = 60.0
"""Without ``renewAt``: present again this long before ``validUntil`` (or at two thirds of the
time left, when less remains)."""

AuditWrite = Callable[[dict[str, Any]], None]
"""Where credential events go (the proxy's audit log)."""


class NoCredentials(Exception):
    """No usable database credentials now; ``reason`` says why (for the client's FATAL)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unverified(Exception):
    """The operator did not (or could not) verify this sidecar; ``reason`` says why."""

    def __init__(self, reason: str, *, code: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code
        """The operator's reason code, when it answered with one."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """The pod the operator verified this sidecar's token for."""

    namespace: str
    service_account: str
    pod: str
    pod_uid: str
    node: str

    def audit_fields(self) -> dict[str, str]:
        """The ``workload`` field of every audit event."""
        return {
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "pod": self.pod,
            "podUid": self.pod_uid,
            "node": self.node,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """Database credentials the operator minted for this workload (memory only): the answer's
    ``credentials`` object (docs/credentials.md, "The credential endpoint's answer"). Empty or
    None fields are the ones the answer did not give (the static upstream settings apply)."""

    user: str
    password: str = field(repr=False)
    valid_until: datetime.datetime
    renew_at: datetime.datetime | None = None
    """When to present again for a renewal (None: a margin before ``valid_until``)."""
    database: str = ""
    """The ``Database`` resource the role is for."""
    host: str = ""
    port: int | None = None
    dbname: str = ""
    sslmode: str = ""
    ca_pem: str | None = field(default=None, repr=False)
    """CA bundle (PEM) the database's certificate must verify against."""
    policies: tuple[str, ...] = ()

    def audit_fields(self) -> dict[str, Any]:
        """What a credentials event says about them (never the password)."""
        return {
            "db_user": self.user,
            "database": self.database or None,
            "valid_until": _iso(self.valid_until),
            "renew_at": _iso(self.renew_at) if self.renew_at is not None else None,
        }


def parse_credentials(raw: Any) -> Credentials:
    """The answer's ``credentials`` object (raises KeyError/TypeError/ValueError when malformed)."""
    if not isinstance(raw, dict):
        raise TypeError(f"credentials must be an object, not {type(raw).__name__}")
    user, password = str(raw["user"]), str(raw["password"])
    if not user or not password:
        raise ValueError("credentials without a user or a password")
    port = raw.get("port")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536):
        raise ValueError(f"credentials port {port!r} is not a port number")
    return Credentials(
        user=user,
        password=password,
        valid_until=_time(raw["validUntil"]),
        renew_at=_time(raw["renewAt"]) if raw.get("renewAt") else None,
        database=str(raw.get("database") or ""),
        host=str(raw.get("host") or ""),
        port=port,
        dbname=str(raw.get("dbname") or ""),
        sslmode=str(raw.get("sslmode") or ""),
        ca_pem=str(raw["caPem"]) if raw.get("caPem") else None,
        policies=tuple(str(p) for p in raw.get("policies") or ()),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Verified:
    """One answer of the operator."""

    workload: Workload
    credentials: Credentials | None
    expires_at: datetime.datetime | None


def parse_answer(body: bytes, *, pod_uid: str | None = None) -> Verified:
    """The operator's 200 answer; ``pod_uid`` (the sidecar's own, from the downward API) must
    match the verified pod's when given."""
    try:
        answer = json.loads(body)
        ident = answer["identity"]
        workload = Workload(
            namespace=str(ident["namespace"]),
            service_account=str(ident["serviceAccount"]),
            pod=str(ident["pod"]),
            pod_uid=str(ident["podUid"]),
            node=str(ident.get("node") or ""),
        )
        raw = answer.get("credentials")
        credentials = parse_credentials(raw) if raw else None
        expires = _time(answer["expiresAt"]) if answer.get("expiresAt") else None
    except (ValueError, KeyError, TypeError) as err:
        raise Unverified(f"the operator's answer is not what dbgov expects ({err!r})") from err
    if pod_uid and workload.pod_uid != pod_uid:
        raise Unverified(
            f"the operator verified pod {workload.namespace}/{workload.pod} uid {workload.pod_uid}, "
            f"but this sidecar runs in pod uid {pod_uid} (DBGOV_POD_UID): the token is not this pod's"
        )
    return Verified(workload=workload, credentials=credentials, expires_at=expires)


def refusal(status: int, body: bytes) -> Unverified:
    """An error answer as :class:`Unverified` with the operator's code and message."""
    try:
        error = json.loads(body)["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return Unverified(f"the operator answered HTTP {status}")
    return Unverified(f"the operator refused this sidecar's token: {code}: {message}", code=code)


def ssl_context(ca: str) -> ssl.SSLContext:
    """Verify the operator against ``ca``: PEM text, or the path of a PEM file."""
    if "-----BEGIN" in ca:
        return ssl.create_default_context(cadata=ca)
    return ssl.create_default_context(cafile=ca)


def present(*, url: str, token_file: str, context: ssl.SSLContext, pod_uid: str | None = None) -> Verified:
    """Read the token and POST it to the operator (blocking: call in a thread)."""
    try:
        token = pathlib.Path(token_file).read_text().strip()
    except OSError as err:
        raise Unverified(f"cannot read the projected token {token_file} (DBGOV_TOKEN_FILE): {err}") from err
    if not token:
        raise Unverified(f"the projected token {token_file} (DBGOV_TOKEN_FILE) is empty")
    request = urllib.request.Request(
        url,
        data=b"{}",
        method="POST",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return parse_answer(response.read(MAX_ANSWER), pod_uid=pod_uid)
    except urllib.error.HTTPError as err:
        raise refusal(err.code, err.read(MAX_ANSWER)) from err
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise Unverified(
                f"the operator at {url} presented a certificate the CA in DBGOV_CREDENTIAL_CA does not "
                f"verify ({reason.verify_message}); the injected CA is stale or the URL is wrong"
            ) from err
        raise Unverified(f"cannot reach the operator at {url} (DBGOV_CREDENTIAL_URL): {reason}") from err
    except (OSError, TimeoutError) as err:
        raise Unverified(f"cannot reach the operator at {url} (DBGOV_CREDENTIAL_URL): {err}") from err


class WorkloadIdentity:
    """The sidecar's verified identity, kept current by :meth:`run`."""

    def __init__(
        self,
        *,
        url: str,
        token_file: str,
        ca: str,
        pod_uid: str | None = None,
        clock: Callable[[], float] = time.time,
        audit: AuditWrite | None = None,
    ) -> None:
        self._url, self._token_file, self._pod_uid = url, token_file, pod_uid
        self._context = ssl_context(ca)
        self._clock = clock
        self._audit = audit
        self.current: Verified | None = None
        self.reason = "the operator has not been asked yet"
        """Why there is no verified identity (while :attr:`current` is ``None``)."""
        self.verified = asyncio.Event()
        self._held: Credentials | None = None
        """The credentials new logins use: swapped as one object, kept while a renewal fails."""
        self._renewal_failure: str | None = None
        self._expired_announced = False
        self.on_credentials: list[Callable[[Credentials], None]] = []
        """Called with each new set of credentials (the proxy reloads its policy on a new mask key)."""

    def audit_fields(self) -> dict[str, str] | None:
        """The ``workload`` audit field; ``None`` until verified (sessions refuse clients)."""
        return None if self.current is None else self.current.workload.audit_fields()

    @property
    def credentials(self) -> Credentials | None:
        """The minted database credentials new logins use (the latest received), if any."""
        return self._held

    def missing(self) -> str | None:
        """Why a new login would be refused now (no credentials yet, or expired); None when
        there are credentials to log in with. For /readyz: it announces nothing."""
        held = self._held
        if held is None:
            if self.current is None:
                return f"the operator has not verified this sidecar yet ({self.reason})"
            return (
                "the operator verified this sidecar but sent no database credentials (no policy "
                "binds this workload to a Database, or minting is off)"
            )
        if self._clock() >= held.valid_until.timestamp():
            why = f"; renewing failed: {self._renewal_failure}" if self._renewal_failure else ""
            return (
                f"the credentials of role {held.user} expired at {_iso(held.valid_until)} and were "
                f"not renewed{why}"
            )
        return None

    def login(self) -> Credentials:
        """The credentials to log in upstream with now, read at each new connection; raises
        :class:`NoCredentials` when there are none yet or they expired (fail closed)."""
        held, reason = self._held, self.missing()
        if reason is not None:
            if held is not None:
                self._announce_expiry(held)
            raise NoCredentials(reason)
        assert held is not None
        return held

    async def verify_once(self) -> Verified:
        """Present the token once; on success the answer becomes :attr:`current`."""
        verified = await asyncio.to_thread(
            present, url=self._url, token_file=self._token_file, context=self._context, pod_uid=self._pod_uid
        )
        if self.current is None or self.current.workload != verified.workload:
            log.info(
                "workload identity verified by the operator: %s", json.dumps(verified.workload.audit_fields())
            )
        self.current = verified
        if verified.credentials is not None:
            self._take(verified.credentials)
        self.verified.set()
        return verified

    def _take(self, new: Credentials) -> None:
        """Swap in ``new`` (one assignment: a login reads the old or the new, never a mix)."""
        old, self._held = self._held, new
        self._renewal_failure = None
        if old is not None and old == new:
            return
        self._expired_announced = False
        kind = "credentials_received" if old is None else "credentials_renewed"
        log.info("%s: role %s valid until %s", kind.replace("_", " "), new.user, _iso(new.valid_until))
        self._emit(kind, new.audit_fields())
        for callback in self.on_credentials:
            callback(new)

    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        if self._audit is None:
            return
        workload = None if self.current is None else self.current.workload.audit_fields()
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        self._audit(
            {"type": kind, "time": _iso(now), "session_id": "sidecar", "workload": workload, **fields}
        )

    def _announce_expiry(self, held: Credentials) -> None:
        if self._expired_announced or self._held is not held:
            return
        self._expired_announced = True
        log.warning(
            "dbgov: the credentials of role %s expired at %s without a renewal; new client logins "
            "are refused until the operator renews them (open sessions continue)",
            held.user,
            _iso(held.valid_until),
        )
        self._emit("credentials_expired", {**held.audit_fields(), "reason": self._renewal_failure})

    async def run(self) -> None:
        """Present the token until verified (backing off), then again before the answer expires."""
        delay = FIRST_RETRY
        while True:
            try:
                verified = await self.verify_once()
            except Unverified as err:
                self.reason = err.reason
                state = (
                    "keeping the identity verified before" if self.current is not None else "refusing clients"
                )
                log.warning(
                    "dbgov: workload identity not verified (%s); %s; retrying in %gs",
                    err.reason,
                    state,
                    delay,
                )
                if self._held is not None:
                    self._renewal_failure = err.reason
                    self._emit(
                        "warning",
                        {
                            "warning": "credentials renewal failed",
                            "reason": err.reason,
                            "retry_in": delay,
                            **self._held.audit_fields(),
                        },
                    )
                await self._sleep(delay)
                delay = min(delay * 2, MAX_RETRY)
                continue
            delay = FIRST_RETRY
            await self._sleep(self._refresh_in(verified))

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking at the held credentials' expiry on the way to announce it."""
        held = self._held
        if held is not None and not self._expired_announced:
            until_expiry = held.valid_until.timestamp() - self._clock()
            if 0 <= until_expiry < seconds:
                await asyncio.sleep(until_expiry)
                seconds -= until_expiry
                if self._held is held and self._clock() >= held.valid_until.timestamp():
                    self._announce_expiry(held)
        await asyncio.sleep(max(0.0, seconds))

    def _refresh_in(self, verified: Verified) -> float:
        now = self._clock()
        wait = REFRESH
        if verified.expires_at is not None:
            wait = min(wait, (verified.expires_at.timestamp() - now) / 2)
        held = verified.credentials
        if held is not None:
            left = held.valid_until.timestamp() - now
            renew = held.renew_at.timestamp() - now if held.renew_at is not None else None
            latest = left - RENEW_MARGIN if left > 3 * RENEW_MARGIN else left * 2 / 3
            renew = latest if renew is None else min(renew, latest)  # never after validUntil - margin
            if renew <= FIRST_RETRY:  # renewAt passed and the operator kept the role: not every second
                renew = left / 3
            wait = min(REFRESH, renew)
        return max(FIRST_RETRY, wait)


def _time(text: Any) -> datetime.datetime:
    when = datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    if when.tzinfo is None:
        raise ValueError(f"time {text!r} has no time zone")
    return when


def _iso(when: datetime.datetime) -> str:
    return when.astimezone(datetime.UTC).isoformat().replace("+00:00", "Z")
