"""Who a sidecar is, decided from a TokenReview answer and the Pod its token is bound to.

The credential endpoint hands out database credentials to whoever presents a projected
ServiceAccount token, so the decision must be exactly right and testable without a cluster:
this module is pure (the review status and the Pod are plain dicts in, an ``Identity`` or a
``Refusal`` with a machine-readable code out). ``credential_server`` does the I/O around it.

A token passes only when the apiserver authenticated it for our audience, it is bound to a
pod (projected tokens are; a plain TokenRequest for the ServiceAccount is not), and that pod
still exists with the same uid, is not being deleted and runs as the token's ServiceAccount:
a token copied out of a deleted pod, or one from a pod recreated under the same name, gets
nothing. A token that names a node (the apiserver adds the pod's node to tokens it mints for
a scheduled pod, 1.30+) must name the pod's own node: a pod never moves, so any other node (or
a node for a pod not scheduled) means the token was not minted for this pod's kubelet. A token
without a node name is accepted for a scheduled pod (older apiservers, or the apiserver could
not read the Node when it minted it); who may mint tokens for the dbgov audience at all is the
chart's admission policy (nodes only) and NodeRestriction's (a node for its own pods only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jwt

SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
CREDENTIAL_ID_EXTRA = "authentication.kubernetes.io/credential-id"

ReasonCode = Literal[
    "missing_token",
    "token_invalid",
    "token_expired",
    "wrong_audience",
    "audience_not_exclusive",
    "not_a_service_account",
    "not_pod_bound",
    "pod_not_found",
    "pod_uid_mismatch",
    "pod_terminating",
    "service_account_mismatch",
    "node_mismatch",
]

REASONS: Mapping[ReasonCode, str] = {
    "missing_token": "no bearer token: send the projected ServiceAccount token as 'Authorization: Bearer <token>'",
    "token_invalid": "the API server did not authenticate the token (forged, malformed or revoked)",
    "token_expired": "the token has expired; read the projected token file again (the kubelet rotates it)",
    "wrong_audience": "the token was not issued for the dbgov audience; project it with audience dbgov",
    "audience_not_exclusive": (
        "the token is valid for other audiences too (the Kubernetes API's, say: every pod holds "
        "such a token); present the projected token whose only audience is dbgov"
    ),
    "not_a_service_account": "the token is not a ServiceAccount's",
    "not_pod_bound": "the token is not bound to a pod; use the projected token the webhook mounts",
    "pod_not_found": "the pod the token is bound to does not exist (any more)",
    "pod_uid_mismatch": "a pod of that name exists, but it is not the pod the token was bound to",
    "pod_terminating": "the pod the token is bound to is being deleted",
    "service_account_mismatch": "the pod the token is bound to does not run as the token's ServiceAccount",
    "node_mismatch": "the token names another node than the one the pod it is bound to runs on",
}
"""Every refusal's code and what it means, as the operator logs it and tests read it."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """A verified workload: the pod the token is bound to, as the apiserver knows it."""

    namespace: str
    service_account: str
    pod: str
    pod_uid: str
    node: str
    """The node the pod runs on; empty for a pod not scheduled (yet)."""

    def as_json(self) -> dict[str, str]:
        """The identity as the endpoint answers it and audit events carry it."""
        return {
            "namespace": self.namespace,
            "serviceAccount": self.service_account,
            "pod": self.pod,
            "podUid": self.pod_uid,
            "node": self.node,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class BoundToken:
    """What an authenticated token claims: its ServiceAccount and the pod it is bound to."""

    namespace: str
    service_account: str
    pod: str
    pod_uid: str
    node: str
    credential_id: str
    """The token's ``JTI=...`` id when the apiserver reports one (for the audit log)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Refusal:
    """Why a token gets nothing: a code from :data:`REASONS`, and detail for the operator's log
    only (never sent to the caller)."""

    code: ReasonCode
    detail: str

    @property
    def message(self) -> str:
        """The code's fixed description (what the caller is told)."""
        return REASONS[self.code]


def bearer_token(authorization: str | None) -> str | Refusal:
    """The token of an ``Authorization: Bearer <token>`` header."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return Refusal(code="missing_token", detail="no 'Authorization: Bearer' header")
    return token.strip()


def read_review(status: Mapping[str, Any], *, audience: str) -> BoundToken | Refusal:
    """Check a TokenReview's ``status`` (as the apiserver answered, camelCase keys): the token
    is authenticated, for ``audience``, a ServiceAccount's and bound to a pod."""
    if not status.get("authenticated"):
        return _unauthenticated(str(status.get("error") or ""))
    audiences = status.get("audiences") or []
    if audience not in audiences:
        return Refusal(code="wrong_audience", detail=f"audiences {list(audiences)}, need {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    namespace, _, account = username.removeprefix(SERVICE_ACCOUNT_PREFIX).partition(":")
    if not username.startswith(SERVICE_ACCOUNT_PREFIX) or not namespace or not account:
        return Refusal(code="not_a_service_account", detail=f"username {username!r}")
    extra: Mapping[str, Sequence[str]] = user.get("extra") or {}
    pod, pod_uid = _one(extra, POD_NAME_EXTRA), _one(extra, POD_UID_EXTRA)
    if not pod or not pod_uid:
        return Refusal(code="not_pod_bound", detail=f"{username} token without a bound pod")
    return BoundToken(
        namespace=namespace,
        service_account=account,
        pod=pod,
        pod_uid=pod_uid,
        node=_one(extra, NODE_NAME_EXTRA),
        credential_id=_one(extra, CREDENTIAL_ID_EXTRA),
    )


def exclusive_audience(token: str, *, audience: str) -> Refusal | None:
    """Refuse a token whose ``aud`` names more than ``audience`` (read after the TokenReview
    verified it, so its claims are the apiserver's). A pod's default ServiceAccount token is
    for the apiserver's audiences; where a cluster lists dbgov among them (--api-audiences),
    every container of every pod would hold a token TokenReview accepts for dbgov: the app
    could fetch its sidecar's credentials itself. The sidecar's projected token names dbgov
    alone."""
    try:
        aud = jwt.decode(token, options={"verify_signature": False})["aud"]
    except (jwt.InvalidTokenError, KeyError) as err:
        return Refusal(code="token_invalid", detail=f"claims unreadable after review: {err!r}")
    audiences = [aud] if isinstance(aud, str) else aud
    if audiences != [audience]:
        return Refusal(code="audience_not_exclusive", detail=f"aud {audiences!r}, need [{audience!r}] alone")
    return None


def check_pod(token: BoundToken, pod: Mapping[str, Any] | None) -> Identity | Refusal:
    """Check the pod the token is bound to (``None``: not found) and derive the identity."""
    where = f"pod {token.namespace}/{token.pod}"
    if pod is None:
        return Refusal(code="pod_not_found", detail=f"{where} (uid {token.pod_uid}) not found")
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    if meta.get("uid") != token.pod_uid:
        return Refusal(
            code="pod_uid_mismatch", detail=f"{where} has uid {meta.get('uid')}, the token {token.pod_uid}"
        )
    if meta.get("deletionTimestamp"):
        return Refusal(code="pod_terminating", detail=f"{where} deleted at {meta['deletionTimestamp']}")
    account = spec.get("serviceAccountName") or "default"
    if account != token.service_account:
        return Refusal(
            code="service_account_mismatch",
            detail=f"{where} runs as {account}, the token is {token.service_account}'s",
        )
    node = str(spec.get("nodeName") or "")
    if token.node and token.node != node:
        return Refusal(
            code="node_mismatch",
            detail=f"{where} runs on node {node or '(none: not scheduled)'}, the token names {token.node}",
        )
    return Identity(
        namespace=token.namespace,
        service_account=token.service_account,
        pod=token.pod,
        pod_uid=token.pod_uid,
        node=node,
    )


def _unauthenticated(error: str) -> Refusal:
    """Classify the apiserver's error text: it differs between versions, so only the words that
    name expiry and audience are read; anything else is an invalid token."""
    lowered = error.lower()
    if "expired" in lowered:
        return Refusal(code="token_expired", detail=error)
    if "audience" in lowered:
        return Refusal(code="wrong_audience", detail=error)
    return Refusal(code="token_invalid", detail=error or "not authenticated")


def _one(extra: Mapping[str, Sequence[str]], key: str) -> str:
    values = extra.get(key) or []
    return str(values[0]) if len(values) == 1 else ""
