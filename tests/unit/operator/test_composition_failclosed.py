"""The pure and threaded parts of issue 12's F3/F5 fixes, without a cluster (the e2e proof is
tests/e2e/test_composition_failclosed.py): a bundle whose composition does not compile keeps
its baselines beside the refusal; the apply-time check names the other policy and the field;
the coalescer turns a burst of requests into at most two reconciles and retries a failure."""

from __future__ import annotations

import contextvars
import threading
import time
from typing import Any

import pytest

from dbgov_operator import bundle, kubeapi, reconcile
from dbgov_policy import compile as policy_compile
from dbgov_sidecar import policies


class FakeApi:
    """What the apply-time check reads: the namespace's policies and enrolled pods."""

    def __init__(self) -> None:
        self.policies: dict[str, dict[str, Any]] = {}

    def add_policy(self, name: str, spec: dict[str, Any]) -> None:
        self.policies[name] = spec

    def list_policies(self, namespace: str) -> list[kubeapi.PolicyObject]:
        return [
            kubeapi.PolicyObject(name=n, generation=1, spec=s, status={}, deleting=False, body={})
            for n, s in self.policies.items()
        ]

    def list_workloads(self, namespace: str) -> list[bundle.Workload]:
        return []


def _issuer(audience: str) -> dict[str, Any]:
    one = {"issuer": "https://idp.example", "audiences": [audience], "algorithms": ["RS256"]}
    return {"jwt": {"issuers": [{**one, "jwksUri": "https://idp.example/keys"}]}}


def _spec(account: str, **more: Any) -> dict[str, Any]:
    return {"subjects": {"serviceAccounts": [account]}, "default": "allow", "rules": [], **more}


NO_DDL = {"name": "no-ddl", "verdict": "block", "statements": ["ddl"]}
BASELINE = {"subjects": {"namespaceSelector": {}}, "default": "allow", "rules": [NO_DDL]}


def test_a_broken_composition_refuses_everything_with_the_baselines_and_a_file_per_database() -> None:
    policies_ = [
        bundle.Policy(name="a", spec=_spec("frz", authentication=_issuer("one")), valid=True),
        bundle.Policy(
            name="b", spec=_spec("frz", authentication=_issuer("two"), databaseRef={"name": "db"}), valid=True
        ),
    ]
    baseline = bundle.Policy(name=bundle.cluster_component("no-ddl"), spec=BASELINE, valid=True)
    plan = bundle.plan(
        policies_, [bundle.Workload(service_account="frz", database="other")], prefix="p-", cluster=[baseline]
    )
    (only,) = plan.bundles
    assert set(only.files) == {"policy.yaml", "policy.db.yaml", "policy.other.yaml"}
    for text in only.files.values():
        doc = policy_compile.load_text(text)
        assert isinstance(doc, tuple)
        assert [c.name for c in doc] == [bundle.REFUSING, "cluster:no-ddl"]
        decision = policies.build(doc).decide("SELECT 1", policies.build(doc).new_context())
        assert decision.verdict == "block"
        assert "a, b, cluster:no-ddl" in decision.reason and "configured differently" in decision.reason


def test_baselines_that_do_not_compose_with_each_other_leave_the_refusal_alone() -> None:
    left = bundle.Policy(name="cluster:l", spec={**BASELINE, "authentication": _issuer("one")}, valid=True)
    right = bundle.Policy(name="cluster:r", spec={**BASELINE, "authentication": _issuer("two")}, valid=True)
    own = bundle.Policy(name="own", spec=_spec("frz"), valid=True)
    (only,) = bundle.plan([own], [], prefix="p-", cluster=[left, right]).bundles
    assert only.problems
    doc = policy_compile.load_text(only.files["policy.yaml"])
    assert isinstance(doc, tuple) and [c.name for c in doc] == [bundle.REFUSING]
    assert (
        "fix or delete one of them (kubectl describe databaseaccesspolicy own)" in doc[0].policy.rules[0].name
    )


def test_the_apply_time_check_names_the_other_policy_and_the_issuer_path() -> None:
    api = FakeApi()
    api.add_policy("first", _spec("orders", authentication=_issuer("one")))
    found = reconcile.conflicts(
        api, namespace="apps", name="second", spec=_spec("orders", authentication=_issuer("two")), prefix="p-"
    )
    (problem,) = found
    assert problem.path == "authentication.jwt.issuers[0]"
    assert "would not compose with first (which bind ServiceAccount orders too)" in problem.message
    elsewhere = _spec("billing", authentication=_issuer("two"))
    assert reconcile.conflicts(api, namespace="apps", name="second", spec=elsewhere, prefix="p-") == ()
    same = _spec("orders", authentication=_issuer("one"))
    assert reconcile.conflicts(api, namespace="apps", name="second", spec=same, prefix="p-") == ()


def test_a_composition_already_broken_is_not_the_new_policys_doing() -> None:
    api = FakeApi()
    api.add_policy("first", _spec("orders", authentication=_issuer("one")))
    api.add_policy("second", _spec("orders", authentication=_issuer("two")))
    assert reconcile.conflicts(api, namespace="apps", name="third", spec=_spec("orders"), prefix="p-") == ()


def test_a_burst_of_requests_is_at_most_two_reconciles() -> None:
    ran: list[str] = []
    release = threading.Event()

    def run(namespace: str) -> None:
        ran.append(namespace)
        release.wait(5)

    coalescer = reconcile.Coalescer(run, delay=0.05, retry=0.05)
    first = coalescer.request("apps")
    time.sleep(0.2)  # the first reconcile is running (blocked on release)
    later = [coalescer.request("apps") for _ in range(500)]
    assert len({id(f) for f in later}) == 1
    release.set()
    first.result(timeout=5)
    later[-1].result(timeout=5)
    assert ran == ["apps", "apps"]
    assert coalescer.runs == 2


def test_a_failed_reconcile_reaches_who_waits_and_is_tried_again() -> None:
    calls: list[int] = []

    def run(namespace: str) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("conflict")

    coalescer = reconcile.Coalescer(run, delay=0.01, retry=0.05)
    with pytest.raises(RuntimeError, match="conflict"):
        coalescer.request("apps").result(timeout=5)
    deadline = time.monotonic() + 5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 2


REQUESTER: contextvars.ContextVar[str] = contextvars.ContextVar("requester", default="none")


def test_a_reconcile_runs_in_the_context_of_who_asked_for_it() -> None:
    """kopf.event needs kopf's context variables, which the coalescer's threads lack."""
    seen: list[str] = []
    coalescer = reconcile.Coalescer(lambda ns: seen.append(REQUESTER.get()), delay=0.01, retry=0.05)
    token = REQUESTER.set("kopf handler")
    try:
        done = coalescer.request("apps")
    finally:
        REQUESTER.reset(token)
    done.result(timeout=5)
    assert seen == ["kopf handler"]
