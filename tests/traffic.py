"""The client-traffic corpus: SQL that real drivers and ORMs send, captured by the tests.

The client tests (psql, psycopg, asyncpg, pgbench, node-postgres, pgx, pgjdbc, Hibernate,
Alembic, Django) run real programs against real PostgreSQL through the proxy. With
``DBGOV_CAPTURE_TRAFFIC=<dir>`` every statement those proxies audit is appended to
``<dir>/<test module>.jsonl``; refreshing the corpus keeps the client modules' statements:

    rm -rf /tmp/traffic && DBGOV_CAPTURE_TRAFFIC=/tmp/traffic .venv/bin/python -m pytest \\
        tests/integration/test_proxy_clients.py tests/integration/test_proxy_node_go_clients.py ...
    .venv/bin/python tests/traffic.py /tmp/traffic

tests/unit/policy/test_client_traffic.py judges every statement of the corpus under a
``default: allow`` policy: none may be refused but by a hard guardrail that the test names.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

CORPUS = Path(__file__).resolve().parent / "data" / "client_traffic.jsonl"
CLIENT_MODULES = (
    "test_proxy_clients",
    "test_proxy_node_go_clients",
    "test_proxy_java_clients",
    "test_proxy_migrations",
    "test_proxy_copy_clients",
    "test_proxy_driver_sql",
)
"""Test modules whose traffic is a real client's own (others send attacks on purpose)."""


def capture(events: Iterable[Mapping[str, Any]], *, into: str) -> None:
    """Append the statements among audit events to the current test module's capture file."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "unknown::")
    module = Path(current.split("::", 1)[0]).stem
    lines = [
        json.dumps({"source": module, "sql": e["statement"]}) + "\n"
        for e in events
        if e.get("type") == "statement" and isinstance(e.get("statement"), str)
    ]
    if lines:
        Path(into).mkdir(parents=True, exist_ok=True)
        with open(Path(into) / f"{module}.jsonl", "a", encoding="utf-8") as out:
            out.writelines(lines)


def load(path: Path = CORPUS) -> list[dict[str, str]]:
    """The corpus: one {source, sql} per distinct statement."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _parses(sql: str) -> bool:
    """Whether PostgreSQL's grammar accepts the text (tests also send garbage on purpose)."""
    from pglast import parser

    try:
        parser.parse_sql_json(sql)
    except parser.ParseError:
        return False
    return True


def refresh(captured: Path, *, corpus: Path = CORPUS) -> int:
    """Merge the captured client modules' statements that PostgreSQL parses into the corpus
    (sorted, distinct)."""
    seen = {(item["source"], item["sql"]) for item in load(corpus)} if corpus.exists() else set()
    for module in CLIENT_MODULES:
        path = captured / f"{module}.jsonl"
        if path.exists():
            seen.update((item["source"], item["sql"]) for item in load(path) if _parses(item["sql"]))
    corpus.write_text(
        "".join(json.dumps({"source": s, "sql": q}, ensure_ascii=False) + "\n" for s, q in sorted(seen)),
        encoding="utf-8",
    )
    return len(seen)


if __name__ == "__main__":
    print(f"{refresh(Path(sys.argv[1]))} statements in {CORPUS}")
