"""What may change in an enrolled pod after admission (issue 12, attack findings F4), as data:
testdata/updates.yaml holds each UPDATE as a JSON patch on a stored pod and the problems the
validating webhook names. The e2e tests (tests/e2e/test_enrollment.py) send the same kinds of
update through a real apiserver; these pin the decisions themselves."""

import copy
import pathlib
from typing import Any

import jsonpatch
import pytest
import yaml

from dbgov_operator import injection, settings

TESTDATA = pathlib.Path(__file__).parent / "testdata"
CASES: list[dict[str, Any]] = yaml.safe_load((TESTDATA / "updates.yaml").read_text())
SIDECAR = settings.SidecarSettings()


def _stored(kind: str) -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load((TESTDATA / "basic.pod.yaml").read_text())
    pod["spec"]["containers"][0]["env"] = [{"name": "PGHOST", "value": "orders.db.svc"}]
    if kind == "injected":
        return injection.inject(pod, sidecar=SIDECAR).pod
    pod["metadata"]["labels"] = {}  # created while it was not enrolled
    return pod


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_update(case: dict[str, Any]) -> None:
    old = jsonpatch.apply_patch(_stored(case.get("old", "injected")), case.get("old_patch") or [])
    new = jsonpatch.apply_patch(copy.deepcopy(old), case["patch"])
    problems = injection.update_problems(
        old, new, enforce=case.get("enforce", False), allow_debug=case.get("allow_debug", False)
    )
    assert len(problems) == len(case["refused"]), problems
    for problem, expected in zip(problems, case["refused"], strict=True):
        assert expected in problem


def test_an_unchanged_injected_pod_passes() -> None:
    pod = _stored("injected")
    assert injection.injected(pod)
    assert injection.update_problems(pod, copy.deepcopy(pod), enforce=True, allow_debug=False) == []
