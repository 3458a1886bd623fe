"""Load the policy file and swap it in on change, keeping the old one if the new is invalid.

With a bundle key (cluster mode) a file is loaded only if the operator's signature verifies
for this pod's namespace and ServiceAccount and is not older than the one in force; a refused
bundle is an audit event ``bundle_rejected``, the last good policy stays in force, and with none
yet every statement is refused and ``/readyz`` says why.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, engine, model
from dbgov_sidecar import audit, bundle_signature, policy_port, policyfile

log = logging.getLogger("dbgov.policy")

_VERIFIED: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "dbgov_verified_bundle", default=None
)
"""(path, text) of a bundle file whose signature verified: ``load`` compiles exactly that text
instead of reading the file again (which may have changed since), whatever wraps the loader."""


def load(path: str, *, max_statement_size: int = engine.MAX_STATEMENT_SIZE) -> policy_port.Policy:
    """Compile ``path`` with ``dbgov_policy`` and wrap its engine (raises on invalid policy);
    the engine refuses statement texts longer than ``max_statement_size`` bytes."""
    pinned = _VERIFIED.get()
    text = pinned[1] if pinned is not None and pinned[0] == path else None
    loaded = policyfile.load_file(path, mask_key=os.environ.get("DBGOV_MASK_KEY", ""), text=text)
    return build(loaded, max_statement_size=max_statement_size)


def build(
    loaded: model.CompiledPolicy | Sequence[compose.Component],
    *,
    max_statement_size: int = engine.MAX_STATEMENT_SIZE,
) -> policy_port.Policy:
    """The policy the proxy decides with: one policy's engine (also a bundle of one, its rules
    named ``policy/rule``), or the composition of a bundle's policies. A bundle of none refuses
    every statement (its workload is bound by no policy)."""
    if isinstance(loaded, model.CompiledPolicy):
        return policy_port.EnginePolicy(engine.Engine(loaded, max_statement_size=max_statement_size))
    if not loaded:
        nothing = policy_compile.compile_policy({"default": "block"})
        return policy_port.EnginePolicy(engine.Engine(nothing, max_statement_size=max_statement_size))
    if len(loaded) == 1:
        (only,) = loaded
        rules = tuple(dataclasses.replace(r, name=f"{only.name}/{r.name}") for r in only.policy.rules)
        named = dataclasses.replace(only.policy, rules=rules)
        return policy_port.EnginePolicy(engine.Engine(named, max_statement_size=max_statement_size))
    return policy_port.ComposedPolicy(compose.Composed(loaded, max_statement_size=max_statement_size))


def problems_of(err: Exception) -> list[str]:
    """Every problem an invalid policy reported, one line each."""
    problems = getattr(err, "problems", None)
    if problems:
        return [f"{getattr(p, 'path', '')}: {getattr(p, 'message', p)}" for p in problems]
    return [str(err) or type(err).__name__]


class PolicyHolder:
    """The policy in force; sessions read ``current`` for every decision."""

    def __init__(
        self,
        path: str | None,
        *,
        loader: Callable[[str], policy_port.Policy] = load,
        trust: policyfile.Trust | None = None,
    ) -> None:
        self.path = path
        self._load = loader
        self.trust = trust
        """Whose signed bundles to load (None: local mode, the file is not signed)."""
        self.generation: int | None = None
        """The generation of the signed bundle in force."""
        self.rejected: bundle_signature.BundleRejected | None = None
        """Why the last signed bundle read was refused (None once one loads)."""
        self._audit: Callable[[audit.Event], None] | None = None
        self._unaudited: list[dict[str, Any]] = []
        self.current: policy_port.Policy = self._initial(path)
        self.reloads = 0
        self.reload_failures = 0
        self._mtime = self._stat()

    def __call__(self) -> policy_port.Policy:
        return self.current

    def _initial(self, path: str | None) -> policy_port.Policy:
        """The policy to start with. Fail closed: no policy, or a file not there yet, refuses all.

        A missing file is waited for (the operator writes the pod's bundle; `changed` sees it
        appear); a file that is there but invalid raises, so `dbgov proxy` stops and says why.
        """
        if path is None:
            log.error("no policy configured: every statement is refused until DBGOV_POLICY is set")
            return policy_port.RefuseAll(
                "dbgov has no policy configured, so it refuses every statement",
                "Start dbgov proxy with --policy FILE (or DBGOV_POLICY).",
            )
        if not os.path.exists(path):
            log.error("policy file %s does not exist yet: refusing every statement until it does", path)
            return policy_port.RefuseAll(
                f"dbgov's policy file {path} does not exist yet, so it refuses every statement",
                "The policy bundle is written by the dbgov operator; check that a DatabaseAccessPolicy "
                "binds this workload.",
            )
        if self.trust is None:
            return self._load(path)
        try:
            return self._load_verified(path)
        except bundle_signature.BundleRejected as err:
            self._rejected(err)
            return policy_port.RefuseAll(
                f"the policy bundle {path} was refused ({err.code}: {err.reason}), so dbgov refuses "
                "every statement until the operator writes a valid one",
                "The dbgov operator signs every bundle and rewrites a changed one within seconds; "
                "check that it is running and that nobody edits the bundle ConfigMap.",
            )

    def _load_verified(self, path: str) -> policy_port.Policy:
        """Verify, then compile exactly the bytes that verified (raises BundleRejected or the
        compiler's error; neither changes the policy in force)."""
        assert self.trust is not None
        verified = policyfile.read_verified(path, trust=self.trust, loaded_generation=self.generation)
        token = _VERIFIED.set((path, verified.text))
        try:
            policy = self._load(path)
        finally:
            _VERIFIED.reset(token)
        self.generation = verified.generation
        self.rejected = None
        return policy

    def attach_audit(self, record: Callable[[audit.Event], None]) -> None:
        """Send ``bundle_rejected`` events to ``record`` from now on, and those from before the
        audit log existed (the first load)."""
        self._audit = record
        pending, self._unaudited = self._unaudited, []
        for event in pending:
            record(event)

    def _rejected(self, err: bundle_signature.BundleRejected) -> None:
        self.rejected = err
        log.error("policy bundle %s refused: %s (%s)", self.path, err.reason, err.code)
        event: dict[str, Any] = {
            "type": "bundle_rejected",
            "time": audit.timestamp(time.time()),
            "file": self.path,
            "reason": err.code,
            "detail": err.reason,
            "generation_in_force": self.generation,
            "in_force": "the last good bundle"
            if self.generation is not None
            else "none: every statement is refused",
        }
        if self._audit is None:
            self._unaudited.append(event)
        else:
            self._audit(event)

    def _stat(self) -> tuple[float | None, ...] | None:
        if self.path is None:
            return None
        paths = [self.path]
        if self.trust is not None:
            paths.append(str(policyfile.signature_path(self.path)))
        return tuple(_mtime(p) for p in paths)

    def changed(self) -> bool:
        """True when the file's (or its signature's) modification time moved since the last load."""
        return self.path is not None and self._stat() != self._mtime

    def reload(self) -> list[str]:
        """Load the file again; on failure keep the old policy and return every problem."""
        if self.path is None:
            return []
        self._mtime = self._stat()
        try:
            policy = self._load(self.path) if self.trust is None else self._load_verified(self.path)
        except bundle_signature.BundleRejected as err:
            self.reload_failures += 1
            self._rejected(err)
            return [f"bundle refused ({err.code}): {err.reason}"]
        except Exception as err:  # any failure keeps the policy in force
            self.reload_failures += 1
            problems = problems_of(err)
            for problem in problems:
                log.error("policy %s not reloaded: %s", self.path, problem)
            return problems
        self.current = policy
        self.reloads += 1
        log.info("policy %s reloaded", self.path)
        return []


def _mtime(path: str) -> float | None:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None
