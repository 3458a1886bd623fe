"""Zero false refusals on real client traffic (issue 10).

tests/data/client_traffic.jsonl holds the statements real drivers and ORMs sent through the
proxy in the client tests (tests/traffic.py says how it is captured and refreshed). Under a
policy whose default is allow, every one of them must be allowed: a refusal there is dbgov
breaking an application. The only exceptions are hard guardrails, each named below with why.
"""

from __future__ import annotations

import pytest

import traffic
from dbgov_policy import compile as policy_compile
from dbgov_policy import engine

CORPUS = traffic.load()
ALLOW = policy_compile.compile_policy({"default": "allow"})
GUARDED: dict[str, str] = {}
"""A statement (exact text) → the guardrail that refuses it under every policy, and why that is
right; empty today: no real client's own traffic trips one."""


def test_the_corpus_covers_every_client_family() -> None:
    sources = {item["source"] for item in CORPUS}
    assert set(traffic.CLIENT_MODULES) <= sources
    assert len(CORPUS) >= 500


@pytest.mark.parametrize("item", CORPUS, ids=lambda item: f"{item['source']}:{item['sql'][:60]}")
def test_client_statement_passes_under_default_allow(item: dict[str, str]) -> None:
    session = engine.SessionContext()
    session.names.writable_at_login = True  # as PostgreSQL starts a session unless told otherwise
    decision = engine.Engine(ALLOW).decide(item["sql"], session=session)
    if item["sql"] in GUARDED:
        assert decision.verdict == "block" and decision.rule == GUARDED[item["sql"]]
    else:
        assert decision.verdict == "allow", f"{decision.rule}: {decision.reason}"
