"""The operator's decision modules stay pure: no kopf, no API client, no sockets, no asyncio."""

import ast
import pathlib

import pytest

import dbgov_operator

PURE = (
    "annotations",
    "bundle",
    "certs",
    "conditions",
    "credentials",
    "databases",
    "grants",
    "identity",
    "injection",
    "kubetypes",
    "settings",
)
FORBIDDEN = {"asyncio", "socket", "kopf", "kubernetes", "aiohttp", "ssl", "os", "subprocess"}
ROOT = pathlib.Path(dbgov_operator.__file__).parent


@pytest.mark.parametrize("name", PURE)
def test_pure_module_imports(name: str) -> None:
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, imported & FORBIDDEN
