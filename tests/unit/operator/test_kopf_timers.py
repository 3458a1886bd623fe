"""The operator's timers hold no finalizer (kopf_timers): the registered handlers, as
``python -m dbgov_operator`` runs them, after release_timer_finalizers."""

from __future__ import annotations

import kopf
import pytest
from kopf._core.intents import handlers as kopf_handlers

from dbgov_operator import kopf_timers


def test_a_timer_registered_by_kopf_requires_a_finalizer_until_released() -> None:
    registry = kopf.OperatorRegistry()

    @kopf.timer("dbgov.io", "v1alpha1", "databases", interval=1, registry=registry)
    def tick(**_: object) -> None:
        pass

    @kopf.on.delete("dbgov.io", "v1alpha1", "databases", optional=True, registry=registry)
    def gone(**_: object) -> None:
        pass

    (timer,) = registry._spawning.get_all_handlers()
    assert timer.requires_finalizer  # kopf's own default: what this module exists for
    assert kopf_timers.release_timer_finalizers(registry) == 1
    (timer,) = registry._spawning.get_all_handlers()
    assert isinstance(timer, kopf_handlers.TimerHandler) and timer.requires_finalizer is False
    assert timer.fn is tick
    assert kopf_timers.release_timer_finalizers(registry) == 0


def test_the_operators_own_handlers_require_no_finalizer_anywhere() -> None:
    from dbgov_operator import handlers  # noqa: F401 -- registers on the default registry

    registry = kopf.get_default_registry()
    kopf_timers.release_timer_finalizers()
    spawning = registry._spawning.get_all_handlers()
    assert spawning and all(not h.requires_finalizer for h in spawning)
    changing = registry._changing.get_all_handlers()
    assert all(not h.requires_finalizer for h in changing), [h.id for h in changing if h.requires_finalizer]


def test_an_unknown_registry_shape_fails_loudly() -> None:
    with pytest.raises(TypeError, match="kopf_timers"):
        kopf_timers.release_timer_finalizers(object())
