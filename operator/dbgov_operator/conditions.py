"""A DatabaseAccessPolicy's status: conditions keyed by type, with observedGeneration.

Pure: the previous conditions and the clock come in, so an unchanged condition keeps its
``lastTransitionTime`` and an unchanged status is recognisably equal (no write, no event).
"""

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from dbgov_operator.kubetypes import BoundWorkload, Condition, PolicyStatus
from dbgov_policy import compile as policy_compile

POLICY_VALID = "PolicyValid"
READY = "Ready"
COMPOSITION_INVALID = "CompositionInvalid"
"""Ready's reason when a bundle the policy is in does not compile with the other policies."""


def policy_status(
    *,
    generation: int,
    problems: Sequence[policy_compile.Problem],
    bound: Sequence[BoundWorkload],
    previous: Mapping[str, Any] | None,
    now: str,
    composition: Sequence[policy_compile.Problem] = (),
) -> PolicyStatus:
    """The status for a policy at ``generation`` given its problems, where it is bound, and
    why a composition it is part of does not compile (``composition``: it is then not Ready,
    since the bundles it should be in refuse every statement until it is fixed)."""
    old = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    if problems:
        listing = "; ".join(describe(p) for p in problems)
        valid = _condition(POLICY_VALID, "False", "Invalid", listing, generation)
        ready = _condition(
            READY,
            "False",
            "PolicyInvalid",
            "invalid: the bundles of the workloads it binds refuse every statement until it is fixed",
            generation,
        )
    elif composition:
        valid = _condition(POLICY_VALID, "True", "Compiled", "the policy compiles", generation)
        listing = "; ".join(str(p) for p in composition)
        ready = _condition(READY, "False", COMPOSITION_INVALID, listing, generation)
    else:
        valid = _condition(POLICY_VALID, "True", "Compiled", "the policy compiles", generation)
        accounts = ", ".join(b["name"] for b in bound)
        message = f"in the bundles of: {accounts}" if bound else "no workloads are bound yet"
        ready = _condition(READY, "True", "BundlesCurrent", message, generation)
    return {
        "observedGeneration": generation,
        "conditions": [_keep_time(c, old.get(c["type"]), now) for c in (valid, ready)],
        "boundWorkloads": len(bound),
        "workloads": list(bound),
    }


def describe(problem: policy_compile.Problem) -> str:
    """A problem with its path from the object's root (``spec.rules[0]...``), as users see it
    in kubectl and in the admission error alike."""
    return f"spec.{problem}" if problem.path else str(problem)


def same(status: Mapping[str, Any] | None, desired: PolicyStatus) -> bool:
    """Whether ``status`` already says everything ``desired`` says."""
    return status is not None and all(status.get(k) == v for k, v in desired.items())


def _condition(
    kind: str, status: Literal["True", "False"], reason: str, message: str, generation: int
) -> Condition:
    return {
        "type": kind,
        "status": status,
        "observedGeneration": generation,
        "lastTransitionTime": "",
        "reason": reason,
        "message": message,
    }


def _keep_time(new: Condition, old: Mapping[str, Any] | None, now: str) -> Condition:
    changed = old is None or old.get("status") != new["status"]
    since = now if changed else str((old or {}).get("lastTransitionTime"))
    return {**new, "lastTransitionTime": since}
