"""The sidecar's workload identity: who the operator says this pod is, from its projected token.

In a cluster the sidecar must not serve a client before it knows, verified by the operator,
which pod it runs in: every audit event carries that identity, and the operator's answer is
also where minted database credentials arrive. So at start the proxy presents the projected
ServiceAccount token (re-read each time: the kubelet rotates it) to the operator's credential
endpoint over HTTPS, verifying the operator's certificate against the CA injection gave it,
and refuses clients until an answer arrives; it retries with backoff and logs why. Credentials,
when the operator sends them, stay in memory only.

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
    """Database credentials the operator minted for this workload (memory only)."""

    user: str
    password: str = field(repr=False)
    valid_until: datetime.datetime


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
        credentials = None
        if raw:
            credentials = Credentials(
                user=str(raw["user"]), password=str(raw["password"]), valid_until=_time(raw["validUntil"])
            )
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
    ) -> None:
        self._url, self._token_file, self._pod_uid = url, token_file, pod_uid
        self._context = ssl_context(ca)
        self._clock = clock
        self.current: Verified | None = None
        self.reason = "the operator has not been asked yet"
        """Why there is no verified identity (while :attr:`current` is ``None``)."""
        self.verified = asyncio.Event()

    def audit_fields(self) -> dict[str, str] | None:
        """The ``workload`` audit field; ``None`` until verified (sessions refuse clients)."""
        return None if self.current is None else self.current.workload.audit_fields()

    @property
    def credentials(self) -> Credentials | None:
        """The minted database credentials of the latest answer, if any."""
        return None if self.current is None else self.current.credentials

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
        self.verified.set()
        return verified

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
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY)
                continue
            delay = FIRST_RETRY
            await asyncio.sleep(self._refresh_in(verified))

    def _refresh_in(self, verified: Verified) -> float:
        if verified.expires_at is None:
            return REFRESH
        left = verified.expires_at.timestamp() - self._clock()
        return max(FIRST_RETRY, min(REFRESH, left / 2))


def _time(text: Any) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
