"""`dbgov demo` / `make demo`: an AI agent's session through the dbgov proxy, then its audit trail.

The demo starts an embedded PostgreSQL 16 (from the pgserver wheel) holding the `shop` schema
with fake PII, starts `dbgov proxy` in front of it with examples/policy.yaml, and plays an
agent that reads, gets masked data back, tries a DROP, an unbounded DELETE, a mass delete the
row limit rolls back, a change that needs a human's approval and a privilege escalation. Then
it prints the audit trail the proxy wrote (and checks its hash chains), and stops everything
it started. `--offline` only explains the decisions, with no database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from dbgov_policy import engine
from dbgov_sidecar import audit, check_cli, policyfile

if TYPE_CHECKING:  # the embedded PostgreSQL needs pgserver, a dev extra the image does not install
    from dbgov_sidecar import embedded_pg

EXAMPLE_POLICY = pathlib.Path(__file__).with_name("demo_policy.yaml")
"""The example policy (examples/policy.yaml in the repository links to it), shipped in the package
so `dbgov demo` works wherever dbgov is installed."""

AGENT_SESSION: tuple[tuple[str, str], ...] = (
    ("an allowed read", "SELECT id, name, price_cents FROM shop.products ORDER BY id"),
    (
        "PII comes back masked",
        "SELECT id, name, email, ssn, card_number FROM shop.customers ORDER BY id LIMIT 3",
    ),
    (
        "masking survives aliases and whole-row references",
        "SELECT row_to_json(c) FROM shop.customers AS c WHERE id = 1",
    ),
    (
        "a predicate on a masked column only ever sees masked values",
        "SELECT count(*) FROM shop.customers WHERE ssn LIKE '9%'",
    ),
    ("a DROP is refused", "DROP TABLE shop.orders"),
    ("an unbounded DELETE is refused", "DELETE FROM shop.orders WHERE 1 = 1"),
    (
        "a DELETE over maxRowsAffected is rolled back",
        "DELETE FROM shop.orders WHERE quantity > 0",
    ),
    ("a bounded DELETE is fine", "DELETE FROM shop.orders WHERE id = 17"),
    (
        "changing customer data needs a human",
        "UPDATE shop.customers SET name = 'Ann Lee' WHERE id = 42",
    ),
    (
        "a column the agent only sees masked cannot be overwritten blind",
        "UPDATE shop.customers SET email = 'new@example.com' WHERE id = 42",
    ),
    ("no privilege games", "SET ROLE postgres"),
    ("no reading server files", "SELECT pg_read_file('/etc/passwd')"),
    (
        "a statement hidden in a CTE is judged as itself",
        "WITH gone AS (DELETE FROM shop.orders RETURNING *) SELECT count(*) FROM gone",
    ),
    ("the session is still fine", "SELECT count(*) FROM shop.orders"),
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "demo", help="run an AI agent's session through the proxy and print its audit trail"
    )
    _options(p)
    p.set_defaults(func=run)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--policy", default=str(EXAMPLE_POLICY), help="policy file (default: examples/policy.yaml)"
    )
    p.add_argument(
        "--offline", action="store_true", help="only explain the decisions; start no database or proxy"
    )


def run(args: argparse.Namespace) -> int:
    if args.offline:
        return _offline(args.policy)
    return _live(args.policy)


def _offline(policy_path: str) -> int:
    policy = policyfile.load_policy_file(policy_path, mask_key="demo-key")
    eng = engine.Engine(policy)
    session = engine.SessionContext()
    print(f"dbgov demo (offline): an AI agent's session judged by {policy_path}\n")
    for title, sql in AGENT_SESSION:
        print(f"# {title}")
        print(check_cli.explain(sql, eng.decide(sql, session=session), abbreviate=True), end="")
    return 0


def _live(policy_path: str) -> int:
    try:  # only the live demo needs a client and an embedded server: both are dev extras
        import psycopg  # noqa: PLC0415

        from dbgov_sidecar import embedded_pg  # noqa: PLC0415
    except ModuleNotFoundError as err:
        print(
            f"dbgov demo: the live demo needs {err.name}, from the dev extra "
            "(pip install 'dbgov[dev]'); `dbgov demo --offline` needs nothing more",
            file=sys.stderr,
        )
        return 2

    with tempfile.TemporaryDirectory(prefix="dbgov-demo-") as tmp:
        work = pathlib.Path(tmp)
        print("dbgov demo: starting an embedded PostgreSQL 16 with the shop schema (fake PII) ...")
        with embedded_pg.running_server() as pg:
            audit_path = work / "audit.jsonl"
            with _proxy(
                pg, policy_path=policy_path, audit_path=audit_path, log_path=work / "proxy.log"
            ) as dsn:
                print(f"dbgov demo: dbgov proxy on {' '.join(dsn.split()[:2])} enforcing {policy_path}\n")
                with psycopg.connect(dsn, autocommit=True, application_name="demo-agent") as conn:
                    for title, sql in AGENT_SESSION:
                        _step(conn, title, sql)
            print("\n== audit trail (one event per statement, hash-chained per session) ==")
            _print_audit(audit_path)
            print(f"\nfirst statement event, as written:\n{_first_statement(audit_path)}")
    print("\ndbgov demo: stopped the proxy and PostgreSQL.")
    return 0


@contextlib.contextmanager
def _proxy(
    pg: embedded_pg.PgServer, *, policy_path: str, audit_path: pathlib.Path, log_path: pathlib.Path
) -> Iterator[str]:
    from dbgov_sidecar import embedded_pg  # noqa: PLC0415 - _live has checked it imports

    port, metrics_port = embedded_pg.free_port(), embedded_pg.free_port()
    env = {
        "DBGOV_LISTEN": f"127.0.0.1:{port}",
        "DBGOV_UPSTREAM": f"postgresql://app@{pg.host}:{pg.port}/shop?sslmode=disable",
        "DBGOV_UPSTREAM_PASSWORD": embedded_pg.APP_PASSWORD,
        "DBGOV_POLICY": policy_path,
        "DBGOV_AUDIT": str(audit_path),
        "DBGOV_METRICS": f"127.0.0.1:{metrics_port}",
        "PATH": "/usr/bin:/bin",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dbgov_sidecar.proxy_cli"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_listening(port, proc, log_path)
        yield f"host=127.0.0.1 port={port} dbname=shop user=app sslmode=disable"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_listening(port: int, proc: subprocess.Popen[bytes], log_path: pathlib.Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dbgov proxy exited ({proc.returncode}):\n{log_path.read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"dbgov proxy did not start listening:\n{log_path.read_text()}")


def _step(conn: Any, title: str, sql: str) -> None:
    import psycopg  # noqa: PLC0415

    print(f"# {title}\nagent> {sql}")
    try:
        cur = conn.execute(sql)
    except psycopg.Error as err:
        diag = err.diag
        print(f"  ERROR {diag.sqlstate}: {diag.message_primary}")
        if diag.message_hint:
            print(f"  HINT: {diag.message_hint}")
    else:
        if cur.description is not None:
            rows = cur.fetchall()
            for row in rows[:3]:
                print("  " + " | ".join(_short(v) for v in row))
            if len(rows) > 3:
                print(f"  ... {len(rows)} rows")
        else:
            print(f"  {cur.statusmessage}")
    print()


def _short(value: object) -> str:
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _print_audit(path: pathlib.Path) -> None:
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    sessions: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        sessions.setdefault(str(event.get("session_id")), []).append(event)
        if event.get("type") != "statement":
            print(
                f"  {event.get('type'):<13} session {str(event.get('session_id'))[:8]} user={event.get('user')}"
            )
            continue
        rows = event.get("rows_affected") or event.get("rows_returned") or 0
        notes = [f"masked {len(event['masked_columns'])} columns"] if event.get("masked_columns") else []
        if event.get("sqlstate"):
            notes.append(f"SQLSTATE {event['sqlstate']}")
        print(
            f"  {event.get('enforced', event.get('decision')):<8} {event.get('rule')!s:<32} "
            f"rows={rows!s:<4} {str(event.get('statement'))[:58]:<58} {'; '.join(notes)}"
        )
    chains = ", ".join(
        f"{sid[:8]}: {'intact' if audit.verify(evs) else 'BROKEN'}" for sid, evs in sessions.items()
    )
    print(f"  hash chains: {chains} ({len(events)} events)")


def _first_statement(path: pathlib.Path) -> str:
    for line in path.read_text().splitlines():
        if '"type":"statement"' in line:
            return json.dumps(json.loads(line), indent=2, sort_keys=True)
    return "(none)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbgov demo", description=__doc__)
    _options(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
