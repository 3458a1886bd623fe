"""kopf handlers: each reads top to bottom as parse -> decide -> build -> respond.

The decisions live in pure modules (injection, bundle, conditions); this module only moves data
between kopf, the Kubernetes API and those functions.
"""

import copy
from collections.abc import Mapping
from typing import Any, cast

import kopf

from dbgov_operator import injection, runtime

POD_INJECTION_ID = "inject.pods.dbgov.io"


def replace_body(patch: kopf.Patch, new_body: Mapping[str, Any]) -> None:
    """Make kopf's admission patch the diff from the reviewed object to ``new_body``."""

    def _replace(body: kopf.RawBody) -> None:
        raw = cast(dict[str, Any], body)  # a plain dict at run time; RawBody is its type
        raw.clear()
        raw.update(copy.deepcopy(dict(new_body)))

    patch.fns.append(_replace)


@kopf.on.mutate("v1", "pods", id=POD_INJECTION_ID, operations=["CREATE"])
def inject_pod(
    body: kopf.Body,
    namespace: str | None,
    patch: kopf.Patch,
    warnings: list[str],
    logger: kopf.Logger,
    **_: Any,
) -> None:
    """Add the dbgov sidecar to an enrolled pod (pods CREATE only)."""
    config = runtime.current()
    pod = dict(body)
    decision = injection.decide(pod, namespace=namespace or "", config=config)
    if not decision.inject:
        logger.debug("Not injecting: %s", decision.reason)
        return
    try:
        result = injection.inject(pod, sidecar=config.sidecar)
    except injection.InjectionRefused as err:
        raise kopf.AdmissionError(f"dbgov cannot inject this pod: {err}", code=400) from err
    replace_body(patch, result.pod)
    warnings.extend(result.warnings)
    logger.info("Injected the dbgov sidecar")
