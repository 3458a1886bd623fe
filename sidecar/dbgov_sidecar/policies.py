"""Load the policy file and swap it in on change, keeping the old one if the new is invalid."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from dbgov_policy import engine
from dbgov_sidecar import policy_port, policyfile

log = logging.getLogger("dbgov.policy")


def load(path: str) -> policy_port.Policy:
    """Compile ``path`` with ``dbgov_policy`` and wrap its engine (raises on invalid policy)."""
    compiled = policyfile.load_policy_file(path, mask_key=os.environ.get("DBGOV_MASK_KEY", ""))
    return policy_port.EnginePolicy(engine.Engine(compiled))


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
        self.current: policy_port.Policy = policy_port.AllowAll() if path is None else loader(path)
        self.reloads = 0
        self.reload_failures = 0
        self._mtime = self._stat()

    def __call__(self) -> policy_port.Policy:
        return self.current

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
