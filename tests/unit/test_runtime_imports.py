"""The image installs only `.[fast]` (Dockerfile.sidecar): `dbgov check` and `dbgov proxy` must run
without the dev and operator extras. The demo's embedded PostgreSQL (pgserver) was imported by the
CLI itself, so the shipped sidecar failed at import."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[2]

NOT_IN_THE_IMAGE = (
    # the dev extra (pyproject.toml) and what it brings
    "pgserver",
    "platformdirs",
    "psycopg",
    "psycopg_binary",
    "asyncpg",
    "sqlalchemy",
    "jsonschema",
    "hypothesis",
    "pytest",
    "_pytest",
    "xdist",
    "mypy",
    # the operator extra
    "kopf",
    "kubernetes",
    "cryptography",
    "jwt",
)
"""Top-level modules of extras Dockerfile.sidecar does not install (it runs `pip install '.[fast]'`)."""

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = set(sys.argv[1].split(","))

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    import dbgov_sidecar.check_cli, dbgov_sidecar.proxy_cli
    from dbgov_sidecar import cli

    status = cli.main(["check", "--policy", sys.argv[2], "SELECT 1", "DROP TABLE shop.orders"])
    cli.build_parser().parse_args(["proxy"])  # the proxy's parser builds too
    loaded = sorted({m.split(".")[0] for m in sys.modules} & BLOCKED)
    print("loaded:", loaded, "status:", status)
    """
)


def test_check_and_proxy_import_without_the_dev_and_operator_extras() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, ",".join(NOT_IN_THE_IMAGE), str(ROOT / "examples" / "policy.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "ALLOW    SELECT 1" in result.stdout
    assert "BLOCK    DROP TABLE shop.orders" in result.stdout
    assert result.stdout.rstrip().endswith("loaded: [] status: 0")


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Import cycles only break when the cycle is entered from one particular module: import each
    runtime module first, alone, in its own interpreter (decide → compile → compose → engine →
    decide failed so, though the test suite, importing engine first, never saw it)."""
    names = sorted(
        f"{package.name}.{module.stem}"
        for package in (ROOT / "sidecar" / "dbgov_policy", ROOT / "sidecar" / "dbgov_sidecar")
        for module in package.glob("*.py")
        if module.stem not in {"__init__", "demo", "embedded_pg"}
    )
    assert len(names) > 20
    failed = {}
    for name in names:
        proc = subprocess.run(
            [sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=60, check=False
        )
        if proc.returncode != 0:
            failed[name] = proc.stderr.strip().splitlines()[-1]
    assert failed == {}
