"""node-postgres and Go pgx through the proxy against a real PostgreSQL (issue 10, real clients).

The programs live in tests/clients/ (node: package.json + package-lock.json; go: go.mod +
go.sum). Each takes a URL, a scenario and a schema and prints what it saw as JSON. They are
installed and built on first use into a cache outside the repository, keyed by a hash of their
sources and lockfiles (``DBGOV_CLIENTS_DIR``, default ~/.cache/dbgov/clients), npm's and Go's
download caches included, so deleting that directory is a cold start.

Every scenario runs twice: through the proxy and directly against PostgreSQL. The two outputs
must be equal except where the policy says otherwise: a masked column comes back masked, a
refused statement fails with the policy's 42501 and the same connection goes on working.
Building needs npm and go (and their registries); without them the tests fail, never skip.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from test_proxy_session_truth import _engine

import pg
from conftest import RunningProxy
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

CLIENTS = Path(__file__).resolve().parents[1] / "clients"
NODE_FILES = ("package.json", "package-lock.json", "client.js")
GO_FILES = ("go.mod", "go.sum", "main.go")
REFUSED = "dbgov: statement refused by"
PEOPLE = [(i, f"Person {i}", f"person.number{i}@example.com") for i in range(1, 6)]
ITEMS = [(1, "one"), (2, "two"), (3, "three")]


def _cache_root() -> Path:
    return Path(os.environ.get("DBGOV_CLIENTS_DIR") or Path.home() / ".cache" / "dbgov" / "clients")


def _digest(folder: Path, names: tuple[str, ...]) -> str:
    sha = hashlib.sha256()
    for name in names:
        sha.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    return sha.hexdigest()[:16]


def _tool(name: str, why: str) -> str:
    """The toolchain's command; Go also where hack/build-tools.sh finds it (GO, /usr/local/go)."""
    path = shutil.which(name)
    if name == "go":
        fallback = Path("/usr/local/go/bin/go")
        path = os.environ.get("GO") or path or (str(fallback) if fallback.exists() else None)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: {why}. Install it; these tests never skip.", pytrace=False)
    return path


def _run_build(argv: list[str], *, cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        pytest.fail(
            f"building a test client failed: {' '.join(argv)} exited {proc.returncode}\n"
            f"{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time per client version (pytest-xdist workers share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _cached(kind: str, files: tuple[str, ...], build: Callable[[Path, Path], None]) -> Path:
    """The built client's folder, building it into a scratch folder renamed into place."""
    root = _cache_root()
    target = root / f"{kind}-{_digest(CLIENTS / kind, files)}"
    with _locked(root / f"{kind}.lock"):
        if not (target / ".built").exists():
            scratch = root / f"{target.name}.building"
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            for name in files:
                shutil.copy2(CLIENTS / kind / name, scratch / name)
            build(scratch, root)
            (scratch / ".built").touch()
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
    return target


def _build_node(folder: Path, root: Path) -> None:
    npm = _tool("npm", "the node-postgres client in tests/clients/node is installed with `npm ci`")
    env = {**os.environ, "npm_config_cache": str(root / "npm-cache"), "npm_config_update_notifier": "false"}
    _run_build(
        [npm, "ci", "--prefix", str(folder), "--ignore-scripts", "--no-audit", "--no-fund"],
        cwd=folder,
        env=env,
    )


def _build_go(folder: Path, root: Path) -> None:
    go = _tool("go", "the pgx client in tests/clients/go is built with `go build`")
    env = {
        **os.environ,
        "GOMODCACHE": str(root / "go-mod"),
        "GOCACHE": str(root / "go-build"),
        "GOFLAGS": "-mod=readonly -modcacherw",  # so that deleting the cache just works
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    _run_build([go, "build", "-o", str(folder / "pgxclient"), "."], cwd=folder, env=env)


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    node = _tool("node", "the node-postgres client runs on Node.js")
    return [node, str(_cached("node", NODE_FILES, _build_node) / "client.js")]


@pytest.fixture(scope="session")
def pgx_client() -> list[str]:
    return [str(_cached("go", GO_FILES, _build_go) / "pgxclient")]


@pytest.fixture(scope="module")
def schema(pg_server: pg.PgServer) -> Iterator[str]:
    """`people` (email masked by one policy) and `items` (written, then restored, by scenarios)."""
    name = f"clients_{uuid.uuid4().hex[:8]}"
    people = ",".join(f"({i}, '{n}', '{e}')" for i, n, e in PEOPLE)
    items = ",".join(f"({i}, '{label}')" for i, label in ITEMS)
    pg_server.psql(
        f"CREATE SCHEMA {name} AUTHORIZATION app;"
        f"CREATE TABLE {name}.people (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL);"
        f"CREATE TABLE {name}.items (id int PRIMARY KEY, label text NOT NULL);"
        f"ALTER TABLE {name}.people OWNER TO app; ALTER TABLE {name}.items OWNER TO app;"
        f"INSERT INTO {name}.people VALUES {people}; INSERT INTO {name}.items VALUES {items};",
        dbname="shop",
    )
    yield name
    pg_server.psql(f"DROP SCHEMA {name} CASCADE;", dbname="shop")


def _policy(schema: str, *, writes: list[str], masks: list[dict[str, str]]) -> policy_port.EnginePolicy:
    return _engine(
        {
            "default": "block",
            "rules": [
                {"name": "transactions", "verdict": "allow", "statements": ["tcl"]},
                {
                    "name": "test-schema",
                    "verdict": "allow",
                    "statements": ["select", *writes],
                    "tables": [f"{schema}.*"],
                },
            ],
            "masks": masks,
        }
    )


def masking_policy(schema: str) -> policy_port.EnginePolicy:
    """Reads and writes on the schema; people.email masked."""
    return _policy(
        schema,
        writes=["insert", "update", "delete", "copy-from"],
        masks=[{"table": f"{schema}.people", "column": "email", "strategy": "email"}],
    )


def blocking_policy(schema: str) -> policy_port.EnginePolicy:
    """Reads and writes on the schema, but no DELETE and no DROP (nor anything else unlisted)."""
    return _policy(schema, writes=["insert", "update", "copy-from"], masks=[])


def _masked(email: str) -> str:
    local, at, domain = email.partition("@")
    return "*" * len(local) + at + domain


def _run(argv: list[str], url: str, scenario: str, schema: str) -> dict[str, Any]:
    proc = subprocess.run(
        [*argv, url, scenario, schema], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{scenario} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _direct_url(server: pg.PgServer) -> str:
    return (
        f"postgresql://app:{quote(pg.APP_PASSWORD, safe='')}@{server.host}:{server.port}/shop?sslmode=disable"
    )


def _both(
    argv: list[str], scenario: str, *, proxy: RunningProxy, server: pg.PgServer, schema: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(through the proxy, directly): the proxy first, so a write it let slip shows in the control."""
    through = _run(argv, f"{proxy.url()}?sslmode=disable", scenario, schema)
    direct = _run(argv, _direct_url(server), scenario, schema)
    return through, direct


def _expect_plain(scenario: str, through: dict[str, Any], direct: dict[str, Any]) -> None:
    """Scenarios the masking policy lets through untouched: the same output, and a known one."""
    assert through == direct
    known: dict[str, Any] = {
        "prepared": {"names": [n for _, n, _ in PEOPLE]},
        "transaction": {"inside": 2, "after_rollback": 0, "after_commit": 1},
    }
    if scenario in known:
        assert direct == known[scenario]


#: Counts taken right after a refused DELETE of a real row: directly it ran, through the proxy not.
AFTER_DELETE = ("after_extended", "after_prepared", "after")


def _expect_refused(through: dict[str, Any], direct: dict[str, Any]) -> None:
    refusals = [k for k in direct if not k.startswith(("after", "next"))]
    assert refusals
    for key in refusals:
        assert direct[key] is None, (key, direct[key])  # PostgreSQL runs them
        assert through[key]["code"] == "42501", (key, through[key])
        assert through[key]["message"].startswith(REFUSED), (key, through[key])
    for key in (k for k in direct if k.startswith("after")):
        if key in AFTER_DELETE:
            assert (direct[key], through[key]) == (len(ITEMS) - 1, len(ITEMS)), key
        else:
            assert through[key] == direct[key] == len(ITEMS), key
    if "next_in_transaction" in direct:  # a refusal aborts the transaction, as an error there does
        assert direct["next_in_transaction"] is None
        assert through["next_in_transaction"]["code"] == "25P02"


NODE_PLAIN = ["simple", "params", "prepared", "transaction"]
PGX_PLAIN = [*NODE_PLAIN, "batch", "copyfrom"]


@pytest.mark.parametrize("scenario", NODE_PLAIN)
def test_node_postgres_behaves_as_directly(
    node_client: list[str],
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    scenario: str,
) -> None:
    proxy = make_proxy(policy=masking_policy(schema))
    through, direct = _both(node_client, scenario, proxy=proxy, server=pg_server, schema=schema)
    _expect_plain(scenario, through, direct)


@pytest.mark.parametrize("scenario", PGX_PLAIN)
def test_pgx_behaves_as_directly(
    pgx_client: list[str],
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    scenario: str,
) -> None:
    proxy = make_proxy(policy=masking_policy(schema))
    through, direct = _both(pgx_client, scenario, proxy=proxy, server=pg_server, schema=schema)
    _expect_plain(scenario, through, direct)


def test_pgx_copy_from_and_batch_are_what_they_claim(
    pgx_client: list[str], make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, schema: str
) -> None:
    """The control above compares; this pins the values, so both sides being wrong alike fails."""
    proxy = make_proxy(policy=masking_policy(schema))
    url = f"{proxy.url()}?sslmode=disable"
    copied = _run(pgx_client, url, "copyfrom", schema)
    assert copied == {"copied": 3, "rows": [[300, "copied"], [301, "copied"], [302, "copied"]]}
    batch = _run(pgx_client, url, "batch", schema)
    assert batch == {"before": 3, "inserted": 1, "label": "batch", "deleted": 1, "after": 3}
    judged = " ".join(str(e.get("statement", e.get("sql", ""))) for e in proxy.events).lower()
    assert "copy" in judged and "binary" in judged, "pgx's CopyFrom should be a binary COPY"


@pytest.mark.parametrize("client", ["node", "pgx"])
def test_masked_column_comes_back_masked(
    request: pytest.FixtureRequest,
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    client: str,
) -> None:
    argv: list[str] = request.getfixturevalue(f"{client}_client")
    proxy = make_proxy(policy=masking_policy(schema))
    through, direct = _both(argv, "masked", proxy=proxy, server=pg_server, schema=schema)
    emails = {e for _, _, e in PEOPLE}
    for form, rows in direct.items():
        for row in rows:
            assert (row["email"] if isinstance(row, dict) else row[1]) in emails, (form, row)
    expected = json.loads(json.dumps(direct))
    for rows in expected.values():
        for row in rows:
            if isinstance(row, dict):
                row["email"] = _masked(row["email"])
            else:
                row[1] = _masked(row[1])
    assert through == expected


def test_pgx_database_sql_behaves_as_directly_but_masked(
    pgx_client: list[str], make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, schema: str
) -> None:
    proxy = make_proxy(policy=masking_policy(schema))
    through, direct = _both(pgx_client, "stdlib", proxy=proxy, server=pg_server, schema=schema)
    assert direct["emails"] == [e for _, _, e in PEOPLE[:3]]
    assert direct["inside"] == 1 and direct["after_rollback"] == 0
    assert through == {**direct, "emails": [_masked(e) for e in direct["emails"]]}


@pytest.mark.parametrize("case", ["node refused", "pgx refused", "pgx stdlib_refused"])
def test_refused_statement_gets_policy_error_and_connection_goes_on(
    request: pytest.FixtureRequest,
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    case: str,
) -> None:
    client, scenario = case.split()
    argv: list[str] = request.getfixturevalue(f"{client}_client")
    proxy = make_proxy(policy=blocking_policy(schema))
    through, direct = _both(argv, scenario, proxy=proxy, server=pg_server, schema=schema)
    _expect_refused(through, direct)
    blocked = [e for e in proxy.events if e.get("enforced") == "block"]
    assert blocked, "the refusals should be audited"
