"""pgjdbc and Hibernate through the proxy against a real PostgreSQL (issue 10, real clients).

The program lives in tests/clients/java: a Maven project (every version pinned in pom.xml) built
into one runnable jar on first use, into a cache outside the repository keyed by a hash of its
sources (``DBGOV_CLIENTS_DIR``, default ~/.cache/dbgov/clients), Maven's local repository
included (``m2`` there), so deleting that directory is a cold start. It takes a JDBC URL, a user,
a password, a scenario and a schema and prints what it saw as JSON.

Every scenario runs twice: through the proxy and directly against PostgreSQL. Under a policy that
allows everything and masks nothing the two outputs must be equal, whatever JDBC sends (server
prepared statements, rewritten batches, DatabaseMetaData's catalog queries, savepoints, read-only
transactions, startup options): a difference there is a false refusal or a changed answer. Under
the masking policy only the masked column differs; under the blocking policy a refused statement
fails with the policy's 42501 as a PSQLException and the same connection goes on working.
Building needs a JDK and Maven (and Maven Central); without them the tests fail, never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_proxy_node_go_clients import _cache_root, _digest, _locked, _run_build, _tool
from test_proxy_session_truth import _engine

import pg
from conftest import RunningProxy
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

JAVA = Path(__file__).resolve().parents[1] / "clients" / "java"
SOURCES = "src/main/java/dbgov/clients"
JAVA_FILES = (
    "pom.xml",
    *(f"{SOURCES}/{name}.java" for name in ("Main", "Json", "Orm", "Person", "Note", "Tag")),
)
JAR = "dbgov-java-client.jar"
REFUSED = "dbgov: statement refused by"
#: id, name, email, born, created (timestamp), created_tz, score
PEOPLE = [
    (
        i,
        f"Person {i}",
        f"person.number{i}@example.com",
        f"199{i}-0{i}-1{i}",
        f"2024-0{i}-0{i} 1{i}:3{i}:00",
        f"{i}{i}.{i}5",
    )
    for i in range(1, 6)
]
ITEMS = [(1, "one"), (2, "two"), (3, "three")]
SCENARIOS = [
    "prepared",
    "batch",
    "metadata",
    "transactions",
    "read_only_always",
    "settings",
    "driver",
    "cancel",
    "masked",
    "refused",
    "hibernate",
    "hibernate_validate",
]


def _build_java(folder: Path, root: Path) -> None:
    mvn = _tool(
        "mvn", "the pgjdbc/Hibernate client in tests/clients/java is built with Maven (`mvn package`)"
    )
    _tool("java", "the pgjdbc/Hibernate client runs on a JDK (17 or newer)")
    _run_build(
        [mvn, "-B", "-q", f"-Dmaven.repo.local={root / 'm2'}", "-DskipTests", "package"],
        cwd=folder,
        env=dict(os.environ),
    )
    shutil.move(folder / "target" / JAR, folder / JAR)
    shutil.rmtree(folder / "target")


def _cached_java() -> Path:
    """The built jar's folder (as test_proxy_node_go_clients._cached, with source subfolders)."""
    root = _cache_root()
    target = root / f"java-{_digest(JAVA, JAVA_FILES)}"
    with _locked(root / "java.lock"):
        if not (target / ".built").exists():
            scratch = root / f"{target.name}.building"
            shutil.rmtree(scratch, ignore_errors=True)
            for name in JAVA_FILES:
                (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(JAVA / name, scratch / name)
            _build_java(scratch, root)
            (scratch / ".built").touch()
            shutil.rmtree(target, ignore_errors=True)
            scratch.rename(target)
    return target


@pytest.fixture(scope="session")
def java_client() -> list[str]:
    java = _tool("java", "the pgjdbc/Hibernate client runs on a JDK (17 or newer)")
    jar = _cached_java() / JAR
    # a short-lived client: the first JIT tier and the serial collector start fastest
    return [java, "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Duser.timezone=UTC", "-jar", str(jar)]


@pytest.fixture(scope="module")
def schema(pg_server: pg.PgServer) -> Iterator[str]:
    """`people` (email masked by one policy), `items` (written, then restored, by scenarios),
    `orders` (a foreign key and an index for DatabaseMetaData), `notes` and `tags` (Hibernate's,
    with a sequence and an identity)."""
    name = f"jdbc_{uuid.uuid4().hex[:8]}"
    people = ",".join(f"({i}, '{n}', '{e}', '{b}', '{c}', '{c}+02', {s})" for i, n, e, b, c, s in PEOPLE)
    items = ",".join(f"({i}, '{label}')" for i, label in ITEMS)
    pg_server.psql(
        f"CREATE SCHEMA {name} AUTHORIZATION app; SET ROLE app; SET search_path = {name};"
        "CREATE TABLE people (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL,"
        " born date NOT NULL, created timestamp NOT NULL, created_tz timestamptz NOT NULL,"
        " score numeric(6,2) NOT NULL);"
        "CREATE TABLE items (id int PRIMARY KEY, label text NOT NULL);"
        "CREATE TABLE orders (id int PRIMARY KEY, person_id int NOT NULL REFERENCES people (id),"
        " qty int NOT NULL CHECK (qty > 0));"
        "CREATE INDEX orders_person ON orders (person_id);"
        "CREATE SEQUENCE notes_seq INCREMENT BY 50;"
        "CREATE TABLE notes (id bigint PRIMARY KEY, person_id int NOT NULL REFERENCES people (id),"
        " body text NOT NULL, stars int NOT NULL);"
        "CREATE TABLE tags (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text NOT NULL,"
        " version int NOT NULL);"
        f"INSERT INTO people VALUES {people}; INSERT INTO items VALUES {items};"
        "INSERT INTO orders VALUES (1, 1, 2), (2, 3, 1);",
        dbname="shop",
    )
    yield name
    pg_server.psql(f"DROP SCHEMA {name} CASCADE;", dbname="shop")


def allow_all_policy() -> policy_port.EnginePolicy:
    """Everything allowed, nothing masked: the proxy must be invisible."""
    return _engine({"default": "allow", "rules": [], "masks": []})


def masking_policy(schema: str) -> policy_port.EnginePolicy:
    """Everything allowed; people.email masked."""
    return _engine(
        {
            "default": "allow",
            "rules": [],
            "masks": [{"table": f"{schema}.people", "column": "email", "strategy": "email"}],
        }
    )


def blocking_policy(schema: str) -> policy_port.EnginePolicy:
    """Everything allowed but DROP/TRUNCATE anywhere and DELETE on items."""
    return _engine(
        {
            "default": "allow",
            "rules": [
                {"name": "no-drop", "verdict": "block", "statements": ["drop", "truncate"]},
                {
                    "name": "keep-items",
                    "verdict": "block",
                    "statements": ["delete"],
                    "tables": [f"{schema}.items"],
                },
            ],
            "masks": [],
        }
    )


def _masked(email: str) -> str:
    local, at, domain = email.partition("@")
    return "*" * len(local) + at + domain


def _run(argv: list[str], *, url: str, password: str, scenario: str, schema: str) -> dict[str, Any]:
    proc = subprocess.run(
        [*argv, url, "app", password, scenario, schema],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert proc.returncode == 0, f"{scenario} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def _both(
    argv: list[str], scenario: str, *, proxy: RunningProxy, server: pg.PgServer, schema: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(through the proxy, directly): the proxy first, so a write it let slip shows in the control."""
    through = _run(
        argv,
        url=f"jdbc:postgresql://127.0.0.1:{proxy.port}/shop?sslmode=disable",
        password="",
        scenario=scenario,
        schema=schema,
    )
    direct = _run(
        argv,
        url=f"jdbc:postgresql://{server.host}:{server.port}/shop?sslmode=disable",
        password=pg.APP_PASSWORD,
        scenario=scenario,
        schema=schema,
    )
    return through, direct


EMAILS = {e for _, _, e, *_ in PEOPLE}


def _known(scenario: str, direct: dict[str, Any], schema: str) -> None:
    """What each scenario must have seen directly: the comparison alone would pass if the client
    did nothing, or did the same wrong thing both ways."""
    if scenario == "prepared":
        assert [run["server_prepared"] for run in direct.values()] == [
            [False] * 3 + [True] * 5,  # default prepareThreshold 5: named, binary from the 5th run
            [True] * 8,
            [False] * 8,  # prepareThreshold=0: unnamed statements only
            [True] * 8,  # -1: binary from the first run
            [False] * 3 + [True] * 5,  # preferQueryMode=simple says so, but sends Query messages
        ]
        for run in direct.values():
            assert run["updated"] == [1] * 7 and [len(rows) for rows in run["results"]] == [3] * 8
            assert run["results"][1][0] == {
                "id": 2,
                "name": "Person 2",
                "born": "1992-02-12",
                "created": "2024-02-02T12:32",
                "created_tz": "2024-02-02T10:32",
                "score": "22.25",
                "times": 2000,
            }
    elif scenario == "batch":
        plain, rewritten = direct["rewrite_false"], direct["rewrite_true"]
        assert plain["inserted"] == [1] * 7 and plain["in_transaction"] == [1] * 3
        # reWriteBatchedInserts: VALUES ($1,$2),($3,$4),...; counts are SUCCESS_NO_INFO (-2)
        assert rewritten["inserted"] == [-2] * 6 + [1] and rewritten["in_transaction"] == [-2, -2, 1]
        for run in (plain, rewritten):
            assert run["statements"] == [1, 8] and run["deleted"] == 11 and len(run["rows"]) == 11
    elif scenario == "metadata":
        assert {t["TABLE_NAME"] for t in direct["tables"]} >= {
            "people",
            "items",
            "orders",
            "notes",
            "notes_seq",
        }
        assert [c["COLUMN_NAME"] for c in direct["columns"]] == [
            *("id", "name", "email", "born", "created", "created_tz", "score")
        ]
        assert [k["COLUMN_NAME"] for k in direct["primary_keys"]] == ["id"]
        assert {i["INDEX_NAME"] for i in direct["index_info"]} == {"orders_pkey", "orders_person"}
        (key,) = direct["imported_keys"]
        assert (key["PKTABLE_SCHEM"], key["PKTABLE_NAME"], key["FKCOLUMN_NAME"]) == (
            schema,
            "people",
            "person_id",
        )
        assert {k["FKTABLE_NAME"] for k in direct["exported_keys"]} == {"orders", "notes"}
        assert [r["COLUMN_NAME"] for r in direct["best_row"]] == ["id"] and direct["type_info"] is True
        assert {p["PRIVILEGE"] for p in direct["table_privileges"]} >= {"SELECT", "INSERT", "DELETE"}
        assert {f["FUNCTION_NAME"] for f in direct["functions"]} == {"upper"}
    elif scenario == "transactions":
        assert direct["inside"] == direct["after_commit"] == direct["after_rollback"] == 2
        assert direct["read_only_write"]["code"] == "25006" and direct["after_error"]["code"] == "25P02"
        assert (direct["read_only_setting"], direct["read_write_setting"]) == ("on", "off")
        assert (direct["isolation"], direct["items"]) == ("serializable", len(ITEMS))
    elif scenario == "read_only_always":
        assert (direct["always_setting"], direct["always_back"]) == ("on", "off")
        assert direct["always_write"]["code"] == "25006"
    elif scenario == "settings":
        assert (direct["search_path"], direct["statement_timeout"], direct["back"]) == (schema, "5s", 5)
        assert direct["people_in_public"]["code"] == "42P01"
    elif scenario == "driver":
        assert direct["is_valid"] is True and direct["callable"] == "CALLED"
        assert direct["generated_keys"] == [{"id": 500, "label": "generated"}]
        assert direct["escapes"] == [{"up": "SHOUT", "len": 3, "day": "2024-01-02"}]
        assert direct["multi"] == [[{"one": 1}], 1, [{"two": 2}]] and direct["max_rows"] == [
            {"id": 1},
            {"id": 2},
        ]
        assert direct["updatable"] == [{"label": "updated in place"}] and direct["copy"][0] == 2
        assert (direct["fetch_size"], direct["cleaned"], direct["items"]) == ([1, 2, 3, 4, 5], 3, len(ITEMS))
    elif scenario == "cancel":
        assert direct["timed_out"]["code"] == "57014" and direct["after"] == len(ITEMS)
    elif scenario == "masked":
        assert {row["email"] for rows in direct.values() for row in rows} == EMAILS
    elif scenario == "refused":
        assert all(v is None for k, v in direct.items() if not k.startswith("after") and k != "prepared")
        assert direct["prepared"] == [None] * 7 and direct["after_prepared"] == len(ITEMS) - 1
    elif scenario == "hibernate_validate":
        assert direct == {"validated": True}
    elif scenario == "hibernate":
        assert direct["offsets"] == [0, 1, 2, 3, 4, 5] and direct["aggregate"] == [6, 3, 7]
        assert (direct["bulk_updated"], direct["deleted_is_gone"], direct["cleaned"]) == (2, True, 5)
        assert [n["body"] for n in direct["criteria"]] == ["note 0", "note 3"]
        assert {p["email"] for p in direct["people"]} == EMAILS
        assert [email for _, email in direct["joined"]] == [PEOPLE[i % 3][2] for i in (0, 2, 3, 4, 5)]
        tags = direct["tags"]
        assert (tags["offsets"], tags["native"], tags["removed"]) == ([0, 1, 2], 1, 3)
        assert tags["locked"] == {"offset": 1, "name": "lime", "version": 1}
        assert tags["page"] == [tags["locked"], {"offset": 2, "name": "blue", "version": 0}]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_pgjdbc_and_hibernate_without_masks_see_exactly_what_they_see_directly(
    java_client: list[str],
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    scenario: str,
) -> None:
    proxy = make_proxy(policy=allow_all_policy())
    through, direct = _both(java_client, scenario, proxy=proxy, server=pg_server, schema=schema)
    _known(scenario, direct, schema)
    assert through == direct
    refused = [e for e in proxy.events if e.get("enforced") == "block"]
    assert not refused, refused


@pytest.mark.parametrize("scenario", ["prepared", "batch", "metadata", "transactions", "settings"])
def test_pgjdbc_under_the_masking_policy_sees_the_rest_unchanged(
    java_client: list[str],
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    scenario: str,
) -> None:
    proxy = make_proxy(policy=masking_policy(schema))
    through, direct = _both(java_client, scenario, proxy=proxy, server=pg_server, schema=schema)
    assert through == direct


def _mask_emails(value: Any) -> Any:
    """``value`` with every email in it masked, wherever it sits (a row, an entity, a list)."""
    if isinstance(value, dict):
        return {k: _mask_emails(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_emails(v) for v in value]
    return _masked(value) if value in EMAILS else value


@pytest.mark.parametrize("scenario", ["masked", "hibernate"])
def test_masked_column_comes_back_masked(
    java_client: list[str],
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    schema: str,
    scenario: str,
) -> None:
    """Rows from plain and server-prepared statements, and Hibernate's entities, JPQL and Criteria."""
    proxy = make_proxy(policy=masking_policy(schema))
    through, direct = _both(java_client, scenario, proxy=proxy, server=pg_server, schema=schema)
    _known(scenario, direct, schema)
    expected = _mask_emails(direct)
    assert expected != direct
    assert through == expected
    masked = [e for e in proxy.events if e.get("masked_columns")]
    assert masked, "the masked reads should be audited as masked"
    assert all(e.get("enforced") != "block" for e in proxy.events)


def _assert_refusal(outcome: Any, *, exception: str = "PSQLException") -> None:
    assert outcome is not None, "the proxy let a statement through that the policy refuses"
    assert (outcome["code"], outcome["exception"]) == ("42501", exception), outcome
    assert outcome["message"].startswith(REFUSED), outcome


def test_refused_statement_is_a_psqlexception_42501_and_the_connection_goes_on(
    java_client: list[str], make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, schema: str
) -> None:
    proxy = make_proxy(policy=blocking_policy(schema))
    through, direct = _both(java_client, "refused", proxy=proxy, server=pg_server, schema=schema)
    _known("refused", direct, schema)
    assert len(through["prepared"]) == 7  # past prepareThreshold: refused as a named statement too
    for outcome in through["prepared"]:
        _assert_refusal(outcome)
    for key in ("simple", "in_transaction", "in_savepoint", "autosave"):
        _assert_refusal(through[key])
    _assert_refusal(through["batch"], exception="BatchUpdateException")
    # a refusal aborts the transaction, as an error there does; ROLLBACK (TO SAVEPOINT) recovers
    assert through["next_in_transaction"]["code"] == "25P02"
    # autosave=always: pgjdbc rolls back to its own savepoint, and the transaction goes on
    after = {k: v for k, v in through.items() if k.startswith("after")}
    assert after == dict.fromkeys(after, len(ITEMS)), after  # the refused DELETEs deleted nothing
    blocked = [e for e in proxy.events if e.get("enforced") == "block"]
    assert len(blocked) >= 12, "every refusal should be audited"
