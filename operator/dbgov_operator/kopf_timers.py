"""Timers that hold no finalizer.

kopf adds its finalizer to every object a ``@kopf.timer`` watches (``requires_finalizer=True``
is hard-coded for timers and daemons, nolar/kopf#1074), so a Database carried
``dbgov.io/finalizer`` although none of our Database handlers needs to run before it goes (the
revocation on deletion is an ``on.event`` that needs no finalizer). Once the operator is
uninstalled or stopped, deleting such a Database, or the namespace holding it, hung until
someone removed the finalizer by hand: issue 12 asks that uninstalling leave no finalizer.

Our timers only re-check and reap now and then; a deleted object's timer is simply stopped
when kopf sees it gone. So after the handlers are registered, every timer is registered again
without the finalizer requirement, and kopf removes the finalizer it put on existing objects
("no handlers requiring it"). This reaches into kopf's registry, which has no public switch
for it; ``release_timer_finalizers`` fails loudly if that registry changes shape."""

from __future__ import annotations

import dataclasses
from typing import Any

import kopf
from kopf._core.intents import handlers as kopf_handlers


def release_timer_finalizers(registry: Any = None) -> int:
    """Make every registered ``@kopf.timer`` of ``registry`` (the default one) require no
    finalizer; returns how many were changed. Raises TypeError if kopf's registry is not the
    shape this was written for (so a kopf upgrade cannot silently bring the finalizer back)."""
    found = registry if registry is not None else kopf.get_default_registry()
    spawning = getattr(found, "_spawning", None)
    handlers = getattr(spawning, "_handlers", None)
    if not isinstance(handlers, list):
        raise TypeError(
            "kopf's registry has no _spawning._handlers list: check kopf_timers against this kopf"
        )
    changed = 0
    for i, handler in enumerate(handlers):
        if isinstance(handler, kopf_handlers.TimerHandler) and handler.requires_finalizer:
            handlers[i] = dataclasses.replace(handler, requires_finalizer=False)
            changed += 1
    return changed
