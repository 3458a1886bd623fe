"""Shared fixtures: a real PostgreSQL per test session (per xdist worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pg


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pg.PgServer]:
    """A PostgreSQL 16 on 127.0.0.1 with the shop schema, stopped by PID at the end."""
    with pg.running_server() as server:
        yield server
