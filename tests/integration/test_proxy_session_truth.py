"""The server runs exactly what the proxy judged, in the session state it was judged in.

Each test here is one way the proxy's picture of a session could drift from the server's
(issue 14): how the server reads the bytes (client_encoding, standard_conforming_strings),
which schemas names resolve in, which statements exist. Every attack runs against a real
PostgreSQL through the real proxy, and the test checks what the server actually did.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from test_proxy_protocol import RawClient

import pg
from conftest import RunningProxy
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine
from dbgov_sidecar import policy_port
from dbgov_sidecar.pgwire import framing, messages

pytestmark = pytest.mark.integration

PII = "pii-canary"


def _engine(spec: dict[str, object]) -> policy_port.EnginePolicy:
    return policy_port.EnginePolicy(engine.Engine(policy_compile.compile_policy(spec)))


@pytest.fixture
def arena(pg_server: pg.PgServer) -> Iterator[str]:
    """A schema of its own: `victim` (which the attacks try to drop) and `customers` (PII)."""
    schema = f"truth_{uuid.uuid4().hex[:8]}"
    pg_server.psql(
        f"CREATE SCHEMA {schema} AUTHORIZATION app;"
        f"CREATE TABLE {schema}.victim (id int); ALTER TABLE {schema}.victim OWNER TO app;"
        f"CREATE TABLE {schema}.customers (id int, email text); ALTER TABLE {schema}.customers OWNER TO app;"
        f"INSERT INTO {schema}.customers VALUES (1, '{PII}@example.com');",
        dbname="shop",
    )
    yield schema
    pg_server.psql(f"DROP SCHEMA {schema} CASCADE;", dbname="shop")


def _reads_only(schema: str) -> policy_port.EnginePolicy:
    """Reads of the arena's `victim` allowed; everything else (its PII table too) refused."""
    return _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "reads",
                    "verdict": "allow",
                    "statements": ["select"],
                    "tables": [f"{schema}.victim"],
                }
            ],
        }
    )


def _exists(server: pg.PgServer, relation: str) -> bool:
    return server.psql(f"SELECT to_regclass('{relation}') IS NOT NULL", dbname="shop").strip() == "t"


def _raw_login(proxy: RunningProxy, params: dict[str, str]) -> tuple[RawClient, list[framing.Message]]:
    client = RawClient(proxy.port)
    client.send(messages.startup_message({"user": "app", "database": "shop", **params}))
    return client, client.read_until(b"Z")


def _attacks(schema: str) -> list[bytes]:
    """Texts valid in UTF-8 whose backslash SJIS/GBK/BIG5 read as the second byte of a character
    (0x81 0x5C, 0x95 0x5C): the proxy sees one string literal, such a server a second statement."""
    return [
        f"SELECT E'ぁ\\' UNION ALL SELECT email FROM {schema}.customers --'".encode(),
        f"SELECT E'ぁ\\'; DROP TABLE {schema}.victim; --'".encode(),
        f"SELECT 'ソ\\'; DROP TABLE {schema}.victim; --'".encode(),  # ソ: 0x83 0x5C in SJIS
    ]


def _answers(client: RawClient, text: bytes) -> bytes:
    client.send(b"Q" + (len(text) + 5).to_bytes(4, "big") + text + b"\0")
    return b"".join(m.data for m in client.read_until(b"Z"))


@pytest.mark.parametrize("encoding", ["SJIS", "GBK", "GB18030", "BIG5", "UHC", "JOHAB", "LATIN1", "auto"])
def test_a_client_encoding_the_proxy_does_not_read_is_refused_at_startup(
    make_proxy: Callable[..., RunningProxy], arena: str, pg_server: pg.PgServer, encoding: str
) -> None:
    proxy = make_proxy(policy=_reads_only(arena))
    client, answer = _raw_login(proxy, {"client_encoding": encoding})
    try:
        errors = [messages.decode_fields(m.data) for m in answer if m.type == messages.ERROR_RESPONSE]
        assert errors and errors[0]["S"] == "FATAL", [chr(m.type) for m in answer]
        assert "client_encoding" in errors[0]["M"] and "UTF8" in errors[0]["M"]
        assert not any(m.type == messages.READY_FOR_QUERY for m in answer)
    finally:
        client.close()
    if encoding == "auto":
        return  # libpq sends its locale's encoding for "auto"
    with pytest.raises(psycopg.OperationalError, match="client_encoding"):
        psycopg.connect(proxy.dsn(extra=f"client_encoding={encoding}")).close()


@pytest.mark.parametrize("spelling", ["UTF8", "utf-8", "Unicode", "SQL_ASCII"])
def test_utf8_spellings_and_sql_ascii_log_in_and_the_server_reads_utf8(
    make_proxy: Callable[..., RunningProxy], arena: str, spelling: str
) -> None:
    proxy = make_proxy(policy=_reads_only(arena))
    client, answer = _raw_login(proxy, {"client_encoding": spelling})
    try:
        assert answer[-1].type == messages.READY_FOR_QUERY, answer
        status = dict(
            messages.decode_parameter_status(m.data) for m in answer if m.type == messages.PARAMETER_STATUS
        )
        assert status["client_encoding"] == "UTF8"
        assert status["standard_conforming_strings"] == "on"
    finally:
        client.close()


@pytest.fixture
def sjis_role(pg_server: pg.PgServer, arena: str) -> Iterator[tuple[str, str]]:
    """A login role whose defaults make the server read SJIS without standard-conforming strings."""
    name, password = f"enc_{uuid.uuid4().hex[:8]}", "enc-pw"
    pg_server.psql(
        f"CREATE ROLE {name} LOGIN PASSWORD '{password}';"
        f"ALTER ROLE {name} SET client_encoding = 'SJIS';"
        f"ALTER ROLE {name} SET standard_conforming_strings = off;"
        f"GRANT USAGE ON SCHEMA {arena} TO {name}; GRANT ALL ON ALL TABLES IN SCHEMA {arena} TO {name};"
        f"ALTER TABLE {arena}.victim OWNER TO {name};",
        dbname="shop",
    )
    yield name, password
    pg_server.psql(f"REASSIGN OWNED BY {name} TO app; DROP OWNED BY {name}; DROP ROLE {name};", dbname="shop")


def test_role_defaults_cannot_make_the_server_read_another_encoding(
    make_proxy: Callable[..., RunningProxy], arena: str, sjis_role: tuple[str, str], pg_server: pg.PgServer
) -> None:
    user, password = sjis_role
    proxy = make_proxy(policy=_reads_only(arena), upstream={"user": user, "password": password})
    client, answer = _raw_login(proxy, {})  # no client_encoding: the role's SJIS would apply
    try:
        assert answer[-1].type == messages.READY_FOR_QUERY, answer
        for text in _attacks(arena):
            reply = _answers(client, text)
            assert PII.encode() not in reply
        assert b"UTF8" in _answers(client, b"SHOW client_encoding")
        assert b"on" in _answers(client, b"SHOW standard_conforming_strings")
    finally:
        client.close()
    assert _exists(pg_server, f"{arena}.victim")


def test_settings_changed_behind_the_policy_are_refused_or_end_the_session(
    make_proxy: Callable[..., RunningProxy], arena: str, pg_server: pg.PgServer
) -> None:
    proxy = make_proxy(policy=_engine({"default": "allow", "rules": []}))
    changes = [
        b"UPDATE pg_settings SET setting = 'SJIS' WHERE name = 'client_encoding'",
        b"SELECT set_config('client_encoding', 'SJIS', false)",
        b"SET NAMES 'GBK'",
        b"SET standard_conforming_strings = off",
    ]
    for change in changes:
        client, answer = _raw_login(proxy, {})
        try:
            assert answer[-1].type == messages.READY_FOR_QUERY
            # the change and an attack pipelined behind it, in one write
            pipelined = change + b"\0"
            attack = _attacks(arena)[1]
            client.send(
                b"Q"
                + (len(pipelined) + 4).to_bytes(4, "big")
                + pipelined
                + b"Q"
                + (len(attack) + 5).to_bytes(4, "big")
                + attack
                + b"\0"
            )
            reply = client.read_until(b"Z")
            assert any(m.type == messages.ERROR_RESPONSE for m in reply), change
        finally:
            client.close()
        assert _exists(pg_server, f"{arena}.victim"), change


def test_a_server_that_reports_another_encoding_ends_the_session(dbgov: RunningProxy) -> None:
    """Whatever path a change takes past the policy (here a stand-in policy that allows every
    SET), the server's own ParameterStatus ends the session before another statement is read."""
    client, answer = _raw_login(dbgov, {})
    try:
        assert answer[-1].type == messages.READY_FOR_QUERY
        client.send(messages.query("SET client_encoding = 'SJIS'"))
        reply = client.read_until(b"Z")
        fatal = [messages.decode_fields(m.data) for m in reply if m.type == messages.ERROR_RESPONSE]
        assert fatal and fatal[0]["S"] == "FATAL" and "client_encoding" in fatal[0]["M"], reply
        assert not any(m.type == messages.READY_FOR_QUERY for m in reply)
        assert client.sock.recv(1) == b""  # closed
    finally:
        client.close()
    assert any(e.get("warning") == "server reported client_encoding SJIS" for e in dbgov.events)


@pytest.fixture
def constrained(pg_server: pg.PgServer, arena: str) -> str:
    """The arena's customers with constraints whose errors quote rows and keys."""
    pg_server.psql(
        f"ALTER TABLE {arena}.customers ADD COLUMN ssn text NOT NULL DEFAULT '900-00-0000';"
        f"ALTER TABLE {arena}.customers ALTER COLUMN id SET NOT NULL;"
        f"UPDATE {arena}.customers SET ssn = '{PII}-ssn';"
        f"ALTER TABLE {arena}.customers ADD CONSTRAINT ck CHECK (id < 1000);"
        f"CREATE UNIQUE INDEX ON {arena}.customers (email);"
        f"ALTER TABLE {arena}.customers ADD COLUMN slot int4range;"
        f"UPDATE {arena}.customers SET slot = '[1000,2000)';"
        f"ALTER TABLE {arena}.customers ADD CONSTRAINT ex EXCLUDE USING gist (slot WITH &&);",
        dbname="shop",
    )
    return arena


def _masking(schema: str) -> policy_port.EnginePolicy:
    return _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "writes",
                    "verdict": "allow",
                    "statements": ["select", "insert", "update"],
                    "tables": [f"{schema}.customers"],
                }
            ],
            "masks": [
                {"table": f"{schema}.customers", "column": "email", "strategy": "redact"},
                {"table": f"{schema}.customers", "column": "ssn", "strategy": "redact"},
                {"table": f"{schema}.customers", "column": "slot", "strategy": "redact"},
            ],
        }
    )


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE {s}.customers SET id = NULL WHERE id = 1",  # not null: Failing row contains (…)
        "UPDATE {s}.customers SET id = 5000 WHERE id = 1",  # check: Failing row contains (…)
        "INSERT INTO {s}.customers (id, email) VALUES (2, '" + PII + "@example.com')",  # unique: Key (…)
        "INSERT INTO {s}.customers (id, email, slot) VALUES (3, 'x@example.com', '[1500,1501)')",  # exclusion
    ],
)
def test_integrity_errors_do_not_quote_masked_rows(
    make_proxy: Callable[..., RunningProxy], constrained: str, statement: str
) -> None:
    proxy = make_proxy(policy=_masking(constrained))
    with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.IntegrityError) as info:
            conn.execute(statement.format(s=constrained))
        diag = info.value.diag
        assert diag.sqlstate is not None and diag.sqlstate.startswith("23")
        for secret in (PII, "1000"):  # a masked value, the existing row's slot
            assert secret not in str(diag.message_detail) and secret not in str(info.value)
        assert diag.message_detail is not None and "withheld" in diag.message_detail
        assert diag.table_name == "customers"  # the rest of the error is the server's
        assert conn.execute("SELECT 1").fetchone() == (1,)


# --- search_path: what the server resolves names in, read back from the server ---------------


@pytest.fixture
def two_schemas(pg_server: pg.PgServer) -> Iterator[tuple[str, str, str, str]]:
    """Schemas `home` (the role's default search_path; its customers' email is masked) and
    `stage` (an unmasked customers table), and that role: (home, stage, user, password)."""
    home, stage = f"home_{uuid.uuid4().hex[:8]}", f"stage_{uuid.uuid4().hex[:8]}"
    user, password = f"path_{uuid.uuid4().hex[:8]}", "path-pw"
    pg_server.psql(
        f"CREATE ROLE {user} LOGIN PASSWORD '{password}';"
        f"ALTER ROLE {user} SET search_path = {home};"
        f"CREATE SCHEMA {home}; CREATE SCHEMA {stage};"
        f"CREATE TABLE {home}.customers (id int, email text);"
        f"INSERT INTO {home}.customers VALUES (1, '{PII}@example.com');"
        f"CREATE TABLE {stage}.customers (id int, email text);"
        f"INSERT INTO {stage}.customers VALUES (1, 'staged@example.com');"
        f"GRANT USAGE ON SCHEMA {home}, {stage} TO {user}; GRANT CREATE ON SCHEMA {stage} TO {user};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {home} TO {user};"
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {stage} TO {user};",
        dbname="shop",
    )
    yield home, stage, user, password
    pg_server.psql(
        f"DROP SCHEMA {home} CASCADE; DROP SCHEMA {stage} CASCADE; DROP OWNED BY {user}; DROP ROLE {user};",
        dbname="shop",
    )


def _path_policy(home: str, stage: str) -> policy_port.EnginePolicy:
    return _engine(
        {
            "default": "block",
            "rules": [
                {
                    "name": "reads",
                    "verdict": "allow",
                    "statements": ["select"],
                    "tables": [f"{home}.*", f"{stage}.*", "public.*"],
                }
            ],
            "masks": [{"table": f"{home}.customers", "column": "email", "strategy": "redact"}],
            "guardrails": {"allowedSettings": {"search_path": [stage, home]}},
        }
    )


@pytest.fixture
def path_proxy(
    make_proxy: Callable[..., RunningProxy], two_schemas: tuple[str, str, str, str]
) -> RunningProxy:
    home, stage, user, password = two_schemas
    return make_proxy(policy=_path_policy(home, stage), upstream={"user": user, "password": password})


def _run_all(client: RawClient, *texts: str) -> bytes:
    """Each text as its own Query, sent in one write (pipelined); the answers up to the last
    ReadyForQuery, as bytes."""
    client.send(b"".join(messages.query(t) for t in texts))
    answer = b""
    for _ in texts:
        answer += b"".join(m.data for m in client.read_until(b"Z"))
    return answer


@pytest.mark.parametrize(
    "drift",
    [
        # the proxy used to take the SET as applied when it judged it
        ["BEGIN", "SET search_path = {stage}", "ROLLBACK"],
        ["BEGIN", "SET search_path = {stage}", "SELECT 1/0", "ROLLBACK"],
        ["BEGIN", "SAVEPOINT a", "SET search_path = {stage}", "ROLLBACK TO SAVEPOINT a", "COMMIT"],
        ["SELECT 1/0; SET search_path = {stage}"],
        ["SELECT set_config('search_path', '{stage}', false) WHERE false"],
        # and RESET / DISCARD / DEFAULT to be `public`, where the server goes back to the role's
        ["SET search_path = {stage}", "RESET search_path"],
        ["SET search_path = {stage}", "RESET ALL"],
        ["SET search_path = {stage}", "DISCARD ALL"],
        ["SET search_path = {stage}", "SET search_path TO DEFAULT"],
    ],
)
@pytest.mark.parametrize("pipelined", [False, True])
def test_search_path_follows_the_server(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str], drift: list[str], pipelined: bool
) -> None:
    _home, stage, _, _ = two_schemas
    steps = [d.format(stage=stage) for d in drift]
    client, answer = _raw_login(path_proxy, {})
    try:
        assert answer[-1].type == messages.READY_FOR_QUERY
        read = "SELECT email || '' AS e FROM customers"
        if pipelined:
            reply = _run_all(client, *steps, read)
        else:
            for step in steps:
                _answers(client, step.encode())
            reply = _answers(client, read.encode())
        assert PII.encode() not in reply
        assert b"staged@example.com" not in reply  # it is the home table the server reads
        assert _answers(client, b"SELECT 1").endswith(messages.ready_for_query("I"))
    finally:
        client.close()


def test_an_unexecuted_parse_of_a_set_changes_nothing(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str]
) -> None:
    _home, stage, _, _ = two_schemas
    client, _answer = _raw_login(path_proxy, {})
    try:
        client.send(messages.parse("s", f"SET search_path = {stage}") + messages.SYNC_MESSAGE)
        client.read_until(b"Z")
        reply = _answers(client, b"SELECT email || '' AS e FROM customers")
        assert PII.encode() not in reply and b"staged" not in reply
    finally:
        client.close()


def test_a_statement_prepared_under_another_search_path_is_judged_again(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str]
) -> None:
    home, stage, _, _ = two_schemas
    client, _answer = _raw_login(path_proxy, {})
    try:
        _answers(client, f"SET search_path = {stage}".encode())
        client.send(messages.parse("p", "SELECT email || '' AS e FROM customers") + messages.SYNC_MESSAGE)
        assert client.read_until(b"Z")[0].type == messages.PARSE_COMPLETE
        run = messages.bind("", "p") + messages.execute("") + messages.SYNC_MESSAGE
        client.send(run)
        assert b"staged@example.com" in b"".join(m.data for m in client.read_until(b"Z"))
        _answers(client, f"SET search_path = {home}".encode())
        client.send(run)  # the server would now read home.customers, whose email is masked
        reply = client.read_until(b"Z")
        assert PII.encode() not in b"".join(m.data for m in reply)
        errors = [messages.decode_fields(m.data) for m in reply if m.type == messages.ERROR_RESPONSE]
        assert errors and "search_path changed" in errors[0]["M"]
        assert _answers(client, b"SELECT 1").endswith(messages.ready_for_query("I"))
    finally:
        client.close()
    events = [e for e in path_proxy.events if e.get("rule") == "builtin:search-path-changed"]
    assert events and events[0]["decision"] == "block"


def test_a_statement_after_a_set_in_the_same_batch_is_refused(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str]
) -> None:
    _home, stage, _, _ = two_schemas
    client, _answer = _raw_login(path_proxy, {})
    try:
        client.send(
            messages.parse("", f"SET search_path = {stage}")
            + messages.bind("", "")
            + messages.execute("")
            + messages.parse("", "SELECT email || '' AS e FROM customers")
            + messages.bind("", "")
            + messages.execute("")
            + messages.SYNC_MESSAGE
        )
        reply = client.read_until(b"Z")
        errors = [messages.decode_fields(m.data) for m in reply if m.type == messages.ERROR_RESPONSE]
        assert errors and "search_path" in errors[0]["M"]
        assert PII.encode() not in b"".join(m.data for m in reply)
        # the batch failed, so its implicit transaction took the SET back with it: the server
        # reads home.customers again, and the proxy (which asked it) masks what it returns
        after = _answers(client, b"SELECT email || '' AS e FROM customers")
        assert b"staged" not in after and PII.encode() not in after and b"*****" in after
    finally:
        client.close()


def test_executing_a_portal_that_sets_search_path_is_where_it_changes(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str]
) -> None:
    """A named portal outlives its Sync inside a block: the SET runs at its Execute."""
    home, stage, _, _ = two_schemas
    client, _ = _raw_login(path_proxy, {})
    sync = messages.SYNC_MESSAGE
    try:
        _answers(client, f"SET search_path = {stage}".encode())
        _answers(client, b"BEGIN")
        for step in (
            messages.parse("s1", f"SET search_path = {home}") + sync,
            messages.bind("p1", "s1") + sync,
            messages.execute("p1") + sync,
        ):
            client.send(step)
            client.read_until(b"Z")
        reply = _answers(client, b"SELECT email || '' AS e FROM customers")
        assert PII.encode() not in reply and b"*****" in reply  # home's, masked
        assert b"COMMIT" in _answers(client, b"COMMIT")
    finally:
        client.close()


def test_nothing_runs_after_a_set_executed_in_the_same_batch(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str]
) -> None:
    """An Execute of SQL EXECUTE resolves the prepared statement's names as it runs."""
    home, stage, _, _ = two_schemas
    client, _ = _raw_login(path_proxy, {})
    try:
        _answers(client, f"SET search_path = {stage}".encode())
        _answers(client, b"PREPARE p AS SELECT id, email || '' AS e FROM customers")
        client.send(
            messages.parse("sx", "EXECUTE p")
            + messages.parse("s1", f"SET search_path = {home}")
            + messages.SYNC_MESSAGE
        )
        client.read_until(b"Z")
        client.send(
            messages.bind("px", "sx")
            + messages.bind("p1", "s1")
            + messages.execute("p1")
            + messages.execute("px")
            + messages.SYNC_MESSAGE
        )
        reply = client.read_until(b"Z")
        assert PII.encode() not in b"".join(m.data for m in reply)
        assert any(m.type == messages.ERROR_RESPONSE for m in reply)
    finally:
        client.close()


@pytest.mark.parametrize("statement", ["SET search_path = {stage}", "CREATE TABLE {stage}.made (x int)"])
def test_a_set_or_ddl_alone_in_a_batch_runs(
    make_proxy: Callable[..., RunningProxy], two_schemas: tuple[str, str, str, str], statement: str
) -> None:
    """What drivers send for every statement: Parse, Bind, Execute, Sync in one write."""
    home, stage, user, password = two_schemas
    spec_policy = _path_policy(home, stage)
    proxy = make_proxy(policy=spec_policy, upstream={"user": user, "password": password})
    if statement.startswith("CREATE"):
        proxy.policy = _engine(
            {
                "default": "block",
                "rules": [{"name": "all", "verdict": "allow", "statements": ["select", "ddl"]}],
                "guardrails": {"allowedSettings": {"search_path": [stage, home]}},
            }
        )
    client, _ = _raw_login(proxy, {})
    try:
        sql = statement.format(stage=stage)
        client.send(
            messages.parse("", sql) + messages.bind("", "") + messages.execute("") + messages.SYNC_MESSAGE
        )
        reply = client.read_until(b"Z")
        assert not any(m.type == messages.ERROR_RESPONSE for m in reply), _fields_of(reply)
        assert [chr(m.type) for m in reply] == ["1", "2", "C", "Z"]
    finally:
        client.close()


def _fields_of(reply: list[framing.Message]) -> list[dict[str, str]]:
    return [messages.decode_fields(m.data) for m in reply if m.type == messages.ERROR_RESPONSE]


# --- maxRowsAffected and the audit, by what the server did ---------------------------------


@pytest.fixture
def guarded(make_proxy: Callable[..., RunningProxy], arena: str, pg_server: pg.PgServer) -> RunningProxy:
    """The arena's victim with ten rows, writes held to maxRowsAffected 3."""
    pg_server.psql(
        f"ALTER TABLE {arena}.victim ADD COLUMN v int NOT NULL DEFAULT 0;"
        f"INSERT INTO {arena}.victim (id) SELECT generate_series(1, 10);",
        dbname="shop",
    )
    return make_proxy(
        policy=_engine(
            {
                "default": "block",
                "rules": [
                    {
                        "name": "w",
                        "verdict": "allow",
                        "statements": ["select", "update"],
                        "tables": [f"{arena}.victim"],
                    }
                ],
                "guardrails": {"maxRowsAffected": 3},
            }
        )
    )


def _bumped(server: pg.PgServer, arena: str) -> int:
    return int(server.psql(f"SELECT sum(v) FROM {arena}.victim", dbname="shop").strip())


def test_a_guarded_write_cannot_commit_itself(
    guarded: RunningProxy, arena: str, pg_server: pg.PgServer
) -> None:
    client, _ = _raw_login(guarded, {})
    try:
        reply = _answers(client, f"UPDATE {arena}.victim SET v = v + 1 WHERE id > 0; COMMIT".encode())
        assert b"maxRowsAffected" in reply
    finally:
        client.close()
    assert _bumped(pg_server, arena) == 0


def test_a_write_right_after_a_failed_blocks_rollback_is_guarded(
    guarded: RunningProxy, arena: str, pg_server: pg.PgServer
) -> None:
    client, _ = _raw_login(guarded, {})
    try:
        _answers(client, b"BEGIN")
        _answers(client, b"SELECT 1/0")  # the block is failed: the proxy knows it
        reply = _run_all(client, "ROLLBACK", f"UPDATE {arena}.victim SET v = v + 1 WHERE id > 0")
        assert b"more than maxRowsAffected" in reply
    finally:
        client.close()
    assert _bumped(pg_server, arena) == 0


def test_an_sql_prepared_write_run_by_a_protocol_bind_is_guarded_and_audited(
    guarded: RunningProxy, arena: str, pg_server: pg.PgServer
) -> None:
    client, _ = _raw_login(guarded, {})
    try:
        _answers(client, f"PREPARE p AS UPDATE {arena}.victim SET v = v + 1 WHERE id > 0".encode())
        client.send(messages.bind("", "p") + messages.execute("") + messages.SYNC_MESSAGE)
        reply = client.read_until(b"Z")
        assert any("maxRowsAffected" in f["M"] for f in _fields_of(reply)), _fields_of(reply)
    finally:
        client.close()
    assert _bumped(pg_server, arena) == 0
    audited = [e for e in guarded.events if e.get("statement") == 'EXECUTE "p"']
    assert audited and audited[0]["sqlstate"] == "54000"


def test_a_reparse_the_server_skipped_changes_nothing(
    guarded: RunningProxy, arena: str, pg_server: pg.PgServer
) -> None:
    client, _ = _raw_login(guarded, {})
    sync = messages.SYNC_MESSAGE
    write = f"UPDATE {arena}.victim SET v = v + 1 WHERE id > 0"
    try:
        client.send(messages.parse("", write) + sync)
        assert client.read_until(b"Z")[0].type == messages.PARSE_COMPLETE
        # an error first: the server skips the rest of the batch, this Parse included
        client.send(messages.bind("", "no_such_statement") + messages.parse("", "SELECT 'harmless'") + sync)
        assert _fields_of(client.read_until(b"Z"))  # (refused by the proxy: no such statement)
        client.send(messages.bind("", "") + messages.execute("") + sync)  # runs the UPDATE
        reply = client.read_until(b"Z")
        assert any("maxRowsAffected" in f["M"] for f in _fields_of(reply)), _fields_of(reply)
    finally:
        client.close()
    assert _bumped(pg_server, arena) == 0
    statements = [e.get("statement") for e in guarded.events if e.get("sqlstate") == "54000"]
    assert statements == [write]


def test_a_cursor_read_by_protocol_execute_is_judged_and_audited(guarded: RunningProxy, arena: str) -> None:
    client, _ = _raw_login(guarded, {})
    try:
        _answers(client, b"BEGIN")
        _answers(client, f"DECLARE c CURSOR FOR SELECT id FROM {arena}.victim".encode())
        client.send(messages.execute("c", 4) + messages.SYNC_MESSAGE)
        reply = client.read_until(b"Z")
        assert [chr(m.type) for m in reply] == ["D"] * 4 + ["s", "Z"]
        client.send(messages.execute("nope") + messages.SYNC_MESSAGE)  # no such cursor: refused
        assert "never DECLAREd" in _fields_of(client.read_until(b"Z"))[0]["M"]
        _answers(client, b"ROLLBACK")
    finally:
        client.close()
    fetched = [e for e in guarded.events if e.get("statement") == 'FETCH FORWARD ALL FROM "c"']
    assert fetched and fetched[0]["decision"] == "allow" and fetched[0]["rows_returned"] == 4


def test_a_query_inside_an_extended_batch_is_answered_and_audited_as_itself(
    guarded: RunningProxy, arena: str
) -> None:
    """asyncpg sends Parse, Describe, Flush and then a Query; after a failed batch the server
    would drop such a Query unanswered. The proxy ends the batch with a Sync of its own first,
    so each statement gets its own answer and audit line."""
    client, _ = _raw_login(guarded, {})
    try:
        client.send(
            messages.parse("", "SELECT 1/0")
            + messages.bind("", "")
            + messages.execute("")
            + messages.query("SELECT 2 AS two")
        )
        reply = client.read_until(b"Z")
        assert [chr(m.type) for m in reply] == ["1", "E", "T", "D", "C", "Z"]  # (1/0 fails at Bind)
        client.send(messages.SYNC_MESSAGE)  # the client's own Sync still gets its ReadyForQuery
        assert [chr(m.type) for m in client.read_until(b"Z")] == ["Z"]
        assert _answers(client, b"SELECT 3").endswith(messages.ready_for_query("I"))
    finally:
        client.close()
    by_text = {e.get("statement"): e for e in guarded.events if e.get("type") != "session_start"}
    assert by_text["SELECT 1/0"]["sqlstate"] == "22012"
    assert by_text["SELECT 2 AS two"]["sqlstate"] is None and by_text["SELECT 2 AS two"]["rows_returned"] == 1
    assert by_text["SELECT 3"]["rows_returned"] == 1


def test_statements_flushed_without_sync_are_audited_with_their_rows(
    guarded: RunningProxy, arena: str
) -> None:
    client, _ = _raw_login(guarded, {})
    try:
        client.send(
            messages.parse("", f"SELECT id FROM {arena}.victim WHERE id <= 2")
            + messages.bind("", "")
            + messages.execute("")
            + messages.FLUSH_MESSAGE
        )
        reply = client.read_until(b"C")
        assert [chr(m.type) for m in reply] == ["1", "2", "D", "D", "C"]
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while not any(e.get("type") == "session_end" for e in guarded.events) and time.monotonic() < deadline:
        time.sleep(0.05)
    (event,) = [e for e in guarded.events if str(e.get("statement", "")).startswith("SELECT id FROM")]
    # its rows were sent; its implicit transaction never committed: the outcome is the connection's
    assert event["sqlstate"] == "08006" and event["rows_returned"] == 2


def test_nothing_interleaves_with_the_search_path_probe(
    path_proxy: RunningProxy, two_schemas: tuple[str, str, str, str]
) -> None:
    """A bare Sync, a Describe or a Close pipelined behind a SET waits for the probe like a
    statement does: the proxy's count of answers stays the server's."""
    _, stage, _, _ = two_schemas
    client, _ = _raw_login(path_proxy, {})
    try:
        client.send(
            messages.query(f"SET search_path = {stage}")
            + messages.SYNC_MESSAGE
            + messages.close("S", "nothing")
            + messages.SYNC_MESSAGE
            + messages.query("SELECT email || '' AS e FROM customers")
        )
        kinds: list[str] = []
        data = b""
        for _ in range(4):
            reply = client.read_until(b"Z")
            kinds += [chr(m.type) for m in reply]
            data += b"".join(m.data for m in reply)
        assert kinds == ["C", "Z", "Z", "3", "Z", "T", "D", "C", "Z"], kinds
        assert b"staged@example.com" in data
        assert _answers(client, b"SELECT 1").endswith(messages.ready_for_query("I"))
    finally:
        client.close()


def test_a_query_after_a_refusal_in_an_open_batch_is_answered(guarded: RunningProxy, arena: str) -> None:
    client, _ = _raw_login(guarded, {})
    try:
        client.send(
            messages.parse("", f"DROP TABLE {arena}.victim")
            + messages.FLUSH_MESSAGE
            + messages.query("SELECT 7")
        )
        reply = client.read_until(b"Z")
        assert [chr(m.type) for m in reply] == ["E", "T", "D", "C", "Z"], reply
        assert "refused" in _fields_of(reply)[0]["M"]
    finally:
        client.close()
    assert [e["statement"] for e in guarded.events if e.get("statement") == "SELECT 7"] == ["SELECT 7"]


def test_each_statement_of_a_batch_with_a_refusal_keeps_its_own_rows(
    guarded: RunningProxy, arena: str
) -> None:
    client, _ = _raw_login(guarded, {})
    one, two = f"SELECT id FROM {arena}.victim WHERE id <= 2", f"SELECT id FROM {arena}.victim WHERE id = 5"
    try:
        client.send(
            messages.parse("", one)
            + messages.bind("", "")
            + messages.execute("")
            + messages.parse("", two)
            + messages.bind("", "")
            + messages.execute("")
            + messages.parse("", f"DROP TABLE {arena}.victim")
            + messages.SYNC_MESSAGE
        )
        reply = client.read_until(b"Z")
        assert [chr(m.type) for m in reply].count("D") == 3
    finally:
        client.close()
    rows = {e["statement"]: e["rows_returned"] for e in guarded.events if e.get("statement") in (one, two)}
    assert rows == {one: 2, two: 1}


@pytest.mark.parametrize("drop", ["DEALLOCATE s", "DISCARD ALL", "DEALLOCATE ALL"])
def test_sql_can_not_swap_what_a_protocol_statement_name_runs(
    guarded: RunningProxy, arena: str, pg_server: pg.PgServer, drop: str
) -> None:
    """SQL PREPARE and DEALLOCATE share the protocol's statement names."""
    client, _ = _raw_login(guarded, {})
    try:
        client.send(messages.parse("s", "SELECT 1") + messages.SYNC_MESSAGE)
        client.read_until(b"Z")
        _answers(client, drop.encode())
        _answers(client, f"PREPARE s AS UPDATE {arena}.victim SET v = v + 1 WHERE id > 0".encode())
        client.send(messages.bind("", "s") + messages.execute("") + messages.SYNC_MESSAGE)
        reply = client.read_until(b"Z")
        assert any("maxRowsAffected" in f["M"] for f in _fields_of(reply)), _fields_of(reply)
    finally:
        client.close()
    assert _bumped(pg_server, arena) == 0
    assert not [e for e in guarded.events if e.get("statement") == "SELECT 1" and e.get("rows_affected")]


def test_a_guarded_write_cannot_be_executed_in_part(
    guarded: RunningProxy, arena: str, pg_server: pg.PgServer
) -> None:
    """An Execute with a row count suspends a RETURNING write after every row has changed."""
    client, _ = _raw_login(guarded, {})
    try:
        client.send(
            messages.parse("", f"UPDATE {arena}.victim SET v = v + 1 WHERE id > 0 RETURNING id")
            + messages.bind("", "")
            + messages.execute("", 1)
            + messages.SYNC_MESSAGE
        )
        reply = client.read_until(b"Z")
        assert any("executed whole" in f["M"] for f in _fields_of(reply)), _fields_of(reply)
    finally:
        client.close()
    assert _bumped(pg_server, arena) == 0


def test_a_portal_is_audited_as_the_statement_it_was_bound_to(guarded: RunningProxy, arena: str) -> None:
    write = f"UPDATE {arena}.victim SET v = v + 1 WHERE id < 3"
    client, _ = _raw_login(guarded, {})
    try:
        _answers(client, b"BEGIN")
        client.send(
            messages.parse("s", write)
            + messages.bind("p", "s")
            + messages.close("S", "s")
            + messages.parse("s", "SELECT 42")
            + messages.execute("p")
            + messages.SYNC_MESSAGE
        )
        client.read_until(b"Z")
        _answers(client, b"ROLLBACK")
    finally:
        client.close()
    by_text = {e.get("statement"): e for e in guarded.events}
    assert by_text[write]["rows_affected"] == 2
    assert not by_text.get("SELECT 42", {}).get("rows_affected")
