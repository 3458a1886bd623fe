"""Reading a policy file from disk: the I/O half of `dbgov_policy.compile.load_policy_text`."""

from __future__ import annotations

import pathlib

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, model


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


def load_file(
    path: str | pathlib.Path, *, mask_key: str = "", text: str | None = None
) -> model.CompiledPolicy | tuple[compose.Component, ...]:
    """Read and compile a policy file or an operator bundle (several named policies, composed
    by the caller); raise `PolicyInvalid` naming every problem. ``text``: the file's content
    already read (and verified), compiled instead of reading it again."""
    p = pathlib.Path(path)
    if text is None:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            problem = policy_compile.Problem(path="", message=f"cannot read the policy file: {err}")
            raise policy_compile.PolicyInvalid([problem], source=str(p)) from err
    return policy_compile.load_text(text, source=str(p), mask_key=mask_key)
