"""Reading a policy file from disk: the I/O half of `dbgov_policy.compile.load_policy_text`."""

from __future__ import annotations

import pathlib

from dbgov_policy import compile as policy_compile
from dbgov_policy import model


def load_policy_file(path: str | pathlib.Path, *, mask_key: str = "") -> model.CompiledPolicy:
    """Read and compile a policy file; raise `PolicyInvalid` naming every problem."""
    p = pathlib.Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        problem = policy_compile.Problem(
            path="", message=f"cannot read the policy file: {err.strerror or err}"
        )
        raise policy_compile.PolicyInvalid([problem], source=str(p)) from err
    except UnicodeDecodeError as err:
        problem = policy_compile.Problem(path="", message=f"the policy file is not UTF-8: {err}")
        raise policy_compile.PolicyInvalid([problem], source=str(p)) from err
    return policy_compile.load_policy_text(text, source=str(p), mask_key=mask_key)
