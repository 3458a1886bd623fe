"""Policy status conditions."""

from dbgov_operator import conditions
from dbgov_operator.kubetypes import BoundWorkload
from dbgov_policy import compile as policy_compile

BOUND: list[BoundWorkload] = [{"kind": "ServiceAccount", "name": "orders", "serviceAccount": "orders"}]


def test_valid_policy_is_ready_with_observed_generation() -> None:
    status = conditions.policy_status(generation=3, problems=(), bound=BOUND, previous=None, now="T1")
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"]["status"] == "True"
    assert by_type["PolicyValid"]["reason"] == "Compiled"
    assert {c["observedGeneration"] for c in status["conditions"]} == {3}
    assert status["observedGeneration"] == 3
    assert status["boundWorkloads"] == 1
    assert "orders" in by_type["Ready"]["message"]


def test_invalid_policy_lists_every_problem_with_its_path() -> None:
    problems = (
        policy_compile.Problem(path="rules[0].verdict", message="unknown verdict"),
        policy_compile.Problem(path="subjects", message="required"),
    )
    status = conditions.policy_status(generation=1, problems=problems, bound=[], previous=None, now="T")
    valid = {c["type"]: c for c in status["conditions"]}["PolicyValid"]
    assert valid["status"] == "False"
    assert valid["message"] == "spec.rules[0].verdict: unknown verdict; spec.subjects: required"


def test_transition_time_moves_only_when_status_changes() -> None:
    first = conditions.policy_status(generation=1, problems=(), bound=[], previous=None, now="T1")
    again = conditions.policy_status(generation=2, problems=(), bound=BOUND, previous=first, now="T2")
    assert {c["lastTransitionTime"] for c in again["conditions"]} == {"T1"}
    broken = conditions.policy_status(
        generation=3,
        problems=(policy_compile.Problem(path="mode", message="bad"),),
        bound=[],
        previous=again,
        now="T3",
    )
    assert {c["lastTransitionTime"] for c in broken["conditions"]} == {"T3"}


def test_same_status_needs_no_write() -> None:
    first = conditions.policy_status(generation=1, problems=(), bound=BOUND, previous=None, now="T1")
    again = conditions.policy_status(generation=1, problems=(), bound=BOUND, previous=first, now="T2")
    assert conditions.same({**first, "kopf": {}}, again)
    assert not conditions.same(first, {**again, "boundWorkloads": 2})
    assert not conditions.same(None, again)
