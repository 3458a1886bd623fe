"""The bounds that keep one client from stalling or exhausting the proxy (issue 14 item 8)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from dbgov_policy import analyze, crosscheck, engine
from dbgov_sidecar import config, policies
from dbgov_sidecar.pgwire import ProtocolViolation, framing, messages

POLICY = Path(__file__).resolve().parents[3] / "examples" / "policy.yaml"


def _engine(**options: int) -> engine.Engine:
    policy = policies.load(str(POLICY), **options)
    eng = getattr(policy, "_engine")  # noqa: B009 - the adapter's engine
    assert isinstance(eng, engine.Engine)
    return eng


def test_a_text_over_the_limit_is_refused_before_any_parsing() -> None:
    eng = _engine(max_statement_size=1000)
    decision = eng.decide("SELECT " + "1," * 600 + "1")
    assert (decision.verdict, decision.sqlstate, decision.rule) == (
        "block",
        "54000",
        "guardrail:max-statement-size",
    )
    assert "1208 bytes, more than the 1000 bytes" in decision.reason
    assert "DBGOV_MAX_STATEMENT_SIZE" in decision.reason
    assert eng.decide("SELECT 1").verdict == "allow"


def test_the_limit_counts_utf8_bytes() -> None:
    eng = _engine(max_statement_size=1000)
    text = "SELECT '" + "é" * 600 + "'"  # 609 characters, 1209 bytes
    assert eng.decide(text).reason.startswith("the statement is 1209 bytes")


def test_long_texts_are_never_normalized() -> None:
    """libpg_query's normalizer is not linear in SELECT targets (a fingerprint of ~8 KB each,
    GROUP BY matched against every target): long texts have no cache key."""
    assert engine.shape_key("SELECT 1, 2") == "SELECT $1, $2"
    with pytest.raises(engine.TooLongToShape):
        engine.shape_key("SELECT " + "1," * engine.SHAPE_MAX_SIZE + "1")
    eng = _engine()
    long = "SELECT " + ",".join(["1"] * 9000)
    assert eng.decide(long).verdict == "allow"
    assert eng.decide(long).verdict == "allow"
    assert eng.stats.hits == 0 and eng.cached_shape(long) is None


def test_sqlglot_is_not_asked_about_long_texts() -> None:
    texts = ["SELECT 1"]
    units = analyze.analyze(texts[0]).units
    # a unit sqlglot disagrees with (it reads SELECT): refused while sqlglot is asked
    wrong = (analyze.Unit(cls=units[0].cls.__class__("insert", "insert")),)
    assert crosscheck.check(texts, wrong) is not None
    assert crosscheck.check(texts, wrong, whole=crosscheck.MAX_SIZE + 1) is None
    # the statement count is libpg_query's own and always checked
    assert crosscheck.check(texts * 2, units, whole=crosscheck.MAX_SIZE + 1) is not None


def test_the_analysis_runs_with_the_collector_paused_and_restores_it() -> None:
    eng = _engine()
    seen: list[bool] = []
    real = analyze.analyze

    def spy(sql: str, *, search_path: tuple[str, ...] = ("public",)) -> analyze.Analysis:
        seen.append(gc.isenabled())
        return real(sql, search_path=search_path)

    analyze.analyze = spy  # type: ignore[assignment]
    try:
        assert eng.decide("SELECT 41 + 1").verdict == "allow"
    finally:
        analyze.analyze = real
    assert seen == [False] and gc.isenabled()


def test_an_oversized_message_is_refused_from_its_length_word() -> None:
    framer = framing.Framer(side="backend", max_message_size=1000)
    framer.feed(b"D" + (5000).to_bytes(4, "big"))  # nothing of the body yet
    with pytest.raises(framing.MessageTooLarge) as err:
        framer.drain()
    assert isinstance(err.value, ProtocolViolation)
    assert err.value.what == "server message 'D' (a row) of 5000 bytes exceeds the limit of 1000"
    client = framing.Framer(side="frontend", max_message_size=100)
    client.feed(messages.query("SELECT " + "1" * 200)[:5])
    with pytest.raises(framing.MessageTooLarge, match="client message 'Q' \\(a query\\)"):
        client.drain()


def test_settings_from_the_environment() -> None:
    settings = config.from_env(
        {
            "DBGOV_MAX_STATEMENT_SIZE": "4194304",
            "DBGOV_MAX_SESSION_BUFFER": "65536",
            "DBGOV_MAX_TOTAL_BUFFER": "1048576",
            "DBGOV_MAX_STARTUP_CONNECTIONS": "7",
        }
    )
    assert settings.max_statement_size == 4 << 20
    cfg = config.proxy_config(settings, salt=b"s" * 16)
    assert (cfg.max_session_buffer, cfg.max_total_buffer, cfg.max_startup_connections) == (65536, 1 << 20, 7)
    defaults = config.Settings()
    assert defaults.max_statement_size == engine.MAX_STATEMENT_SIZE == 1 << 20
    assert defaults.max_startup_connections == 1000
