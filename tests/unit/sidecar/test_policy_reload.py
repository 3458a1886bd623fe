"""Policy reload keeps the old policy when the new one is invalid."""

from __future__ import annotations

import os
from pathlib import Path

from dbgov_sidecar import policies, policy_port


class _Invalid(ValueError):
    def __init__(self) -> None:
        super().__init__("invalid")
        self.problems = [type("P", (), {"path": "rules[0].verdict", "message": "must be allow|block"})()]


def test_reload_swaps_valid_and_keeps_old_on_invalid(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("v1")

    def loader(p: str) -> policy_port.Policy:
        text = Path(p).read_text()
        if text == "bad":
            raise _Invalid()
        policy = policy_port.AllowAll()
        policy.mode = text  # type: ignore[misc]
        return policy

    holder = policies.PolicyHolder(str(path), loader=loader)
    assert holder().mode == "v1" and not holder.changed()
    path.write_text("bad")
    os.utime(path, (1, 1))
    assert holder.changed()
    assert holder.reload() == ["rules[0].verdict: must be allow|block"]
    assert holder().mode == "v1" and holder.reload_failures == 1
    path.write_text("v2")
    assert holder.reload() == []
    assert holder().mode == "v2" and holder.reloads == 1


def test_no_policy_refuses_everything() -> None:
    holder = policies.PolicyHolder(None)
    d = holder().decide("SELECT 1", None)
    assert (d.verdict, d.rule, d.sqlstate) == ("block", "no-policy", "42501")
    assert "DBGOV_POLICY" in (d.hint or "")
    assert holder.reload() == [] and not holder.changed()


def test_a_policy_file_that_appears_later_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    holder = policies.PolicyHolder(str(path))
    assert holder().decide("SELECT 1", None).verdict == "block"
    assert not holder.changed()
    path.write_text("rules: [{name: all, verdict: allow}]\n")
    assert holder.changed()
    assert holder.reload() == []
    assert holder().decide("SELECT 1", holder().new_context()).verdict == "allow"
