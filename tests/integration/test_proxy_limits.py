"""maxRowsAffected with the real engine: big writes are rolled back and refused, small ones kept."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from test_proxy_protocol import RawClient, _fields

import pg
from conftest import RunningProxy
from dbgov_sidecar import policies
from dbgov_sidecar.pgwire import messages

pytestmark = pytest.mark.integration

POLICY = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"  # maxRowsAffected: 100


def _psql(dsn: str, script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(pg.BIN / "psql"), "-X", "-At", dsn], input=script, capture_output=True, text=True, check=False
    )


def _total(server: pg.PgServer) -> int:
    return int(server.psql("SELECT sum(quantity) FROM shop.orders;").strip())


def test_max_rows_affected(make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer) -> None:
    running = make_proxy(policy=policies.load(str(POLICY)))
    dsn = running.dsn()
    before = _total(pg_server)

    big = _psql(dsn, "UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= 150;\nSELECT 'after';\n")
    assert "changed 150 rows, more than maxRowsAffected (100)" in big.stderr
    assert "after" in big.stdout  # the session goes on
    assert _total(pg_server) == before  # rolled back

    small = _psql(dsn, "UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= 10;\n")
    assert small.returncode == 0 and "UPDATE 10" not in small.stderr
    assert _total(pg_server) == before + 10

    # Inside a transaction block: the small write stays, the big one aborts the block.
    block = _psql(
        dsn,
        "BEGIN;\nUPDATE shop.orders SET quantity = quantity + 1 WHERE id <= 5;\n"
        "UPDATE shop.orders SET quantity = quantity + 1 WHERE id > 20;\n"
        "SELECT 'inside';\nCOMMIT;\n",
    )
    assert "more than maxRowsAffected" in block.stderr
    assert "current transaction is aborted" in block.stderr
    assert "ROLLBACK" in block.stdout
    assert _total(pg_server) == before + 10

    kept = _psql(dsn, "BEGIN;\nUPDATE shop.orders SET quantity = quantity - 1 WHERE id <= 10;\nCOMMIT;\n")
    assert kept.returncode == 0, kept.stderr
    assert _total(pg_server) == before
    events = [e for e in running.events if e.get("sqlstate") == "54000"]
    assert len(events) == 2 and events[0]["rows_affected"] == 150


def test_max_rows_affected_extended_protocol(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer
) -> None:
    running = make_proxy(policy=policies.load(str(POLICY)))
    before = _total(pg_server)
    update = "UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= %s"
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="changed 150 rows"):
            conn.execute(update, [150])
        assert _total(pg_server) == before
        assert conn.execute(update, [10]).rowcount == 10
        assert _total(pg_server) == before + 10
        with pytest.raises(psycopg.errors.ProgramLimitExceeded), conn.pipeline():
            conn.execute(update, [5])
            conn.execute(update, [120])  # same implicit transaction: both roll back
            conn.execute("SELECT 1")
        assert _total(pg_server) == before + 10
        for _ in range(3):  # prepared server-side, executed by name
            assert conn.execute(update, [1], prepare=True).rowcount == 1
        assert _total(pg_server) == before + 13
    with psycopg.connect(running.dsn()) as conn:  # inside a transaction block
        conn.execute(update, [5])
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute(update, [200])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert _total(pg_server) == before + 13
        conn.execute(update, [5])
        conn.commit()
    assert _total(pg_server) == before + 18


def test_max_rows_affected_sees_writes_that_no_tag_counts(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer
) -> None:
    running = make_proxy(policy=policies.load(str(POLICY)))
    before = _total(pg_server)
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        # "SELECT 1" would be all the server reports for 150 changed rows: refused before it runs.
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="cannot be counted"):
            conn.execute(
                "WITH d AS (UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= 150 RETURNING id) "
                "SELECT count(*) FROM d"
            )
        assert _total(pg_server) == before
        # EXECUTE reports the prepared statement's own tag: held to the limit like the statement.
        conn.execute("PREPARE bump(int) AS UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= $1")
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="changed 150 rows"):
            conn.execute("EXECUTE bump(150)")
        assert _total(pg_server) == before
        conn.execute("EXECUTE bump(3)")
        assert _total(pg_server) == before + 3
        # Rows a read returns are not rows changed: a guarded string may read more than the limit.
        reads = conn.execute(
            "SELECT id FROM shop.orders WHERE id <= 150; UPDATE shop.orders SET quantity = quantity - 1 "
            "WHERE id <= 3"
        )
        assert len(reads.fetchall()) == 150
        assert reads.nextset() and reads.rowcount == 3
    assert _total(pg_server) == before


COPY_POLICY = """\
mode: enforce
default: block
rules:
  - {name: load-orders, verdict: allow, statements: [select, copy], tables: [shop.orders]}
guardrails:
  maxRowsAffected: 100
"""


@pytest.fixture
def copying(make_proxy: Callable[..., RunningProxy], tmp_path: Path) -> RunningProxy:
    """A proxy whose policy allows COPY into shop.orders under maxRowsAffected 100."""
    policy = tmp_path / "copy.yaml"
    policy.write_text(COPY_POLICY)
    return make_proxy(policy=policies.load(str(policy)))


def test_max_rows_affected_holds_copy_from_stdin(copying: RunningProxy, pg_server: pg.PgServer) -> None:
    """COPY FROM STDIN needs the client's data while the write is held: it must flow, then count."""
    running = copying
    columns = "id, customer_id, product_id, quantity"
    before = int(pg_server.psql("SELECT count(*) FROM shop.orders;").strip())
    rows = [(100_000 + i, 1, 1, 1) for i in range(150)]
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        conn.execute("SET statement_timeout = '20s'")  # a hang fails the test, not the suite
        with conn.cursor().copy(f"COPY shop.orders ({columns}) FROM STDIN") as copy:
            for row in rows[:10]:
                copy.write_row(row)
        assert int(pg_server.psql("SELECT count(*) FROM shop.orders;").strip()) == before + 10
        with (
            pytest.raises(psycopg.errors.ProgramLimitExceeded, match="changed 140 rows"),
            conn.cursor().copy(f"COPY shop.orders ({columns}) FROM STDIN") as copy,
        ):
            for row in rows[10:]:
                copy.write_row(row)
        assert int(pg_server.psql("SELECT count(*) FROM shop.orders;").strip()) == before + 10
        assert conn.execute("SELECT 1").fetchone() == (1,)
    pg_server.psql("DELETE FROM shop.orders WHERE id >= 100000;")


def test_copy_from_stdin_in_the_extended_protocol_fails_cleanly_under_the_limit(
    copying: RunningProxy,
) -> None:
    """Its Sync would commit before the count is known: refused with a reason, never a hang."""
    raw = RawClient(copying.port)
    try:
        raw.login()
        raw.send(
            messages.parse("", "COPY shop.orders (id, customer_id, product_id, quantity) FROM STDIN")
            + messages.bind("", "")
            + messages.execute("", 0)
            + messages.SYNC_MESSAGE
        )
        answer = raw.read_until(b"Z")
        assert messages.COPY_IN_RESPONSE not in [m.type for m in answer]  # never put in copy mode
        assert "extended protocol cannot be held to maxRowsAffected" in _fields(answer)["M"]
        raw.send(messages.query("SELECT 1"))  # the session goes on
        assert [m.type for m in raw.read_until(b"Z")][-3:] == [ord("D"), ord("C"), ord("Z")]
    finally:
        raw.close()


@pytest.mark.parametrize("affected", ["  maxRowsAffected: 100\n", ""])
def test_rows_a_guarded_write_returns_are_held_to_max_rows_returned(
    make_proxy: Callable[..., RunningProxy], pg_server: pg.PgServer, tmp_path: Path, affected: str
) -> None:
    """UPDATE … RETURNING past maxRowsReturned is refused and rolled back, with or without
    maxRowsAffected: the client must never get an error for a change that stayed."""
    policy = tmp_path / "returning.yaml"
    policy.write_text(
        "mode: enforce\ndefault: block\nrules:\n"
        "  - {name: orders, verdict: allow, statements: [select, update], tables: [shop.orders]}\n"
        f"guardrails:\n{affected}  maxRowsReturned: 5\n"
    )
    running = make_proxy(policy=policies.load(str(policy)))
    before = _total(pg_server)
    returning = "UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= %s RETURNING id"
    with psycopg.connect(running.dsn(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="more than 5 rows"):
            conn.execute(returning, [20])
        assert _total(pg_server) == before  # rolled back: the client never saw its whole result
        assert len(conn.execute(returning, [5]).fetchall()) == 5  # at the limit: kept
        assert _total(pg_server) == before + 5
    with psycopg.connect(running.dsn()) as conn:  # inside a block: the block fails, as on an error
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute(returning, [20])
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
    raw = RawClient(running.port)  # simple protocol: not a single row past the limit on the wire
    try:
        raw.login()
        raw.send(messages.query("UPDATE shop.orders SET quantity = quantity - 1 WHERE id <= 5 RETURNING id"))
        assert [m.type for m in raw.read_until(b"Z")].count(ord("D")) == 5
        raw.send(messages.query("UPDATE shop.orders SET quantity = quantity + 1 WHERE id <= 20 RETURNING id"))
        answer = raw.read_until(b"Z")
        assert [m.type for m in answer].count(ord("D")) <= 5
        assert "more than 5 rows" in _fields(answer)["M"]
    finally:
        raw.close()
    assert _total(pg_server) == before
