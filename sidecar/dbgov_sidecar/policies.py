"""Load the policy file and swap it in on change, keeping the old one if the new is invalid."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, engine, model
from dbgov_sidecar import policy_port, policyfile

log = logging.getLogger("dbgov.policy")


def load(path: str, *, max_statement_size: int = engine.MAX_STATEMENT_SIZE) -> policy_port.Policy:
    """Compile ``path`` with ``dbgov_policy`` and wrap its engine (raises on invalid policy);
    the engine refuses statement texts longer than ``max_statement_size`` bytes."""
    loaded = policyfile.load_file(path, mask_key=os.environ.get("DBGOV_MASK_KEY", ""))
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

    def __init__(self, path: str | None, *, loader: Callable[[str], policy_port.Policy] = load) -> None:
        self.path = path
        self._load = loader
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
        return self._load(path)

    def _stat(self) -> float | None:
        if self.path is None:
            return None
        try:
            return os.stat(self.path).st_mtime
        except OSError:
            return None

    def changed(self) -> bool:
        """True when the file's modification time moved since the last load."""
        return self.path is not None and self._stat() != self._mtime

    def reload(self) -> list[str]:
        """Load the file again; on failure keep the old policy and return every problem."""
        if self.path is None:
            return []
        self._mtime = self._stat()
        try:
            policy = self._load(self.path)
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
