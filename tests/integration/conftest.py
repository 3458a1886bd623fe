"""Run the proxy for integration tests: its own uvloop in a thread, real PostgreSQL behind it.

Clients (psql, psycopg, pgbench, asyncpg in its own loop) talk to it over TCP exactly as they
would to PostgreSQL. After every test the proxy must be back to no connections and no tasks:
a leaked session or task fails the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop

import pg
import traffic
from dbgov_sidecar import audit, metrics, policy_port, proxy, session

CAPTURE_TRAFFIC = os.environ.get("DBGOV_CAPTURE_TRAFFIC", "")
"""A directory: every statement a client sends through a test proxy is appended there (see
tests/traffic.py, which refreshes the client-traffic corpus from it)."""


class RulesPolicy:
    """A tiny stand-in for the policy engine, enough to drive every verdict through the wire."""

    mode = "enforce"

    def __init__(self, *, max_rows_returned: int | None = None, mode: str = "enforce") -> None:
        self.max_rows_returned = max_rows_returned
        self.mode = mode
        self.decided: list[str] = []

    def new_context(
        self, *, search_path: tuple[str, ...] | None = None, columns: object = None, **_: object
    ) -> object:
        return None

    def decide(self, sql: str, context: object) -> policy_port.Decision:
        self.decided.append(sql)
        text = sql.strip().lower()
        if "garbage" in text:
            return policy_port.SimpleDecision(
                verdict="block",
                rule=None,
                reason="the statement cannot be parsed",
                sqlstate="42601",
                hint="Fix the SQL syntax.",
            )
        if re.match(r"drop\b", text):
            return policy_port.SimpleDecision(
                verdict="block",
                rule="no-drop",
                reason="DROP is not allowed",
                hint="Ask a DBA to run schema changes.",
                sqlstate="42501",
            )
        if re.match(r"delete\b", text) and " where " not in text:
            return policy_port.SimpleDecision(
                verdict="block",
                rule="no-unbounded-delete",
                reason="DELETE needs a WHERE clause",
                sqlstate="42501",
            )
        if re.match(r"truncate\b", text):
            return policy_port.SimpleDecision(
                verdict="approve",
                rule="truncate-needs-approval",
                reason="TRUNCATE is held",
                sqlstate="42501",
            )
        if re.search(r"\bssn\b", text) and "shop.customers" in text:
            rewritten = re.sub(r"\bssn\b", "'***-**-' || right(ssn, 4) AS ssn", sql, count=1)
            return policy_port.SimpleDecision(
                verdict="mask",
                rule="mask-ssn",
                reason="ssn is masked",
                rewritten=rewritten,
                masked_columns=("shop.customers.ssn",),
            )
        return policy_port.SimpleDecision(verdict="allow", rule="allow-rest", reason="allowed")


class RunningProxy:
    """A Proxy serving on its own event loop thread, auditing as `dbgov proxy` does (a sealed,
    hash-chained log and metrics, which the compiled lane writes into too); ``events`` reads the
    lines back."""

    def __init__(self, config: proxy.ProxyConfig, policy: Any) -> None:
        self.policy = policy
        self._events: list[dict[str, Any]] = []
        self.log = audit.AuditLog(self._sink)
        self.counters = metrics.Metrics()
        self.loop = uvloop.new_event_loop()
        self.proxy = proxy.Proxy(
            config, policy=lambda: self.policy, audit=proxy.Recorder(self.log, self.counters)
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.proxy.start())
        self.port = self.proxy.port

    def _sink(self, text: str) -> bool:
        events = [json.loads(line) for line in text.splitlines()]
        self._events.extend(events)
        if CAPTURE_TRAFFIC:
            traffic.capture(events, into=CAPTURE_TRAFFIC)
        return True

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every audit event so far (what waits in the log's buffer is flushed first)."""
        if self.loop.is_running():

            async def flush() -> None:
                self.log.flush()

            self.call(flush())
        return self._events

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def dsn(self, *, user: str = "app", dbname: str = "shop", extra: str = "") -> str:
        return f"host=127.0.0.1 port={self.port} user={user} dbname={dbname} sslmode=disable {extra}"

    def url(self, *, user: str = "app", dbname: str = "shop") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def leftovers(self) -> tuple[int, int, int]:
        async def count() -> tuple[int, int, int]:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            return len(self.proxy.connections), len(self.proxy.tasks), len(others)

        result: tuple[int, int, int] = self.call(count())
        return result

    def assert_clean(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (left := self.leftovers()) != (0, 0, 0):
            if time.monotonic() > deadline:
                raise AssertionError(f"proxy leaked connections/proxy tasks/loop tasks: {left}")
            time.sleep(0.05)

    def close(self) -> None:
        self.call(self.proxy.stop(drain_timeout=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def upstream_config(server: pg.PgServer, **overrides: Any) -> proxy.UpstreamConfig:
    fields: dict[str, Any] = {
        "host": server.host,
        "port": server.port,
        "user": "app",
        "password": pg.APP_PASSWORD,
        "sslmode": "disable",
    }
    fields.update(overrides)
    return proxy.UpstreamConfig(**fields)


@pytest.fixture(scope="session")
def shared_proxy(pg_server: pg.PgServer) -> Iterator[RunningProxy]:
    """The proxy most tests use: upstream SCRAM as `app`, the RulesPolicy stand-in."""
    config = proxy.ProxyConfig(listen_port=0, upstream=upstream_config(pg_server))
    running = RunningProxy(config, RulesPolicy())
    yield running
    running.close()


@pytest.fixture
def dbgov(shared_proxy: RunningProxy) -> Iterator[RunningProxy]:
    """The shared proxy, reset to the default policy and checked for leaks afterwards."""
    shared_proxy.policy = RulesPolicy()
    shared_proxy.events.clear()
    yield shared_proxy
    shared_proxy.assert_clean()


@pytest.fixture
def make_proxy(pg_server: pg.PgServer) -> Iterator[Callable[..., RunningProxy]]:
    """Start extra proxies with their own config; each is leak-checked and stopped."""
    started: list[RunningProxy] = []

    def make(
        *,
        policy: Any = None,
        upstream: dict[str, Any] | None = None,
        session_config: session.SessionConfig | None = None,
        **config: Any,
    ) -> RunningProxy:
        cfg = proxy.ProxyConfig(
            listen_port=0,
            upstream=upstream_config(pg_server, **(upstream or {})),
            session=session_config or session.SessionConfig(),
            **config,
        )
        running = RunningProxy(cfg, policy or RulesPolicy())
        started.append(running)
        return running

    yield make
    try:
        for running in started:
            running.assert_clean()
    finally:
        for running in started:
            running.close()
