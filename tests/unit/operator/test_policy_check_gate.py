"""The policy webhook's gate (issue 12, F4): one check at a time per namespace, each within its
share of the webhook timeout, refused with "retry" past it; a check that gave up runs on and the
next check of its namespace waits for it. Pods never pass through the gate (their pool is
their own: the e2e test in tests/e2e/test_admission_isolation.py floods it)."""

import asyncio
import time
from collections.abc import Callable

import kopf
import pytest

from dbgov_operator import handlers, runtime

BUDGET = runtime.current().webhook.timeout_seconds * handlers.POLICY_CHECK_SHARE


def _slow(seconds: float, log: list[tuple[str, float, float]], tag: str) -> Callable[..., None]:
    def work(*, name: str, namespace: str) -> None:
        started = time.monotonic()
        time.sleep(seconds)
        log.append((tag, started, time.monotonic()))

    return work


def test_a_check_past_its_budget_is_refused_with_retry_and_runs_on() -> None:
    log: list[tuple[str, float, float]] = []

    async def scenario() -> None:
        with pytest.raises(kopf.AdmissionError) as caught:
            await handlers._checking_policy(_slow(BUDGET + 0.5, log, "slow"), name="p", namespace="gate-1")
        assert caught.value.code == 503
        assert "retry in a few seconds" in str(caught.value)
        assert "gate-1/p" in str(caught.value)
        assert log == []  # refused before its work ended: it runs on
        while "gate-1" in handlers._policy_checks:
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert [tag for tag, *_ in log] == ["slow"]


def test_checks_of_one_namespace_run_one_at_a_time_and_other_namespaces_do_not_wait() -> None:
    log: list[tuple[str, float, float]] = []

    async def scenario() -> None:
        await asyncio.gather(
            handlers._checking_policy(_slow(0.3, log, "a1"), name="a1", namespace="gate-a"),
            handlers._checking_policy(_slow(0.3, log, "a2"), name="a2", namespace="gate-a"),
            handlers._checking_policy(_slow(0.3, log, "b"), name="b", namespace="gate-b"),
        )

    started = time.monotonic()
    asyncio.run(scenario())
    spans = {tag: (begin, end) for tag, begin, end in log}
    first, second = sorted((spans["a1"], spans["a2"]))
    assert second[0] >= first[1]  # never overlapping in one namespace
    b_begin, _ = spans["b"]
    assert b_begin - started < 0.2  # gate-b did not wait for gate-a
    assert not handlers._policy_checks


def test_a_check_waiting_behind_a_long_one_is_refused_within_its_budget() -> None:
    log: list[tuple[str, float, float]] = []

    async def scenario() -> float:
        long = asyncio.ensure_future(
            handlers._checking_policy(_slow(BUDGET + 1.0, log, "long"), name="long", namespace="gate-w")
        )
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(kopf.AdmissionError):
            await handlers._checking_policy(_slow(0.01, log, "short"), name="short", namespace="gate-w")
        waited = time.monotonic() - started
        with pytest.raises(kopf.AdmissionError):
            await long
        while "gate-w" in handlers._policy_checks:
            await asyncio.sleep(0.05)
        return waited

    waited = asyncio.run(scenario())
    assert waited < BUDGET + 0.5
    assert [tag for tag, *_ in log] == ["long"]  # the short one never started behind it


def test_an_error_reaches_its_own_request_only() -> None:
    def invalid(*, name: str, namespace: str) -> None:
        raise kopf.AdmissionError("invalid", code=422)

    async def scenario() -> None:
        with pytest.raises(kopf.AdmissionError, match="invalid"):
            await handlers._checking_policy(invalid, name="p", namespace="gate-e")
        await handlers._checking_policy(lambda **_: None, name="q", namespace="gate-e")

    asyncio.run(scenario())
    assert "gate-e" not in handlers._policy_checks
