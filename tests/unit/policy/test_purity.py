"""The policy engine is pure: no module of it imports an event loop, socket, Kubernetes or I/O layer."""

from __future__ import annotations

import ast
import pathlib

import dbgov_policy

FORBIDDEN = {
    "asyncio",
    "socket",
    "kopf",
    "kubernetes",
    "aiohttp",
    "uvloop",
    "psycopg",
    "asyncpg",
    "subprocess",
    "os",
}


def test_dbgov_policy_imports_no_io_layer() -> None:
    package = pathlib.Path(dbgov_policy.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert len(list(package.glob("*.py"))) >= 10
    assert found == []
